//! The fast path of [`summarize_send_notification`](super::summarize_send_notification): one
//! forward pass over a body shaped the way Exchange writes it, with no reader, no events and no
//! allocation but the result.
//!
//! It accepts a strict subset of what the full walk in `notification.rs` accepts and returns
//! `None` ("not sure") for everything else, so that walk gives the verdict: the one invariant is
//! that whenever [`summarize_fast`] returns `Some(s)`, the full walk returns `Ok(s)` too. Its
//! functions below mirror that walk's one by one, and do the same checks on every tag, skipped
//! ones included: names matched by a stack, attribute syntax, duplicates, the limits of
//! `xml.rs`, namespace scoping. What it does not handle it does not try to: comments,
//! processing instructions other than a leading `<?xml version="1.0"?>`, CDATA, DOCTYPE, any
//! `&` (so nothing is ever unescaped), `\r` in a text it reads, `>` in text, names outside
//! `[A-Za-z_][A-Za-z0-9._-]*` with at most one prefix, a text element with a child, odd
//! namespace declarations. Every one of those sends the body down the full walk.

use std::borrow::Cow;

use memchr::{memchr, memchr3};

use super::notification::{EventType, MessageSummary, NotificationSummary, MAX_EVENTS};
use super::response::ResponseClass;
use super::xml::{Ns, MAX_ATTRIBUTES, MAX_DEPTH, MAX_VALUE_LEN, XMLNS_NS, XML_NS};

/// Most namespace declarations in scope at once. Exchange declares four or five per body; past
/// this the fast path gives up rather than grow its fixed-size table.
const MAX_BINDINGS: usize = 32;

/// The UTF-8 byte order mark .NET writers may put before the body, which quick-xml skips.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The summary of `body` when it is a SendNotification the fast path is sure about; `None` to
/// let the full walk decide (and produce the precise error, if any).
pub(crate) fn summarize_fast(body: &[u8]) -> Option<NotificationSummary<'_>> {
    walk(body).ok()
}

/// The fast path gave up: the body is unusual, or wrong. Carries nothing, as the full walk
/// says what, if anything, is wrong.
struct Bail;

type Fast<T> = Result<T, Bail>;

/// `walk_send_notification` with `open_body`, `open_message` and
/// `for_each_response_message` inlined.
fn walk(body: &[u8]) -> Fast<NotificationSummary<'_>> {
    let mut xml = Scanner::new(std::str::from_utf8(body).map_err(|_| Bail)?);
    if !xml.root()?.is(Ns::Soap, b"Envelope") {
        return Err(Bail);
    }
    loop {
        let child = xml.child()?.ok_or(Bail)?; // no soap:Body
        if child.is(Ns::Soap, b"Body") {
            break;
        }
        xml.skip()?; // Header, or anything else an intermediary added
    }
    // The body's first element, which must be the message.
    if !xml
        .child()?
        .ok_or(Bail)?
        .is(Ns::Messages, b"SendNotification")
    {
        return Err(Bail);
    }
    let mut messages = Vec::with_capacity(1);
    let mut events_left = MAX_EVENTS;
    while let Some(child) = xml.child()? {
        if !child.is(Ns::Messages, b"ResponseMessages") {
            xml.skip()?;
            continue;
        }
        while let Some(message) = xml.child()? {
            if !message.is(Ns::Messages, b"SendNotificationResponseMessage") {
                xml.skip()?;
                continue;
            }
            if messages.len() == MAX_EVENTS {
                return Err(Bail);
            }
            messages.push(read_message(&mut xml, &mut events_left)?);
        }
    }
    xml.finish()?;
    if messages.is_empty() {
        return Err(Bail);
    }
    Ok(NotificationSummary { messages })
}

