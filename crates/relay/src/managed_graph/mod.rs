//! Managed Graph mode: the relay owns Microsoft Graph subscriptions for the configured
//! resources. The [`keeper`] creates, renews, replaces and deletes them through the [`client`];
//! [`inbound`] answers Graph's POSTs to the relay's own callback URLs (validation handshake,
//! `clientState` check, delivery before the 202).

pub mod client;
pub mod inbound;
pub mod keeper;

pub use keeper::{GraphKeeper, GraphView};
