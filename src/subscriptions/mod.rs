//! The subscription manager (managed mode): keeps every configured mailbox subscribed to push
//! notifications with the relay's callback URL.

pub mod backoff;
pub mod client;
pub mod delivery;
pub mod manager;
pub mod trace;

pub use manager::{Manager, Owner};
