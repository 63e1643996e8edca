//! `SendNotification`, what Exchange POSTs to the callback URL, parsed into typed values; and
//! `SendNotificationResult`, the callback's answer. The parse runs on every request the relay
//! forwards, so it is one pass that borrows its strings from the body.

use std::borrow::Cow;

use super::fast::summarize_fast;
use super::fault::open_message;
use super::response::{
    for_each_response_message, read_response_message, ResponseClass, ResponseStatus,
};
use super::xml::{Element, Ns, XmlReader};
use super::EwsError;

/// Most events accepted in one SendNotification, and separately most response messages.
/// Exchange sends events in batches and sets `MoreEvents` when more follow, so real bodies
/// hold far fewer; the cap bounds the memory a hostile body can make the parser allocate.
pub const MAX_EVENTS: usize = 10_000;

/// The kinds of notification event, named as in the schema without the `Event` suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// An item or folder was copied.
    Copied,
    /// An item or folder was created.
    Created,
    /// An item or folder was deleted.
    Deleted,
    /// An item or folder changed (for folders, often only `UnreadCount`).
    Modified,
    /// An item or folder was moved; the event carries the old ids.
    Moved,
    /// A message arrived in the mailbox.
    NewMail,
    /// Free/busy information changed.
    FreeBusyChanged,
    /// Keep-alive sent when the subscription is idle; cannot be subscribed to.
    Status,
}

impl EventType {
    /// Every event type, in schema order.
    pub const ALL: [EventType; 8] = [
        EventType::Copied,
        EventType::Created,
        EventType::Deleted,
        EventType::Modified,
        EventType::Moved,
        EventType::NewMail,
        EventType::FreeBusyChanged,
        EventType::Status,
    ];

    /// The schema's name: the event's element name and the `t:EventType` value in `Subscribe`.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::Copied => "CopiedEvent",
            EventType::Created => "CreatedEvent",
            EventType::Deleted => "DeletedEvent",
            EventType::Modified => "ModifiedEvent",
            EventType::Moved => "MovedEvent",
            EventType::NewMail => "NewMailEvent",
            EventType::FreeBusyChanged => "FreeBusyChangedEvent",
            EventType::Status => "StatusEvent",
        }
    }

    /// The event type whose schema name is `name` (`"NewMailEvent"`), for configuration too.
    pub fn from_name(name: &str) -> Option<EventType> {
        Self::from_element(name.as_bytes())
    }

    /// Position in [`EventType::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    pub(super) fn from_element(name: &[u8]) -> Option<EventType> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().as_bytes() == name)
    }
}

/// An EWS item or folder id: opaque `Id` and, when present, the `ChangeKey` of that version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id<'a> {
    /// The `Id` attribute.
    pub id: Cow<'a, str>,
    /// The `ChangeKey` attribute.
    pub change_key: Option<Cow<'a, str>>,
}

/// What an event is about: an item (`ItemId`, `OldItemId`) or a folder (`FolderId`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectId<'a> {
    /// An item: message, meeting, contact …
    Item(Id<'a>),
    /// A folder.
    Folder(Id<'a>),
}

/// One notification event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// Which event this is.
    pub kind: EventType,
    /// Where a subscription made with this watermark would resume, after this event.
    pub watermark: Option<Cow<'a, str>>,
    /// `TimeStamp` (xs:dateTime, as sent); absent on `StatusEvent`.
    pub timestamp: Option<Cow<'a, str>>,
    /// `ItemId` or `FolderId`.
    pub object: Option<ObjectId<'a>>,
    /// `ParentFolderId`: the folder the object is in (after the move, for `MovedEvent`).
    pub parent_folder_id: Option<Id<'a>>,
    /// `OldItemId` or `OldFolderId`, on `MovedEvent` and `CopiedEvent`.
    pub old_object: Option<ObjectId<'a>>,
    /// `OldParentFolderId`, on `MovedEvent` and `CopiedEvent`.
    pub old_parent_folder_id: Option<Id<'a>>,
    /// `UnreadCount`, on `ModifiedEvent` for a folder.
    pub unread_count: Option<u32>,
}

