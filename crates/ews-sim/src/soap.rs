//! The server side of the SOAP the simulator speaks: parse the `Subscribe` and `GetUserSettings`
//! requests a client sends, and build what Exchange answers (`SubscribeResponse`, SOAP faults,
//! `GetUserSettingsResponseMessage`) and what it pushes (`SendNotification`), in the shapes of
//! `tests/fixtures/`.
//!
//! Parsing reuses the bounded, namespace-aware reader of [`crate::ews`], so elements are
//! matched by namespace URI and local name whatever their prefix.

use std::fmt::Write as _;

use ews::xml::{push_element, Element, Ns, XmlReader};
use ews::{EventType, EwsError, MAX_STATUS_FREQUENCY, MAX_URL_LEN, MESSAGES_NS, TYPES_NS};

/// Why a `Subscribe` is refused before any mailbox is looked at. Each maps to the SOAP fault
/// Exchange answers (HTTP 500) for the same mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not XML, not SOAP 1.1, or not in the schema's shape (order, required elements, values).
    #[error("schema validation: {0}")]
    Schema(String),
    /// `t:RequestServerVersion` missing or older than Exchange 2013.
    #[error("RequestServerVersion: {0}")]
    ServerVersion(String),
    /// `t:ExchangeImpersonation/t:ConnectingSID/t:SmtpAddress` missing.
    #[error("ExchangeImpersonation: {0}")]
    Impersonation(String),
}

impl RequestError {
    /// The EWS response code of the fault.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::Schema(_) => "ErrorSchemaValidation",
            RequestError::ServerVersion(_) => "ErrorInvalidServerVersion",
            RequestError::Impersonation(_) => "ErrorInvalidExchangeImpersonationHeaderData",
        }
    }
}

impl From<EwsError> for RequestError {
    fn from(e: EwsError) -> Self {
        RequestError::Schema(e.to_string())
    }
}

pub(crate) fn schema(message: impl Into<String>) -> RequestError {
    RequestError::Schema(message.into())
}

/// Which folders a parsed `Subscribe` watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FolderSpec {
    /// `SubscribeToAllFolders="true"`.
    All,
    /// `t:FolderIds`: distinguished folder names or folder ids, as sent.
    Folders(Vec<String>),
}

/// A push `Subscribe` as the simulator understood it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSubscribe {
    /// `t:RequestServerVersion/@Version`.
    pub server_version: String,
    /// The impersonated mailbox.
    pub mailbox: String,
    /// The folders.
    pub folders: FolderSpec,
    /// The event types asked for (never `Status`).
    pub event_types: Vec<EventType>,
    /// `t:Watermark`, to resume from.
    pub watermark: Option<String>,
    /// `t:StatusFrequency` in minutes, 1..=1440.
    pub status_frequency: u16,
    /// `t:URL`, the callback; its scheme and length are checked later, as Exchange reports them
    /// with a response code rather than a fault.
    pub url: String,
}

/// Versions older than the header routing (`X-AnchorMailbox`) that push subscriptions through a
/// front end rely on; Exchange answers them, the simulator refuses them so a misconfigured
/// client shows up in tests.
const REFUSED_VERSIONS: [&str; 5] = [
    "Exchange2007",
    "Exchange2007_SP1",
    "Exchange2010",
    "Exchange2010_SP1",
    "Exchange2010_SP2",
];

