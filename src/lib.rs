#![forbid(unsafe_code)]

pub mod ews;
