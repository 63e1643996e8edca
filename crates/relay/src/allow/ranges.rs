//! `--refresh-ranges`: keep the `exchange-online` networks current from Microsoft 365's
//! endpoint web service.
//!
//! The service publishes a version; the relay asks for it at most hourly and downloads the list
//! only when it changed (PROTOCOL.md, "Source addresses"). A downloaded list must parse
//! completely and be non-empty, or it is refused: a malformed list never replaces a good one.
//! The last good list is cached in the state directory, so a restart while the service is
//! unreachable uses it; with no cache, the built-in snapshot stays.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

/// Microsoft 365's endpoint web service.
pub const DEFAULT_SERVICE: &str = "https://endpoints.office.com";
/// How often the version is checked against Microsoft's service: its documented ceiling.
pub const MIN_INTERVAL_MICROSOFT: Duration = Duration::from_secs(3600);
/// The cache file in the state directory.
pub const CACHE_FILE: &str = "exchange-online-ranges.json";
/// Largest answer read from the service (the Exchange list is about 10 KiB).
const MAX_ANSWER: usize = 4 << 20;
/// Networks accepted at most from one list, against a runaway answer.
const MAX_NETWORKS: usize = 10_000;

/// A list of Exchange Online networks with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ranges {
    /// The service's version string, e.g. `2026110100`.
    pub version: String,
    /// Where this copy came from: `service`, `cache`.
    #[serde(skip, default = "cache_origin")]
    pub origin: &'static str,
    /// When it was downloaded (unix seconds).
    pub fetched_at: u64,
    /// The networks.
    #[serde(with = "nets")]
    pub networks: Vec<IpNet>,
}

fn cache_origin() -> &'static str {
    "cache"
}

mod nets {
    use ipnet::IpNet;

    pub fn serialize<S: serde::Serializer>(v: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|n| n.to_string()))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        let v: Vec<String> = serde::Deserialize::deserialize(d)?;
        v.iter()
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

impl Ranges {
    /// Seconds since it was downloaded.
    pub fn age(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Duration::from_secs(now.saturating_sub(self.fetched_at))
    }
}

/// Why a refresh did not produce a new list.
#[derive(Debug, thiserror::Error)]
pub enum RangesError {
    /// The service could not be reached or answered with an error status.
    #[error("endpoint service unreachable: {0}")]
    Unreachable(String),
    /// The answer was not the expected JSON, or held no usable network.
    #[error("endpoint service answered an unusable list: {0}")]
    Malformed(String),
}

#[derive(serde::Deserialize)]
struct VersionAnswer {
    latest: String,
}

#[derive(serde::Deserialize)]
struct Endpoint {
    #[serde(rename = "serviceArea", default)]
    service_area: String,
    #[serde(default)]
    ips: Vec<String>,
}

/// Parse the endpoints answer: every `Exchange` entry's `ips`, all of which must parse.
pub fn parse_endpoints(body: &[u8], version: &str) -> Result<Ranges, RangesError> {
    let entries: Vec<Endpoint> =
        serde_json::from_slice(body).map_err(|e| RangesError::Malformed(e.to_string()))?;
    let mut networks = Vec::new();
    for e in entries.iter().filter(|e| e.service_area == "Exchange") {
        for ip in &e.ips {
            let net = ip
                .parse::<IpNet>()
                .map_err(|_| RangesError::Malformed(format!("'{ip}' is not a CIDR")))?;
            networks.push(net);
        }
    }
    networks.sort();
    networks.dedup();
    if networks.is_empty() {
        return Err(RangesError::Malformed("no Exchange networks".into()));
    }
    if networks.len() > MAX_NETWORKS {
        return Err(RangesError::Malformed(format!(
            "{} networks",
            networks.len()
        )));
    }
    Ok(Ranges {
        version: version.to_owned(),
        origin: "service",
        fetched_at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        networks,
    })
}

/// Talks to the endpoint web service.
#[derive(Debug, Clone)]
pub struct Service {
    http: reqwest::Client,
    base: String,
    client_request_id: String,
}

