//! The push `Subscribe` request the subscription manager sends for one mailbox, and the
//! `SubscribeResponse` that gives it a subscription id and watermark (or says why not).

use std::borrow::Cow;

use super::fault::open_message;
use super::notification::EventType;
use super::response::{
    for_each_response_message, read_response_message, ResponseClass, ResponseStatus,
};
use super::xml::{
    check_mailbox, check_server_version, check_text, check_url, push_element, Ns, XmlReader,
};
use super::{EwsError, MESSAGES_NS, SOAP_NS, TYPES_NS};

/// `RequestServerVersion` sent unless configured otherwise: the oldest version with the
/// header-based routing (`X-AnchorMailbox`) the relay relies on.
pub const DEFAULT_SERVER_VERSION: &str = "Exchange2013";

/// Largest `StatusFrequency` in minutes (the schema's `SubscriptionStatusFrequencyType` is
/// 1..=1440). The value also sets how long Exchange keeps retrying a silent callback.
pub const MAX_STATUS_FREQUENCY: u16 = 1440;

/// Which folders a subscription watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folders<'a> {
    /// These distinguished folders (`calendar`, `inbox` …), as `t:DistinguishedFolderId`.
    Distinguished(&'a [&'a str]),
    /// Every folder of the mailbox (`SubscribeToAllFolders="true"`).
    All,
}

impl<'a> Folders<'a> {
    /// These distinguished folders, or every folder when `names` is empty (how the relay's
    /// `--folder` list reads: none given means the whole mailbox).
    pub fn from_names(names: &'a [&'a str]) -> Self {
        if names.is_empty() {
            Folders::All
        } else {
            Folders::Distinguished(names)
        }
    }
}

/// A push subscription for one mailbox. Send it with `X-AnchorMailbox: {mailbox}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeRequest<'a> {
    /// `RequestServerVersion`, usually [`DEFAULT_SERVER_VERSION`].
    pub server_version: &'a str,
    /// The impersonated mailbox (`ExchangeImpersonation/ConnectingSID/SmtpAddress`).
    pub mailbox: &'a str,
    /// The folders to watch.
    pub folders: Folders<'a>,
    /// The events wanted; at least one, never [`EventType::Status`] (always sent anyway).
    pub event_types: &'a [EventType],
    /// Where to resume: the last watermark stored for this mailbox.
    pub watermark: Option<&'a str>,
    /// Minutes between keep-alives on an idle subscription, 1..=[`MAX_STATUS_FREQUENCY`].
    pub status_frequency: u16,
    /// The callback URL Exchange will POST to.
    pub url: &'a str,
}

/// Builds the SOAP envelope of a push `Subscribe`, elements in schema order.
pub fn build_subscribe(request: &SubscribeRequest<'_>) -> Result<String, EwsError> {
    check_server_version(request.server_version)?;
    check_mailbox("mailbox", request.mailbox)?;
    check_folders_and_events(request.folders, request.event_types)?;
    if let Some(watermark) = request.watermark {
        if watermark.is_empty() {
            return Err(EwsError::invalid("watermark", "empty"));
        }
        check_text("watermark", watermark)?;
    }
    if !(1..=MAX_STATUS_FREQUENCY).contains(&request.status_frequency) {
        return Err(EwsError::invalid(
            "status_frequency",
            "must be 1 to 1440 minutes",
        ));
    }
    check_url("url", request.url)?;

    let mut xml = String::with_capacity(1024);
    push_envelope_start(&mut xml, request.server_version, Some(request.mailbox));
    xml.push_str("<m:Subscribe>");
    push_subscription_start(
        &mut xml,
        "m:PushSubscriptionRequest",
        request.folders,
        request.event_types,
    );
    if let Some(watermark) = request.watermark {
        push_element(&mut xml, "t:Watermark", watermark);
    }
    push_element(
        &mut xml,
        "t:StatusFrequency",
        &request.status_frequency.to_string(),
    );
    push_element(&mut xml, "t:URL", request.url);
    xml.push_str("</m:PushSubscriptionRequest></m:Subscribe></soap:Body></soap:Envelope>");
    Ok(xml)
}

/// Refuses folder and event lists Exchange would refuse in any `Subscribe`, push or streaming.
pub(super) fn check_folders_and_events(
    folders: Folders<'_>,
    event_types: &[EventType],
) -> Result<(), EwsError> {
    if let Folders::Distinguished(folders) = folders {
        if folders.is_empty() {
            return Err(EwsError::invalid("folders", "empty"));
        }
        // Every DistinguishedFolderIdNameType value is a lower-case ASCII word.
        if !folders
            .iter()
            .all(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_lowercase()))
        {
            return Err(EwsError::invalid(
                "folders",
                "not a distinguished folder name",
            ));
        }
    }
    if event_types.is_empty() {
        return Err(EwsError::invalid("event_types", "empty"));
    }
    if event_types.contains(&EventType::Status) {
        return Err(EwsError::invalid(
            "event_types",
            "StatusEvent cannot be subscribed to",
        ));
    }
    Ok(())
}

