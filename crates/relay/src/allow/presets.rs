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

/// Microsoft Graph change notifications (webhooks): the Public Cloud addresses in the
/// "Microsoft Graph Change Notifications" row (row 23) of Microsoft's "Other endpoints not included
/// in the Microsoft 365 IP Address and URL Web service", which Graph's "Receive change
/// notifications through webhooks" names as the full list of delivery sources. They are not
/// Exchange Online's. The US Government and 21Vianet lists of the same row are left out. The
/// snapshot is the page's `ms.date`, read from its source (MicrosoftDocs/microsoft-365-docs,
/// `microsoft-365/enterprise/additional-office365-ip-addresses-and-urls.md`, commit ba01cbe5);
/// Microsoft says the list can change without notice.
pub const MICROSOFT_GRAPH: Preset = Preset {
    name: "microsoft-graph",
    source: "https://learn.microsoft.com/microsoft-365/enterprise/additional-office365-ip-addresses-and-urls",
    snapshot: "2025-01-08",
    cidrs: &[
        "52.159.23.209/32",
        "52.159.17.84/32",
        "13.78.204.0/32",
        "52.148.24.136/32",
        "52.148.27.39/32",
        "52.147.213.251/32",
        "52.147.213.181/32",
        "20.127.53.125/32",
        "40.76.162.99/32",
        "40.76.162.42/32",
        "70.37.95.92/32",
        "70.37.95.11/32",
        "70.37.92.195/32",
        "70.37.93.191/32",
        "70.37.90.219/32",
        "20.9.36.45/32",
        "20.9.35.166/32",
        "20.9.36.128/32",
        "20.9.37.73/32",
        "20.9.37.76/32",
        "20.96.21.67/32",
        "20.69.245.215/32",
        "104.46.117.15/32",
        "20.96.21.98/32",
        "20.96.21.115/32",
        "137.135.11.161/32",
        "137.135.11.116/32",
        "20.253.156.113/32",
        "137.135.11.222/32",
        "137.135.11.250/32",
        "52.159.107.50/32",
        "52.159.107.4/32",
        "52.159.124.33/32",
        "52.159.109.205/32",
        "52.159.102.72/32",
        "20.98.68.182/32",
        "20.98.68.57/32",
        "20.98.68.200/32",
        "20.98.68.203/32",
        "20.98.68.218/32",
        "20.171.81.121/32",
        "20.25.189.138/32",
        "20.171.82.192/32",
        "20.171.83.146/32",
        "20.171.83.157/32",
        "52.142.114.29/32",
        "52.142.115.31/32",
        "20.223.139.245/32",
        "51.104.159.213/32",
        "51.104.159.181/32",
        "51.124.75.43/32",
        "51.124.73.177/32",
        "104.40.209.182/32",
        "51.138.90.7/32",
        "51.138.90.52/32",
        "20.199.102.157/32",
        "20.199.102.73/32",
        "20.216.150.67/32",
        "20.111.9.46/32",
        "20.111.9.77/32",
        "13.87.81.123/32",
        "13.87.81.35/32",
        "20.90.99.1/32",
        "13.87.81.133/32",
        "13.87.81.141/32",
        "20.91.212.211/32",
        "20.91.212.136/32",
        "20.91.213.57/32",
        "20.91.208.88/32",
        "20.91.209.147/32",
        "20.44.210.83/32",
        "20.44.210.146/32",
        "20.212.153.162/32",
        "52.148.115.48/32",
        "52.148.114.238/32",
        "40.80.232.177/32",
        "40.80.232.118/32",
        "52.231.196.24/32",
        "40.80.233.14/32",
        "40.80.239.196/32",
        "20.48.12.75/32",
        "20.48.11.201/32",
        "20.89.108.161/32",
        "20.48.14.35/32",
        "20.48.15.147/32",
        "104.215.13.23/32",
        "104.215.6.169/32",
        "20.89.240.165/32",
        "104.215.18.55/32",
        "104.215.12.254/32",
        "20.20.32.0/19",
        "20.190.128.0/18",
        "20.231.128.0/19",
        "40.126.0.0/18",
        "2603:1006:2000::/48",
        "2603:1007:200::/48",
        "2603:1016:1400::/48",
        "2603:1017::/48",
        "2603:1026:3000::/48",
        "2603:1027:1::/48",
        "2603:1036:3000::/48",
        "2603:1037:1::/48",
        "2603:1046:2000::/48",
        "2603:1047:1::/48",
        "2603:1056:2000::/48",
        "2603:1057:2::/48",
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
pub const ALL: &[&Preset] = &[&EXCHANGE_ONLINE, &MICROSOFT_GRAPH, &CLOUDFLARE];

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

    #[test]
    fn microsoft_graph_has_no_duplicates_or_overlaps() {
        let nets: Vec<ipnet::IpNet> = super::MICROSOFT_GRAPH
            .cidrs
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(
            nets.len(),
            106,
            "90 addresses and 16 networks in the snapshot"
        );
        for (i, a) in nets.iter().enumerate() {
            for b in &nets[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} and {b} overlap");
            }
        }
    }

    #[test]
    fn names_resolve() {
        for p in super::ALL {
            assert_eq!(super::by_name(p.name).map(|q| q.name), Some(p.name));
        }
        let g = super::by_name("microsoft-graph").expect("microsoft-graph is registered");
        assert!(g.source.starts_with("https://learn.microsoft.com/"));
        assert!(super::by_name("microsoft-graph ").is_none());
    }
}
