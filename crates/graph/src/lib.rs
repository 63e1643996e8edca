//! The Microsoft Graph change-notification protocol, as the relay needs it: parse the
//! `changeNotificationCollection` Graph POSTs to a notification URL (refusing anything
//! ambiguous), strip the `clientState` secret before an item reaches a receiver, decode the
//! `validationToken` of the subscription handshake, build the subscription create and renew
//! bodies and read Graph's answers and refusals, and format and parse Graph's timestamps.
//!
//! No I/O happens here: callers own HTTP, tokens and clocks. Everything is checked against
//! Microsoft's pages ("Receive change notifications through webhooks", the `subscription`,
//! `changeNotification` and `changeNotificationCollection` resource types, "Reduce missing
//! subscriptions and change notifications"); the tests use fixtures in Microsoft's shape.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod notification;
pub mod secret;
pub mod subscription;
pub mod time;
pub mod validation;

mod json;

pub use notification::{parse_collection, Collection, LifecycleEvent, Notification, ParseError};
pub use secret::{constant_time_eq, MAX_CLIENT_STATE};
pub use subscription::{
    mailbox_of, max_lifetime, max_minutes_in_error, parse_error, parse_subscription,
    valid_resource, ErrorBody, NewSubscription, Renewal, Subscription, CHANGE_TYPES, MIN_LIFETIME,
};
pub use time::{format_time, parse_time};
pub use validation::{validation_token, BadQuery};
