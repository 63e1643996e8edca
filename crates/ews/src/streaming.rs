//! EWS streaming notifications (Exchange 2010 SP1 and later): the `Subscribe` that creates a
//! streaming subscription, the `GetStreamingEvents` that opens the long-lived connection its
//! events arrive on, the `Unsubscribe` that ends it, the parse of one envelope of that
//! connection's answer, and the `SendNotification` a push receiver would have got for the same
//! events, so that a relay can follow mailboxes by streaming and still deliver push.
//!
//! The answer to `GetStreamingEvents` is one chunked HTTP response holding a sequence of
//! complete SOAP envelopes; [`crate::EnvelopeSplitter`] cuts it into envelopes and
//! [`parse_streaming_events`] reads each one. No I/O happens here.

use std::borrow::Cow;

use super::fault::open_message;
use super::notification::{read_full_notification, Event, EventType, Id, Notification, ObjectId};
use super::response::{
    for_each_response_message, read_response_message, ResponseClass, ResponseStatus,
};
use super::subscribe::{
    check_folders_and_events, push_envelope_start, push_subscription_start, Folders,
};
use super::xml::{check_mailbox, check_server_version, check_text, push_element, Ns, XmlReader};
use super::{EwsError, MAX_EVENTS, MESSAGES_NS, SOAP_NS, TYPES_NS};

/// Most subscription ids one `GetStreamingEvents` may name: Microsoft's guidance for grouped
/// subscriptions ("Maintain affinity between a group of subscriptions and the Mailbox server")
/// puts at most 200 mailboxes behind one connection.
pub const MAX_STREAMING_SUBSCRIPTIONS: usize = 200;

/// Longest `ConnectionTimeout` in minutes: the schema's
/// `StreamingSubscriptionConnectionTimeoutType` is 1..=30. Exchange closes the connection
/// (`ConnectionStatus` `Closed`) when it runs out, and the client opens the next one.
pub const MAX_CONNECTION_TIMEOUT: u8 = 30;

/// `RequestServerVersion` values older than streaming notifications (added in Exchange 2010
/// SP1): a streaming `Subscribe` or `GetStreamingEvents` sent with one of these fails.
const PRE_STREAMING_VERSIONS: [&str; 3] = ["Exchange2007", "Exchange2007_SP1", "Exchange2010"];

/// A version name that is well-formed and not older than Exchange 2010 SP1.
fn check_streaming_server_version(version: &str) -> Result<(), EwsError> {
    check_server_version(version)?;
    if PRE_STREAMING_VERSIONS.contains(&version) {
        return Err(EwsError::invalid(
            "server_version",
            "streaming notifications need Exchange2010_SP1 or later",
        ));
    }
    Ok(())
}

/// A subscription id a builder can send: not empty, text XML can carry, not absurdly long.
fn check_subscription_id(id: &str) -> Result<(), EwsError> {
    if id.is_empty() {
        return Err(EwsError::invalid("subscription_id", "empty"));
    }
    if id.len() > super::MAX_VALUE_LEN {
        return Err(EwsError::invalid("subscription_id", "too long"));
    }
    check_text("subscription_id", id)
}

/// A streaming subscription for one mailbox. Send it with `X-AnchorMailbox: {mailbox}`.
///
/// Unlike a push subscription it has no watermark to resume from, no `StatusFrequency` and no
/// URL: events flow only while a `GetStreamingEvents` connection is open, and a subscription
/// no connection serves is dropped by Exchange after a while (not checked here how long).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamingSubscribeRequest<'a> {
    /// `RequestServerVersion`: `Exchange2010_SP1` or later, usually
    /// [`crate::DEFAULT_SERVER_VERSION`].
    pub server_version: &'a str,
    /// The impersonated mailbox (`ExchangeImpersonation/ConnectingSID/SmtpAddress`).
    pub mailbox: &'a str,
    /// The folders to watch.
    pub folders: Folders<'a>,
    /// The events wanted; at least one, never [`EventType::Status`].
    pub event_types: &'a [EventType],
}

