//! The bounded, namespace-aware XML reader every parser in `ews` walks a body with, and the
//! checks and escaping every builder applies to the text it writes.
//!
//! Parsers are small recursive-descent functions over [`XmlReader`]: [`XmlReader::child`] yields
//! the next child element of the one just entered, [`XmlReader::text`] reads a leaf's text,
//! [`XmlReader::skip`] passes over an element the caller does not want. The limits below are
//! enforced on every event, in skipped elements too, so no input can make a parse expensive.

use std::borrow::Cow;

use quick_xml::escape::resolve_xml_entity;
use quick_xml::events::attributes::Attributes;
use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

use super::EwsError;

/// Deepest element nesting accepted. A SendNotification is 8 levels deep at its deepest
/// (Envelope, Body, SendNotification, ResponseMessages, message, Notification, event, ItemId);
/// 64 leaves room for extensions while a hostile 10,000-deep body is refused after 64 tags.
pub const MAX_DEPTH: usize = 64;

/// Longest single text or attribute value accepted, in bytes. Subscription ids, watermarks and
/// item ids are a few hundred bytes; 64 KiB is generous for those and still stops one huge value
/// from being copied or unescaped.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// Most attributes accepted on one element. EWS elements carry a handful (Id, ChangeKey,
/// namespace declarations); the cap keeps namespace resolution, which scans the declarations in
/// scope, cheap even on a body full of declarations.
pub const MAX_ATTRIBUTES: usize = 32;

/// Longest URL accepted by a builder, exclusive: Exchange refuses push URLs of 2083
/// characters or more, and no Autodiscover URL comes near that.
pub const MAX_URL_LEN: usize = 2083;

/// The namespaces the parsers match on; any other URI is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ns {
    Soap,
    Messages,
    Types,
    Errors,
    Autodiscover,
    Other,
}

impl Ns {
    fn of(resolved: ResolveResult<'_>) -> Ns {
        let ResolveResult::Bound(ns) = resolved else {
            return Ns::Other;
        };
        match ns.into_inner() {
            b"http://schemas.xmlsoap.org/soap/envelope/" => Ns::Soap,
            b"http://schemas.microsoft.com/exchange/services/2006/messages" => Ns::Messages,
            b"http://schemas.microsoft.com/exchange/services/2006/types" => Ns::Types,
            b"http://schemas.microsoft.com/exchange/services/2006/errors" => Ns::Errors,
            b"http://schemas.microsoft.com/exchange/2010/Autodiscover" => Ns::Autodiscover,
            _ => Ns::Other,
        }
    }
}

/// A start tag, with its namespace resolved.
pub(crate) struct Element<'i> {
    pub ns: Ns,
    start: BytesStart<'i>,
    input: &'i [u8],
}

impl<'i> Element<'i> {
    /// Whether this is the element `local` in namespace `ns`.
    pub fn is(&self, ns: Ns, local: &str) -> bool {
        self.ns == ns && self.local() == local.as_bytes()
    }

    /// The local name, without prefix.
    pub fn local(&self) -> &[u8] {
        self.start.local_name().into_inner()
    }

    /// The value of the unqualified attribute `name` (EWS attributes such as `Id` carry no
    /// prefix), borrowed from the body unless it had to be unescaped.
    pub fn attr(&self, name: &str) -> Result<Option<Cow<'i, str>>, EwsError> {
        self.attrs([name]).map(|[value]| value)
    }

    /// Several attributes in one pass over the tag.
    pub fn attrs<const N: usize>(
        &self,
        names: [&str; N],
    ) -> Result<[Option<Cow<'i, str>>; N], EwsError> {
        let name_len = self.start.name().into_inner().len();
        match self.tag_in_input() {
            Some(tag) => find_attrs(Attributes::new(tag, name_len), names),
            None => Ok(find_attrs(self.start.attributes(), names)?
                .map(|value| value.map(|v| Cow::Owned(v.into_owned())))),
        }
    }

    /// The tag's text as a slice of the body itself, so attribute values can borrow from the
    /// body rather than from this short-lived event. The slice reader hands out sub-slices of
    /// its input, so this finds the tag by address; `None` (values get copied) otherwise.
    fn tag_in_input(&self) -> Option<&'i str> {
        let tag: &[u8] = &self.start;
        let offset = (tag.as_ptr() as usize).checked_sub(self.input.as_ptr() as usize)?;
        let bytes = self.input.get(offset..offset.checked_add(tag.len())?)?;
        std::str::from_utf8(bytes).ok()
    }
}

fn find_attrs<'a, const N: usize>(
    mut attrs: Attributes<'a>,
    names: [&str; N],
) -> Result<[Option<Cow<'a, str>>; N], EwsError> {
    let decoder = attrs.decoder();
    let mut values = [const { None }; N];
    for attr in attrs.with_checks(false) {
        let attr = attr?;
        let key = attr.key.into_inner();
        if let Some(i) = names.iter().position(|name| name.as_bytes() == key) {
            if values[i].is_none() {
                values[i] = Some(attr.decode_and_unescape_value(decoder)?);
            }
        }
    }
    Ok(values)
}

