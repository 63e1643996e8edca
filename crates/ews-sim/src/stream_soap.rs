//! The SOAP of streaming notifications, server side: tell which EWS operation a request is,
//! parse a streaming `Subscribe`, a `GetStreamingEvents` and an `Unsubscribe`, and build the
//! envelopes of a `GetStreamingEvents` answer (events, keep-alive, errors, `Closed`) and the
//! `UnsubscribeResponse`, in the shapes of the `ews` crate's `streaming-*.xml` fixtures.
//!
//! Written independently of the `ews` crate's client-side builders so that each half checks
//! the other in the tests.

use std::fmt::Write as _;

use ews::xml::{push_element, Ns, XmlReader};
use ews::{EventType, MESSAGES_NS, TYPES_NS};

use super::soap::{
    read_event_types, read_folder_ids, read_impersonation, schema, FolderSpec, RequestError,
};

/// Most subscription ids one `GetStreamingEvents` may name: Microsoft's affinity guidance puts
/// at most 200 mailboxes in one group, and a group shares one connection.
pub const MAX_IDS_PER_CONNECTION: usize = 200;

/// `ConnectionTimeout` bounds in minutes (the schema's 1..=30).
pub const CONNECTION_TIMEOUT_MINUTES: std::ops::RangeInclusive<u32> = 1..=30;

/// Versions older than streaming notifications (added in Exchange 2010 SP1).
const PRE_STREAMING_VERSIONS: [&str; 3] = ["Exchange2007", "Exchange2007_SP1", "Exchange2010"];

/// An EWS request the simulator serves, as far as telling them apart needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EwsRequest {
    /// `m:Subscribe/m:PushSubscriptionRequest`: parse it with [`super::soap::parse_subscribe`].
    PushSubscribe,
    /// `m:Subscribe/m:StreamingSubscriptionRequest`.
    StreamingSubscribe(StreamingSubscribe),
    /// `m:GetStreamingEvents`.
    GetStreamingEvents(GetStreamingEvents),
    /// `m:Unsubscribe`.
    Unsubscribe(Unsubscribe),
}

/// A streaming `Subscribe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamingSubscribe {
    /// `t:RequestServerVersion/@Version`.
    pub server_version: String,
    /// The impersonated mailbox.
    pub mailbox: String,
    /// The folders.
    pub folders: FolderSpec,
    /// The event types (never `Status`).
    pub event_types: Vec<EventType>,
}

/// A `GetStreamingEvents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetStreamingEvents {
    /// `t:RequestServerVersion/@Version`.
    pub server_version: String,
    /// The impersonated mailbox, if any.
    pub impersonated: Option<String>,
    /// The subscription ids, in request order, duplicates removed (at least one).
    pub ids: Vec<String>,
    /// `m:ConnectionTimeout` in minutes (1..=30).
    pub timeout_minutes: u32,
}

/// An `Unsubscribe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// The impersonated mailbox, if any.
    pub impersonated: Option<String>,
    /// `m:SubscriptionId`.
    pub id: String,
}

