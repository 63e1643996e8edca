//! EWS response codes turned into what the subscription manager should do about them.

use std::time::Duration;

/// What a response code asks of whoever sent the request. The subscription manager maps each
/// variant to one recovery path; see PROTOCOL.md's table of errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `NoError`: the request did what it asked.
    Success,
    /// A passing server-side condition: retry with exponential backoff.
    Transient,
    /// Throttled (`ErrorServerBusy`): wait at least this long before the next request.
    BackOff(Duration),
    /// The mailbox moved: run Autodiscover again, then subscribe at the new EWS URL.
    Rediscover,
    /// The stored watermark is too old or from another database: subscribe without one and
    /// tell the receiver to resynchronise, since events in between are lost.
    ResubscribeWithoutWatermark,
    /// The subscription is gone on the server: subscribe again from the last watermark.
    Resubscribe,
    /// Wrong until someone changes configuration or permissions: report it, retry rarely.
    /// Also the answer for codes this module does not know (see [`classify`]).
    Permanent,
}

/// Maps an EWS `ResponseCode` (or a fault's `e:ResponseCode`) to an [`Action`].
///
/// `back_off` is `BackOffMilliseconds` from the message's or fault's `MessageXml`; it only
/// matters for `ErrorServerBusy`, which without it is plain [`Action::Transient`].
///
/// Unknown codes give [`Action::Permanent`]: a failure nobody has classified is reported to an
/// operator and retried rarely, rather than retried at full rate against a server whose limits
/// (27 concurrent requests, 20 subscriptions per mailbox) it might be the symptom of.
pub fn classify(code: &str, back_off: Option<Duration>) -> Action {
    match code {
        "NoError" => Action::Success,
        "ErrorServerBusy" => back_off.map_or(Action::Transient, Action::BackOff),
        "ErrorProxyRequestNotAllowed" | "ErrorReadEventsFailed" => Action::Rediscover,
        "ErrorInvalidWatermark" => Action::ResubscribeWithoutWatermark,
        "ErrorSubscriptionNotFound" | "ErrorExpiredSubscription" | "ErrorInvalidSubscription" => {
            Action::Resubscribe
        }
        // PROTOCOL.md's transient codes, plus the store and failover conditions Exchange
        // reports while a database moves or restarts.
        "ErrorMailboxMoveInProgress"
        | "ErrorInternalServerTransientError"
        | "ErrorConnectionFailed"
        | "ErrorTimeoutExpired"
        | "ErrorInternalServerError"
        | "ErrorMailboxStoreUnavailable"
        | "ErrorMailboxFailover"
        | "ErrorTooManyObjectsOpened" => Action::Transient,
        // Named here for the reader; they fall in the default arm anyway.
        "ErrorNonExistentMailbox"
        | "ErrorImpersonateUserDenied"
        | "ErrorSubscriptionAccessDenied"
        | "ErrorInvalidPushSubscriptionUrl"
        | "ErrorExceededSubscriptionCount" => Action::Permanent,
        _ => Action::Permanent,
    }
}