/// Parses and schema-checks a push `Subscribe` envelope.
pub fn parse_subscribe(body: &[u8]) -> Result<ParsedSubscribe, RequestError> {
    let mut xml = XmlReader::new(body)?;
    match xml.child()? {
        Some(root) if root.is(Ns::Soap, "Envelope") => {}
        _ => return Err(schema("not a SOAP 1.1 envelope")),
    }
    let (mut server_version, mut mailbox, mut request) = (None, None, None);
    while let Some(part) = xml.child()? {
        if part.is(Ns::Soap, "Header") {
            while let Some(header) = xml.child()? {
                match (header.ns, header.local()) {
                    (Ns::Types, b"RequestServerVersion") => {
                        server_version = header.attr("Version")?.map(|v| v.into_owned());
                        xml.skip()?;
                    }
                    (Ns::Types, b"ExchangeImpersonation") => {
                        mailbox = read_impersonation(&mut xml)?
                    }
                    _ => xml.skip()?,
                }
            }
        } else if part.is(Ns::Soap, "Body") {
            let Some(message) = xml.child()? else {
                return Err(schema("empty soap:Body"));
            };
            if !message.is(Ns::Messages, "Subscribe") {
                return Err(schema(format!(
                    "expected m:Subscribe, found {}",
                    String::from_utf8_lossy(message.local())
                )));
            }
            request = Some(read_subscribe(&mut xml)?);
            // Anything after the message in the body is not in the schema.
            if xml.child()?.is_some() {
                return Err(schema("more than one element in soap:Body"));
            }
        } else {
            return Err(schema("unexpected element in soap:Envelope"));
        }
    }
    xml.finish()?;
    let (folders, event_types, watermark, status_frequency, url) =
        request.ok_or_else(|| schema("no soap:Body"))?;
    let server_version = server_version.ok_or_else(|| {
        RequestError::ServerVersion("the t:RequestServerVersion header is required".into())
    })?;
    if REFUSED_VERSIONS.contains(&server_version.as_str()) || server_version.is_empty() {
        return Err(RequestError::ServerVersion(format!(
            "{server_version}: Exchange2013 or later is required"
        )));
    }
    let mailbox = mailbox.ok_or_else(|| {
        RequestError::Impersonation(
            "t:ExchangeImpersonation/t:ConnectingSID/t:SmtpAddress is required".into(),
        )
    })?;
    Ok(ParsedSubscribe {
        server_version,
        mailbox,
        folders,
        event_types,
        watermark,
        status_frequency,
        url,
    })
}

pub(crate) fn read_impersonation(xml: &mut XmlReader<'_>) -> Result<Option<String>, RequestError> {
    let mut mailbox = None;
    while let Some(sid) = xml.child()? {
        if !sid.is(Ns::Types, "ConnectingSID") {
            xml.skip()?;
            continue;
        }
        while let Some(id) = xml.child()? {
            if id.is(Ns::Types, "SmtpAddress") {
                let text = xml.text()?;
                if !text.is_empty() {
                    mailbox = Some(text.into_owned());
                }
            } else {
                xml.skip()?;
            }
        }
    }
    Ok(mailbox)
}

type SubscribeParts = (FolderSpec, Vec<EventType>, Option<String>, u16, String);

/// Reads `m:Subscribe` (just entered): exactly one `m:PushSubscriptionRequest`.
fn read_subscribe(xml: &mut XmlReader<'_>) -> Result<SubscribeParts, RequestError> {
    let Some(request) = xml.child()? else {
        return Err(schema("m:Subscribe is empty"));
    };
    if !request.is(Ns::Messages, "PushSubscriptionRequest") {
        return Err(schema(format!(
            "only push subscriptions are simulated, found {}",
            String::from_utf8_lossy(request.local())
        )));
    }
    let parts = read_push_request(xml, &request)?;
    if xml.child()?.is_some() {
        return Err(schema("more than one subscription request in m:Subscribe"));
    }
    Ok(parts)
}

