//! Which protocol a notification or subscription belongs to: the `source` label of metrics and
//! the admin API, and the router's choice between the EWS and the Graph path.

/// EWS push or Microsoft Graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Source {
    /// EWS push notifications (`SendNotification` SOAP), under `--path-prefix`.
    #[default]
    Ews,
    /// Microsoft Graph change notifications (JSON), under `--graph-path-prefix`.
    Graph,
}

impl Source {
    /// Both, in label order.
    pub const ALL: [Source; 2] = [Source::Ews, Source::Graph];

    /// The label value: `ews` or `graph`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Ews => "ews",
            Source::Graph => "graph",
        }
    }
}