/// `read_message` and `read_response_message` in one: the response message just entered.
fn read_message<'i>(xml: &mut Scanner<'i>, events_left: &mut usize) -> Fast<MessageSummary<'i>> {
    let class = match xml.attr(b"ResponseClass") {
        Some("Success") => ResponseClass::Success,
        Some("Warning") => ResponseClass::Warning,
        Some("Error") => ResponseClass::Error,
        _ => return Err(Bail),
    };
    let mut code = None;
    let mut id_in_message_xml = None;
    // The subscription of the last `Notification`, which wins over `MessageXml`'s.
    let mut id_in_notification = None;
    let mut tally = Tally {
        event_counts: [0; EventType::ALL.len()],
        last_watermark: None,
    };
    while let Some(child) = xml.child()? {
        match (child.ns, child.local) {
            (Ns::Messages, b"ResponseCode") => code = Some(Cow::Borrowed(xml.text()?)),
            (Ns::Messages, b"MessageText") => {
                xml.text()?;
            }
            // Each MessageXml replaces what an earlier one said, as in the full walk.
            (Ns::Messages, b"MessageXml") => id_in_message_xml = read_message_xml(xml)?,
            (Ns::Messages, b"Notification") => {
                id_in_notification = Some(read_notification(xml, events_left, &mut tally)?);
            }
            _ => xml.skip()?,
        }
    }
    Ok(MessageSummary {
        class,
        code,
        subscription_id: id_in_notification.or(id_in_message_xml).map(Cow::Borrowed),
        event_counts: tally.event_counts,
        last_watermark: tally.last_watermark.map(Cow::Borrowed),
    })
}

/// `read_message_xml`, keeping only the subscription id.
fn read_message_xml<'i>(xml: &mut Scanner<'i>) -> Fast<Option<&'i str>> {
    let mut subscription_id = None;
    while let Some(value) = xml.child()? {
        if !value.is(Ns::Types, b"Value") {
            xml.skip()?;
            continue;
        }
        match xml.attr(b"Name") {
            Some("SubscriptionId") => subscription_id = Some(xml.text()?),
            // Read as text (so checked as the full walk checks it), but not kept.
            Some("BackOffMilliseconds") => {
                xml.text()?;
            }
            _ => xml.skip()?,
        }
    }
    Ok(subscription_id)
}

/// The events of one message by kind, and the last watermark among them; shared by every
/// `Notification` of the message, as in the full walk.
struct Tally<'i> {
    event_counts: [u32; EventType::ALL.len()],
    last_watermark: Option<&'i str>,
}

/// `read_notification`: returns the subscription id, which is required.
fn read_notification<'i>(
    xml: &mut Scanner<'i>,
    events_left: &mut usize,
    tally: &mut Tally<'i>,
) -> Fast<&'i str> {
    let mut subscription_id = None;
    while let Some(child) = xml.child()? {
        if child.ns != Ns::Types {
            xml.skip()?;
            continue;
        }
        match child.local {
            b"SubscriptionId" => subscription_id = Some(xml.text()?),
            b"PreviousWatermark" => {
                xml.text()?;
            }
            b"MoreEvents" => match xml.text()? {
                "true" | "1" | "false" | "0" => {}
                _ => return Err(Bail),
            },
            name => match EventType::from_element(name) {
                Some(kind) => {
                    *events_left = events_left.checked_sub(1).ok_or(Bail)?;
                    tally.event_counts[kind.index()] += 1;
                    if let Some(watermark) = read_event(xml)? {
                        tally.last_watermark = Some(watermark);
                    }
                }
                // An event type newer than this code.
                None => xml.skip()?,
            },
        }
    }
    subscription_id.ok_or(Bail)
}

/// `read_event` without `FULL`: the event just entered, returning its watermark.
fn read_event<'i>(xml: &mut Scanner<'i>) -> Fast<Option<&'i str>> {
    let mut watermark = None;
    while let Some(child) = xml.child()? {
        if child.ns != Ns::Types {
            xml.skip()?;
            continue;
        }
        match child.local {
            b"Watermark" => watermark = Some(xml.text()?),
            b"ItemId" | b"FolderId" | b"ParentFolderId" | b"OldItemId" | b"OldFolderId"
            | b"OldParentFolderId" => {
                if xml.attr(b"Id").is_none() {
                    return Err(Bail);
                }
                xml.skip()?;
            }
            b"TimeStamp" => {
                xml.text()?;
            }
            b"UnreadCount" => {
                xml.text()?.parse::<u32>().map_err(|_| Bail)?;
            }
            _ => xml.skip()?,
        }
    }
    Ok(watermark)
}

/// A start tag, its namespace resolved.
struct Element<'i> {
    ns: Ns,
    local: &'i [u8],
}

impl Element<'_> {
    fn is(&self, ns: Ns, local: &[u8]) -> bool {
        self.ns == ns && self.local == local
    }
}