/// Builds the SOAP envelope of a streaming `Subscribe`
/// (`m:Subscribe/m:StreamingSubscriptionRequest`), elements in schema order. Its response is
/// read by [`crate::parse_subscribe_response`]: a `SubscriptionId` and, for streaming, no
/// `Watermark`.
pub fn streaming_subscribe_request(
    request: &StreamingSubscribeRequest<'_>,
) -> Result<String, EwsError> {
    check_streaming_server_version(request.server_version)?;
    check_mailbox("mailbox", request.mailbox)?;
    check_folders_and_events(request.folders, request.event_types)?;

    let mut xml = String::with_capacity(768);
    push_envelope_start(&mut xml, request.server_version, Some(request.mailbox));
    xml.push_str("<m:Subscribe>");
    push_subscription_start(
        &mut xml,
        "m:StreamingSubscriptionRequest",
        request.folders,
        request.event_types,
    );
    xml.push_str("</m:StreamingSubscriptionRequest></m:Subscribe></soap:Body></soap:Envelope>");
    Ok(xml)
}

/// Builds the SOAP envelope of a `GetStreamingEvents` for the subscriptions `ids`, keeping the
/// connection open `connection_timeout_minutes` (1..=[`MAX_CONNECTION_TIMEOUT`]).
///
/// `impersonate` adds `ExchangeImpersonation` for that mailbox. For a group of subscriptions
/// from several mailboxes Microsoft's affinity guidance sends the request with the group's
/// `X-AnchorMailbox` and `X-PreferServerAffinity: true` headers (the caller's business); whether
/// to impersonate is left to the caller.
pub fn get_streaming_events_request(
    ids: &[&str],
    connection_timeout_minutes: u8,
    impersonate: Option<&str>,
    server_version: &str,
) -> Result<String, EwsError> {
    if ids.is_empty() {
        return Err(EwsError::invalid("subscription_ids", "empty"));
    }
    if ids.len() > MAX_STREAMING_SUBSCRIPTIONS {
        return Err(EwsError::invalid(
            "subscription_ids",
            "more than 200 in one GetStreamingEvents",
        ));
    }
    for id in ids {
        check_subscription_id(id)?;
    }
    if !(1..=MAX_CONNECTION_TIMEOUT).contains(&connection_timeout_minutes) {
        return Err(EwsError::invalid(
            "connection_timeout_minutes",
            "must be 1 to 30 minutes",
        ));
    }
    if let Some(mailbox) = impersonate {
        check_mailbox("impersonate", mailbox)?;
    }
    check_streaming_server_version(server_version)?;

    let mut xml = String::with_capacity(512 + ids.iter().map(|id| id.len() + 40).sum::<usize>());
    push_envelope_start(&mut xml, server_version, impersonate);
    xml.push_str("<m:GetStreamingEvents><m:SubscriptionIds>");
    for id in ids {
        push_element(&mut xml, "t:SubscriptionId", id);
    }
    xml.push_str("</m:SubscriptionIds>");
    push_element(
        &mut xml,
        "m:ConnectionTimeout",
        &connection_timeout_minutes.to_string(),
    );
    xml.push_str("</m:GetStreamingEvents></soap:Body></soap:Envelope>");
    Ok(xml)
}

/// Builds the SOAP envelope of an `Unsubscribe` of `subscription_id`: how a streaming (or pull)
/// subscription is ended at once, rather than left to expire. (Push subscriptions cannot be
/// ended this way; see PROTOCOL.md.) Read the answer with [`parse_unsubscribe_response`].
pub fn unsubscribe_request(
    subscription_id: &str,
    impersonate: Option<&str>,
    server_version: &str,
) -> Result<String, EwsError> {
    check_subscription_id(subscription_id)?;
    if let Some(mailbox) = impersonate {
        check_mailbox("impersonate", mailbox)?;
    }
    check_server_version(server_version)?;

    let mut xml = String::with_capacity(512 + subscription_id.len());
    push_envelope_start(&mut xml, server_version, impersonate);
    xml.push_str("<m:Unsubscribe>");
    push_element(&mut xml, "m:SubscriptionId", subscription_id);
    xml.push_str("</m:Unsubscribe></soap:Body></soap:Envelope>");
    Ok(xml)
}

/// Parses the response to an `Unsubscribe`: the status of its one `UnsubscribeResponseMessage`.
/// A SOAP fault comes back as [`EwsError::Fault`].
pub fn parse_unsubscribe_response(body: &[u8]) -> Result<ResponseStatus<'_>, EwsError> {
    let mut xml = XmlReader::new(body)?;
    open_message(&mut xml, Ns::Messages, "UnsubscribeResponse")?;
    let mut status = None;
    for_each_response_message(&mut xml, "UnsubscribeResponseMessage", |xml, message| {
        if status.is_some() {
            return xml.skip();
        }
        status = Some(read_response_message(xml, message, |_, _| Ok(false))?.0);
        Ok(())
    })?;
    xml.finish()?;
    status.ok_or(EwsError::MissingElement("m:UnsubscribeResponseMessage"))
}

