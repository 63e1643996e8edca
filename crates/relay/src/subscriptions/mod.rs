//! The subscription manager (managed mode): keeps every configured mailbox subscribed to push
//! notifications with the relay's callback URL.

pub mod auth;
pub mod backoff;
pub mod client;
pub mod manager;
pub mod trace;

pub use manager::{Manager, Owner};

/// Subscription ids are long base64; logs show the start and the end.
pub fn abbreviate(id: &str) -> String {
    if id.len() <= 24 {
        id.to_owned()
    } else {
        let start: String = id.chars().take(10).collect();
        let end: String = id
            .chars()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("{start}…{end}")
    }
}