/// Reads `m:PushSubscriptionRequest`, enforcing the schema order
/// `FolderIds? EventTypes Watermark? StatusFrequency URL CallerData?`.
fn read_push_request(
    xml: &mut XmlReader<'_>,
    request: &Element<'_>,
) -> Result<SubscribeParts, RequestError> {
    const ORDER: [&str; 6] = [
        "FolderIds",
        "EventTypes",
        "Watermark",
        "StatusFrequency",
        "URL",
        "CallerData",
    ];
    let all_folders = match request.attr("SubscribeToAllFolders")?.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(schema(format!(
                "SubscribeToAllFolders={other:?} is not a boolean"
            )))
        }
    };
    let mut next_allowed = 0;
    let mut folders = None;
    let mut event_types = None;
    let (mut watermark, mut frequency, mut url) = (None, None, None);
    while let Some(child) = xml.child()? {
        let name = String::from_utf8_lossy(child.local()).into_owned();
        let position = ORDER.iter().position(|n| *n == name);
        let position = match (child.ns, position) {
            (Ns::Types, Some(p)) => p,
            _ => {
                return Err(schema(format!(
                    "unexpected element {name} in PushSubscriptionRequest"
                )))
            }
        };
        if position < next_allowed {
            return Err(schema(format!(
                "t:{name} out of order: expected FolderIds?, EventTypes, Watermark?, StatusFrequency, URL"
            )));
        }
        next_allowed = position + 1;
        match position {
            0 => folders = Some(read_folder_ids(xml)?),
            1 => event_types = Some(read_event_types(xml)?),
            2 => watermark = Some(xml.text()?.into_owned()),
            3 => {
                let text = xml.text()?;
                let minutes: u16 = text
                    .parse()
                    .map_err(|_| schema(format!("t:StatusFrequency {text:?} is not an integer")))?;
                if !(1..=MAX_STATUS_FREQUENCY).contains(&minutes) {
                    return Err(schema(format!(
                        "t:StatusFrequency {minutes} is outside 1..=1440"
                    )));
                }
                frequency = Some(minutes);
            }
            4 => url = Some(xml.text()?.into_owned()),
            _ => xml.skip()?,
        }
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
    Ok((
        folders,
        event_types.ok_or_else(|| schema("t:EventTypes is required"))?,
        watermark.filter(|w| !w.is_empty()),
        frequency.ok_or_else(|| schema("t:StatusFrequency is required"))?,
        url.ok_or_else(|| schema("t:URL is required"))?,
    ))
}

pub(crate) fn read_folder_ids(xml: &mut XmlReader<'_>) -> Result<Vec<String>, RequestError> {
    let mut folders = Vec::new();
    while let Some(folder) = xml.child()? {
        let id = match (folder.ns, folder.local()) {
            (Ns::Types, b"DistinguishedFolderId" | b"FolderId") => folder.attr("Id")?,
            _ => return Err(schema("t:FolderIds holds something other than folder ids")),
        };
        xml.skip()?;
        folders.push(
            id.filter(|id| !id.is_empty())
                .ok_or_else(|| schema("folder id without an Id attribute"))?
                .into_owned(),
        );
    }
    if folders.is_empty() {
        return Err(schema("t:FolderIds is empty"));
    }
    Ok(folders)
}

pub(crate) fn read_event_types(xml: &mut XmlReader<'_>) -> Result<Vec<EventType>, RequestError> {
    let mut types = Vec::new();
    while let Some(event_type) = xml.child()? {
        if !event_type.is(Ns::Types, "EventType") {
            return Err(schema(
                "t:EventTypes holds something other than t:EventType",
            ));
        }
        let name = xml.text()?;
        match EventType::from_name(&name) {
            Some(EventType::Status) | None => {
                return Err(schema(format!("{name:?} is not a subscribable event type")))
            }
            Some(kind) if !types.contains(&kind) => types.push(kind),
            Some(_) => {}
        }
    }
    if types.is_empty() {
        return Err(schema("t:EventTypes is empty"));
    }
    Ok(types)
}

/// Whether a callback URL passes Exchange's check (`ErrorInvalidPushSubscriptionUrl` if not).
pub fn valid_push_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    matches!(rest, Some(rest) if !rest.is_empty() && !rest.starts_with('/'))
        && url.len() < MAX_URL_LEN
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Parses a `GetUserSettingsRequestMessage` into its mailboxes, in request order.
pub fn parse_get_user_settings(body: &[u8]) -> Result<Vec<String>, RequestError> {
    let mut xml = XmlReader::new(body)?;
    let message = xml.open_body()?;
    if !message.is(Ns::Autodiscover, "GetUserSettingsRequestMessage") {
        return Err(schema("expected a:GetUserSettingsRequestMessage"));
    }
    let mut mailboxes = Vec::new();
    while let Some(request) = xml.child()? {
        if !request.is(Ns::Autodiscover, "Request") {
            xml.skip()?;
            continue;
        }
        while let Some(part) = xml.child()? {
            if !part.is(Ns::Autodiscover, "Users") {
                xml.skip()?;
                continue;
            }
            while let Some(user) = xml.child()? {
                if !user.is(Ns::Autodiscover, "User") {
                    xml.skip()?;
                    continue;
                }
                while let Some(field) = xml.child()? {
                    if field.is(Ns::Autodiscover, "Mailbox") {
                        mailboxes.push(xml.text()?.into_owned());
                    } else {
                        xml.skip()?;
                    }
                }
                if mailboxes.len() > ews::MAX_AUTODISCOVER_USERS {
                    return Err(schema("more than 100 users in one GetUserSettings"));
                }
            }
        }
    }
    xml.finish()?;
    if mailboxes.is_empty() {
        return Err(schema("no a:Users/a:User/a:Mailbox"));
    }
    Ok(mailboxes)
}

