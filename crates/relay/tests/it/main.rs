//! ews-relay's integration tests, one binary: a real relay on ephemeral loopback ports, real
//! TLS, real receivers, the EWS simulator for Exchange.

mod acme;
mod budget;
mod cli;
mod client_certificate;
mod client_ip;
mod common;
mod durability;
mod graph_durability;
mod graph_managed;
mod graph_passthrough;
mod http1;
mod managed;
mod managed_discovery;
mod ranges;
mod relay;
mod reload;
mod startup;
mod status_page;
mod store;
mod streaming;
mod streaming_admin;
mod streaming_faults;
mod streaming_side_by_side;
mod tracking;