/// What [`XmlReader::next`] yields: comments, processing instructions and the XML declaration
/// are dropped, empty elements come as a start and an end.
pub(crate) enum Node<'i> {
    Start(Element<'i>),
    End,
    Text(Cow<'i, str>),
    Eof,
}

/// A one-pass reader over a whole body that enforces the limits of this module.
pub(crate) struct XmlReader<'i> {
    reader: NsReader<&'i [u8]>,
    input: &'i [u8],
    /// Elements currently open.
    depth: usize,
    /// Whether the root element has started, to refuse a second one.
    seen_root: bool,
}

impl<'i> XmlReader<'i> {
    /// A reader over a whole body, positioned before its first byte.
    pub fn new(input: &'i [u8]) -> Self {
        let mut reader = NsReader::from_reader(input);
        // `<a/>` comes as Start + End, so parsers handle one shape.
        reader.config_mut().expand_empty_elements = true;
        Self {
            reader,
            input,
            depth: 0,
            seen_root: false,
        }
    }

    /// The next node, after the depth, size and DTD checks. White space outside the root is
    /// dropped; anything else there is an error.
    pub fn next(&mut self) -> Result<Node<'i>, EwsError> {
        loop {
            let (ns, event) = match self.reader.read_resolved_event() {
                Ok((ns, event)) => (Ns::of(ns), event),
                Err(e) => {
                    let at = self.reader.error_position();
                    return Err(EwsError::malformed(format_args!("{e} (at byte {at})")));
                }
            };
            let text = match event {
                Event::Start(start) => {
                    if self.depth == 0 && self.seen_root {
                        return Err(EwsError::malformed("content after the root element"));
                    }
                    self.seen_root = true;
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        return Err(EwsError::TooDeep);
                    }
                    check_attributes(&start)?;
                    let input = self.input;
                    return Ok(Node::Start(Element { ns, start, input }));
                }
                // `expand_empty_elements` turns every `<a/>` into Start + End.
                Event::Empty(_) => return Err(EwsError::malformed("unexpanded empty element")),
                Event::End(_) => {
                    // quick-xml checks that end tags match their start tags.
                    self.depth = self.depth.saturating_sub(1);
                    return Ok(Node::End);
                }
                Event::Text(text) => text.xml10_content()?,
                Event::CData(cdata) => cdata.xml10_content()?,
                Event::GeneralRef(reference) => resolve_reference(&reference)?,
                Event::DocType(_) => return Err(EwsError::DtdForbidden),
                Event::Decl(_) | Event::PI(_) | Event::Comment(_) => continue,
                Event::Eof if self.depth > 0 => {
                    return Err(EwsError::malformed(
                        "truncated: input ends inside an element",
                    ))
                }
                Event::Eof => return Ok(Node::Eof),
            };
            if text.len() > MAX_VALUE_LEN {
                return Err(EwsError::TooLarge);
            }
            if self.depth > 0 {
                return Ok(Node::Text(text));
            }
            if !text.trim_matches(is_xml_space).is_empty() {
                return Err(if self.seen_root {
                    EwsError::malformed("text after the root element")
                } else {
                    // JSON, a form, plain text: not XML at all, let alone SOAP.
                    EwsError::NotSoapEnvelope
                });
            }
        }
    }

    /// The next child element of the element just entered, or `None` at its end tag.
    /// Text between child elements is ignored.
    pub fn child(&mut self) -> Result<Option<Element<'i>>, EwsError> {
        loop {
            match self.next()? {
                Node::Start(element) => return Ok(Some(element)),
                Node::End | Node::Eof => return Ok(None),
                Node::Text(_) => {}
            }
        }
    }

    /// Passes over the rest of the element just entered, through its end tag.
    pub fn skip(&mut self) -> Result<(), EwsError> {
        let outer = self.depth.saturating_sub(1);
        while self.depth > outer {
            if let Node::Eof = self.next()? {
                break;
            }
        }
        Ok(())
    }

    /// The text of the element just entered, through its end tag, trimmed of XML white space.
    /// Child elements (which EWS leaves never have) are skipped.
    pub fn text(&mut self) -> Result<Cow<'i, str>, EwsError> {
        let mut text = Cow::Borrowed("");
        loop {
            match self.next()? {
                Node::Text(piece) if text.is_empty() => text = piece,
                Node::Text(piece) => {
                    if text.len() + piece.len() > MAX_VALUE_LEN {
                        return Err(EwsError::TooLarge);
                    }
                    text.to_mut().push_str(&piece);
                }
                Node::Start(_) => self.skip()?,
                Node::End | Node::Eof => return Ok(trim(text)),
            }
        }
    }

    /// Enters `soap:Envelope/soap:Body` and returns the body's first element: the message.
    pub fn open_body(&mut self) -> Result<Element<'i>, EwsError> {
        match self.next()? {
            Node::Start(root) if root.is(Ns::Soap, "Envelope") => {}
            _ => return Err(EwsError::NotSoapEnvelope),
        }
        while let Some(element) = self.child()? {
            if !element.is(Ns::Soap, "Body") {
                self.skip()?; // Header, or anything else an intermediary added
                continue;
            }
            return self.child()?.ok_or(EwsError::UnexpectedMessage {
                expected: "a message in soap:Body",
                found: String::new(),
            });
        }
        Err(EwsError::MissingElement("soap:Body"))
    }

    /// Reads the rest of the document, so a truncated or trailing-garbage body is refused
    /// even when the message itself was complete.
    pub fn finish(mut self) -> Result<(), EwsError> {
        loop {
            if let Node::Eof = self.next()? {
                return Ok(());
            }
        }
    }
}