const XML_DECL: &str = "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n";

/// A `SubscribeResponse` with one message: success with id and watermark (none for a streaming
/// subscription: pass an empty one), or an error code.
pub fn subscribe_response(outcome: Result<(&str, &str), &str>) -> String {
    let mut xml = String::with_capacity(1024);
    xml.push_str(XML_DECL);
    xml.push_str("<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\">\n");
    if outcome.is_ok() {
        xml.push_str(&format!(
            "  <s:Header>\n    <h:ServerVersionInfo xmlns:h=\"{TYPES_NS}\" MajorVersion=\"15\" MinorVersion=\"20\" MajorBuildNumber=\"8722\" MinorBuildNumber=\"12\" Version=\"V2018_01_08\"/>\n  </s:Header>\n"
        ));
    }
    xml.push_str(&format!(
        "  <s:Body>\n    <m:SubscribeResponse xmlns:m=\"{MESSAGES_NS}\" xmlns:t=\"{TYPES_NS}\">\n      <m:ResponseMessages>\n"
    ));
    match outcome {
        Ok((id, watermark)) => {
            xml.push_str("        <m:SubscribeResponseMessage ResponseClass=\"Success\">\n          <m:ResponseCode>NoError</m:ResponseCode>\n          ");
            push_element(&mut xml, "m:SubscriptionId", id);
            xml.push('\n');
            // A streaming subscription has no watermark: Exchange sends only the id.
            if !watermark.is_empty() {
                xml.push_str("          ");
                push_element(&mut xml, "m:Watermark", watermark);
                xml.push('\n');
            }
        }
        Err(code) => {
            xml.push_str(
                "        <m:SubscribeResponseMessage ResponseClass=\"Error\">\n          ",
            );
            push_element(
                &mut xml,
                "m:MessageText",
                &format!("The request failed: {code}."),
            );
            xml.push_str("\n          ");
            push_element(&mut xml, "m:ResponseCode", code);
            xml.push_str("\n          <m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>\n");
        }
    }
    xml.push_str("        </m:SubscribeResponseMessage>\n      </m:ResponseMessages>\n    </m:SubscribeResponse>\n  </s:Body>\n</s:Envelope>\n");
    xml
}

/// A SOAP fault as EWS sends it with HTTP 500: the code in `faultcode` (types prefix) and in
/// `detail/e:ResponseCode`, plus `BackOffMilliseconds` for `ErrorServerBusy`.
pub fn fault(code: &str, message: &str, back_off_ms: Option<u64>) -> String {
    let mut xml = String::with_capacity(1024);
    xml.push_str(XML_DECL);
    xml.push_str("<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\">\n  <s:Body>\n    <s:Fault>\n");
    xml.push_str(&format!(
        "      <faultcode xmlns:a=\"{TYPES_NS}\">a:{}</faultcode>\n",
        quick_xml::escape::escape(code)
    ));
    xml.push_str(&format!(
        "      <faultstring xml:lang=\"en-US\">{}</faultstring>\n      <detail>\n",
        quick_xml::escape::escape(message)
    ));
    let errors = ews::ERRORS_NS;
    xml.push_str(&format!(
        "        <e:ResponseCode xmlns:e=\"{errors}\">{}</e:ResponseCode>\n",
        quick_xml::escape::escape(code)
    ));
    xml.push_str(&format!(
        "        <e:Message xmlns:e=\"{errors}\">{}</e:Message>\n",
        quick_xml::escape::escape(message)
    ));
    if let Some(ms) = back_off_ms {
        xml.push_str(&format!(
            "        <t:MessageXml xmlns:t=\"{TYPES_NS}\">\n          <t:Value Name=\"BackOffMilliseconds\">{ms}</t:Value>\n        </t:MessageXml>\n"
        ));
    }
    xml.push_str("      </detail>\n    </s:Fault>\n  </s:Body>\n</s:Envelope>\n");
    xml
}

