//! Built-in network lists, each a snapshot with its source and date so an operator can tell how
//! old it is and where to check it.

/// A named, dated snapshot of a published list of networks.
#[derive(Debug)]
pub struct Preset {
    /// Name used with `--allow-preset`.
    pub name: &'static str,
    /// Where the list is published.
    pub source: &'static str,
    /// When this snapshot was taken.
    pub snapshot: &'static str,
    /// The networks, CIDR notation.
    pub cidrs: &'static [&'static str],
}

/// Exchange Online: every `serviceArea: "Exchange"` entry with `ips` in Microsoft 365's endpoint
/// web service (ids 1, 2, 8/9/10: Outlook, SMTP relay and EOP). Microsoft publishes no separate
/// list for push-notification sources; this is the accepted allow-list (PROTOCOL.md).
pub const EXCHANGE_ONLINE: Preset = Preset {
    name: "exchange-online",
    source: "https://endpoints.office.com/endpoints/worldwide?ServiceAreas=Exchange",
    snapshot: "2026-11-21",
    cidrs: &[
        "13.107.6.152/31",
        "13.107.18.10/31",
        "13.107.128.0/22",
        "23.103.160.0/20",
        "40.92.0.0/15",
        "40.96.0.0/13",
        "40.104.0.0/15",
        "40.107.0.0/16",
        "52.96.0.0/14",
        "52.100.0.0/14",
        "52.238.78.88/32",
        "104.47.0.0/17",
        "131.253.33.215/32",
        "132.245.0.0/16",
        "150.171.32.0/22",
        "204.79.197.215/32",
        "2603:1006::/40",
        "2603:1016::/36",
        "2603:1026::/36",
        "2603:1036::/36",
        "2603:1046::/36",
        "2603:1056::/36",
        "2603:1096::/38",
        "2603:1096:400::/40",
        "2603:1096:600::/40",
        "2603:1096:a00::/39",
        "2603:1096:c00::/40",
        "2603:10a6:200::/40",
        "2603:10a6:400::/40",
        "2603:10a6:600::/40",
        "2603:10a6:800::/40",
        "2603:10d6:200::/40",
        "2620:1ec:4::152/128",
        "2620:1ec:4::153/128",
        "2620:1ec:c::10/128",
        "2620:1ec:c::11/128",
        "2620:1ec:d::10/128",
        "2620:1ec:d::11/128",
        "2620:1ec:8f0::/46",
        "2620:1ec:900::/46",
        "2620:1ec:a92::152/128",
        "2620:1ec:a92::153/128",
        "2a01:111:f400::/48",
        "2a01:111:f403::/48",
    ],
};

/// Cloudflare's edge, for a relay behind Cloudflare's proxy (`result.ipv4_cidrs` and
/// `result.ipv6_cidrs`).
pub const CLOUDFLARE: Preset = Preset {
    name: "cloudflare",
    source: "https://api.cloudflare.com/client/v4/ips",
    snapshot: "2026-11-21",
    cidrs: &[
        "173.245.48.0/20",
        "103.21.244.0/22",
        "103.22.200.0/22",
        "103.31.4.0/22",
        "141.101.64.0/18",
        "108.162.192.0/18",
        "190.93.240.0/20",
        "188.114.96.0/20",
        "197.234.240.0/22",
        "198.41.128.0/17",
        "162.158.0.0/15",
        "104.16.0.0/13",
        "104.24.0.0/14",
        "172.64.0.0/13",
        "131.0.72.0/22",
        "2400:cb00::/32",
        "2606:4700::/32",
        "2803:f800::/32",
        "2405:b500::/32",
        "2405:8100::/32",
        "2a06:98c0::/29",
        "2c0f:f248::/32",
    ],
};

/// All presets, for lookup by name and for error messages.
pub const ALL: &[&Preset] = &[&EXCHANGE_ONLINE, &CLOUDFLARE];

/// Find a preset by its `--allow-preset` name.
pub fn by_name(name: &str) -> Option<&'static Preset> {
    ALL.iter().copied().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_preset_parses() {
        for p in super::ALL {
            for c in p.cidrs {
                c.parse::<ipnet::IpNet>()
                    .unwrap_or_else(|e| panic!("{}: {c}: {e}", p.name));
            }
        }
    }
}
