//! SOAP Autodiscover `GetUserSettings`: where each mailbox's EWS endpoint is
//! (`ExternalEwsUrl`) and which backend group it belongs to (`GroupingInformation`), so the
//! subscription manager can group mailboxes for server affinity and follow mailbox moves.

use std::borrow::Cow;

use super::fault::open_message;
use super::xml::{check_mailbox, check_server_version, check_url, push_element, Ns, XmlReader};
use super::{EwsError, ADDRESSING_NS, AUTODISCOVER_NS, SOAP_NS};

/// Most mailboxes in one `GetUserSettings` request. A bound chosen here, not a documented
/// Exchange limit: it keeps each request and response small and a failure cheap to retry;
/// callers split longer lists.
pub const MAX_AUTODISCOVER_USERS: usize = 100;

/// The `wsa:Action` SOAP Autodiscover requires for `GetUserSettings`.
const GET_USER_SETTINGS_ACTION: &str =
    "http://schemas.microsoft.com/exchange/2010/Autodiscover/Autodiscover/GetUserSettings";

/// A `GetUserSettings` request for `ExternalEwsUrl` and `GroupingInformation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetUserSettingsRequest<'a> {
    /// `RequestedServerVersion`, usually [`super::DEFAULT_SERVER_VERSION`].
    pub server_version: &'a str,
    /// The Autodiscover service URL the request is POSTed to (`wsa:To`).
    pub url: &'a str,
    /// The mailboxes to look up, 1..=[`MAX_AUTODISCOVER_USERS`]; answers come in this order.
    pub mailboxes: &'a [&'a str],
}

/// Builds the SOAP envelope of a `GetUserSettings` request.
pub fn build_get_user_settings(request: &GetUserSettingsRequest<'_>) -> Result<String, EwsError> {
    check_server_version(request.server_version)?;
    check_url("url", request.url)?;
    if request.mailboxes.is_empty() {
        return Err(EwsError::invalid("mailboxes", "empty"));
    }
    if request.mailboxes.len() > MAX_AUTODISCOVER_USERS {
        return Err(EwsError::invalid(
            "mailboxes",
            "more than 100 in one request",
        ));
    }
    for mailbox in request.mailboxes {
        check_mailbox("mailboxes", mailbox)?;
    }

    let mut xml = String::with_capacity(1024 + 64 * request.mailboxes.len());
    xml.push_str(r#"<?xml version="1.0" encoding="utf-8"?>"#);
    xml.push_str(&format!(
        r#"<soap:Envelope xmlns:a="{AUTODISCOVER_NS}" xmlns:wsa="{ADDRESSING_NS}" "#
    ));
    xml.push_str(&format!(
        r#"xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:soap="{SOAP_NS}">"#
    ));
    xml.push_str("<soap:Header>");
    push_element(&mut xml, "a:RequestedServerVersion", request.server_version);
    push_element(&mut xml, "wsa:Action", GET_USER_SETTINGS_ACTION);
    push_element(&mut xml, "wsa:To", request.url);
    xml.push_str("</soap:Header><soap:Body><a:GetUserSettingsRequestMessage><a:Request><a:Users>");
    for mailbox in request.mailboxes {
        xml.push_str("<a:User>");
        push_element(&mut xml, "a:Mailbox", mailbox);
        xml.push_str("</a:User>");
    }
    xml.push_str("</a:Users><a:RequestedSettings>");
    push_element(&mut xml, "a:Setting", "ExternalEwsUrl");
    push_element(&mut xml, "a:Setting", "GroupingInformation");
    xml.push_str("</a:RequestedSettings></a:Request></a:GetUserSettingsRequestMessage>");
    xml.push_str("</soap:Body></soap:Envelope>");
    Ok(xml)
}

/// Where Autodiscover sends the caller instead of answering for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect<'a> {
    /// `ErrorCode` `RedirectAddress`: ask again for this address instead.
    Address(Cow<'a, str>),
    /// `ErrorCode` `RedirectUrl`: ask this Autodiscover URL instead.
    Url(Cow<'a, str>),
}

/// The answer for one requested mailbox (`UserResponse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserResponse<'a> {
    /// `ErrorCode`: `NoError`, `InvalidUser`, `RedirectAddress` …
    pub error_code: Option<Cow<'a, str>>,
    /// `ErrorMessage`, for logs.
    pub error_message: Option<Cow<'a, str>>,
    /// Set when `ErrorCode` is `RedirectAddress` or `RedirectUrl`, from `RedirectTarget`.
    pub redirect: Option<Redirect<'a>>,
    /// The `ExternalEwsUrl` setting: the EWS endpoint to subscribe at.
    pub external_ews_url: Option<Cow<'a, str>>,
    /// The `GroupingInformation` setting: mailboxes sharing it (and the URL) can share an
    /// affinity group.
    pub grouping_information: Option<Cow<'a, str>>,
}

/// A parsed `GetUserSettingsResponseMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSettingsResponse<'a> {
    /// The request-level `ErrorCode`; anything but `NoError` means no user was looked up.
    pub error_code: Option<Cow<'a, str>>,
    /// The request-level `ErrorMessage`.
    pub error_message: Option<Cow<'a, str>>,
    /// One answer per requested mailbox, in request order (the answers do not name them).
    pub users: Vec<UserResponse<'a>>,
}