/// Appends the XML declaration, the envelope's start tag with the `soap:`, `m:` and `t:`
/// declarations, the header (`RequestServerVersion`, and `ExchangeImpersonation` when
/// `impersonate` names a mailbox) and the body's start tag: everything before the message.
/// The caller checked `server_version` and the mailbox.
pub(super) fn push_envelope_start(
    xml: &mut String,
    server_version: &str,
    impersonate: Option<&str>,
) {
    xml.push_str(r#"<?xml version="1.0" encoding="utf-8"?>"#);
    xml.push_str(&format!(
        r#"<soap:Envelope xmlns:soap="{SOAP_NS}" xmlns:m="{MESSAGES_NS}" xmlns:t="{TYPES_NS}">"#
    ));
    xml.push_str("<soap:Header>");
    xml.push_str(&format!(
        r#"<t:RequestServerVersion Version="{server_version}"/>"#
    ));
    if let Some(mailbox) = impersonate {
        xml.push_str("<t:ExchangeImpersonation><t:ConnectingSID>");
        push_element(xml, "t:SmtpAddress", mailbox);
        xml.push_str("</t:ConnectingSID></t:ExchangeImpersonation>");
    }
    xml.push_str("</soap:Header><soap:Body>");
}

/// Appends the start of a subscription request element (`element`, e.g.
/// `m:PushSubscriptionRequest`), its `FolderIds` or `SubscribeToAllFolders`, and its
/// `EventTypes`: the part push and streaming subscriptions share, in schema order. The caller
/// checked both lists and closes the element.
pub(super) fn push_subscription_start(
    xml: &mut String,
    element: &str,
    folders: Folders<'_>,
    event_types: &[EventType],
) {
    match folders {
        Folders::All => xml.push_str(&format!(r#"<{element} SubscribeToAllFolders="true">"#)),
        Folders::Distinguished(folders) => {
            xml.push_str(&format!("<{element}><t:FolderIds>"));
            for folder in folders {
                xml.push_str(&format!(r#"<t:DistinguishedFolderId Id="{folder}"/>"#));
            }
            xml.push_str("</t:FolderIds>");
        }
    }
    xml.push_str("<t:EventTypes>");
    for event_type in event_types {
        push_element(xml, "t:EventType", event_type.as_str());
    }
    xml.push_str("</t:EventTypes>");
}

/// A parsed `SubscribeResponse`: its one `SubscribeResponseMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeResponse<'a> {
    /// Class and code; [`ResponseStatus::action`] says what to do on failure.
    pub status: ResponseStatus<'a>,
    /// The new subscription's id (`m:SubscriptionId`); present on success.
    pub subscription_id: Option<Cow<'a, str>>,
    /// The watermark the subscription starts at (`m:Watermark`, messages namespace).
    pub watermark: Option<Cow<'a, str>>,
}

/// Parses the response to a `Subscribe`. A SOAP fault comes back as [`EwsError::Fault`]; a
/// per-message error is a successful parse whose `status` carries the code.
pub fn parse_subscribe_response(body: &[u8]) -> Result<SubscribeResponse<'_>, EwsError> {
    let mut xml = XmlReader::new(body)?;
    open_message(&mut xml, Ns::Messages, "SubscribeResponse")?;
    let mut response = None;
    for_each_response_message(&mut xml, "SubscribeResponseMessage", |xml, message| {
        // One Subscribe asks for one subscription: the first message is the answer.
        if response.is_some() {
            return xml.skip();
        }
        let (mut subscription_id, mut watermark) = (None, None);
        let (status, _) = read_response_message(xml, message, |xml, child| {
            match (child.ns, child.local()) {
                (Ns::Messages, b"SubscriptionId") => subscription_id = Some(xml.text()?),
                (Ns::Messages, b"Watermark") => watermark = Some(xml.text()?),
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        response = Some(SubscribeResponse {
            status,
            subscription_id,
            watermark,
        });
        Ok(())
    })?;
    xml.finish()?;
    let response = response.ok_or(EwsError::MissingElement("m:SubscribeResponseMessage"))?;
    let succeeded = response.status.class == ResponseClass::Success;
    if succeeded
        && response
            .subscription_id
            .as_deref()
            .is_none_or(str::is_empty)
    {
        return Err(EwsError::MissingElement("m:SubscriptionId"));
    }
    Ok(response)
}
