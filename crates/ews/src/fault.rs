//! SOAP faults: what EWS answers (HTTP 500) instead of a response when it refuses a request as
//! a whole, throttling (`ErrorServerBusy` with `BackOffMilliseconds`) above all.

use std::time::Duration;

use super::codes::{classify, Action};
use super::response::read_message_xml;
use super::xml::{Element, Ns, XmlReader};
use super::EwsError;

/// A SOAP 1.1 fault. Owned, because it travels inside [`EwsError::Fault`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// `faultcode` as written, prefix included: `a:ErrorServerBusy`, `s:Client` …
    pub code: String,
    /// `faultstring`, for logs.
    pub message: String,
    /// `detail/e:ResponseCode`: the EWS response code, when Exchange gave one.
    pub response_code: Option<String>,
    /// `detail/t:MessageXml/t:Value[@Name="BackOffMilliseconds"]`: how long to wait.
    pub back_off: Option<Duration>,
}

impl Fault {
    /// What the caller should do: the detail's EWS code decides, else the fault code's local
    /// part (EWS writes its code there too).
    pub fn action(&self) -> Action {
        if let Some(code) = &self.response_code {
            return classify(code, self.back_off);
        }
        let local = self
            .code
            .rsplit_once(':')
            .map_or(self.code.as_str(), |(_, l)| l);
        match local {
            // A bare SOAP `Server` fault is the server failing, not the request: retry.
            "Server" => Action::Transient,
            code => classify(code, self.back_off),
        }
    }
}

/// Parses a SOAP envelope whose body is a `soap:Fault`.
///
/// The response parsers ([`super::parse_subscribe_response`] …) recognise faults themselves
/// and return them as [`EwsError::Fault`]; this is for callers that only have a fault.
pub fn parse_fault(body: &[u8]) -> Result<Fault, EwsError> {
    let mut xml = XmlReader::new(body)?;
    let message = xml.open_body()?;
    if !message.is(Ns::Soap, "Fault") {
        return Err(unexpected("Fault", &message));
    }
    let fault = read_fault(&mut xml)?;
    xml.finish()?;
    Ok(fault)
}

/// Enters the body and checks that it holds the element `local` in `ns`; a `soap:Fault` there
/// is read and returned as [`EwsError::Fault`].
pub fn open_message(xml: &mut XmlReader<'_>, ns: Ns, local: &'static str) -> Result<(), EwsError> {
    let message = xml.open_body()?;
    if message.is(ns, local) {
        Ok(())
    } else if message.is(Ns::Soap, "Fault") {
        Err(EwsError::Fault(Box::new(read_fault(xml)?)))
    } else {
        Err(unexpected(local, &message))
    }
}

fn unexpected(expected: &'static str, found: &Element<'_>) -> EwsError {
    EwsError::UnexpectedMessage {
        expected,
        found: String::from_utf8_lossy(found.local()).into_owned(),
    }
}

/// Reads the `soap:Fault` just entered. `faultcode`, `faultstring` and `detail` are
/// unqualified in SOAP 1.1, so they are matched by local name alone.
fn read_fault(xml: &mut XmlReader<'_>) -> Result<Fault, EwsError> {
    let (mut code, mut message) = (None, None);
    let (mut response_code, mut back_off) = (None, None);
    while let Some(child) = xml.child()? {
        match child.local() {
            b"faultcode" => code = Some(xml.text()?.into_owned()),
            b"faultstring" => message = Some(xml.text()?.into_owned()),
            b"detail" => {
                while let Some(detail) = xml.child()? {
                    match (detail.ns, detail.local()) {
                        (Ns::Errors, b"ResponseCode") => {
                            response_code = Some(xml.text()?.into_owned());
                        }
                        (Ns::Types | Ns::Messages, b"MessageXml") => {
                            back_off = read_message_xml(xml)?.back_off;
                        }
                        _ => xml.skip()?,
                    }
                }
            }
            _ => xml.skip()?,
        }
    }
    Ok(Fault {
        code: code.ok_or(EwsError::MissingElement("faultcode"))?,
        message: message.ok_or(EwsError::MissingElement("faultstring"))?,
        response_code,
        back_off,
    })
}