/// The `Notification` of one response message: one subscription's batch of events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification<'a> {
    /// The subscription these events belong to.
    pub subscription_id: Cow<'a, str>,
    /// The watermark of the last event delivered before this batch.
    pub previous_watermark: Option<Cow<'a, str>>,
    /// Whether Exchange has more events queued and will POST again at once.
    pub more_events: bool,
    /// The events, in order; a keep-alive holds one `Status` event.
    pub events: Vec<Event<'a>>,
}

impl Notification<'_> {
    /// The watermark to store for resuming after this batch: the last event's.
    pub fn last_watermark(&self) -> Option<&str> {
        self.events
            .iter()
            .rev()
            .find_map(|e| e.watermark.as_deref())
    }
}

/// One `SendNotificationResponseMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationMessage<'a> {
    /// Class, code and text of the message; `Error` when Exchange can no longer read events.
    pub status: ResponseStatus<'a>,
    /// The subscription the message is about: from `Notification`, or when Exchange sent an
    /// error without one, from `MessageXml/t:Value[@Name="SubscriptionId"]`.
    pub subscription_id: Option<Cow<'a, str>>,
    /// The events; absent on an error message.
    pub notification: Option<Notification<'a>>,
}

/// A parsed `m:SendNotification`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendNotification<'a> {
    /// The response messages, one per subscription; at least one.
    pub messages: Vec<NotificationMessage<'a>>,
}

impl<'a> SendNotification<'a> {
    /// What [`summarize_send_notification`] returns for the same body.
    pub fn summary(&self) -> NotificationSummary<'a> {
        let messages = self
            .messages
            .iter()
            .map(|m| {
                let mut summary = MessageSummary {
                    class: m.status.class,
                    code: m.status.code.clone(),
                    subscription_id: m.subscription_id.clone(),
                    event_counts: [0; EventType::ALL.len()],
                    last_watermark: None,
                };
                if let Some(n) = &m.notification {
                    for e in &n.events {
                        summary.event_counts[e.kind.index()] += 1;
                    }
                    summary.last_watermark = n.last_watermark().map(|w| Cow::Owned(w.to_owned()));
                }
                summary
            })
            .collect();
        NotificationSummary { messages }
    }
}

/// What the relay tracks of one `SendNotificationResponseMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSummary<'a> {
    /// `ResponseClass`.
    pub class: ResponseClass,
    /// `m:ResponseCode`.
    pub code: Option<Cow<'a, str>>,
    /// As [`NotificationMessage::subscription_id`].
    pub subscription_id: Option<Cow<'a, str>>,
    /// How many events of each kind, in [`EventType::ALL`] order; all 0 without a notification.
    pub event_counts: [u32; EventType::ALL.len()],
    /// As [`Notification::last_watermark`]; `None` without a notification.
    pub last_watermark: Option<Cow<'a, str>>,
}

/// A `m:SendNotification` reduced to what the relay tracks: see
/// [`summarize_send_notification`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationSummary<'a> {
    /// One per response message, in order; at least one.
    pub messages: Vec<MessageSummary<'a>>,
}

/// Parses the body of a POST to the callback URL as [`parse_send_notification`] does (the same
/// checks, so the same bodies are refused with the same errors) but keeps only what the relay
/// tracks: no events are built and no item or folder ids decoded.
///
/// Bodies shaped the way Exchange writes them take a fast path (`fast.rs`) that is about five
/// times cheaper; anything it is not sure about goes through the full walk, which gives the
/// verdict.
pub fn summarize_send_notification(body: &[u8]) -> Result<NotificationSummary<'_>, EwsError> {
    match summarize_fast(body) {
        Some(summary) => Ok(summary),
        None => summarize_send_notification_slow(body),
    }
}