/// `m:ConnectionStatus` of a streaming response message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionStatus {
    /// The connection stays open: on its own, a keep-alive.
    Ok,
    /// Exchange is closing the connection (its `ConnectionTimeout` ran out, or it was
    /// replaced): open a new `GetStreamingEvents` to keep receiving events.
    Closed,
}

/// One `m:GetStreamingEventsResponseMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamingMessage<'a> {
    /// Class, code, text and `BackOffMilliseconds` of the message. Codes seen here include
    /// `ErrorMissedNotificationEvents` (events were lost: the receiver must resynchronise, the
    /// subscription lives on), `ErrorSubscriptionNotFound` and `ErrorExpiredSubscription`
    /// (subscribe again), `ErrorExceededConnectionCount`, `ErrorNewEventStreamConnectionOpened`,
    /// `ErrorProxyRequestNotAllowed` and `ErrorServerBusy`.
    pub status: ResponseStatus<'a>,
    /// The events, one `Notification` per subscription that had any, in order.
    pub notifications: Vec<Notification<'a>>,
    /// `m:ErrorSubscriptionIds`: the subscriptions an error applies to. Also holds the id of
    /// `MessageXml/t:Value[@Name="SubscriptionId"]` if Exchange named one there instead.
    pub error_subscription_ids: Vec<Cow<'a, str>>,
    /// `m:ConnectionStatus`, when sent.
    pub connection_status: Option<ConnectionStatus>,
}

/// One envelope of a `GetStreamingEvents` answer: its `m:GetStreamingEventsResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamingBatch<'a> {
    /// The response messages, in order; at least one.
    pub messages: Vec<StreamingMessage<'a>>,
}

impl StreamingBatch<'_> {
    /// Whether this envelope only says the connection is alive: every message a success with
    /// no events, no error ids, and no `Closed`.
    pub fn is_keep_alive(&self) -> bool {
        self.messages.iter().all(|m| {
            m.status.class == ResponseClass::Success
                && m.notifications.is_empty()
                && m.error_subscription_ids.is_empty()
                && m.connection_status != Some(ConnectionStatus::Closed)
        })
    }

    /// Whether Exchange said it is closing the connection (`ConnectionStatus` `Closed`).
    pub fn is_closed(&self) -> bool {
        self.messages
            .iter()
            .any(|m| m.connection_status == Some(ConnectionStatus::Closed))
    }

    /// Every notification of the envelope, in order.
    pub fn notifications(&self) -> impl Iterator<Item = &Notification<'_>> {
        self.messages.iter().flat_map(|m| m.notifications.iter())
    }
}

/// Parses one envelope of a `GetStreamingEvents` answer, as [`crate::EnvelopeSplitter`] cuts
/// them. A SOAP fault in place of the response is [`EwsError::Fault`]; a per-message error is a
/// successful parse whose message carries the code. Namespaces are matched by URI; the
/// `Notification` elements and the `SubscriptionId`s of `ErrorSubscriptionIds` are accepted in
/// the messages namespace (as Exchange writes them, and as the EWS Managed API reads them) and
/// in the types namespace (as the schema declares them).
pub fn parse_streaming_events(envelope: &[u8]) -> Result<StreamingBatch<'_>, EwsError> {
    let mut xml = XmlReader::new(envelope)?;
    open_message(&mut xml, Ns::Messages, "GetStreamingEventsResponse")?;
    let mut messages = Vec::with_capacity(1);
    let mut budget = MAX_EVENTS;
    for_each_response_message(
        &mut xml,
        "GetStreamingEventsResponseMessage",
        |xml, message| {
            if messages.len() >= MAX_EVENTS {
                return Err(EwsError::TooMany {
                    what: "response messages in one streaming envelope",
                    limit: MAX_EVENTS,
                });
            }
            messages.push(read_streaming_message(xml, message, &mut budget)?);
            Ok(())
        },
    )?;
    xml.finish()?;
    if messages.is_empty() {
        return Err(EwsError::MissingElement(
            "m:GetStreamingEventsResponseMessage",
        ));
    }
    Ok(StreamingBatch { messages })
}