/// Reads the envelope far enough to tell the operation, and parses the streaming ones.
pub fn parse_ews_request(body: &[u8]) -> Result<EwsRequest, RequestError> {
    let mut xml = XmlReader::new(body)?;
    match xml.child()? {
        Some(root) if root.is(Ns::Soap, "Envelope") => {}
        _ => return Err(schema("not a SOAP 1.1 envelope")),
    }
    let (mut server_version, mut impersonated) = (None, None);
    let mut request = None;
    while let Some(part) = xml.child()? {
        if part.is(Ns::Soap, "Header") {
            while let Some(header) = xml.child()? {
                match (header.ns, header.local()) {
                    (Ns::Types, b"RequestServerVersion") => {
                        server_version = header.attr("Version")?.map(|v| v.into_owned());
                        xml.skip()?;
                    }
                    (Ns::Types, b"ExchangeImpersonation") => {
                        impersonated = read_impersonation(&mut xml)?
                    }
                    _ => xml.skip()?,
                }
            }
        } else if part.is(Ns::Soap, "Body") {
            let Some(message) = xml.child()? else {
                return Err(schema("empty soap:Body"));
            };
            request = Some(match (message.ns, message.local()) {
                (Ns::Messages, b"Subscribe") => read_subscribe(&mut xml)?,
                (Ns::Messages, b"GetStreamingEvents") => read_get_streaming_events(&mut xml)?,
                (Ns::Messages, b"Unsubscribe") => read_unsubscribe(&mut xml)?,
                (_, other) => {
                    return Err(schema(format!(
                    "the simulator serves Subscribe, GetStreamingEvents and Unsubscribe, not {}",
                    String::from_utf8_lossy(other)
                )))
                }
            });
            if xml.child()?.is_some() {
                return Err(schema("more than one element in soap:Body"));
            }
        } else {
            return Err(schema("unexpected element in soap:Envelope"));
        }
    }
    xml.finish()?;
    let request = request.ok_or_else(|| schema("no soap:Body"))?;
    if matches!(request, Parsed::Push) {
        return Ok(EwsRequest::PushSubscribe);
    }
    let server_version = server_version.ok_or_else(|| {
        RequestError::ServerVersion("the t:RequestServerVersion header is required".into())
    })?;
    if server_version.is_empty() || PRE_STREAMING_VERSIONS.contains(&server_version.as_str()) {
        return Err(RequestError::ServerVersion(format!(
            "{server_version}: streaming notifications need Exchange2010_SP1 or later"
        )));
    }
    Ok(match request {
        Parsed::Push => EwsRequest::PushSubscribe,
        Parsed::Streaming(folders, event_types) => {
            let mailbox = impersonated.ok_or_else(|| {
                RequestError::Impersonation(
                    "t:ExchangeImpersonation/t:ConnectingSID/t:SmtpAddress is required".into(),
                )
            })?;
            EwsRequest::StreamingSubscribe(StreamingSubscribe {
                server_version,
                mailbox,
                folders,
                event_types,
            })
        }
        Parsed::Get(ids, timeout_minutes) => EwsRequest::GetStreamingEvents(GetStreamingEvents {
            server_version,
            impersonated,
            ids,
            timeout_minutes,
        }),
        Parsed::Unsubscribe(id) => EwsRequest::Unsubscribe(Unsubscribe { impersonated, id }),
    })
}

/// The body of the request, before the headers are checked.
enum Parsed {
    Push,
    Streaming(FolderSpec, Vec<EventType>),
    Get(Vec<String>, u32),
    Unsubscribe(String),
}

/// `m:Subscribe` (just entered): push is left to `soap::parse_subscribe`; streaming is read
/// here, in schema order `FolderIds? EventTypes`.
fn read_subscribe(xml: &mut XmlReader<'_>) -> Result<Parsed, RequestError> {
    let Some(request) = xml.child()? else {
        return Err(schema("m:Subscribe is empty"));
    };
    if request.is(Ns::Messages, "PushSubscriptionRequest") {
        xml.skip()?;
        if xml.child()?.is_some() {
            return Err(schema("more than one subscription request in m:Subscribe"));
        }
        return Ok(Parsed::Push);
    }
    if !request.is(Ns::Messages, "StreamingSubscriptionRequest") {
        return Err(schema(format!(
            "push and streaming subscriptions are simulated, not {}",
            String::from_utf8_lossy(request.local())
        )));
    }
    let all_folders = match request.attr("SubscribeToAllFolders")?.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(schema(format!(
                "SubscribeToAllFolders={other:?} is not a boolean"
            )))
        }
    };
    let (mut folders, mut event_types) = (None, None);
    while let Some(child) = xml.child()? {
        match (child.ns, child.local()) {
            (Ns::Types, b"FolderIds") if folders.is_none() && event_types.is_none() => {
                folders = Some(read_folder_ids(xml)?)
            }
            (Ns::Types, b"EventTypes") if event_types.is_none() => {
                event_types = Some(read_event_types(xml)?)
            }
            (_, other) => {
                return Err(schema(format!(
                    "unexpected or out-of-order {} in StreamingSubscriptionRequest (FolderIds?, EventTypes)",
                    String::from_utf8_lossy(other)
                )))
            }
        }
    }
    if xml.child()?.is_some() {
        return Err(schema("more than one subscription request in m:Subscribe"));
    }
    let folders = match (all_folders, folders) {
        (true, None) => FolderSpec::All,
        (false, Some(folders)) => FolderSpec::Folders(folders),
        (true, Some(_)) => {
            return Err(schema(
                "t:FolderIds given together with SubscribeToAllFolders=\"true\"",
            ))
        }
        (false, None) => {
            return Err(schema(
                "t:FolderIds is required unless SubscribeToAllFolders=\"true\"",
            ))
        }
    };
    let event_types = event_types.ok_or_else(|| schema("t:EventTypes is required"))?;
    Ok(Parsed::Streaming(folders, event_types))
}

