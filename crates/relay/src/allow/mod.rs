//! Source-address filtering, done right after `accept` and before any TLS work.
//!
//! The allow-list is compiled once into sorted, merged integer ranges per address family, so a
//! check is a binary search with no allocation or locking.

pub mod presets;
pub mod ranges;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// Why an allow-list could not be built; the variant says which flag was at fault.
#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    /// A `--allow` value.
    #[error("{0}")]
    Cidr(String),
    /// The `--allow-file`.
    #[error("{0}")]
    File(String),
    /// A `--allow-preset` name.
    #[error("{0}")]
    Preset(String),
}

/// An immutable set of admitted networks.
#[derive(Debug, Clone)]
pub struct AllowList {
    /// Merged, sorted inclusive ranges of IPv4 addresses.
    v4: Vec<(u32, u32)>,
    /// Merged, sorted inclusive ranges of IPv6 addresses.
    v6: Vec<(u128, u128)>,
    /// Where the networks came from, for the start-up log and the admin API.
    sources: Vec<String>,
    /// Number of networks given, before merging.
    networks: usize,
}

impl AllowList {
    /// Build from the three flags: the union of every `--allow`, the `--allow-file` and every
    /// `--allow-preset`. With none of them the `exchange-online` preset applies, so a relay
    /// started without thought fails closed; any of them replaces that default (name it with
    /// `--allow-preset exchange-online` to keep it), so the list is exactly what was written.
    pub fn build(
        cidrs: &[String],
        file: Option<&Path>,
        preset_names: &[String],
    ) -> Result<Self, AllowListError> {
        Self::build_with(cidrs, file, preset_names, None)
    }

    /// As [`AllowList::build`], with a fresher `exchange-online` list (from Microsoft's endpoint
    /// web service) in place of the built-in snapshot when given.
    pub fn build_with(
        cidrs: &[String],
        file: Option<&Path>,
        preset_names: &[String],
        exchange_online: Option<&ranges::Ranges>,
    ) -> Result<Self, AllowListError> {
        let mut nets = Vec::new();
        let mut sources = Vec::new();
        for c in cidrs {
            nets.push(parse_net(c).map_err(AllowListError::Cidr)?);
        }
        if !cidrs.is_empty() {
            sources.push(format!("--allow ({} networks)", cidrs.len()));
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| AllowListError::File(format!("{}: {e}", path.display())))?;
            let before = nets.len();
            for (i, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                let net = parse_net(line).map_err(|m| {
                    AllowListError::File(format!("{}: line {}: {m}", path.display(), i + 1))
                })?;
                nets.push(net);
            }
            sources.push(format!(
                "--allow-file {} ({} networks)",
                path.display(),
                nets.len() - before
            ));
        }
        let mut names: Vec<&str> = preset_names.iter().map(String::as_str).collect();
        if cidrs.is_empty() && file.is_none() && names.is_empty() {
            names.push(presets::EXCHANGE_ONLINE.name);
        }
        for name in names {
            let preset = presets::by_name(name).ok_or_else(|| {
                let known: Vec<_> = presets::ALL.iter().map(|p| p.name).collect();
                AllowListError::Preset(format!(
                    "unknown preset '{name}' (known: {})",
                    known.join(", ")
                ))
            })?;
            if let (Some(r), true) = (
                exchange_online,
                preset.name == presets::EXCHANGE_ONLINE.name,
            ) {
                nets.extend_from_slice(&r.networks);
                sources.push(format!(
                    "preset {} ({} networks, version {} from the endpoint service via {}, fetched {})",
                    preset.name,
                    r.networks.len(),
                    r.version,
                    r.origin,
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.fetched_at)
                    )
                ));
                continue;
            }
            for c in preset.cidrs {
                nets.push(parse_net(c).map_err(AllowListError::Preset)?);
            }
            sources.push(format!(
                "preset {} ({} networks, snapshot {} of {})",
                preset.name,
                preset.cidrs.len(),
                preset.snapshot,
                preset.source
            ));
        }
        Ok(Self::from_networks(&nets, sources))
    }

    /// Compile networks into merged ranges.
    pub fn from_networks(nets: &[IpNet], sources: Vec<String>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        Self {
            v4: merge(v4),
            v6: merge(v6),
            sources,
            networks: nets.len(),
        }
    }

    /// Whether `ip` is admitted. IPv4-mapped IPv6 addresses (a dual-stack listener's view of an
    /// IPv4 peer) are checked as the IPv4 address they are.
    pub fn allows(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => contains(&self.v4, u32::from(a)),
            IpAddr::V6(a) => contains(&self.v6, u128::from(a)),
        }
    }

    /// One line for logs: where the networks came from.
    pub fn describe(&self) -> String {
        format!(
            "{} networks from {}",
            self.networks,
            self.sources.join("; ")
        )
    }
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("'{s}' is not a CIDR or address (e.g. 40.96.0.0/13, 2603:1006::/40)"))
}