/// What [`Scanner::next`] yields. `<a/>` comes as a start and an end, as from `XmlReader`;
/// text comes as nothing, as the walk ignores text between elements. The name of a start
/// tag is left in the scanner rather than carried here: small enough for a register, the
/// token costs nothing to return.
#[derive(Clone, Copy)]
enum Token {
    Start,
    End,
}

/// One attribute of the start tag just read.
#[derive(Clone, Copy)]
struct Attr<'i> {
    key: &'i [u8],
    value: &'i str,
}

/// One namespace declaration in scope.
#[derive(Clone, Copy)]
struct Binding<'i> {
    /// `None` for the default namespace.
    prefix: Option<&'i [u8]>,
    ns: Ns,
    /// Depth of the element that declared it.
    depth: usize,
}

/// A forward-only tokenizer over a whole body, keeping the open elements, the attributes of
/// the last start tag and the namespace declarations in scope in fixed-size tables.
struct Scanner<'i> {
    text: &'i str,
    bytes: &'i [u8],
    /// The next byte to read.
    pos: usize,
    /// Elements currently open; their names are `open[..depth]`.
    depth: usize,
    open: [&'i [u8]; MAX_DEPTH],
    /// The last start tag was `<a/>`: its end is the next token.
    empty_open: bool,
    /// The name of the last start tag, split at its colon.
    prefix: Option<&'i [u8]>,
    local: &'i [u8],
    attrs: [Attr<'i>; MAX_ATTRIBUTES],
    attr_count: usize,
    bindings: [Binding<'i>; MAX_BINDINGS],
    binding_count: usize,
}

impl<'i> Scanner<'i> {
    /// A scanner over `text`, positioned on its first byte. Infallible, so it is built in
    /// place rather than moved out of a `Result`.
    fn new(text: &'i str) -> Self {
        Scanner {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            depth: 0,
            open: [&[]; MAX_DEPTH],
            empty_open: false,
            prefix: None,
            local: &[],
            attrs: [Attr {
                key: &[],
                value: "",
            }; MAX_ATTRIBUTES],
            attr_count: 0,
            bindings: [Binding {
                prefix: None,
                ns: Ns::Other,
                depth: 0,
            }; MAX_BINDINGS],
            binding_count: 0,
        }
    }

    /// The root element, entered: past a byte order mark, the XML declaration and white
    /// space.
    fn root(&mut self) -> Fast<Element<'i>> {
        let body = self.bytes;
        let mut pos = if body.starts_with(BOM) { BOM.len() } else { 0 };
        if body[pos..].starts_with(b"<?") {
            pos = declaration(body, pos)?;
        }
        let root = skip_space(body, pos);
        // The white space is one text node, and as such limited in size.
        if root - pos > MAX_VALUE_LEN || self.byte(root)? != b'<' {
            return Err(Bail);
        }
        self.pos = root;
        self.start_tag()?;
        Ok(self.element())
    }

    /// The next child element of the element just entered, or `None` at its end tag. Text
    /// between child elements is ignored.
    fn child(&mut self) -> Fast<Option<Element<'i>>> {
        match self.next()? {
            Token::Start => Ok(Some(self.element())),
            Token::End => Ok(None),
        }
    }

    /// Passes over the rest of the element just entered, through its end tag.
    fn skip(&mut self) -> Fast<()> {
        let outer = self.depth - 1;
        while self.depth > outer {
            self.next()?;
        }
        Ok(())
    }

    /// The text of the element just entered, through its end tag, trimmed of XML white space.
    /// A child element or a `\r` (which the full walk would normalise) gives up.
    fn text(&mut self) -> Fast<&'i str> {
        if self.empty_open {
            self.empty_open = false;
            self.close();
            return Ok("");
        }
        let at = self.pos;
        let len = memchr3(b'<', b'&', b'>', self.bytes.get(at..).ok_or(Bail)?).ok_or(Bail)?;
        // A child element is left to the full walk, which reads the text around it.
        if self.bytes[at + len] != b'<' || len > MAX_VALUE_LEN || self.byte(at + len + 1)? != b'/' {
            return Err(Bail);
        }
        self.pos = at + len;
        self.end_tag()?;
        // Trimmed of XML white space, which is ASCII.
        let start = skip_space(self.bytes, at);
        let mut end = at + len;
        while end > start && CLASS[usize::from(self.bytes[end - 1])] & SPACE != 0 {
            end -= 1;
        }
        if memchr(b'\r', &self.bytes[start..end]).is_some() {
            return Err(Bail);
        }
        self.str(start, end)
    }

    /// Reads the rest of the document: the root's remaining content, then nothing but white
    /// space.
    fn finish(mut self) -> Fast<()> {
        while self.depth > 0 {
            self.next()?;
        }
        let rest = &self.bytes[self.pos..];
        if rest.len() > MAX_VALUE_LEN || run(rest, 0, SPACE) != rest.len() {
            return Err(Bail);
        }
        Ok(())
    }

    /// The value of the unqualified attribute `key` of the start tag just read.
    fn attr(&self, key: &[u8]) -> Option<&'i str> {
        self.attrs[..self.attr_count]
            .iter()
            .find(|attr| attr.key == key)
            .map(|attr| attr.value)
    }

    /// The start tag just read, its namespace resolved.
    fn element(&self) -> Element<'i> {
        let ns = self.bindings[..self.binding_count]
            .iter()
            .rev()
            .find(|binding| same_prefix(binding.prefix, self.prefix))
            .map_or(Ns::Other, |binding| binding.ns);
        Element {
            ns,
            local: self.local,
        }
    }

    fn next(&mut self) -> Fast<Token> {
        if self.empty_open {
            self.empty_open = false;
            self.close();
            return Ok(Token::End);
        }
        if self.depth == 0 {
            return Err(Bail);
        }
        // Text between tags: ignored by every caller (`text` reads its own), so only checked.
        let at = markup(self.bytes, self.pos)?;
        if at - self.pos > MAX_VALUE_LEN {
            return Err(Bail);
        }
        self.pos = at;
        if self.byte(at + 1)? == b'/' {
            self.end_tag()?;
            return Ok(Token::End);
        }
        // `<!` and `<?` fail the name grammar.
        self.start_tag()?;
        Ok(Token::Start)
    }

    /// Reads the start tag at `pos` and enters it: name, attributes, namespace declarations.
    fn start_tag(&mut self) -> Fast<()> {
        let bytes = self.bytes;
        let start = self.pos + 1;
        let (end, colon) = name(bytes, start)?;
        (self.prefix, self.local) = match colon {
            Some(colon) => (Some(&bytes[start..colon]), &bytes[colon + 1..end]),
            None => (None, &bytes[start..end]),
        };
        // Prefixes that cannot be declared: the full walk resolves them as unbound.
        if matches!(self.prefix, Some(b"xml" | b"xmlns")) || self.depth == MAX_DEPTH {
            return Err(Bail);
        }
        let depth = self.depth + 1;
        self.attr_count = 0;
        let mut p = end;
        let empty = loop {
            let key = skip_space(bytes, p);
            match self.byte(key)? {
                b'>' => {
                    p = key + 1;
                    break false;
                }
                b'/' if self.byte(key + 1)? == b'>' => {
                    p = key + 2;
                    break true;
                }
                // White space must separate the name and every attribute.
                _ if key == p => return Err(Bail),
                _ => {}
            }
            let (key_end, _) = self::name(bytes, key)?;
            let eq = skip_space(bytes, key_end);
            if self.byte(eq)? != b'=' {
                return Err(Bail);
            }
            let open_quote = skip_space(bytes, eq + 1);
            let quote = self.byte(open_quote)?;
            if quote != b'"' && quote != b'\'' {
                return Err(Bail);
            }
            let value = open_quote + 1;
            let len = memchr3(quote, b'<', b'&', &bytes[value..]).ok_or(Bail)?;
            if bytes[value + len] != quote || len > MAX_VALUE_LEN {
                return Err(Bail);
            }
            let attr = Attr {
                key: &bytes[key..key_end],
                value: self.str(value, value + len)?,
            };
            if self.attr_count == MAX_ATTRIBUTES
                || self.attrs[..self.attr_count]
                    .iter()
                    .any(|seen| seen.key == attr.key)
            {
                return Err(Bail);
            }
            self.attrs[self.attr_count] = attr;
            self.attr_count += 1;
            if attr.key.starts_with(b"xmlns") {
                self.declare(attr, depth)?;
            }
            p = value + len + 1;
        };
        self.open[self.depth] = &bytes[start..end];
        self.depth = depth;
        self.pos = p;
        self.empty_open = empty;
        Ok(())
    }

    /// Puts `attr` in scope if it is a namespace declaration; gives up on those the full walk
    /// refuses or treats specially, and on a prefix bound to no namespace.
    fn declare(&mut self, attr: Attr<'i>, depth: usize) -> Fast<()> {
        let prefix = match attr.key.get(5) {
            None => None,
            Some(b':') => Some(&attr.key[6..]),
            Some(_) => return Ok(()), // `xmlnsfoo`: an ordinary attribute
        };
        let uri = attr.value.as_bytes();
        if matches!(prefix, Some(b"xml" | b"xmlns"))
            || uri == XML_NS
            || uri == XMLNS_NS
            || (prefix.is_some() && uri.is_empty())
            || self.binding_count == MAX_BINDINGS
        {
            return Err(Bail);
        }
        self.bindings[self.binding_count] = Binding {
            prefix,
            ns: Ns::of(uri),
            depth,
        };
        self.binding_count += 1;
        Ok(())
    }

    /// Reads the end tag at `pos`, which must close the innermost open element.
    fn end_tag(&mut self) -> Fast<()> {
        let name = self.open[self.depth - 1];
        let after_name = self.pos + 2 + name.len();
        if !self
            .bytes
            .get(self.pos + 2..after_name)
            .is_some_and(|found| same(found, name))
        {
            return Err(Bail);
        }
        let close = skip_space(self.bytes, after_name);
        if self.byte(close)? != b'>' {
            return Err(Bail);
        }
        self.pos = close + 1;
        self.close();
        Ok(())
    }

    /// Leaves the innermost element, dropping its declarations.
    fn close(&mut self) {
        self.depth -= 1;
        while self.binding_count > 0 && self.bindings[self.binding_count - 1].depth > self.depth {
            self.binding_count -= 1;
        }
    }

    fn byte(&self, at: usize) -> Fast<u8> {
        self.bytes.get(at).copied().ok_or(Bail)
    }

    fn str(&self, start: usize, end: usize) -> Fast<&'i str> {
        self.text.get(start..end).ok_or(Bail)
    }
}

