//! The simulated Exchange driven as the relay drives it.

mod sim;