fn merge<T: Ord + Copy + num_like::Succ>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if lo <= last.1.succ_saturating() => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out.shrink_to_fit();
    out
}

fn contains<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    // First range whose end is >= x; it contains x if its start is <= x.
    let i = ranges.partition_point(|r| r.1 < x);
    ranges.get(i).is_some_and(|r| r.0 <= x)
}

mod num_like {
    /// Saturating successor, so adjacent ranges merge.
    pub trait Succ {
        fn succ_saturating(self) -> Self;
    }
    impl Succ for u32 {
        fn succ_saturating(self) -> Self {
            self.saturating_add(1)
        }
    }
    impl Succ for u128 {
        fn succ_saturating(self) -> Self {
            self.saturating_add(1)
        }
    }
}

/// What an allow-list is built from, kept so it can be rebuilt when one input changes (the
/// allow file, or a fresher Exchange Online list) without losing the others.
#[derive(Debug)]
pub struct AllowSource {
    /// `--allow` values.
    pub cidrs: Vec<String>,
    /// `--allow-file`.
    pub file: Option<std::path::PathBuf>,
    /// `--allow-preset` names.
    pub presets: Vec<String>,
    /// The latest good Exchange Online list, when refreshed.
    pub exchange_online: Mutex<Option<ranges::Ranges>>,
}

impl AllowSource {
    /// Build the allow-list from the current inputs.
    pub fn build(&self) -> Result<AllowList, AllowListError> {
        let eo = self
            .exchange_online
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        AllowList::build_with(
            &self.cidrs,
            self.file.as_deref(),
            &self.presets,
            eo.as_ref(),
        )
    }

    /// What the start-up log should say about the `exchange-online` default, which applies only
    /// when no `--allow*` flag is given: `--allow` or `--allow-file` replace it, and an operator
    /// who read "add --allow" as "in addition" must learn it from the log, not from silence.
    /// `None` when `--allow-preset` names the presets explicitly.
    pub fn default_note(&self) -> Option<String> {
        if !self.presets.is_empty() {
            return None;
        }
        if self.cidrs.is_empty() && self.file.is_none() {
            return Some(format!(
                "allow-list: no --allow, --allow-file or --allow-preset given: the {} preset applies (the default)",
                presets::EXCHANGE_ONLINE.name
            ));
        }
        Some(format!(
            "allow-list: only the --allow/--allow-file networks are admitted: they replace the {0} default, so Exchange Online cannot connect; add --allow-preset {0} to admit it as well",
            presets::EXCHANGE_ONLINE.name
        ))
    }

    /// Whether the `microsoft-graph` preset is named.
    pub fn uses_microsoft_graph(&self) -> bool {
        self.presets
            .iter()
            .any(|p| p == presets::MICROSOFT_GRAPH.name)
    }

    /// Whether the `exchange-online` preset is part of the list (named, or the default).
    pub fn uses_exchange_online(&self) -> bool {
        self.presets
            .iter()
            .any(|p| p == presets::EXCHANGE_ONLINE.name)
            || (self.cidrs.is_empty() && self.file.is_none() && self.presets.is_empty())
    }
}

/// How often a denied address is logged at most.
const DENIED_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Addresses remembered for log rate-limiting; beyond it, stale entries are dropped, and if all
/// are fresh (a scan from many addresses) further denials are counted but not logged.
const DENIED_LOG_CAPACITY: usize = 10_000;
/// Most recent denied addresses kept for the admin API / status page.
const RECENT_DENIED: usize = 32;

/// Rate-limits denied-connection log lines and remembers the latest denied addresses.
#[derive(Debug, Default)]
pub struct DeniedLog {
    inner: Mutex<DeniedInner>,
}

#[derive(Debug, Default)]
struct DeniedInner {
    last_logged: HashMap<IpAddr, Instant>,
    recent: std::collections::VecDeque<(IpAddr, std::time::SystemTime)>,
}

impl DeniedLog {
    /// Record a denial; returns true when it should be logged now.
    pub fn record(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.recent.len() == RECENT_DENIED {
            inner.recent.pop_front();
        }
        inner.recent.push_back((ip, std::time::SystemTime::now()));
        if let Some(t) = inner.last_logged.get(&ip) {
            if now.duration_since(*t) < DENIED_LOG_INTERVAL {
                return false;
            }
        }
        if inner.last_logged.len() >= DENIED_LOG_CAPACITY {
            inner
                .last_logged
                .retain(|_, t| now.duration_since(*t) < DENIED_LOG_INTERVAL);
            if inner.last_logged.len() >= DENIED_LOG_CAPACITY {
                return false;
            }
        }
        inner.last_logged.insert(ip, now);
        true
    }