/// `m:GetStreamingEvents` (just entered): `m:SubscriptionIds`, then `m:ConnectionTimeout`.
fn read_get_streaming_events(xml: &mut XmlReader<'_>) -> Result<Parsed, RequestError> {
    let (mut ids, mut timeout) = (None::<Vec<String>>, None);
    while let Some(child) = xml.child()? {
        match (child.ns, child.local()) {
            (Ns::Messages, b"SubscriptionIds") if ids.is_none() && timeout.is_none() => {
                let mut list = Vec::new();
                while let Some(id) = xml.child()? {
                    if !(matches!(id.ns, Ns::Types | Ns::Messages)
                        && id.local() == b"SubscriptionId")
                    {
                        return Err(schema("m:SubscriptionIds holds something other than ids"));
                    }
                    let id = xml.text()?;
                    if id.is_empty() {
                        return Err(schema("empty t:SubscriptionId"));
                    }
                    // A generous bound on what one request may name, far above the 200 Exchange
                    // serves, so a runaway client cannot make the list huge.
                    if list.len() >= 10 * MAX_IDS_PER_CONNECTION {
                        return Err(schema("too many t:SubscriptionId"));
                    }
                    if !list.iter().any(|known| *known == id) {
                        list.push(id.into_owned());
                    }
                }
                if list.is_empty() {
                    return Err(schema("m:SubscriptionIds is empty"));
                }
                ids = Some(list);
            }
            (Ns::Messages, b"ConnectionTimeout") if ids.is_some() && timeout.is_none() => {
                let text = xml.text()?;
                let minutes: u32 = text.trim().parse().map_err(|_| {
                    schema(format!("m:ConnectionTimeout {text:?} is not an integer"))
                })?;
                if !CONNECTION_TIMEOUT_MINUTES.contains(&minutes) {
                    return Err(schema(format!(
                        "m:ConnectionTimeout {minutes} is outside 1..=30"
                    )));
                }
                timeout = Some(minutes);
            }
            (_, other) => {
                return Err(schema(format!(
                    "unexpected or out-of-order {} in GetStreamingEvents (SubscriptionIds, ConnectionTimeout)",
                    String::from_utf8_lossy(other)
                )))
            }
        }
    }
    Ok(Parsed::Get(
        ids.ok_or_else(|| schema("m:SubscriptionIds is required"))?,
        timeout.ok_or_else(|| schema("m:ConnectionTimeout is required"))?,
    ))
}

/// `m:Unsubscribe` (just entered): one `m:SubscriptionId`.
fn read_unsubscribe(xml: &mut XmlReader<'_>) -> Result<Parsed, RequestError> {
    let mut id = None;
    while let Some(child) = xml.child()? {
        if id.is_none() && child.is(Ns::Messages, "SubscriptionId") {
            let text = xml.text()?;
            if text.is_empty() {
                return Err(schema("empty m:SubscriptionId"));
            }
            id = Some(text.into_owned());
        } else {
            return Err(schema("m:Unsubscribe holds one m:SubscriptionId"));
        }
    }
    Ok(Parsed::Unsubscribe(
        id.ok_or_else(|| schema("m:SubscriptionId is required"))?,
    ))
}

