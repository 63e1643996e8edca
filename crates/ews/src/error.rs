//! The one error type of the `ews` module: why a body could not be read or a request not built.

use super::fault::Fault;
use super::xml::{MAX_DEPTH, MAX_VALUE_LEN};

/// Why an EWS message could not be parsed or built.
///
/// For a POST to the callback, any error means "not a usable SendNotification" (the relay
/// answers 400); the variants say why, for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum EwsError {
    /// Not well-formed XML: syntax error, truncated input, invalid UTF-8, unknown entity.
    #[error("malformed XML: {0}")]
    Malformed(String),
    /// Elements nested deeper than [`MAX_DEPTH`].
    #[error("XML nested deeper than {MAX_DEPTH} elements")]
    TooDeep,
    /// A single text or attribute value longer than [`MAX_VALUE_LEN`] bytes.
    #[error("XML value longer than {MAX_VALUE_LEN} bytes")]
    TooLarge,
    /// More of something than the module accepts in one message (events, attributes).
    #[error("more than {limit} {what}")]
    TooMany {
        /// What there were too many of.
        what: &'static str,
        /// The limit that was passed.
        limit: usize,
    },
    /// The body contains a `<!DOCTYPE`: refused so no entity is ever expanded or fetched.
    #[error("DOCTYPE declarations are not accepted")]
    DtdForbidden,
    /// The body is not a SOAP 1.1 `Envelope` (empty, JSON, another namespace …).
    #[error("not a SOAP 1.1 envelope")]
    NotSoapEnvelope,
    /// A SOAP envelope whose body holds another message than the one expected.
    #[error("expected {expected} in the SOAP body, found {found}")]
    UnexpectedMessage {
        /// The element the caller asked for, e.g. `m:SendNotification`.
        expected: &'static str,
        /// Local name of the element found instead (empty if the body was empty).
        found: String,
    },
    /// An element or attribute the schema requires is absent or unusable.
    #[error("missing or invalid {0}")]
    MissingElement(&'static str),
    /// A builder was given a value Exchange would reject.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The server answered with a SOAP fault instead of the expected response.
    #[error("SOAP fault {}: {}", .0.code, .0.message)]
    Fault(Box<Fault>),
}

impl EwsError {
    /// The body is not the XML or the SOAP it should be; `what` says where.
    pub fn malformed(what: impl std::fmt::Display) -> Self {
        EwsError::Malformed(what.to_string())
    }

    /// A value the caller gave (e.g. a URL) cannot be put in a message.
    pub fn invalid(field: &'static str, reason: &'static str) -> Self {
        EwsError::InvalidInput { field, reason }
    }
}

impl From<quick_xml::Error> for EwsError {
    fn from(e: quick_xml::Error) -> Self {
        EwsError::malformed(e)
    }
}

impl From<quick_xml::events::attributes::AttrError> for EwsError {
    fn from(e: quick_xml::events::attributes::AttrError) -> Self {
        EwsError::malformed(e)
    }
}

impl From<quick_xml::encoding::EncodingError> for EwsError {
    fn from(e: quick_xml::encoding::EncodingError) -> Self {
        EwsError::malformed(e)
    }
}