/// Whether two prefixes (`None`: the default namespace) are the same. Prefixes are a few
/// bytes long: compared in place, as a call to `memcmp` per binding in scope costs more.
fn same_prefix(a: Option<&[u8]>, b: Option<&[u8]>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y),
        _ => false,
    }
}

/// Whether two names of the same length are equal, compared eight bytes at a time in place:
/// names are short, and a call to `memcmp` per end tag costs more.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (mut a, mut b) = (a, b);
    while let (Some((x, a_rest)), Some((y, b_rest))) =
        (a.split_first_chunk::<8>(), b.split_first_chunk::<8>())
    {
        if u64::from_ne_bytes(*x) != u64::from_ne_bytes(*y) {
            return false;
        }
        (a, b) = (a_rest, b_rest);
    }
    a.iter().zip(b).all(|(x, y)| x == y)
}

/// Byte classes, as bits: the name grammar `[A-Za-z_][A-Za-z0-9._-]*` and XML white space.
const NAME_START: u8 = 1;
const NAME_MORE: u8 = 2;
const SPACE: u8 = 4;

static CLASS: [u8; 256] = {
    let mut classes = [0; 256];
    let mut b = 0;
    while b < 256 {
        classes[b] = match b as u8 {
            b'A'..=b'Z' | b'a'..=b'z' | b'_' => NAME_START | NAME_MORE,
            b'0'..=b'9' | b'.' | b'-' => NAME_MORE,
            b' ' | b'\t' | b'\n' | b'\r' => SPACE,
            _ => 0,
        };
        b += 1;
    }
    classes
};