/// One event of a streaming notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    /// The kind (never `Status`: streaming keep-alives are envelopes, not events).
    pub kind: EventType,
    /// `TimeStamp`.
    pub timestamp: String,
    /// `ItemId/@Id`.
    pub item_id: String,
    /// `ParentFolderId/@Id`.
    pub parent_folder_id: String,
}

/// An error message inside a streaming envelope: the code and the ids it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    /// The EWS response code.
    pub code: &'static str,
    /// `m:ErrorSubscriptionIds` (may be empty, as for `ErrorExceededConnectionCount`).
    pub ids: Vec<String>,
}

impl StreamError {
    fn text(&self) -> &'static str {
        match self.code {
            "ErrorSubscriptionNotFound" => "The specified subscription was not found.",
            "ErrorMissedNotificationEvents" => {
                "Events were missed for the subscription. Resynchronise the mailbox."
            }
            "ErrorProxyRequestNotAllowed" => {
                "The mailbox was moved. Use Autodiscover to find its server and subscribe again."
            }
            "ErrorExceededConnectionCount" => {
                "You have exceeded the available concurrent connections for your account. Try again once your other requests have completed."
            }
            "ErrorNewEventStreamConnectionOpened" => {
                "A new event stream connection was opened for this subscription; this connection no longer serves it."
            }
            "ErrorInvalidArgument" => {
                "Too many subscriptions in one GetStreamingEvents: at most 200 may share a connection."
            }
            _ => "The request failed.",
        }
    }
}

fn envelope_open(xml: &mut String) {
    xml.push_str("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\">\n  <soap:Header>\n    <ServerVersionInfo xmlns=\"http://schemas.microsoft.com/exchange/services/2006/types\" MajorVersion=\"15\" MinorVersion=\"20\" MajorBuildNumber=\"8722\" MinorBuildNumber=\"12\" Version=\"V2018_01_08\"/>\n  </soap:Header>\n  <soap:Body>\n");
    let _ = writeln!(
        xml,
        "    <m:GetStreamingEventsResponse xmlns:m=\"{MESSAGES_NS}\" xmlns:t=\"{TYPES_NS}\">\n      <m:ResponseMessages>"
    );
}

fn envelope_close(xml: &mut String) {
    xml.push_str("      </m:ResponseMessages>\n    </m:GetStreamingEventsResponse>\n  </soap:Body>\n</soap:Envelope>\n");
}

/// What one envelope of a `GetStreamingEvents` answer says.
#[derive(Debug, Clone, Default)]
pub struct Envelope<'a> {
    /// Error messages first, one per code.
    pub errors: &'a [StreamError],
    /// `(subscription id, events)` for the success message's `Notifications`.
    pub notifications: &'a [(String, Vec<StreamEvent>)],
    /// Whether a success message is written at all (with `ConnectionStatus`).
    pub success: bool,
    /// `ConnectionStatus` `Closed` rather than `OK`.
    pub closed: bool,
}