/// Counts and sizes the attributes of every element, and rejects duplicates (the check is
/// quadratic, which the count keeps small).
fn check_attributes(start: &BytesStart<'_>) -> Result<(), EwsError> {
    // Most EWS elements have none: skip the iterator for them.
    if start.attributes_raw().trim_ascii().is_empty() {
        return Ok(());
    }
    for (count, attr) in start.attributes().enumerate() {
        if count >= MAX_ATTRIBUTES {
            return Err(EwsError::TooMany {
                what: "attributes on one element",
                limit: MAX_ATTRIBUTES,
            });
        }
        if attr?.value.len() > MAX_VALUE_LEN {
            return Err(EwsError::TooLarge);
        }
    }
    Ok(())
}

/// `&amp;`, `&#65;` and the other predefined references; anything else would need a DTD.
fn resolve_reference(reference: &BytesRef<'_>) -> Result<Cow<'static, str>, EwsError> {
    if let Some(c) = reference.resolve_char_ref()? {
        return Ok(Cow::Owned(c.to_string()));
    }
    let name = reference.decode()?;
    resolve_xml_entity(&name)
        .map(Cow::Borrowed)
        .ok_or_else(|| EwsError::malformed(format_args!("unknown entity &{name};")))
}

fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

fn trim(text: Cow<'_, str>) -> Cow<'_, str> {
    match text {
        Cow::Borrowed(s) => Cow::Borrowed(s.trim_matches(is_xml_space)),
        Cow::Owned(s) if s.trim_matches(is_xml_space).len() == s.len() => Cow::Owned(s),
        Cow::Owned(s) => Cow::Owned(s.trim_matches(is_xml_space).to_owned()),
    }
}

/// Refuses text a builder cannot put into XML 1.0 at all (control characters, U+FFFE,
/// U+FFFF); escaping takes care of the rest.
pub(crate) fn check_text(field: &'static str, value: &str) -> Result<(), EwsError> {
    let allowed = |c: char| {
        matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}')
            || c >= '\u{10000}'
    };
    if value.chars().all(allowed) {
        Ok(())
    } else {
        Err(EwsError::invalid(
            field,
            "contains a character XML cannot carry",
        ))
    }
}

/// Appends `<{name}>{escaped text}</{name}>`.
pub(crate) fn push_element(out: &mut String, name: &str, text: &str) {
    out.push('<');
    out.push_str(name);
    out.push('>');
    out.push_str(&quick_xml::escape::escape(text));
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

/// An absolute `http://` or `https://` URL shorter than [`MAX_URL_LEN`], without white space.
pub(crate) fn check_url(field: &'static str, url: &str) -> Result<(), EwsError> {
    let (scheme, rest) = url.split_once("://").unwrap_or_default();
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        return Err(EwsError::invalid(
            field,
            "must start with http:// or https://",
        ));
    }
    if rest.is_empty() || rest.starts_with('/') {
        return Err(EwsError::invalid(field, "has no host"));
    }
    if url.len() >= MAX_URL_LEN {
        return Err(EwsError::invalid(
            field,
            "must be shorter than 2083 characters",
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(EwsError::invalid(
            field,
            "contains white space or control characters",
        ));
    }
    Ok(())
}

/// An `ExchangeVersionType` name such as `Exchange2013` or `V2017_07_11`. Checked by shape,
/// not against the list, so versions newer than the schema still pass.
pub(crate) fn check_server_version(version: &str) -> Result<(), EwsError> {
    if !version.is_empty()
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        Ok(())
    } else {
        Err(EwsError::invalid(
            "server_version",
            "not an Exchange version name",
        ))
    }
}

/// An SMTP address: something@something, and text XML can carry.
pub(crate) fn check_mailbox(field: &'static str, mailbox: &str) -> Result<(), EwsError> {
    match mailbox.split_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
            check_text(field, mailbox)
        }
        _ => Err(EwsError::invalid(field, "not an SMTP address")),
    }
}