impl Service {
    /// A client for the service at `base` (no trailing slash).
    pub fn new(http: reqwest::Client, base: &str) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            client_request_id: client_request_id(),
        }
    }

    /// The current version of the Worldwide instance.
    pub async fn version(&self) -> Result<String, RangesError> {
        let url = format!(
            "{}/version/Worldwide?ClientRequestId={}",
            self.base, self.client_request_id
        );
        let body = self.get(&url).await?;
        let v: VersionAnswer =
            serde_json::from_slice(&body).map_err(|e| RangesError::Malformed(e.to_string()))?;
        if v.latest.is_empty() || v.latest.len() > 64 {
            return Err(RangesError::Malformed("empty or oversized version".into()));
        }
        Ok(v.latest)
    }

    /// The Exchange networks at `version`.
    pub async fn fetch(&self, version: &str) -> Result<Ranges, RangesError> {
        let url = format!(
            "{}/endpoints/worldwide?ServiceAreas=Exchange&ClientRequestId={}",
            self.base, self.client_request_id
        );
        let body = self.get(&url).await?;
        parse_endpoints(&body, version)
    }

    async fn get(&self, url: &str) -> Result<bytes::Bytes, RangesError> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| RangesError::Unreachable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(RangesError::Unreachable(format!(
                "HTTP {}",
                resp.status().as_u16()
            )));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| RangesError::Unreachable(e.to_string()))?;
        if body.len() > MAX_ANSWER {
            return Err(RangesError::Malformed(format!("{} bytes", body.len())));
        }
        Ok(body)
    }
}

/// A random GUID-shaped id, as the service asks each client to send.
fn client_request_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    // Only an id for the service's logs: with no entropy source it stays zero.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Path of the cache file under `state_dir`.
pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CACHE_FILE)
}

/// The cached list, if present and valid.
pub fn load_cache(state_dir: &Path) -> Option<Ranges> {
    let text = std::fs::read(cache_path(state_dir)).ok()?;
    let r: Ranges = serde_json::from_slice(&text).ok()?;
    (!r.networks.is_empty()).then_some(r)
}

/// Store `ranges` as the cache (write beside, then rename).
pub fn save_cache(state_dir: &Path, ranges: &Ranges) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let path = cache_path(state_dir);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(ranges).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exchange_entries_only() {
        let body = br#"[
          {"id":1,"serviceArea":"Exchange","ips":["40.96.0.0/13","2603:1006::/40"],"tcpPorts":"443"},
          {"id":2,"serviceArea":"Exchange","urls":["outlook.office.com"]},
          {"id":46,"serviceArea":"SharePoint","ips":["13.107.136.0/22"]}
        ]"#;
        let r = parse_endpoints(body, "2026110100").unwrap();
        assert_eq!(r.networks.len(), 2);
        assert_eq!(r.version, "2026110100");
        assert!(parse_endpoints(b"[]", "v").is_err(), "empty list refused");
        assert!(parse_endpoints(b"<html>", "v").is_err());
        assert!(
            parse_endpoints(
                br#"[{"serviceArea":"Exchange","ips":["40.96.0.0/33"]}]"#,
                "v"
            )
            .is_err(),
            "one bad network refuses the whole list"
        );
    }

    #[test]
    fn cache_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_cache(dir.path()).is_none());
        let r = parse_endpoints(
            br#"[{"serviceArea":"Exchange","ips":["40.96.0.0/13"]}]"#,
            "7",
        )
        .unwrap();
        save_cache(dir.path(), &r).unwrap();
        let back = load_cache(dir.path()).unwrap();
        assert_eq!(back.networks, r.networks);
        assert_eq!(back.origin, "cache");
        std::fs::write(cache_path(dir.path()), "garbage").unwrap();
        assert!(load_cache(dir.path()).is_none());
    }

    #[test]
    fn request_id_is_guid_shaped() {
        let id = client_request_id();
        let parts: Vec<_> = id.split('-').map(str::len).collect();
        assert_eq!(parts, vec![8, 4, 4, 4, 12], "{id}");
    }
}
