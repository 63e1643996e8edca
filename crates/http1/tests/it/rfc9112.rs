//! RFC 9112 tables.