    /// The most recent denied addresses, newest last.
    pub fn recent(&self) -> Vec<(IpAddr, std::time::SystemTime)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.recent.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(cidrs: &[&str]) -> AllowList {
        let v: Vec<String> = cidrs.iter().map(|s| s.to_string()).collect();
        AllowList::build(&v, None, &[]).unwrap()
    }

    #[test]
    fn matches_v4_and_v6() {
        let l = list(&["10.0.0.0/8", "192.168.1.5", "2001:db8::/32"]);
        assert!(l.allows("10.1.2.3".parse().unwrap()));
        assert!(l.allows("192.168.1.5".parse().unwrap()));
        assert!(!l.allows("192.168.1.6".parse().unwrap()));
        assert!(!l.allows("11.0.0.0".parse().unwrap()));
        assert!(l.allows("2001:db8::1".parse().unwrap()));
        assert!(!l.allows("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn mapped_v4_is_normalised() {
        let l = list(&["127.0.0.1/32"]);
        assert!(l.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!l.allows("::ffff:127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn merges_overlaps_and_edges() {
        let l = list(&["10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "0.0.0.0/0"]);
        assert_eq!(l.v4, vec![(0, u32::MAX)]);
        let l = list(&["10.0.0.0/24", "10.0.1.0/24"]);
        assert_eq!(l.v4.len(), 1);
        assert!(l.allows("10.0.1.255".parse().unwrap()));
        assert!(!l.allows("10.0.2.0".parse().unwrap()));
    }

    #[test]
    fn default_is_exchange_online() {
        let l = AllowList::build(&[], None, &[]).unwrap();
        assert!(l.allows("40.96.1.1".parse().unwrap()));
        assert!(l.allows("2603:1006::1".parse().unwrap()));
        assert!(!l.allows("127.0.0.1".parse().unwrap()));
        assert!(l.describe().contains("exchange-online"));
    }

    #[test]
    fn microsoft_graph_preset_is_not_exchange_online() {
        let l = AllowList::build(&[], None, &["microsoft-graph".into()]).unwrap();
        assert!(l.allows("52.159.23.209".parse().unwrap()));
        assert!(l.allows("2603:1006:2000::1".parse().unwrap()));
        assert!(
            !l.allows("40.96.1.1".parse().unwrap()),
            "naming a preset replaces the exchange-online default"
        );
        assert!(l.describe().contains("microsoft-graph"));
        let e = AllowList::build(&[], None, &["nope".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("microsoft-graph"), "{e}");
    }

    #[test]
    fn file_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("allow.txt");
        std::fs::write(&p, "# comment\n127.0.0.0/8  # loopback\n\n::1\n").unwrap();
        let l = AllowList::build(&[], Some(&p), &[]).unwrap();
        assert!(l.allows("127.5.5.5".parse().unwrap()));
        assert!(l.allows("::1".parse().unwrap()));
        assert!(
            !l.allows("40.96.1.1".parse().unwrap()),
            "a file replaces the default preset"
        );
        std::fs::write(&p, "127.0.0.0/8\nbogus\n").unwrap();
        let e = AllowList::build(&[], Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = AllowList::build(&[], None, &["nope".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("exchange-online"), "{e}");
    }

    #[test]
    fn the_default_is_replaced_by_allow_and_kept_by_naming_it() {
        let source = |cidrs: &[&str], presets: &[&str]| AllowSource {
            cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            file: None,
            presets: presets.iter().map(|s| s.to_string()).collect(),
            exchange_online: Default::default(),
        };
        let exo: IpAddr = "40.96.1.1".parse().unwrap();
        let onprem: IpAddr = "10.1.2.3".parse().unwrap();
        let s = source(&["10.1.2.3"], &[]);
        let l = s.build().unwrap();
        assert!(l.allows(onprem) && !l.allows(exo));
        assert!(!s.uses_exchange_online());
        let note = s.default_note().unwrap();
        assert!(note.contains("--allow-preset exchange-online"), "{note}");
        let s = source(&["10.1.2.3"], &["exchange-online"]);
        let l = s.build().unwrap();
        assert!(l.allows(onprem) && l.allows(exo), "union of both");
        assert!(s.uses_exchange_online());
        assert_eq!(
            s.default_note(),
            None,
            "named explicitly: nothing to explain"
        );
        assert!(source(&[], &[]).default_note().unwrap().contains("default"));
    }

    #[test]
    fn denied_log_is_rate_limited() {
        let d = DeniedLog::default();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert!(d.record(ip));
        assert!(!d.record(ip));
        assert!(d.record("203.0.113.10".parse().unwrap()));
        assert_eq!(d.recent().len(), 3);
    }
}
