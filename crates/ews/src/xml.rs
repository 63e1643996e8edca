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
use quick_xml::name::{PrefixDeclaration, QName};
use quick_xml::Reader;

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
pub enum Ns {
    /// [`crate::SOAP_NS`].
    Soap,
    /// [`crate::MESSAGES_NS`].
    Messages,
    /// [`crate::TYPES_NS`].
    Types,
    /// [`crate::ERRORS_NS`].
    Errors,
    /// [`crate::AUTODISCOVER_NS`].
    Autodiscover,
    /// Any other namespace, or none.
    Other,
}

/// The namespace the `xml` prefix is bound to, and the only one it may be bound to.
pub(super) const XML_NS: &[u8] = b"http://www.w3.org/XML/1998/namespace";
/// The namespace of `xmlns` declarations, which no prefix may be bound to.
pub(super) const XMLNS_NS: &[u8] = b"http://www.w3.org/2000/xmlns/";

impl Ns {
    /// The namespace named by `uri`, as written in a declaration (quick-xml does not unescape
    /// declarations either).
    pub(super) fn of(uri: &[u8]) -> Ns {
        match uri {
            b"http://schemas.xmlsoap.org/soap/envelope/" => Ns::Soap,
            b"http://schemas.microsoft.com/exchange/services/2006/messages" => Ns::Messages,
            b"http://schemas.microsoft.com/exchange/services/2006/types" => Ns::Types,
            b"http://schemas.microsoft.com/exchange/services/2006/errors" => Ns::Errors,
            b"http://schemas.microsoft.com/exchange/2010/Autodiscover" => Ns::Autodiscover,
            _ => Ns::Other,
        }
    }
}

/// The body a reader walks, and the same bytes as text once they were checked to be UTF-8.
#[derive(Clone, Copy)]
struct Source<'i> {
    bytes: &'i [u8],
    /// `Some` when the whole body was checked to be UTF-8 up front: any piece of it is then
    /// text for the price of a bounds check, instead of a UTF-8 check per piece.
    text: Option<&'i str>,
}

impl<'i> Source<'i> {
    /// `part` (a sub-slice of the body, as the slice reader hands out) as text.
    fn str(&self, part: &'i [u8]) -> Result<&'i str, EwsError> {
        if let Some(text) = self.text {
            // Found by address: the slice reader only ever hands out sub-slices of its input.
            let offset = (part.as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
            if let Some(piece) = offset
                .checked_add(part.len())
                .and_then(|end| text.get(offset..end))
            {
                return Ok(piece);
            }
        }
        std::str::from_utf8(part).map_err(EwsError::malformed)
    }

    /// A raw text or CDATA piece as text, line ends normalised as XML 1.0 requires.
    fn decode(&self, raw: Cow<'i, [u8]>) -> Result<Cow<'i, str>, EwsError> {
        match raw {
            Cow::Borrowed(raw) => Ok(normalize_eols(Cow::Borrowed(self.str(raw)?))),
            Cow::Owned(raw) => Ok(normalize_eols(Cow::Owned(
                String::from_utf8(raw).map_err(EwsError::malformed)?,
            ))),
        }
    }
}

/// XML 1.0 end-of-line handling: `\r\n` and a lone `\r` read as `\n`.
fn normalize_eols(text: Cow<'_, str>) -> Cow<'_, str> {
    if text.contains('\r') {
        Cow::Owned(text.replace("\r\n", "\n").replace('\r', "\n"))
    } else {
        text
    }
}

/// A start tag, with its namespace resolved.
pub struct Element<'i> {
    /// The element's namespace, resolved from its prefix.
    pub ns: Ns,
    start: BytesStart<'i>,
    source: Source<'i>,
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
            Some(tag) => find_attrs(Attributes::new(tag, name_len), names, self.source),
            None => Ok(find_attrs(self.start.attributes(), names, self.source)?
                .map(|value| value.map(|v| Cow::Owned(v.into_owned())))),
        }
    }

    /// Whether the unqualified attribute `name` is present, without decoding any value.
    pub fn has_attr(&self, name: &str) -> bool {
        self.start
            .attributes()
            .with_checks(false)
            .map_while(Result::ok)
            .any(|attr| attr.key.into_inner() == name.as_bytes())
    }

    /// The tag's text as a slice of the body itself, so attribute values can borrow from the
    /// body rather than from this short-lived event. `None` (values get copied) if the tag is
    /// not a slice of the body.
    fn tag_in_input(&self) -> Option<&'i str> {
        let tag: &[u8] = &self.start;
        let offset = (tag.as_ptr() as usize).checked_sub(self.source.bytes.as_ptr() as usize)?;
        let bytes = self
            .source
            .bytes
            .get(offset..offset.checked_add(tag.len())?)?;
        self.source.str(bytes).ok()
    }
}

