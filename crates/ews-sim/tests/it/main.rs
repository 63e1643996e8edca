//! The simulated Exchange driven as the relay drives it, and its simulated Microsoft Graph.

mod graph;
mod sim;
mod streaming;
