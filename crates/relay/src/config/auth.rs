//! Credentials for outbound calls (EWS, Autodiscover, Microsoft Graph): `--auth` and its
//! companions → [`Auth`]. Shared by managed EWS and managed Graph, which use one identity.

use super::parse::*;
use super::*;

/// The credentials `--auth` names, with their secrets read from files or the environment.
pub(super) fn auth(args: &Args) -> Result<Auth, ConfigError> {
    Ok(match args.auth {
        AuthKind::None => Auth::None,
        AuthKind::Basic => {
            let username = args
                .username
                .clone()
                .ok_or_else(|| ConfigError::new("--username", "required with --auth basic"))?;
            let password = secret(
                "--password-file",
                args.password_file.as_deref(),
                "EWS_RELAY_PASSWORD",
            )?
            .ok_or_else(|| {
                ConfigError::new(
                    "--password-file",
                    "--auth basic needs the password in --password-file or EWS_RELAY_PASSWORD",
                )
            })?;
            Auth::Basic { username, password }
        }
        AuthKind::Oauth => {
            let client_id = args.client_id.clone().ok_or_else(|| {
                ConfigError::new("--client-id", "required with --auth oauth (the default)")
            })?;
            let token_url = match (&args.oauth_token_url, &args.tenant_id) {
                (Some(u), _) => parse_https_url("--oauth-token-url", u, true)?,
                (None, Some(t))
                    if !t.is_empty()
                        && t.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) =>
                {
                    format!("https://login.microsoftonline.com/{t}/oauth2/v2.0/token")
                }
                (None, Some(t)) => {
                    return Err(ConfigError::new(
                        "--tenant-id",
                        format!("'{t}' is not a tenant id or domain"),
                    ))
                }
                (None, None) => {
                    return Err(ConfigError::new(
                        "--tenant-id",
                        "required with --auth oauth (or give --oauth-token-url)",
                    ))
                }
            };
            let secret = secret(
                "--client-secret-file",
                args.client_secret_file.as_deref(),
                "EWS_RELAY_CLIENT_SECRET",
            )?
            .ok_or_else(|| {
                ConfigError::new(
                    "--client-secret-file",
                    "--auth oauth needs the client secret in --client-secret-file or EWS_RELAY_CLIENT_SECRET",
                )
            })?;
            Auth::OAuth {
                token_url,
                client_id,
                secret,
            }
        }
    })
}

/// A secret from a file (first line, trailing newline removed) or, failing that, from an
/// environment variable; never from a flag, which would show in `ps`.
pub(super) fn secret(
    flag: &'static str,
    file: Option<&std::path::Path>,
    env: &str,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(flag, format!("{}: {e}", path.display())))?;
        let value = text.trim_end_matches(['\r', '\n']).to_owned();
        if value.is_empty() {
            return Err(ConfigError::new(flag, format!("{}: empty", path.display())));
        }
        return Ok(Some(Secret::new(value)));
    }
    Ok(std::env::var(env)
        .ok()
        .filter(|v| !v.is_empty())
        .map(Secret::new))
}
