//! `ews-relay`: parse the command line, set up logging, run the relay until SIGTERM/SIGINT.
//!
//! Exit codes (also in `--help` and the README):
//! - 0: clean shutdown after SIGTERM/SIGINT, or `--help`/`--version`;
//! - 1: start-up failed for a reason other than a flag's value: a port is taken or needs
//!   `CAP_NET_BIND_SERVICE`, the state store cannot be opened or is from a newer version, the
//!   async runtime cannot start;
//! - 64 (EX_USAGE): a flag's value is wrong; the message names the flag.
//!
//! Logs go to stdout; a start-up error is printed once, to stderr, as `ews-relay: <message>`.
//! Logging starts before the configuration is validated, so warnings given during validation
//! (e.g. a plain-http `--ews-url`) are logged in the chosen format.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use ews_relay::config::{Args, Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// BSD sysexits EX_USAGE: the command was used incorrectly.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Before validation, which may warn; the guard flushes the log on every return below.
    let _log_guard = init_logging(args.log_format);
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ews-relay: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ews-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Before anything else: a SIGTERM during start-up is then a clean shutdown too, not
        // the default action (killed by the signal).
        let shutdown = termination();
        let listeners = ews_relay::Listeners::bind(&config).await?;
        ews_relay::run(listeners, config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Once, on stderr: the log (stdout) often ends up in the same journal or container log.
        Err(e) => {
            eprintln!("ews-relay: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs go through a background writer so a slow stdout (a full pipe to the container runtime)
/// never blocks request handling; the guard flushes it on exit.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    // rustls warns on every handshake that sends an IP address as SNI (scanners connecting by
    // address): at info that would let anyone flood the log, so rustls logs errors only.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

/// Completes on SIGTERM (container stop) or SIGINT (Ctrl-C). The handlers are installed when
/// this is called (inside the runtime), not when the future is first polled.
fn termination() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut term), Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGINT; only SIGTERM will stop the relay");
                term.recv().await;
            }
            (Err(e), Ok(mut int)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop the relay");
                int.recv().await;
            }
            (Err(e), Err(_)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM or SIGINT; only SIGKILL will stop the relay");
                std::future::pending::<()>().await;
            }
        }
    }
}