/// What Autodiscover answers for one mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserAnswer {
    /// `NoError` with `ExternalEwsUrl` and `GroupingInformation`.
    Settings {
        /// The EWS URL.
        ews_url: String,
        /// The affinity group.
        grouping: String,
    },
    /// `RedirectAddress`: ask again for this address.
    RedirectAddress(String),
    /// `RedirectUrl`: ask this Autodiscover URL.
    RedirectUrl(String),
    /// `InvalidUser`.
    InvalidUser(String),
}

/// A `GetUserSettingsResponseMessage` in the shape of `getusersettings-response.xml`.
pub fn get_user_settings_response(users: &[UserAnswer]) -> String {
    let mut xml = String::with_capacity(1024 + 600 * users.len());
    xml.push_str(XML_DECL);
    xml.push_str("<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:a=\"http://www.w3.org/2005/08/addressing\">\n");
    xml.push_str("  <s:Header>\n    <a:Action s:mustUnderstand=\"1\">http://schemas.microsoft.com/exchange/2010/Autodiscover/Autodiscover/GetUserSettingsResponse</a:Action>\n  </s:Header>\n");
    xml.push_str("  <s:Body>\n    <GetUserSettingsResponseMessage xmlns=\"http://schemas.microsoft.com/exchange/2010/Autodiscover\">\n");
    xml.push_str("      <Response xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\">\n        <ErrorCode>NoError</ErrorCode>\n        <ErrorMessage/>\n        <UserResponses>\n");
    for user in users {
        xml.push_str("          <UserResponse>\n            ");
        let (code, message, target) = match user {
            UserAnswer::Settings { .. } => ("NoError", "No error.".to_owned(), None),
            UserAnswer::RedirectAddress(to) => (
                "RedirectAddress",
                format!("Redirect address: {to}"),
                Some(to),
            ),
            UserAnswer::RedirectUrl(to) => ("RedirectUrl", format!("Redirect URL: {to}"), Some(to)),
            UserAnswer::InvalidUser(who) => ("InvalidUser", format!("Invalid user: '{who}'"), None),
        };
        push_element(&mut xml, "ErrorCode", code);
        xml.push_str("\n            ");
        push_element(&mut xml, "ErrorMessage", &message);
        xml.push_str("\n            ");
        match target {
            Some(target) => push_element(&mut xml, "RedirectTarget", target),
            None => xml.push_str("<RedirectTarget i:nil=\"true\"/>"),
        }
        xml.push_str("\n            <UserSettingErrors/>\n");
        match user {
            UserAnswer::Settings { ews_url, grouping } => {
                xml.push_str("            <UserSettings>\n");
                for (name, value) in [
                    ("ExternalEwsUrl", ews_url),
                    ("GroupingInformation", grouping),
                ] {
                    xml.push_str(
                        "              <UserSetting i:type=\"StringSetting\">\n                ",
                    );
                    push_element(&mut xml, "Name", name);
                    xml.push_str("\n                ");
                    push_element(&mut xml, "Value", value);
                    xml.push_str("\n              </UserSetting>\n");
                }
                xml.push_str("            </UserSettings>\n");
            }
            _ => xml.push_str("            <UserSettings/>\n"),
        }
        xml.push_str("          </UserResponse>\n");
    }
    xml.push_str("        </UserResponses>\n      </Response>\n    </GetUserSettingsResponseMessage>\n  </s:Body>\n</s:Envelope>\n");
    xml
}

/// One event in a push, as the simulator writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEvent {
    /// The kind; `Status` for keep-alives.
    pub kind: EventType,
    /// The watermark after this event.
    pub watermark: String,
    /// `TimeStamp` (absent on `StatusEvent`).
    pub timestamp: Option<String>,
    /// `ItemId/@Id` (absent on `StatusEvent`).
    pub item_id: Option<String>,
    /// `ParentFolderId/@Id`.
    pub parent_folder_id: Option<String>,
}

