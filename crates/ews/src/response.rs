//! What every EWS response message says about itself (`m:ResponseMessageType`): its class,
//! code and text, and the `MessageXml` values the relay acts on.

use std::borrow::Cow;
use std::time::Duration;

use super::codes::{classify, Action};
use super::xml::{Element, Ns, XmlReader};
use super::EwsError;

/// The `ResponseClass` attribute of a response message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseClass {
    /// The request succeeded.
    Success,
    /// Partly done; the code says what was not.
    Warning,
    /// Failed; the code says why.
    Error,
}

/// The status part of one response message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseStatus<'a> {
    /// `ResponseClass`.
    pub class: ResponseClass,
    /// `m:ResponseCode`, e.g. `NoError` or `ErrorInvalidWatermark`; optional in the schema.
    pub code: Option<Cow<'a, str>>,
    /// `m:MessageText`, for logs.
    pub message_text: Option<Cow<'a, str>>,
    /// `m:MessageXml/t:Value[@Name="BackOffMilliseconds"]`, sent with `ErrorServerBusy`.
    pub back_off: Option<Duration>,
}

impl ResponseStatus<'_> {
    /// What the caller should do about this message.
    pub fn action(&self) -> Action {
        match (&self.code, self.class) {
            (Some(code), _) => classify(code, self.back_off),
            (None, ResponseClass::Success) => Action::Success,
            (None, _) => classify("", self.back_off),
        }
    }
}

/// Walks the `m:ResponseMessages` of the message element just entered and hands every
/// response message named `name` to `each`, which must read it through its end tag;
/// everything else is skipped.
pub fn for_each_response_message<'i>(
    xml: &mut XmlReader<'i>,
    name: &str,
    mut each: impl FnMut(&mut XmlReader<'i>, &Element<'i>) -> Result<(), EwsError>,
) -> Result<(), EwsError> {
    while let Some(child) = xml.child()? {
        if !child.is(Ns::Messages, "ResponseMessages") {
            xml.skip()?;
            continue;
        }
        while let Some(message) = xml.child()? {
            if message.is(Ns::Messages, name) {
                each(xml, &message)?;
            } else {
                xml.skip()?;
            }
        }
    }
    Ok(())
}

/// Reads the response message just entered: class and common children into the returned
/// status; every other child is offered to `other`, which returns `false` to have it skipped.
/// Also returns `MessageXml/t:Value[@Name="SubscriptionId"]`, which is where Exchange names
/// the subscription of a failed notification.
pub fn read_response_message<'i>(
    xml: &mut XmlReader<'i>,
    message: &Element<'i>,
    mut other: impl FnMut(&mut XmlReader<'i>, &Element<'i>) -> Result<bool, EwsError>,
) -> Result<(ResponseStatus<'i>, Option<Cow<'i, str>>), EwsError> {
    let class = match message.attr("ResponseClass")?.as_deref() {
        Some("Success") => ResponseClass::Success,
        Some("Warning") => ResponseClass::Warning,
        Some("Error") => ResponseClass::Error,
        _ => return Err(EwsError::MissingElement("ResponseClass attribute")),
    };
    let mut status = ResponseStatus {
        class,
        code: None,
        message_text: None,
        back_off: None,
    };
    let mut subscription_id = None;
    while let Some(child) = xml.child()? {
        match (child.ns, child.local()) {
            (Ns::Messages, b"ResponseCode") => status.code = Some(xml.text()?),
            (Ns::Messages, b"MessageText") => status.message_text = Some(xml.text()?),
            (Ns::Messages, b"MessageXml") => {
                let values = read_message_xml(xml)?;
                status.back_off = values.back_off;
                subscription_id = values.subscription_id;
            }
            _ => {
                if !other(xml, &child)? {
                    xml.skip()?;
                }
            }
        }
    }
    Ok((status, subscription_id))
}

/// The `t:Value[@Name]` entries of a `MessageXml` that this module uses.
#[derive(Default)]
pub struct MessageXml<'i> {
    pub subscription_id: Option<Cow<'i, str>>,
    pub back_off: Option<Duration>,
}

/// Reads the `MessageXml` element just entered (messages namespace in a response message,
/// types namespace in a fault's detail: the caller matched it).
pub fn read_message_xml<'i>(xml: &mut XmlReader<'i>) -> Result<MessageXml<'i>, EwsError> {
    let mut values = MessageXml::default();
    while let Some(value) = xml.child()? {
        if !value.is(Ns::Types, "Value") {
            xml.skip()?;
            continue;
        }
        match value.attr("Name")?.as_deref() {
            Some("SubscriptionId") => values.subscription_id = Some(xml.text()?),
            // A value that is not a number counts as absent: the code alone still classifies.
            Some("BackOffMilliseconds") => {
                values.back_off = xml.text()?.parse().ok().map(Duration::from_millis);
            }
            _ => xml.skip()?,
        }
    }
    Ok(values)
}