/// [`summarize_send_notification`] by the full, namespace-aware walk alone: the reference the
/// fast path is held to (differential tests and the `summarize_fast` fuzz target), and the path
/// every body the fast path does not take goes.
pub fn summarize_send_notification_slow(body: &[u8]) -> Result<NotificationSummary<'_>, EwsError> {
    let mut messages = Vec::with_capacity(1);
    walk_send_notification::<false>(body, |message, tally| {
        messages.push(MessageSummary {
            class: message.status.class,
            code: message.status.code,
            subscription_id: message.subscription_id,
            event_counts: tally.counts,
            last_watermark: tally.last_watermark,
        });
    })?;
    Ok(NotificationSummary { messages })
}

/// The fast path of [`summarize_send_notification`] alone: a scanner for the strict subset of
/// XML that Exchange writes; `None` means it left the body to the full walk. Whenever it is
/// `Some(s)`, [`summarize_send_notification_slow`] returns `Ok(s)`.
pub fn summarize_send_notification_fast(body: &[u8]) -> Option<NotificationSummary<'_>> {
    summarize_fast(body)
}

/// Parses the body of a POST to the callback URL.
///
/// Any error means the body is not a usable SendNotification (the relay answers 400); see
/// [`EwsError`] for why. Unknown elements, event types included, are ignored.
pub fn parse_send_notification(body: &[u8]) -> Result<SendNotification<'_>, EwsError> {
    let mut messages = Vec::with_capacity(1);
    walk_send_notification::<true>(body, |message, _| messages.push(message))?;
    Ok(SendNotification { messages })
}

/// The one walk behind [`parse_send_notification`] and [`summarize_send_notification`], so
/// both check exactly the same. With `FULL` false no events are built: each message comes
/// with its notification's events left empty, and only the tally says what they were.
fn walk_send_notification<'i, const FULL: bool>(
    body: &'i [u8],
    mut each: impl FnMut(NotificationMessage<'i>, Tally<'i>),
) -> Result<(), EwsError> {
    let mut xml = XmlReader::new(body)?;
    open_message(&mut xml, Ns::Messages, "SendNotification")?;
    let (mut messages_left, mut events_left) = (MAX_EVENTS, MAX_EVENTS);
    for_each_response_message(
        &mut xml,
        "SendNotificationResponseMessage",
        |xml, message| {
            spend(
                &mut messages_left,
                "response messages in one SendNotification",
            )?;
            let (message, tally) = read_message::<FULL>(xml, message, &mut events_left)?;
            each(message, tally);
            Ok(())
        },
    )?;
    xml.finish()?;
    // No SendNotificationResponseMessage at all.
    if messages_left == MAX_EVENTS {
        return Err(EwsError::MissingElement(
            "m:SendNotificationResponseMessage",
        ));
    }
    Ok(())
}

/// Whether `body` is a SOAP envelope whose body is `m:SendNotification`, reading no further
/// than that start tag: a cheap routing check. [`parse_send_notification`] gives the verdict
/// on the whole body.
pub fn is_send_notification(body: &[u8]) -> bool {
    let mut xml = XmlReader::prefix(body);
    matches!(xml.open_body(), Ok(m) if m.is(Ns::Messages, "SendNotification"))
}

/// Counts one more of `what` against a budget of [`MAX_EVENTS`].
fn spend(left: &mut usize, what: &'static str) -> Result<(), EwsError> {
    *left = left.checked_sub(1).ok_or(EwsError::TooMany {
        what,
        limit: MAX_EVENTS,
    })?;
    Ok(())
}

/// The events of one message by kind, and the last watermark among them.
struct Tally<'i> {
    counts: [u32; EventType::ALL.len()],
    last_watermark: Option<Cow<'i, str>>,
}