fn find_attrs<'a, const N: usize>(
    mut attrs: Attributes<'a>,
    names: [&str; N],
    source: Source<'a>,
) -> Result<[Option<Cow<'a, str>>; N], EwsError> {
    let decoder = attrs.decoder();
    let mut values = [const { None }; N];
    for attr in attrs.with_checks(false) {
        let attr = attr?;
        let key = attr.key.into_inner();
        if let Some(i) = names.iter().position(|name| name.as_bytes() == key) {
            if values[i].is_none() {
                values[i] = Some(match attr.value {
                    // Nothing to unescape: the value as it stands in the body.
                    Cow::Borrowed(value) if !value.contains(&b'&') => {
                        Cow::Borrowed(source.str(value)?)
                    }
                    _ => attr.decode_and_unescape_value(decoder)?,
                });
            }
        }
    }
    Ok(values)
}

/// What [`XmlReader::next_node`] yields: comments, processing instructions and the XML declaration
/// are dropped, empty elements come as a start and an end. Namespaces are resolved and text
/// decoded only on demand, as most nodes are passed over.
pub enum Node<'i> {
    /// A start tag (or an empty element's, whose end follows as [`Node::End`]).
    Start(BytesStart<'i>),
    /// An end tag.
    End,
    /// Raw text or CDATA, checked for size; [`Source::decode`] makes it text.
    Raw(Cow<'i, [u8]>),
    /// A character or entity reference, resolved.
    Text(Cow<'static, str>),
    /// The end of the document.
    Eof,
}

/// One namespace declaration in scope.
struct Binding {
    /// Where its prefix is in [`XmlReader::prefixes`]; `None` for the default namespace.
    prefix: Option<(usize, usize)>,
    ns: Ns,
    /// Depth of the element that declared it.
    depth: usize,
}

/// A one-pass reader over a whole body that enforces the limits of this module.
///
/// It resolves namespaces itself rather than through quick-xml's `NsReader`: that one scans
/// every tag's attributes for declarations in a pass of its own, copies every URI and resolves
/// every tag, end tags included. Here declarations are picked up in the one pass that checks
/// the attributes anyway, a URI is mapped to [`Ns`] once where it is declared, and only tags a
/// parser looks at are resolved.
pub struct XmlReader<'i> {
    reader: Reader<&'i [u8]>,
    source: Source<'i>,
    /// Declarations in scope, innermost last.
    bindings: Vec<Binding>,
    /// The prefixes of `bindings`, end to end.
    prefixes: Vec<u8>,
    /// Elements currently open.
    depth: usize,
    /// Whether the root element has started, to refuse a second one.
    seen_root: bool,
}

impl<'i> XmlReader<'i> {
    /// A reader over a whole body, positioned before its first byte. The body is checked to be
    /// UTF-8 here, in one pass, rather than piece by piece: so text the parsers skip is checked
    /// too, and the text they keep costs nothing more.
    pub fn new(input: &'i [u8]) -> Result<Self, EwsError> {
        let text = std::str::from_utf8(input)
            .map_err(|e| EwsError::malformed(format_args!("{e} (at byte {})", e.valid_up_to())))?;
        Ok(Self::with_source(Source {
            bytes: input,
            text: Some(text),
        }))
    }

    /// A reader for a caller that reads only the start of `input`, where checking all of it
    /// up front would be wasted: text is then checked to be UTF-8 as it is read.
    pub fn prefix(input: &'i [u8]) -> Self {
        Self::with_source(Source {
            bytes: input,
            text: None,
        })
    }

    fn with_source(source: Source<'i>) -> Self {
        let mut reader = Reader::from_reader(source.bytes);
        // `<a/>` comes as Start + End, so parsers handle one shape.
        reader.config_mut().expand_empty_elements = true;
        Self {
            reader,
            source,
            bindings: Vec::new(),
            prefixes: Vec::new(),
            depth: 0,
            seen_root: false,
        }
    }

    /// The next node, after the depth, size and DTD checks. White space outside the root is
    /// dropped; anything else there is an error.
    pub fn next_node(&mut self) -> Result<Node<'i>, EwsError> {
        loop {
            let event = match self.reader.read_event() {
                Ok(event) => event,
                Err(e) => {
                    let at = self.reader.error_position();
                    return Err(EwsError::malformed(format_args!("{e} (at byte {at})")));
                }
            };
            let node = match event {
                Event::Start(start) => {
                    if self.depth == 0 && self.seen_root {
                        return Err(EwsError::malformed("content after the root element"));
                    }
                    self.seen_root = true;
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        return Err(EwsError::TooDeep);
                    }
                    self.check_attributes(&start)?;
                    return Ok(Node::Start(start));
                }
                // `expand_empty_elements` turns every `<a/>` into Start + End.
                Event::Empty(_) => return Err(EwsError::malformed("unexpanded empty element")),
                Event::End(_) => {
                    // quick-xml checks that end tags match their start tags.
                    self.depth = self.depth.saturating_sub(1);
                    self.end_scope();
                    return Ok(Node::End);
                }
                Event::Text(text) => Node::Raw(text.into_inner()),
                Event::CData(cdata) => Node::Raw(cdata.into_inner()),
                Event::GeneralRef(reference) => Node::Text(resolve_reference(&reference)?),
                Event::DocType(_) => return Err(EwsError::DtdForbidden),
                Event::Decl(_) | Event::PI(_) | Event::Comment(_) => continue,
                Event::Eof if self.depth > 0 => {
                    return Err(EwsError::malformed(
                        "truncated: input ends inside an element",
                    ))
                }
                Event::Eof => return Ok(Node::Eof),
            };
            // Raw length bounds the decoded length: line-end normalisation only shortens.
            let (len, blank) = match &node {
                Node::Raw(raw) => {
                    if self.source.text.is_none() {
                        // Not checked up front: check this piece now.
                        std::str::from_utf8(raw).map_err(EwsError::malformed)?;
                    }
                    (raw.len(), raw.iter().all(|&b| is_xml_space(char::from(b))))
                }
                Node::Text(text) => (text.len(), text.trim_matches(is_xml_space).is_empty()),
                _ => unreachable!("only text nodes get here"),
            };
            if len > MAX_VALUE_LEN {
                return Err(EwsError::TooLarge);
            }
            if self.depth > 0 {
                return Ok(node);
            }
            if !blank {
                return Err(if self.seen_root {
                    EwsError::malformed("text after the root element")
                } else {
                    // JSON, a form, plain text: not XML at all, let alone SOAP.
                    EwsError::NotSoapEnvelope
                });
            }
        }
    }

    /// Counts and sizes the attributes of a start tag, rejects duplicates (the check is
    /// quadratic, which the count keeps small), checks the references in every value (so a body
    /// is refused alike whether or not a parser reads the attribute) and takes in its namespace
    /// declarations: everything about attributes in one pass.
    fn check_attributes(&mut self, start: &BytesStart<'_>) -> Result<(), EwsError> {
        // Most EWS elements have none: skip the iterator for them.
        if start.attributes_raw().trim_ascii().is_empty() {
            return Ok(());
        }
        // Names seen so far, on the stack: quick-xml's own duplicate check allocates.
        let mut keys: [&[u8]; MAX_ATTRIBUTES] = [&[]; MAX_ATTRIBUTES];
        let mut attrs = start.attributes();
        let decoder = attrs.decoder();
        for (count, attr) in attrs.with_checks(false).enumerate() {
            if count >= MAX_ATTRIBUTES {
                return Err(EwsError::TooMany {
                    what: "attributes on one element",
                    limit: MAX_ATTRIBUTES,
                });
            }
            let attr = attr?;
            let key = attr.key.into_inner();
            if keys[..count].contains(&key) {
                return Err(EwsError::malformed(format_args!(
                    "duplicate attribute {}",
                    String::from_utf8_lossy(key)
                )));
            }
            keys[count] = key;
            if attr.value.len() > MAX_VALUE_LEN {
                return Err(EwsError::TooLarge);
            }
            if attr.value.contains(&b'&') {
                attr.decode_and_unescape_value(decoder)?;
            }
            if let Some(declaration) = attr.key.as_namespace_binding() {
                self.declare(declaration, &attr.value)?;
            }
        }
        Ok(())
    }

    /// Puts a namespace declaration of the element just entered in scope, refusing what the
    /// Namespaces in XML recommendation forbids (as quick-xml's resolver does).
    fn declare(&mut self, declaration: PrefixDeclaration<'_>, uri: &[u8]) -> Result<(), EwsError> {
        let prefix = match declaration {
            PrefixDeclaration::Default => None,
            PrefixDeclaration::Named(b"xml") if uri == XML_NS => return Ok(()),
            PrefixDeclaration::Named(b"xml") => {
                return Err(EwsError::malformed(
                    "the xml prefix bound to another namespace",
                ))
            }
            PrefixDeclaration::Named(b"xmlns") => {
                return Err(EwsError::malformed("the xmlns prefix declared"))
            }
            PrefixDeclaration::Named(b"") => {
                return Err(EwsError::malformed("an empty namespace prefix declared"))
            }
            PrefixDeclaration::Named(_) if uri == XML_NS || uri == XMLNS_NS => {
                return Err(EwsError::malformed(
                    "a prefix bound to a reserved namespace",
                ))
            }
            PrefixDeclaration::Named(prefix) => {
                let at = self.prefixes.len();
                self.prefixes.extend_from_slice(prefix);
                Some((at, prefix.len()))
            }
        };
        self.bindings.push(Binding {
            prefix,
            ns: Ns::of(uri),
            depth: self.depth,
        });
        Ok(())
    }

    /// Drops the declarations of the element just ended.
    fn end_scope(&mut self) {
        while let Some(binding) = self.bindings.last() {
            if binding.depth <= self.depth {
                break;
            }
            if let Some((at, _)) = binding.prefix {
                self.prefixes.truncate(at);
            }
            self.bindings.pop();
        }
    }

    /// The namespace of an element name: the innermost declaration of its prefix, or of the
    /// default namespace; `Other` when there is none (quick-xml would say unbound or unknown).
    fn resolve(&self, name: QName<'_>) -> Ns {
        let prefix = name.prefix().map(|p| p.into_inner());
        self.bindings
            .iter()
            .rev()
            .find(|b| b.prefix.map(|(at, len)| &self.prefixes[at..at + len]) == prefix)
            .map_or(Ns::Other, |b| b.ns)
    }

    /// The start tag `start`, just read, with its namespace resolved.
    fn element(&self, start: BytesStart<'i>) -> Element<'i> {
        let ns = self.resolve(start.name());
        Element {
            ns,
            start,
            source: self.source,
        }
    }

    /// The next child element of the element just entered, or `None` at its end tag.
    /// Text between child elements is ignored.
    pub fn child(&mut self) -> Result<Option<Element<'i>>, EwsError> {
        loop {
            match self.next_node()? {
                Node::Start(start) => return Ok(Some(self.element(start))),
                Node::End | Node::Eof => return Ok(None),
                Node::Raw(_) | Node::Text(_) => {}
            }
        }
    }

    /// Passes over the rest of the element just entered, through its end tag.
    pub fn skip(&mut self) -> Result<(), EwsError> {
        let outer = self.depth.saturating_sub(1);
        while self.depth > outer {
            if let Node::Eof = self.next_node()? {
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
            let piece = match self.next_node()? {
                Node::Raw(raw) => self.source.decode(raw)?,
                Node::Text(piece) => piece,
                Node::Start(_) => {
                    self.skip()?;
                    continue;
                }
                Node::End | Node::Eof => return Ok(trim(text)),
            };
            if text.is_empty() {
                text = piece;
            } else {
                if text.len() + piece.len() > MAX_VALUE_LEN {
                    return Err(EwsError::TooLarge);
                }
                text.to_mut().push_str(&piece);
            }
        }
    }

    /// Enters `soap:Envelope/soap:Body` and returns the body's first element: the message.
    pub fn open_body(&mut self) -> Result<Element<'i>, EwsError> {
        let is_envelope = match self.next_node()? {
            Node::Start(root) => self.element(root).is(Ns::Soap, "Envelope"),
            _ => false,
        };
        if !is_envelope {
            return Err(EwsError::NotSoapEnvelope);
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
            if let Node::Eof = self.next_node()? {
                return Ok(());
            }
        }
    }
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
pub fn check_text(field: &'static str, value: &str) -> Result<(), EwsError> {
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
pub fn push_element(out: &mut String, name: &str, text: &str) {
    out.push('<');
    out.push_str(name);
    out.push('>');
    out.push_str(&quick_xml::escape::escape(text));
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

/// An absolute `http://` or `https://` URL shorter than [`MAX_URL_LEN`], without white space.
pub fn check_url(field: &'static str, url: &str) -> Result<(), EwsError> {
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
pub fn check_server_version(version: &str) -> Result<(), EwsError> {
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
pub fn check_mailbox(field: &'static str, mailbox: &str) -> Result<(), EwsError> {
    match mailbox.split_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
            check_text(field, mailbox)
        }
        _ => Err(EwsError::invalid(field, "not an SMTP address")),
    }
}