fn class(bytes: &[u8], at: usize) -> u8 {
    bytes.get(at).map_or(0, |&b| CLASS[usize::from(b)])
}

/// How many bytes from `at` on are all of `class`.
fn run(bytes: &[u8], at: usize, class: u8) -> usize {
    let rest = bytes.get(at..).unwrap_or_default();
    rest.iter()
        .position(|&b| CLASS[usize::from(b)] & class == 0)
        .unwrap_or(rest.len())
}

/// The end of the name that starts at `start`, and where its colon is if it has a prefix.
/// A second colon ends the name, which its caller then refuses; so does running off the end
/// of the body, at the caller's next read.
fn name(bytes: &[u8], start: usize) -> Fast<(usize, Option<usize>)> {
    let part = |start: usize| -> Fast<usize> {
        if class(bytes, start) & NAME_START == 0 {
            return Err(Bail);
        }
        Ok(start + 1 + run(bytes, start + 1, NAME_MORE))
    };
    let end = part(start)?;
    if bytes.get(end) != Some(&b':') {
        return Ok((end, None));
    }
    Ok((part(end + 1)?, Some(end)))
}

/// Where the XML declaration at `at` ends, if it is `<?xml version="1.0"?>` with at most an
/// `encoding` of UTF-8 and a `standalone`, in that order; anything else gives up.
fn declaration(bytes: &[u8], at: usize) -> Fast<usize> {
    type Valid = fn(&[u8]) -> bool;
    let mut expected: &[(&[u8], Valid)] = &[
        (b"version", |v| v == b"1.0"),
        (b"encoding", |v| v.eq_ignore_ascii_case(b"utf-8")),
        (b"standalone", |v| v == b"yes" || v == b"no"),
    ];
    let mut p = at + b"<?xml".len();
    if bytes.get(at..p) != Some(b"<?xml") {
        return Err(Bail);
    }
    loop {
        let key = skip_space(bytes, p);
        if bytes.get(key..key + 2) == Some(b"?>") && expected.len() < 3 {
            return Ok(key + 2);
        }
        if key == p {
            return Err(Bail);
        }
        let (key_end, _) = name(bytes, key)?;
        let i = expected
            .iter()
            .position(|(name, _)| *name == &bytes[key..key_end])
            .ok_or(Bail)?;
        // `version` comes first and is required.
        if expected.len() == 3 && i != 0 {
            return Err(Bail);
        }
        let valid = expected[i].1;
        expected = &expected[i + 1..];
        let eq = skip_space(bytes, key_end);
        if bytes.get(eq) != Some(&b'=') {
            return Err(Bail);
        }
        let open_quote = skip_space(bytes, eq + 1);
        let quote = *bytes.get(open_quote).ok_or(Bail)?;
        if quote != b'"' && quote != b'\'' {
            return Err(Bail);
        }
        let value = open_quote + 1;
        let len = memchr(quote, bytes.get(value..).ok_or(Bail)?).ok_or(Bail)?;
        if !valid(&bytes[value..value + len]) {
            return Err(Bail);
        }
        p = value + len + 1;
    }
}