/// Builds one envelope of a `GetStreamingEvents` answer: error messages (with
/// `ErrorSubscriptionIds`), then, when `success`, one `Success` message with the
/// notifications (none: a keep-alive) and `ConnectionStatus`. Streaming events carry no
/// `Watermark`, as Exchange streams them.
pub fn streaming_envelope(envelope: &Envelope<'_>) -> String {
    let events: usize = envelope
        .notifications
        .iter()
        .map(|(_, events)| events.len())
        .sum();
    let mut xml = String::with_capacity(1024 + 500 * events + 200 * envelope.errors.len());
    envelope_open(&mut xml);
    for error in envelope.errors {
        xml.push_str(
            "        <m:GetStreamingEventsResponseMessage ResponseClass=\"Error\">\n          ",
        );
        push_element(&mut xml, "m:MessageText", error.text());
        xml.push_str("\n          ");
        push_element(&mut xml, "m:ResponseCode", error.code);
        xml.push_str("\n          <m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>\n");
        if !error.ids.is_empty() {
            xml.push_str("          <m:ErrorSubscriptionIds>\n");
            for id in &error.ids {
                xml.push_str("            ");
                push_element(&mut xml, "m:SubscriptionId", id);
                xml.push('\n');
            }
            xml.push_str("          </m:ErrorSubscriptionIds>\n");
        }
        xml.push_str("        </m:GetStreamingEventsResponseMessage>\n");
    }
    if envelope.success {
        xml.push_str("        <m:GetStreamingEventsResponseMessage ResponseClass=\"Success\">\n          <m:ResponseCode>NoError</m:ResponseCode>\n");
        if !envelope.notifications.is_empty() {
            xml.push_str("          <m:Notifications>\n");
            for (id, events) in envelope.notifications {
                xml.push_str("            <m:Notification>\n              ");
                push_element(&mut xml, "t:SubscriptionId", id);
                xml.push('\n');
                for event in events {
                    push_event(&mut xml, event);
                }
                xml.push_str("            </m:Notification>\n");
            }
            xml.push_str("          </m:Notifications>\n");
        }
        let status = if envelope.closed { "Closed" } else { "OK" };
        let _ = writeln!(
            xml,
            "          <m:ConnectionStatus>{status}</m:ConnectionStatus>"
        );
        xml.push_str("        </m:GetStreamingEventsResponseMessage>\n");
    }
    envelope_close(&mut xml);
    xml
}

fn push_event(xml: &mut String, event: &StreamEvent) {
    let name = event.kind.as_str();
    let _ = write!(xml, "              <t:{name}>\n                ");
    push_element(xml, "t:TimeStamp", &event.timestamp);
    let _ = writeln!(
        xml,
        "\n                <t:ItemId Id=\"{}\" ChangeKey=\"CQAAABYAAAB2n3Xo\"/>",
        quick_xml::escape::escape(event.item_id.as_str())
    );
    let _ = writeln!(
        xml,
        "                <t:ParentFolderId Id=\"{}\" ChangeKey=\"AQAAAA==\"/>",
        quick_xml::escape::escape(event.parent_folder_id.as_str())
    );
    if matches!(event.kind, EventType::Moved | EventType::Copied) {
        // The simulated item stays where it is: its old ids are its ids.
        let _ = writeln!(
            xml,
            "                <t:OldItemId Id=\"{}\" ChangeKey=\"CQAAABYAAAB2n3Xo\"/>\n                <t:OldParentFolderId Id=\"{}\" ChangeKey=\"AQAAAA==\"/>",
            quick_xml::escape::escape(event.item_id.as_str()),
            quick_xml::escape::escape(event.parent_folder_id.as_str())
        );
    }
    let _ = writeln!(xml, "              </t:{name}>");
}

/// An `UnsubscribeResponse` with one message: `NoError` or the error code.
pub fn unsubscribe_response(code: &str) -> String {
    let mut xml = String::with_capacity(768);
    xml.push_str("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\">\n  <s:Body>\n");
    let _ = writeln!(
        xml,
        "    <m:UnsubscribeResponse xmlns:m=\"{MESSAGES_NS}\" xmlns:t=\"{TYPES_NS}\">\n      <m:ResponseMessages>"
    );
    if code == "NoError" {
        xml.push_str("        <m:UnsubscribeResponseMessage ResponseClass=\"Success\">\n          <m:ResponseCode>NoError</m:ResponseCode>\n");
    } else {
        xml.push_str("        <m:UnsubscribeResponseMessage ResponseClass=\"Error\">\n          ");
        push_element(
            &mut xml,
            "m:MessageText",
            &format!("The request failed: {code}."),
        );
        xml.push_str("\n          ");
        push_element(&mut xml, "m:ResponseCode", code);
        xml.push_str("\n          <m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>\n");
    }
    xml.push_str("        </m:UnsubscribeResponseMessage>\n      </m:ResponseMessages>\n    </m:UnsubscribeResponse>\n  </s:Body>\n</s:Envelope>\n");
    xml
}