/// Parses the response to a `GetUserSettings` request. A SOAP fault comes back as
/// [`EwsError::Fault`].
pub fn parse_get_user_settings_response(body: &[u8]) -> Result<UserSettingsResponse<'_>, EwsError> {
    let mut xml = XmlReader::new(body)?;
    open_message(&mut xml, Ns::Autodiscover, "GetUserSettingsResponseMessage")?;
    let mut response = None;
    while let Some(child) = xml.child()? {
        if child.is(Ns::Autodiscover, "Response") {
            response = Some(read_response(&mut xml)?);
        } else {
            xml.skip()?;
        }
    }
    xml.finish()?;
    response.ok_or(EwsError::MissingElement("a:Response"))
}

fn read_response<'i>(xml: &mut XmlReader<'i>) -> Result<UserSettingsResponse<'i>, EwsError> {
    let mut response = UserSettingsResponse {
        error_code: None,
        error_message: None,
        users: Vec::new(),
    };
    while let Some(child) = xml.child()? {
        match (child.ns, child.local()) {
            (Ns::Autodiscover, b"ErrorCode") => response.error_code = non_empty(xml.text()?),
            (Ns::Autodiscover, b"ErrorMessage") => response.error_message = non_empty(xml.text()?),
            (Ns::Autodiscover, b"UserResponses") => {
                while let Some(user) = xml.child()? {
                    if user.is(Ns::Autodiscover, "UserResponse") {
                        response.users.push(read_user(xml)?);
                    } else {
                        xml.skip()?;
                    }
                }
            }
            _ => xml.skip()?,
        }
    }
    Ok(response)
}

fn read_user<'i>(xml: &mut XmlReader<'i>) -> Result<UserResponse<'i>, EwsError> {
    let mut user = UserResponse {
        error_code: None,
        error_message: None,
        redirect: None,
        external_ews_url: None,
        grouping_information: None,
    };
    let mut redirect_target = None;
    while let Some(child) = xml.child()? {
        match (child.ns, child.local()) {
            (Ns::Autodiscover, b"ErrorCode") => user.error_code = non_empty(xml.text()?),
            (Ns::Autodiscover, b"ErrorMessage") => user.error_message = non_empty(xml.text()?),
            (Ns::Autodiscover, b"RedirectTarget") => redirect_target = non_empty(xml.text()?),
            (Ns::Autodiscover, b"UserSettings") => {
                while let Some(setting) = xml.child()? {
                    if !setting.is(Ns::Autodiscover, "UserSetting") {
                        xml.skip()?;
                        continue;
                    }
                    let (name, value) = read_setting(xml)?;
                    match name.as_deref() {
                        Some("ExternalEwsUrl") => user.external_ews_url = value,
                        Some("GroupingInformation") => user.grouping_information = value,
                        _ => {}
                    }
                }
            }
            _ => xml.skip()?,
        }
    }
    user.redirect = match (user.error_code.as_deref(), redirect_target) {
        (Some("RedirectAddress"), Some(target)) => Some(Redirect::Address(target)),
        (Some("RedirectUrl"), Some(target)) => Some(Redirect::Url(target)),
        _ => None,
    };
    Ok(user)
}

/// A `UserSetting`'s `Name` and `Value` (string settings; other kinds have no `Value`).
type Setting<'i> = (Option<Cow<'i, str>>, Option<Cow<'i, str>>);

fn read_setting<'i>(xml: &mut XmlReader<'i>) -> Result<Setting<'i>, EwsError> {
    let (mut name, mut value) = (None, None);
    while let Some(child) = xml.child()? {
        match (child.ns, child.local()) {
            (Ns::Autodiscover, b"Name") => name = Some(xml.text()?),
            (Ns::Autodiscover, b"Value") => value = non_empty(xml.text()?),
            _ => xml.skip()?,
        }
    }
    Ok((name, value))
}

/// Autodiscover writes absent values as empty or `i:nil` elements: both mean `None`.
fn non_empty(text: Cow<'_, str>) -> Option<Cow<'_, str>> {
    (!text.is_empty()).then_some(text)
}