/// Where the next tag starts at or after `at`: the next `<`, with no `&` (a reference) or `>`
/// (perhaps ending a `]]>`) before it, both left to the full walk. Eight bytes at a time, as
/// this passes over every run of indentation in the body.
fn markup(bytes: &[u8], at: usize) -> Fast<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // The high bit of each byte of `word` that equals `b`, exact up to the lowest such byte
    // (the borrow may mark bytes after it, which are never looked at).
    let find = |word: u64, b: u8| {
        let x = word ^ (ONES * u64::from(b));
        x.wrapping_sub(ONES) & !x & HIGHS
    };
    let rest = bytes.get(at..).ok_or(Bail)?;
    if rest.first() == Some(&b'<') {
        return Ok(at);
    }
    let mut offset = 0;
    while let Some(chunk) = rest.get(offset..).and_then(|r| r.first_chunk::<8>()) {
        let word = u64::from_le_bytes(*chunk);
        let hits = find(word, b'<') | find(word, b'&') | find(word, b'>');
        if hits != 0 {
            offset += (hits.trailing_zeros() / 8) as usize;
            break;
        }
        offset += 8;
    }
    offset += rest[offset..]
        .iter()
        .position(|&b| matches!(b, b'<' | b'&' | b'>'))
        .ok_or(Bail)?;
    if rest[offset] != b'<' {
        return Err(Bail);
    }
    Ok(at + offset)
}

/// The first byte at or after `at` that is not XML white space (or the end of `bytes`).
fn skip_space(bytes: &[u8], at: usize) -> usize {
    at + run(bytes, at, SPACE)
}