fn read_message<'i, const FULL: bool>(
    xml: &mut XmlReader<'i>,
    message: &Element<'i>,
    budget: &mut usize,
) -> Result<(NotificationMessage<'i>, Tally<'i>), EwsError> {
    let mut notification = None;
    let mut tally = Tally {
        counts: [0; EventType::ALL.len()],
        last_watermark: None,
    };
    let (status, id_in_message_xml) = read_response_message(xml, message, |xml, child| {
        if !child.is(Ns::Messages, "Notification") {
            return Ok(false);
        }
        notification = Some(read_notification::<FULL>(xml, budget, &mut tally)?);
        Ok(true)
    })?;
    let subscription_id = match &notification {
        Some(n) => Some(n.subscription_id.clone()),
        None => id_in_message_xml,
    };
    let message = NotificationMessage {
        status,
        subscription_id,
        notification,
    };
    Ok((message, tally))
}

/// Reads the `Notification` element just entered, events included, spending one of `budget`
/// per event: for the `Notification`s of a streaming response, which have the same type.
pub(super) fn read_full_notification<'i>(
    xml: &mut XmlReader<'i>,
    budget: &mut usize,
) -> Result<Notification<'i>, EwsError> {
    let mut tally = Tally {
        counts: [0; EventType::ALL.len()],
        last_watermark: None,
    };
    read_notification::<true>(xml, budget, &mut tally)
}

fn read_notification<'i, const FULL: bool>(
    xml: &mut XmlReader<'i>,
    budget: &mut usize,
    tally: &mut Tally<'i>,
) -> Result<Notification<'i>, EwsError> {
    let (mut subscription_id, mut previous_watermark) = (None, None);
    let mut more_events = false;
    let mut events = Vec::new();
    while let Some(child) = xml.child()? {
        if child.ns != Ns::Types {
            xml.skip()?;
            continue;
        }
        match child.local() {
            b"SubscriptionId" => subscription_id = Some(xml.text()?),
            b"PreviousWatermark" => previous_watermark = Some(xml.text()?),
            b"MoreEvents" => more_events = boolean(&xml.text()?, "t:MoreEvents")?,
            name => match EventType::from_element(name) {
                Some(kind) => {
                    spend(budget, "events in one SendNotification")?;
                    let event = read_event::<FULL>(xml, kind)?;
                    if FULL {
                        events.push(event);
                    } else {
                        tally.counts[kind.index()] += 1;
                        if event.watermark.is_some() {
                            tally.last_watermark = event.watermark;
                        }
                    }
                }
                // An event type newer than this code.
                None => xml.skip()?,
            },
        }
    }
    Ok(Notification {
        subscription_id: subscription_id.ok_or(EwsError::MissingElement("t:SubscriptionId"))?,
        previous_watermark,
        more_events,
        events,
    })
}

/// Reads the event just entered. With `FULL` false only kind and watermark are kept; the
/// other children get the same checks (an id needs its `Id`, a count must be a number).
fn read_event<'i, const FULL: bool>(
    xml: &mut XmlReader<'i>,
    kind: EventType,
) -> Result<Event<'i>, EwsError> {
    let mut event = Event {
        kind,
        watermark: None,
        timestamp: None,
        object: None,
        parent_folder_id: None,
        old_object: None,
        old_parent_folder_id: None,
        unread_count: None,
    };
    while let Some(child) = xml.child()? {
        if child.ns != Ns::Types {
            xml.skip()?;
            continue;
        }
        let local = child.local();
        if !FULL {
            match local {
                b"Watermark" => event.watermark = Some(xml.text()?),
                b"ItemId" | b"FolderId" | b"ParentFolderId" | b"OldItemId" | b"OldFolderId"
                | b"OldParentFolderId" => {
                    // Values were checked when the tag was read: only presence is left.
                    if !child.has_attr("Id") {
                        return Err(EwsError::MissingElement("Id attribute"));
                    }
                    xml.skip()?;
                }
                b"TimeStamp" => drop(xml.text()?),
                b"UnreadCount" => drop(unread_count(&xml.text()?)?),
                _ => xml.skip()?,
            }
            continue;
        }
        match local {
            b"Watermark" => event.watermark = Some(xml.text()?),
            b"TimeStamp" => event.timestamp = Some(xml.text()?),
            b"ItemId" => event.object = Some(ObjectId::Item(read_id(xml, &child)?)),
            b"FolderId" => event.object = Some(ObjectId::Folder(read_id(xml, &child)?)),
            b"ParentFolderId" => event.parent_folder_id = Some(read_id(xml, &child)?),
            b"OldItemId" => event.old_object = Some(ObjectId::Item(read_id(xml, &child)?)),
            b"OldFolderId" => event.old_object = Some(ObjectId::Folder(read_id(xml, &child)?)),
            b"OldParentFolderId" => event.old_parent_folder_id = Some(read_id(xml, &child)?),
            b"UnreadCount" => event.unread_count = Some(unread_count(&xml.text()?)?),
            _ => xml.skip()?,
        }
    }
    Ok(event)
}