const ENVELOPE_OPEN: &str = "<soap11:Envelope xmlns:soap11=\"http://schemas.xmlsoap.org/soap/envelope/\">\n  <soap11:Header>\n    <t:RequestServerVersion xmlns:t=\"http://schemas.microsoft.com/exchange/services/2006/types\" Version=\"Exchange2013\"/>\n  </soap11:Header>\n  <soap11:Body>\n";

fn send_notification_open(xml: &mut String) {
    xml.push_str(XML_DECL);
    xml.push_str(ENVELOPE_OPEN);
    let _ = write!(
        xml,
        "    <m:SendNotification xmlns:m=\"{MESSAGES_NS}\" xmlns:t=\"{TYPES_NS}\">\n      <m:ResponseMessages>\n"
    );
}

fn send_notification_close(xml: &mut String) {
    xml.push_str("      </m:ResponseMessages>\n    </m:SendNotification>\n  </soap11:Body>\n</soap11:Envelope>\n");
}

/// A successful `SendNotification` for one subscription, as in `send-notification-*.xml`.
pub fn send_notification(
    subscription_id: &str,
    previous_watermark: &str,
    more_events: bool,
    events: &[PushEvent],
) -> String {
    let mut xml = String::with_capacity(1024 + 400 * events.len());
    send_notification_open(&mut xml);
    xml.push_str("        <m:SendNotificationResponseMessage ResponseClass=\"Success\">\n          <m:ResponseCode>NoError</m:ResponseCode>\n          <m:Notification>\n            ");
    push_element(&mut xml, "t:SubscriptionId", subscription_id);
    xml.push_str("\n            ");
    push_element(&mut xml, "t:PreviousWatermark", previous_watermark);
    let _ = write!(
        xml,
        "\n            <t:MoreEvents>{more_events}</t:MoreEvents>\n"
    );
    for event in events {
        let name = event.kind.as_str();
        let _ = write!(xml, "            <t:{name}>\n              ");
        push_element(&mut xml, "t:Watermark", &event.watermark);
        xml.push('\n');
        if let Some(timestamp) = &event.timestamp {
            xml.push_str("              ");
            push_element(&mut xml, "t:TimeStamp", timestamp);
            xml.push('\n');
        }
        if let Some(id) = &event.item_id {
            let _ = writeln!(
                xml,
                "              <t:ItemId Id=\"{}\" ChangeKey=\"CQAAABYAAAB2n3Xo\"/>",
                quick_xml::escape::escape(id.as_str())
            );
        }
        if let Some(id) = &event.parent_folder_id {
            let _ = writeln!(
                xml,
                "              <t:ParentFolderId Id=\"{}\" ChangeKey=\"AQAAAA==\"/>",
                quick_xml::escape::escape(id.as_str())
            );
        }
        let _ = writeln!(xml, "            </t:{name}>");
    }
    xml.push_str("          </m:Notification>\n        </m:SendNotificationResponseMessage>\n");
    send_notification_close(&mut xml);
    xml
}

/// The error push of `send-notification-error.xml`: `ErrorReadEventsFailed`, no
/// `Notification`, the subscription id only in `MessageXml`.
pub fn send_notification_error(subscription_id: &str) -> String {
    let mut xml = String::with_capacity(1024);
    send_notification_open(&mut xml);
    xml.push_str("        <m:SendNotificationResponseMessage ResponseClass=\"Error\">\n          <m:MessageText>Events for this subscription cannot be read. The subscription must be created again.</m:MessageText>\n          <m:ResponseCode>ErrorReadEventsFailed</m:ResponseCode>\n          <m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>\n          <m:MessageXml>\n            <t:Value Name=\"SubscriptionId\">");
    xml.push_str(&quick_xml::escape::escape(subscription_id));
    xml.push_str(
        "</t:Value>\n          </m:MessageXml>\n        </m:SendNotificationResponseMessage>\n",
    );
    send_notification_close(&mut xml);
    xml
}
