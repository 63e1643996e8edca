//! The SOAP layer of Exchange Web Services push notifications: parse what Exchange sends to the
//! callback (`SendNotification`), build the callback's answer (`SendNotificationResult`), build
//! the requests the subscription manager sends (`Subscribe`, Autodiscover `GetUserSettings`),
//! parse their responses and faults, and say what each response code asks the caller to do.
//! Streaming notifications too (`streaming.rs`, `stream_split.rs`): the streaming `Subscribe`,
//! `GetStreamingEvents` and `Unsubscribe`, the envelopes of a streaming answer cut apart and
//! parsed, and a streamed notification rewritten as the `SendNotification` a push would be.
//!
//! Everything is matched by namespace URI and local name, never by prefix. Parsing is one pass
//! over the body with quick-xml's reader (namespaces resolved by the module's own reader, see
//! `xml.rs`), after one UTF-8 check of the whole body; it is bounded in depth, value size and
//! event count, and refuses DTDs outright. Parsed values borrow from the body (`Cow<'_, str>`)
//! and are only copied when the XML escaped them. `summarize_send_notification`, which runs on
//! every request the relay forwards, first tries a hand-written scanner (`fast.rs`) that
//! accepts a strict subset of that and leaves everything else to the full walk. No I/O happens
//! here: callers own HTTP, including the `X-AnchorMailbox` header that must accompany every
//! `Subscribe`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod autodiscover;
mod codes;
mod error;
mod fast;
mod fault;
mod notification;
mod response;
mod stream_split;
mod streaming;
mod subscribe;
pub mod xml;

pub use autodiscover::{
    build_get_user_settings, parse_get_user_settings_response, GetUserSettingsRequest, Redirect,
    UserResponse, UserSettingsResponse, MAX_AUTODISCOVER_USERS,
};
pub use codes::{classify, Action};
pub use error::EwsError;
pub use fault::{parse_fault, Fault};
pub use notification::{
    is_send_notification, parse_send_notification, parse_send_notification_result,
    send_notification_result, summarize_send_notification, summarize_send_notification_fast,
    summarize_send_notification_slow, Event, EventType, Id, MessageSummary, Notification,
    NotificationMessage, NotificationSummary, ObjectId, SendNotification, SubscriptionStatus,
    MAX_EVENTS,
};
pub use response::{ResponseClass, ResponseStatus};
pub use stream_split::{EnvelopeSplitter, DEFAULT_MAX_ENVELOPE};
pub use streaming::{
    get_streaming_events_request, parse_streaming_events, parse_unsubscribe_response,
    send_notification_from_stream, streaming_subscribe_request, unsubscribe_request,
    ConnectionStatus, StreamingBatch, StreamingMessage, StreamingSubscribeRequest,
    MAX_CONNECTION_TIMEOUT, MAX_STREAMING_SUBSCRIPTIONS,
};
pub use subscribe::{
    build_subscribe, parse_subscribe_response, Folders, SubscribeRequest, SubscribeResponse,
    DEFAULT_SERVER_VERSION, MAX_STATUS_FREQUENCY,
};
pub use xml::{MAX_ATTRIBUTES, MAX_DEPTH, MAX_URL_LEN, MAX_VALUE_LEN};

/// SOAP 1.1 envelope namespace, used by Exchange for every EWS and Autodiscover message.
pub const SOAP_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// EWS messages namespace (`m:`): request and response elements, `SendNotification`.
pub const MESSAGES_NS: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";
/// EWS types namespace (`t:`): everything inside the messages, notification events included.
pub const TYPES_NS: &str = "http://schemas.microsoft.com/exchange/services/2006/types";
/// EWS errors namespace (`e:`): the `ResponseCode` in a SOAP fault's `detail`.
pub const ERRORS_NS: &str = "http://schemas.microsoft.com/exchange/services/2006/errors";
/// SOAP Autodiscover namespace (`a:`), for `GetUserSettings`.
pub const AUTODISCOVER_NS: &str = "http://schemas.microsoft.com/exchange/2010/Autodiscover";
/// WS-Addressing namespace (`wsa:`): the `Action` and `To` headers SOAP Autodiscover requires.
pub const ADDRESSING_NS: &str = "http://www.w3.org/2005/08/addressing";