fn read_streaming_message<'i>(
    xml: &mut XmlReader<'i>,
    message: &super::xml::Element<'i>,
    budget: &mut usize,
) -> Result<StreamingMessage<'i>, EwsError> {
    let mut notifications = Vec::new();
    let mut error_subscription_ids = Vec::new();
    let mut connection_status = None;
    let (status, id_in_message_xml) = read_response_message(xml, message, |xml, child| {
        match (child.ns, child.local()) {
            (Ns::Messages, b"Notifications") => {
                while let Some(notification) = xml.child()? {
                    if matches!(notification.ns, Ns::Messages | Ns::Types)
                        && notification.local() == b"Notification"
                    {
                        notifications.push(read_full_notification(xml, budget)?);
                    } else {
                        xml.skip()?;
                    }
                }
            }
            (Ns::Messages, b"ErrorSubscriptionIds") => {
                while let Some(id) = xml.child()? {
                    if matches!(id.ns, Ns::Messages | Ns::Types) && id.local() == b"SubscriptionId"
                    {
                        *budget = budget.checked_sub(1).ok_or(EwsError::TooMany {
                            what: "events and ids in one streaming envelope",
                            limit: MAX_EVENTS,
                        })?;
                        let id = xml.text()?;
                        if id.is_empty() {
                            return Err(EwsError::MissingElement("t:SubscriptionId"));
                        }
                        error_subscription_ids.push(id);
                    } else {
                        xml.skip()?;
                    }
                }
            }
            (Ns::Messages, b"ConnectionStatus") => {
                connection_status = Some(match &*xml.text()? {
                    "OK" => ConnectionStatus::Ok,
                    "Closed" => ConnectionStatus::Closed,
                    _ => return Err(EwsError::MissingElement("m:ConnectionStatus")),
                });
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if let Some(id) = id_in_message_xml {
        if !id.is_empty() && !error_subscription_ids.contains(&id) {
            error_subscription_ids.push(id);
        }
    }
    Ok(StreamingMessage {
        status,
        notifications,
        error_subscription_ids,
        connection_status,
    })
}

/// Builds the `SendNotification` SOAP envelope Exchange would have POSTed to a push callback
/// for `notification`, a notification read from a stream: same elements, namespaces and order
/// as a push (`soap:Header/t:RequestServerVersion` with `server_version`, then
/// `m:SendNotification/m:ResponseMessages/m:SendNotificationResponseMessage` of class `Success`
/// and code `NoError`, and the `m:Notification` with its `PreviousWatermark`, `MoreEvents` and
/// events, each carrying what the stream carried). It reads back through
/// [`crate::parse_send_notification`] and [`crate::summarize_send_notification`] as the same
/// ids, events and watermarks.
///
/// Refused: an empty subscription id or no events (the schema wants at least one), text XML
/// cannot carry, an event without the ids its kind requires (`TimeStamp`, `ItemId` or
/// `FolderId`, `ParentFolderId`, and the old ids of a move or copy) and a value the push parser
/// would refuse (an empty id or watermark).
pub fn send_notification_from_stream(
    notification: &Notification<'_>,
    server_version: &str,
) -> Result<String, EwsError> {
    check_server_version(server_version)?;
    check_subscription_id(&notification.subscription_id)?;
    if notification.events.is_empty() {
        return Err(EwsError::invalid("events", "empty"));
    }
    if let Some(previous) = &notification.previous_watermark {
        check_value("previous_watermark", previous)?;
    }

    let mut xml = String::with_capacity(1024 + 700 * notification.events.len());
    xml.push_str(r#"<?xml version="1.0" encoding="utf-8"?>"#);
    xml.push_str(&format!(
        r#"<soap:Envelope xmlns:soap="{SOAP_NS}" xmlns:m="{MESSAGES_NS}" xmlns:t="{TYPES_NS}">"#
    ));
    xml.push_str(&format!(
        r#"<soap:Header><t:RequestServerVersion Version="{server_version}"/></soap:Header>"#
    ));
    xml.push_str("<soap:Body><m:SendNotification><m:ResponseMessages>");
    xml.push_str(r#"<m:SendNotificationResponseMessage ResponseClass="Success">"#);
    xml.push_str("<m:ResponseCode>NoError</m:ResponseCode><m:Notification>");
    push_text(&mut xml, "t:SubscriptionId", &notification.subscription_id);
    if let Some(previous) = &notification.previous_watermark {
        push_text(&mut xml, "t:PreviousWatermark", previous);
    }
    push_text(
        &mut xml,
        "t:MoreEvents",
        if notification.more_events {
            "true"
        } else {
            "false"
        },
    );
    for event in &notification.events {
        push_event(&mut xml, event)?;
    }
    xml.push_str("</m:Notification></m:SendNotificationResponseMessage>");
    xml.push_str("</m:ResponseMessages></m:SendNotification></soap:Body></soap:Envelope>");
    Ok(xml)
}

/// A value the push parser would take back: not empty, text XML can carry.
fn check_value(field: &'static str, value: &str) -> Result<(), EwsError> {
    if value.is_empty() {
        return Err(EwsError::invalid(field, "empty"));
    }
    check_text(field, value)
}

/// Appends one event in schema order (`BaseNotificationEventType`, then
/// `BaseObjectChangedEventType`, then `ModifiedEventType` or `MovedCopiedEventType`).
fn push_event(xml: &mut String, event: &Event<'_>) -> Result<(), EwsError> {
    let name = event.kind.as_str();
    xml.push_str("<t:");
    xml.push_str(name);
    xml.push('>');
    if let Some(watermark) = &event.watermark {
        check_value("watermark", watermark)?;
        push_text(xml, "t:Watermark", watermark);
    }
    if event.kind != EventType::Status {
        let timestamp = event
            .timestamp
            .as_deref()
            .ok_or(EwsError::invalid("timestamp", "missing on an object event"))?;
        check_value("timestamp", timestamp)?;
        push_text(xml, "t:TimeStamp", timestamp);
        match &event.object {
            Some(ObjectId::Item(id)) => push_id(xml, "t:ItemId", id)?,
            Some(ObjectId::Folder(id)) => push_id(xml, "t:FolderId", id)?,
            None => return Err(EwsError::invalid("object", "missing on an object event")),
        }
        let parent = event.parent_folder_id.as_ref().ok_or(EwsError::invalid(
            "parent_folder_id",
            "missing on an object event",
        ))?;
        push_id(xml, "t:ParentFolderId", parent)?;
        match event.kind {
            EventType::Modified => {
                if let Some(count) = event.unread_count {
                    push_text(xml, "t:UnreadCount", &count.to_string());
                }
            }
            EventType::Moved | EventType::Copied => {
                match &event.old_object {
                    Some(ObjectId::Item(id)) => push_id(xml, "t:OldItemId", id)?,
                    Some(ObjectId::Folder(id)) => push_id(xml, "t:OldFolderId", id)?,
                    None => {
                        return Err(EwsError::invalid("old_object", "missing on a move or copy"))
                    }
                }
                let old_parent = event
                    .old_parent_folder_id
                    .as_ref()
                    .ok_or(EwsError::invalid(
                        "old_parent_folder_id",
                        "missing on a move or copy",
                    ))?;
                push_id(xml, "t:OldParentFolderId", old_parent)?;
            }
            _ => {}
        }
    }
    xml.push_str("</t:");
    xml.push_str(name);
    xml.push('>');
    Ok(())
}

/// Appends an empty id element with its `Id` and `ChangeKey` attributes, escaped.
fn push_id(xml: &mut String, element: &str, id: &Id<'_>) -> Result<(), EwsError> {
    check_value("id", &id.id)?;
    xml.push('<');
    xml.push_str(element);
    xml.push_str(r#" Id=""#);
    push_attribute_value(xml, &id.id);
    xml.push('"');
    if let Some(change_key) = &id.change_key {
        check_text("change_key", change_key)?;
        xml.push_str(r#" ChangeKey=""#);
        push_attribute_value(xml, change_key);
        xml.push('"');
    }
    xml.push_str("/>");
    Ok(())
}

/// Appends `<{name}>{value}</{name}>`, escaped by [`push_attribute_value`] so that even a
/// carriage return (which a reader would turn into a line feed) reads back as it was.
fn push_text(xml: &mut String, name: &str, value: &str) {
    xml.push('<');
    xml.push_str(name);
    xml.push('>');
    push_attribute_value(xml, value);
    xml.push_str("</");
    xml.push_str(name);
    xml.push('>');
}

/// Escapes an attribute value for a double-quoted attribute. White space other than the space
/// is written as a character reference, so attribute-value normalisation gives it back as sent.
fn push_attribute_value(xml: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '&' => xml.push_str("&amp;"),
            '<' => xml.push_str("&lt;"),
            '>' => xml.push_str("&gt;"),
            '"' => xml.push_str("&quot;"),
            '\'' => xml.push_str("&apos;"),
            '\t' => xml.push_str("&#9;"),
            '\n' => xml.push_str("&#10;"),
            '\r' => xml.push_str("&#13;"),
            c => xml.push(c),
        }
    }
}
