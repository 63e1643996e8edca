//! The EWS SOAP layer against Microsoft's schema, the fixtures in Exchange's shapes, hostile
//! input, and the fast path held to the full parser.

mod adversarial;
mod bench;
mod builders;
mod fast;
mod notification;
mod responses;
mod stream_split;
mod streaming;