fn read_id<'i>(xml: &mut XmlReader<'i>, element: &Element<'i>) -> Result<Id<'i>, EwsError> {
    let [id, change_key] = element.attrs(["Id", "ChangeKey"])?;
    xml.skip()?;
    Ok(Id {
        id: id.ok_or(EwsError::MissingElement("Id attribute"))?,
        change_key,
    })
}

/// `t:UnreadCount`.
fn unread_count(text: &str) -> Result<u32, EwsError> {
    text.parse().map_err(|_| invalid("t:UnreadCount"))
}

/// `xs:boolean`.
fn boolean(text: &str, element: &'static str) -> Result<bool, EwsError> {
    match text {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(invalid(element)),
    }
}

fn invalid(element: &'static str) -> EwsError {
    EwsError::MissingElement(element)
}

/// The callback's answer to a SendNotification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionStatus {
    /// Keep the subscription and keep sending.
    Ok,
    /// End the subscription: the only way a push subscription can be ended.
    Unsubscribe,
}

/// The SOAP envelope answering a SendNotification, to send with HTTP 200 and
/// `Content-Type: text/xml; charset=utf-8`. A constant: answering costs nothing.
pub fn send_notification_result(status: SubscriptionStatus) -> &'static str {
    macro_rules! envelope {
        ($status:literal) => {
            concat!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n",
                "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\">\n",
                "  <s:Body>\n",
                "    <m:SendNotificationResult xmlns:m=\"http://schemas.microsoft.com/exchange/services/2006/messages\">\n",
                "      <m:SubscriptionStatus>",
                $status,
                "</m:SubscriptionStatus>\n",
                "    </m:SendNotificationResult>\n",
                "  </s:Body>\n",
                "</s:Envelope>\n",
            )
        };
    }
    match status {
        SubscriptionStatus::Ok => envelope!("OK"),
        SubscriptionStatus::Unsubscribe => envelope!("Unsubscribe"),
    }
}

/// Parses a `SendNotificationResult`: what a receiver answered Exchange, which the relay
/// watches in passthrough mode to learn that a subscription is being ended.
pub fn parse_send_notification_result(body: &[u8]) -> Result<SubscriptionStatus, EwsError> {
    let mut xml = XmlReader::new(body)?;
    open_message(&mut xml, Ns::Messages, "SendNotificationResult")?;
    let mut status = None;
    while let Some(child) = xml.child()? {
        if !child.is(Ns::Messages, "SubscriptionStatus") {
            xml.skip()?;
            continue;
        }
        status = match &*xml.text()? {
            "OK" => Some(SubscriptionStatus::Ok),
            "Unsubscribe" => Some(SubscriptionStatus::Unsubscribe),
            _ => return Err(invalid("m:SubscriptionStatus")),
        };
    }
    xml.finish()?;
    status.ok_or(EwsError::MissingElement("m:SubscriptionStatus"))
}
