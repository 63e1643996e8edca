//! Deliver: where an admitted notification goes. In passthrough the receiver gets the request
//! and answers Exchange ([`passthrough`]); in managed mode the relay answers Exchange itself for
//! the subscriptions it owns, once the notification is delivered or spooled ([`managed`]).

pub mod managed;
pub mod passthrough;
