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
//! `[A-Za-z_][A-Za-z0-9._-]*` with at most one prefix, prefixes longer than eight bytes, a
//! text element with a child, odd namespace declarations, and any byte outside ASCII but a
//! leading byte order mark. Every one of those sends the body down the full walk.
//!
//! Speed comes from looking at the body eight bytes at a time: every run of bytes (a name,
//! an attribute value, a text, the indentation between tags) is passed over by a scan that
//! loads a `u64` and marks, with a few additions and masks, the bytes that may end the run
//! (see [`first_stop`]; values and texts, which can be long, two words per step). Every byte
//! of an accepted body is looked at by one scan or one exact comparison, and every scan gives
//! up at a byte of 0x80 or more, which is why the body needs no UTF-8 check of its own: it is
//! ASCII. Offsets are kept as `u32` ([`Span`]), so the tables of open elements and attributes
//! are small to set up. Past the scans, the cost is per token, so a token costs one call
//! (plus one per tag with attributes), names are compared with constants a word at a time
//! rather than by `memcmp`, and closing an element is one store.

use std::borrow::Cow;

use super::notification::{EventType, MessageSummary, NotificationSummary, MAX_EVENTS};
use super::response::ResponseClass;
use super::xml::{Ns, MAX_ATTRIBUTES, MAX_DEPTH, MAX_VALUE_LEN, XMLNS_NS, XML_NS};
use super::{AUTODISCOVER_NS, ERRORS_NS, MESSAGES_NS, SOAP_NS, TYPES_NS};

/// Most namespace declarations in scope at once. Exchange declares four or five per body; past
/// this the fast path gives up rather than grow its fixed-size table.
const MAX_BINDINGS: usize = 32;

/// The UTF-8 byte order mark .NET writers may put before the body, which quick-xml skips.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The summary of `body` when it is a SendNotification the fast path is sure about; `None` to
/// let the full walk decide (and produce the precise error, if any).
pub fn summarize_fast(body: &[u8]) -> Option<NotificationSummary<'_>> {
    walk(body).ok()
}

/// The fast path gave up: the body is unusual, or wrong. Carries nothing, as the full walk
/// says what, if anything, is wrong.
struct Bail;

type Fast<T> = Result<T, Bail>;

/// `walk_send_notification` with `open_body`, `open_message` and
/// `for_each_response_message` inlined.
fn walk(body: &[u8]) -> Fast<NotificationSummary<'_>> {
    // Offsets are kept as `u32` (see `Span`); the relay's body limit is far below.
    if u32::try_from(body.len()).is_err() {
        return Err(Bail);
    }
    let mut xml = Scanner::new(body);
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
        Some(b"Success") => ResponseClass::Success,
        Some(b"Warning") => ResponseClass::Warning,
        Some(b"Error") => ResponseClass::Error,
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
        if child.ns != Ns::Messages {
            xml.skip()?;
        } else if child.named(b"ResponseCode") {
            code = Some(xml.text()?);
        } else if child.named(b"MessageText") {
            xml.text()?;
        } else if child.named(b"MessageXml") {
            // Each MessageXml replaces what an earlier one said, as in the full walk.
            id_in_message_xml = read_message_xml(xml)?;
        } else if child.named(b"Notification") {
            id_in_notification = Some(read_notification(xml, events_left, &mut tally)?);
        } else {
            xml.skip()?;
        }
    }
    // Made text only now, once per message rather than once per value read.
    let text = |value: Option<&'i [u8]>| value.map(ascii).transpose();
    Ok(MessageSummary {
        class,
        code: text(code)?.map(Cow::Borrowed),
        subscription_id: text(id_in_notification.or(id_in_message_xml))?.map(Cow::Borrowed),
        event_counts: tally.event_counts,
        last_watermark: text(tally.last_watermark)?.map(Cow::Borrowed),
    })
}

/// `read_message_xml`, keeping only the subscription id.
fn read_message_xml<'i>(xml: &mut Scanner<'i>) -> Fast<Option<&'i [u8]>> {
    let mut subscription_id = None;
    while let Some(value) = xml.child()? {
        if !value.is(Ns::Types, b"Value") {
            xml.skip()?;
            continue;
        }
        match xml.attr(b"Name") {
            Some(name) if eq_lit(name, b"SubscriptionId") => subscription_id = Some(xml.text()?),
            // Read as text (so checked as the full walk checks it), but not kept.
            Some(name) if eq_lit(name, b"BackOffMilliseconds") => {
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
    last_watermark: Option<&'i [u8]>,
}

/// `read_notification`: returns the subscription id, which is required.
fn read_notification<'i>(
    xml: &mut Scanner<'i>,
    events_left: &mut usize,
    tally: &mut Tally<'i>,
) -> Fast<&'i [u8]> {
    let mut subscription_id = None;
    while let Some(child) = xml.child()? {
        if child.ns != Ns::Types {
            xml.skip()?;
            continue;
        }
        if let Some(kind) = event_type(child.local) {
            *events_left = events_left.checked_sub(1).ok_or(Bail)?;
            tally.event_counts[kind.index()] += 1;
            if let Some(watermark) = read_event(xml)? {
                tally.last_watermark = Some(watermark);
            }
        } else if child.named(b"SubscriptionId") {
            subscription_id = Some(xml.text()?);
        } else if child.named(b"PreviousWatermark") {
            xml.text()?;
        } else if child.named(b"MoreEvents") {
            let value = xml.text()?;
            if !(eq_lit(value, b"true")
                || eq_lit(value, b"1")
                || eq_lit(value, b"false")
                || eq_lit(value, b"0"))
            {
                return Err(Bail);
            }
        } else {
            // An event type newer than this code, or anything else.
            xml.skip()?;
        }
    }
    subscription_id.ok_or(Bail)
}

/// `EventType::from_element`, each name compared in words by [`eq_lit`] rather than by a
/// call to `memcmp`. Every event name ends in `Event`, which most other children do not.
#[inline(always)]
fn event_type(name: &[u8]) -> Option<EventType> {
    if !name.ends_with(b"Event") {
        return None;
    }
    Some(if eq_lit(name, b"NewMailEvent") {
        EventType::NewMail
    } else if eq_lit(name, b"CreatedEvent") {
        EventType::Created
    } else if eq_lit(name, b"ModifiedEvent") {
        EventType::Modified
    } else if eq_lit(name, b"MovedEvent") {
        EventType::Moved
    } else if eq_lit(name, b"DeletedEvent") {
        EventType::Deleted
    } else if eq_lit(name, b"CopiedEvent") {
        EventType::Copied
    } else if eq_lit(name, b"StatusEvent") {
        EventType::Status
    } else if eq_lit(name, b"FreeBusyChangedEvent") {
        EventType::FreeBusyChanged
    } else {
        return None;
    })
}

/// `read_event` without `FULL`: the event just entered, returning its watermark.
fn read_event<'i>(xml: &mut Scanner<'i>) -> Fast<Option<&'i [u8]>> {
    let mut watermark = None;
    while let Some(child) = xml.child()? {
        if child.ns != Ns::Types {
            xml.skip()?;
            continue;
        }
        let local = child.local;
        if eq_lit(local, b"Watermark") {
            watermark = Some(xml.text()?);
        } else if eq_lit(local, b"TimeStamp") {
            xml.text()?;
        } else if eq_lit(local, b"ItemId")
            || eq_lit(local, b"ParentFolderId")
            || eq_lit(local, b"FolderId")
            || eq_lit(local, b"OldItemId")
            || eq_lit(local, b"OldParentFolderId")
            || eq_lit(local, b"OldFolderId")
        {
            if xml.attr(b"Id").is_none() {
                return Err(Bail);
            }
            xml.skip()?;
        } else if eq_lit(local, b"UnreadCount") {
            // `str::parse`, exactly as the full walk reads it; one per folder event.
            ascii(xml.text()?)?.parse::<u32>().map_err(|_| Bail)?;
        } else {
            xml.skip()?;
        }
    }
    Ok(watermark)
}

/// A piece of the body as text. The scanner has seen every byte of it to be ASCII, so this
/// never fails; it is the one safe way to a `&str`, and costs little on the few values kept.
fn ascii(bytes: &[u8]) -> Fast<&str> {
    std::str::from_utf8(bytes).map_err(|_| Bail)
}

/// A start tag, its namespace resolved.
struct Element<'i> {
    ns: Ns,
    local: &'i [u8],
}

impl Element<'_> {
    #[inline(always)]
    fn is(&self, ns: Ns, local: &[u8]) -> bool {
        self.ns == ns && eq_lit(self.local, local)
    }

    #[inline(always)]
    fn named(&self, local: &[u8]) -> bool {
        eq_lit(self.local, local)
    }
}

/// Whether `bytes` is `lit`, a name the walk looks for. Inlined, with `lit` a constant, this
/// is a length test and a few word comparisons with constants, where `==` on slices calls
/// `memcmp`.
#[inline(always)]
fn eq_lit(bytes: &[u8], lit: &[u8]) -> bool {
    let n = lit.len();
    if bytes.len() != n {
        return false;
    }
    // Two loads of `W` bytes, at the start and at the end (overlapping when `n < 2 * W`),
    // cover any `n` from `W` to `2 * W`.
    fn pair<const W: usize>(a: &[u8], b: &[u8]) -> bool {
        let n = a.len();
        a[..W] == b[..W] && a[n - W..] == b[n - W..]
    }
    match n {
        0 => true,
        1 => bytes[0] == lit[0],
        2..4 => pair::<2>(bytes, lit),
        4..8 => pair::<4>(bytes, lit),
        8..=16 => pair::<8>(bytes, lit),
        _ => {
            let load =
                |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().expect("eight"));
            let mut i = 0;
            while i + 8 < n {
                if load(bytes, i) != load(lit, i) {
                    return false;
                }
                i += 8;
            }
            load(bytes, n - 8) == load(lit, n - 8)
        }
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

/// A piece of the body by offset and length: half the size of a slice, so the tables below
/// are cheap to set up, and an end tag is compared with its start tag in place.
#[derive(Clone, Copy, Default)]
struct Span {
    at: u32,
    len: u32,
}

impl Span {
    /// `start..end`; [`Scanner::new`] refuses bodies whose offsets do not fit.
    fn new(start: usize, end: usize) -> Span {
        Span {
            at: start as u32,
            len: (end - start) as u32,
        }
    }

    fn start(self) -> usize {
        self.at as usize
    }

    fn len(self) -> usize {
        self.len as usize
    }
}

/// One attribute of the start tag just read.
#[derive(Clone, Copy, Default)]
struct Attr {
    key: Span,
    /// The key's first bytes as [`Scanner::attribute`] compares them (at most eight, zero
    /// above).
    key_word: u64,
    value: Span,
}

/// One element open.
#[derive(Clone, Copy, Default)]
struct Open {
    /// Its name, which its end tag must repeat.
    name: Span,
    /// How many declarations were in scope before its own: closing it is one store.
    bindings: u32,
}

/// One namespace declaration in scope.
#[derive(Clone, Copy)]
struct Binding {
    /// The prefix as a [`prefix_key`]; 0 for the default namespace.
    prefix: u64,
    ns: Ns,
}

/// [`prefix_key`] of the two prefixes that cannot be declared.
const XML_KEY: u64 = key_of(b"xml");
const XMLNS_KEY: u64 = key_of(b"xmlns");

/// A forward-only tokenizer over a whole body, keeping the open elements, the attributes of
/// the last start tag and the namespace declarations in scope in fixed-size tables.
struct Scanner<'i> {
    bytes: &'i [u8],
    /// The next byte to read.
    pos: usize,
    /// Elements currently open: `open[..depth]`.
    depth: usize,
    open: [Open; MAX_DEPTH],
    /// The last start tag was `<a/>`: its end is the next token.
    empty_open: bool,
    /// The name of the last start tag: its prefix as a [`prefix_key`] (0 for none), and its
    /// local part.
    prefix: u64,
    local: &'i [u8],
    attrs: [Attr; MAX_ATTRIBUTES],
    attr_count: usize,
    bindings: [Binding; MAX_BINDINGS],
    binding_count: usize,
}

impl<'i> Scanner<'i> {
    /// A scanner over `bytes`, positioned on its first byte. Infallible, so it is built in
    /// place rather than moved out of a `Result`.
    fn new(bytes: &'i [u8]) -> Self {
        Scanner {
            bytes,
            pos: 0,
            depth: 0,
            open: [Open::default(); MAX_DEPTH],
            empty_open: false,
            prefix: 0,
            local: &[],
            attrs: [Attr::default(); MAX_ATTRIBUTES],
            attr_count: 0,
            bindings: [Binding {
                prefix: 0,
                ns: Ns::Other,
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
    #[inline(always)]
    fn child(&mut self) -> Fast<Option<Element<'i>>> {
        match self.next()? {
            Token::Start => Ok(Some(self.element())),
            Token::End => Ok(None),
        }
    }

    /// Passes over the rest of the element just entered, through its end tag.
    fn skip(&mut self) -> Fast<()> {
        // Most elements skipped are empty (`<t:ItemId …/>`).
        if self.empty_open {
            self.empty_open = false;
            self.close();
            return Ok(());
        }
        let outer = self.depth - 1;
        while self.depth > outer {
            self.next()?;
        }
        Ok(())
    }

    /// The text of the element just entered, through its end tag, trimmed of XML white space.
    /// A child element or a `\r` (which the full walk would normalise) gives up.
    fn text(&mut self) -> Fast<&'i [u8]> {
        if self.empty_open {
            self.empty_open = false;
            self.close();
            return Ok(b"");
        }
        let bytes = self.bytes;
        let at = self.pos;
        let mut cr = false;
        // Texts Exchange writes have no white space: the first stop is their `<`, and there
        // is nothing to trim.
        let mut p = at;
        let mut plain = true;
        let mut end = loop {
            let (stop, b) = first_stop_long(bytes, p, text_stops);
            match b {
                b'<' => break stop,
                b'\r' => cr = true,
                b'&' | b'>' | 0x80.. => return Err(Bail),
                _ => {} // other white space and control characters, as the full walk
            }
            plain = false;
            p = stop + 1;
        };
        // A child element is left to the full walk, which reads the text around it.
        if end - at > MAX_VALUE_LEN || self.byte(end + 1)? != b'/' {
            return Err(Bail);
        }
        self.end_tag(end)?;
        if plain {
            return Ok(&bytes[at..end]);
        }
        // Trimmed of XML white space, which is ASCII.
        let start = skip_space(bytes, at);
        while end > start && is_space(bytes[end - 1]) {
            end -= 1;
        }
        let text = &bytes[start..end];
        if cr && text.contains(&b'\r') {
            return Err(Bail);
        }
        Ok(text)
    }

    /// Reads the rest of the document: the root's remaining content, then nothing but white
    /// space.
    fn finish(&mut self) -> Fast<()> {
        while self.depth > 0 {
            self.next()?;
        }
        let rest = &self.bytes[self.pos..];
        if rest.len() > MAX_VALUE_LEN || skip_space(rest, 0) != rest.len() {
            return Err(Bail);
        }
        Ok(())
    }

    /// The value of the unqualified attribute `key` of the start tag just read.
    #[inline(always)]
    fn attr(&self, key: &[u8]) -> Option<&'i [u8]> {
        let bytes = self.bytes;
        self.attrs[..self.attr_count.min(MAX_ATTRIBUTES)]
            .iter()
            .find(|attr| {
                attr.key.len() == key.len() && eq_lit(&bytes[attr.key.start()..][..key.len()], key)
            })
            .map(|attr| &bytes[attr.value.start()..][..attr.value.len()])
    }

    /// The start tag just read, its namespace resolved: the innermost declaration of its
    /// prefix, one comparison of two integers per declaration in scope.
    #[inline(always)]
    fn element(&self) -> Element<'i> {
        let ns = self.bindings[..self.binding_count.min(MAX_BINDINGS)]
            .iter()
            .rev()
            .find(|binding| binding.prefix == self.prefix)
            .map_or(Ns::Other, |binding| binding.ns);
        Element {
            ns,
            local: self.local,
        }
    }

    /// Out of line, and the one call a token costs: the tag readers are inlined into it.
    #[inline(never)]
    fn next(&mut self) -> Fast<Token> {
        if self.empty_open {
            self.empty_open = false;
            self.close();
            return Ok(Token::End);
        }
        if self.depth == 0 {
            return Err(Bail);
        }
        // Text between tags: ignored by every caller (`text` reads its own), so only checked:
        // no `&` (a reference) or `>` (perhaps ending a `]]>`), both left to the full walk.
        let at = markup(self.bytes, self.pos)?;
        if at - self.pos > MAX_VALUE_LEN {
            return Err(Bail);
        }
        self.pos = at;
        if self.byte(at + 1)? == b'/' {
            self.end_tag(at)?;
            return Ok(Token::End);
        }
        // `<!` and `<?` fail the name grammar.
        self.start_tag()?;
        Ok(Token::Start)
    }

    /// Reads the start tag at `pos` and enters it: name, attributes, namespace declarations.
    #[inline(always)]
    fn start_tag(&mut self) -> Fast<()> {
        let bytes = self.bytes;
        let start = self.pos + 1;
        let (end, colon, first) = name(bytes, start)?;
        let local = match colon {
            Some(colon) => {
                // The prefix's key from the word the name scan loaded.
                let len = colon - start;
                if len > 8 {
                    return Err(Bail);
                }
                let prefix = first & low_bytes(len);
                // Prefixes that cannot be declared: the full walk resolves them as unbound.
                if prefix == XML_KEY || prefix == XMLNS_KEY {
                    return Err(Bail);
                }
                self.prefix = prefix;
                colon + 1
            }
            None => {
                self.prefix = 0;
                start
            }
        };
        self.local = &bytes[local..end];
        if self.depth >= MAX_DEPTH {
            return Err(Bail);
        }
        let bindings = self.binding_count as u32;
        self.attr_count = 0;
        let (p, empty) = match bytes.get(end) {
            Some(b'>') => (end + 1, false),
            Some(b'/') if bytes.get(end + 1) == Some(&b'>') => (end + 2, true),
            _ => self.attributes(end)?,
        };
        self.open[self.depth] = Open {
            name: Span::new(start, end),
            bindings,
        };
        self.depth += 1;
        self.pos = p;
        self.empty_open = empty;
        Ok(())
    }

    /// Reads the rest of the start tag being read from `p`, just past its name: its
    /// attributes, through its `>` or `/>`; returns where it ends and whether it was `/>`.
    /// Out of line, so that the many tags without attributes do not pay for its registers.
    #[inline(never)]
    fn attributes(&mut self, mut p: usize) -> Fast<(usize, bool)> {
        let bytes = self.bytes;
        loop {
            match bytes.get(p) {
                Some(b'>') => return Ok((p + 1, false)),
                Some(b'/') if bytes.get(p + 1) == Some(&b'>') => return Ok((p + 2, true)),
                // White space must separate the name and every attribute.
                Some(b' ' | b'\t' | b'\n' | b'\r') => {}
                _ => return Err(Bail),
            }
            p = skip_space(bytes, p + 1);
            // Past the end, `attribute` finds no name and gives up.
            if !matches!(bytes.get(p), Some(b'>' | b'/')) {
                p = self.attribute(p)?;
            }
        }
    }

    /// Reads the attribute at `key` of the start tag being read; returns where its value's
    /// closing quote ends.
    #[inline(always)]
    fn attribute(&mut self, key: usize) -> Fast<usize> {
        let bytes = self.bytes;
        let (key_end, colon, first) = name(bytes, key)?;
        let key_len = key_end - key;
        // The key's first (up to) eight bytes, from the word the name scan loaded: most keys
        // are told apart, and `xmlns` told, by this alone.
        let key_word = first & low_bytes(key_len.min(8));
        let mut eq = key_end;
        if bytes.get(eq) != Some(&b'=') {
            eq = skip_space(bytes, eq);
            if bytes.get(eq) != Some(&b'=') {
                return Err(Bail);
            }
        }
        let open_quote = skip_space(bytes, eq + 1);
        let quote = match bytes.get(open_quote) {
            Some(&quote @ (b'"' | b'\'')) => quote,
            _ => return Err(Bail),
        };
        let value = open_quote + 1;
        // Base64 ids, the one long value kind, hold no stop: one stop per value, its quote.
        let mut p = value;
        let end = loop {
            let (stop, b) = first_stop_long(bytes, p, value_stops);
            match b {
                b if b == quote => break stop,
                b'<' | b'&' | 0x80.. => return Err(Bail),
                _ => p = stop + 1, // the other quote, white space, `!`, `#` …
            }
        };
        if end - value > MAX_VALUE_LEN {
            return Err(Bail);
        }
        let count = self.attr_count;
        if count == MAX_ATTRIBUTES {
            return Err(Bail);
        }
        for seen in &self.attrs[..count] {
            if seen.key_word == key_word
                && seen.key.len() == key_len
                && (key_len <= 8 || same(bytes, seen.key.start(), key, key_len))
            {
                return Err(Bail);
            }
        }
        self.attrs[count] = Attr {
            key: Span::new(key, key_end),
            key_word,
            value: Span::new(value, end),
        };
        self.attr_count = count + 1;
        // `xmlns` or `xmlns:p`, told apart from `xmlnsfoo` by where the colon is. Other
        // prefixed attributes are not resolved, in the full walk either.
        if key_word & low_bytes(5) == XMLNS_KEY {
            match colon {
                None if key_end - key == 5 => self.declare(0, value, end)?,
                Some(colon) if colon == key + 5 => {
                    let prefix = prefix_key(bytes, colon + 1, key_end)?;
                    self.declare(prefix, value, end)?;
                }
                _ => {}
            }
        }
        Ok(end + 1)
    }

    /// Puts the declaration of `prefix` (0: the default namespace) as the URI at
    /// `value..end` in scope; gives up on those the full walk refuses or treats specially, and
    /// on a prefix bound to no namespace.
    fn declare(&mut self, prefix: u64, value: usize, end: usize) -> Fast<()> {
        let uri = &self.bytes[value..end];
        if prefix == XML_KEY
            || prefix == XMLNS_KEY
            || uri == XML_NS
            || uri == XMLNS_NS
            || (prefix != 0 && uri.is_empty())
            || self.binding_count == MAX_BINDINGS
        {
            return Err(Bail);
        }
        self.bindings[self.binding_count] = Binding {
            prefix,
            ns: known_ns(uri),
        };
        self.binding_count += 1;
        Ok(())
    }

    /// Reads the end tag at `at`, which must close the innermost open element: compared with
    /// the start tag's name where it stands in the body.
    #[inline(always)]
    fn end_tag(&mut self, at: usize) -> Fast<()> {
        let name = self.open[self.depth - 1].name;
        let after_name = at + 2 + name.len();
        if !same(self.bytes, at + 2, name.start(), name.len()) {
            return Err(Bail);
        }
        let mut close = after_name;
        if self.byte(close)? != b'>' {
            close = skip_space(self.bytes, close);
            if self.byte(close)? != b'>' {
                return Err(Bail);
            }
        }
        self.pos = close + 1;
        self.close();
        Ok(())
    }

    /// Leaves the innermost element, dropping its declarations.
    #[inline(always)]
    fn close(&mut self) {
        self.depth -= 1;
        self.binding_count = self.open[self.depth].bindings as usize;
    }

    fn byte(&self, at: usize) -> Fast<u8> {
        self.bytes.get(at).copied().ok_or(Bail)
    }
}

/// The end of the name that starts at `start`, where its colon is if it has a prefix, and
/// the word loaded at `start` (see [`word`]), from which callers take the prefix or key
/// without a second load. A second colon ends the name, which its caller then refuses; so
/// does running off the end of the body, at the caller's next read.
///
/// Names are mostly letters, so the scan stops at anything else, and the rare digit, `_`,
/// `-`, `.` or colon is stepped over: a cheaper test per word than the whole name grammar.
#[inline(always)]
fn name(bytes: &[u8], start: usize) -> Fast<(usize, Option<usize>, u64)> {
    let first = word(bytes, start);
    if !is_name_start(first as u8) {
        return Err(Bail);
    }
    // The first byte is a letter or `_`, stepped over whatever its mark.
    let mut hits = letter_stops(first) & !0xFF;
    let mut at = start;
    let mut w = first;
    let mut colon = None;
    loop {
        while hits == 0 {
            at += 8;
            w = word(bytes, at);
            hits = letter_stops(w);
        }
        let lane = first_lane(hits);
        hits &= hits - 1;
        let p = at + lane;
        let b = (w >> (8 * lane)) as u8;
        // The stop that ends the name, the common one, is told by one test of a bitmap.
        let inside = if b < 64 {
            NAME_PUNCTUATION >> b & 1 != 0
        } else {
            b == b'_'
        };
        if !inside {
            return Ok((p, colon, first));
        }
        if b == b':' {
            if colon.is_some() {
                return Ok((p, colon, first));
            }
            // The local part starts like a name.
            if !bytes.get(p + 1).is_some_and(|&b| is_name_start(b)) {
                return Err(Bail);
            }
            colon = Some(p);
        }
    }
}

/// The bytes below 64 that a name may hold past its first: `-`, `.`, digits and `:`, as
/// bits.
const NAME_PUNCTUATION: u64 = {
    let mut bits = 1 << b'-' | 1 << b'.' | 1 << b':';
    let mut digit = b'0';
    while digit <= b'9' {
        bits |= 1 << digit;
        digit += 1;
    }
    bits
};

/// `[A-Za-z_]`: what a name, and each part of a prefixed one, starts with.
fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The prefix at `start..end` as a number, so that resolving an element is comparing
/// integers: its bytes in a little-endian `u64`, zero above them. Name bytes are never zero,
/// so two prefixes of at most eight bytes are equal exactly when their keys are, and no key
/// is 0, which stands for no prefix. A longer prefix gives up.
fn prefix_key(bytes: &[u8], start: usize, end: usize) -> Fast<u64> {
    if end - start > 8 {
        return Err(Bail);
    }
    Ok(word(bytes, start) & low_bytes(end - start))
}

/// The namespace a declaration binds, as [`Ns::of`] says, for the price of a switch on the
/// length and a few word comparisons (the known URIs differ in length), not of calls to
/// `memcmp`.
fn known_ns(uri: &[u8]) -> Ns {
    // `eq_lit` tests the length first: most URIs are told apart by it alone.
    if eq_lit(uri, SOAP_NS.as_bytes()) {
        Ns::Soap
    } else if eq_lit(uri, MESSAGES_NS.as_bytes()) {
        Ns::Messages
    } else if eq_lit(uri, TYPES_NS.as_bytes()) {
        Ns::Types
    } else if eq_lit(uri, ERRORS_NS.as_bytes()) {
        Ns::Errors
    } else if eq_lit(uri, AUTODISCOVER_NS.as_bytes()) {
        Ns::Autodiscover
    } else {
        Ns::Other
    }
}

/// [`prefix_key`] at compile time.
const fn key_of(prefix: &[u8]) -> u64 {
    let mut key = 0;
    let mut i = prefix.len();
    while i > 0 {
        i -= 1;
        key = key << 8 | prefix[i] as u64;
    }
    key
}

/// A mask of the low `n` bytes of a word (`n` at most 8).
fn low_bytes(n: usize) -> u64 {
    u64::MAX.checked_shr(64 - 8 * n as u32).unwrap_or(0)
}

/// Whether the `len` bytes at `a` and at `b` are the same, compared a word at a time in
/// place: names are short, and a call to `memcmp` costs more. A name of up to eight bytes is
/// one masked word; past the end of the body [`word`] pads with 0xFF, which is in no name, so
/// a name cut short is not the same. A longer one is whole words, then its last eight bytes,
/// which may overlap the last whole word.
#[inline(always)]
fn same(bytes: &[u8], a: usize, b: usize, len: usize) -> bool {
    if len <= 8 {
        return (word(bytes, a) ^ word(bytes, b)) & low_bytes(len) == 0;
    }
    let mut i = 0;
    while i + 8 < len {
        if word(bytes, a + i) != word(bytes, b + i) {
            return false;
        }
        i += 8;
    }
    word(bytes, a + len - 8) == word(bytes, b + len - 8)
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
        let (key_end, _, _) = name(bytes, key)?;
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
        let len = bytes
            .get(value..)
            .and_then(|rest| rest.iter().position(|&b| b == quote))
            .ok_or(Bail)?;
        if !valid(&bytes[value..value + len]) {
            return Err(Bail);
        }
        p = value + len + 1;
    }
}

/// The first byte at or after `at` that is not XML white space (or the end of `bytes`). A
/// byte at a time: the runs it passes over inside tags are a byte or two long.
fn skip_space(bytes: &[u8], at: usize) -> usize {
    let mut p = at;
    while bytes.get(p).is_some_and(|&b| is_space(b)) {
        p += 1;
    }
    p
}

// Eight bytes at a time. A scan loads a word and computes a mask with the high bit of each
// byte ("lane") set where the byte stops the scan. Each test adds a constant to every lane or
// XORs one in, so that a lane's high bit says whether its byte is in some range. No word is
// masked to seven bits first: a carry can only come out of a lane holding 0x80 or more, and
// every test marks those bytes, which are not ASCII, as stops that give up. So a wrong mark
// can only follow a stop that ends the scan, and the stops a scan acts on are exact
// (`stops_are_exact` checks every byte in every lane).

/// `b` in every lane.
const fn splat(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

const HIGH: u64 = splat(0x80);

/// The high bit of each ASCII lane of `w` that is at least `b`: adding `0x80 - b` carries
/// into it exactly then.
const fn at_least(w: u64, b: u8) -> u64 {
    w.wrapping_add(splat(0x80 - b))
}

/// The high bit of each ASCII lane of `w` that is not `b`: their XOR is not zero, and
/// adding 0x7F carries it into the high bit.
const fn not(w: u64, b: u8) -> u64 {
    (w ^ splat(b)).wrapping_add(splat(0x7F))
}

/// Bytes that are not ASCII letters. Folding the case (`| 0x20`) makes the letters one
/// range, and moves nothing else into it.
fn letter_stops(w: u64) -> u64 {
    let lower = w | splat(0x20);
    !(at_least(lower, b'a') & !at_least(lower, b'z' + 1) & !w) & HIGH
}

/// Bytes that may end or spoil an attribute value: its quote, `<` and `&`, which give up,
/// and non-ASCII. The quotes and `&` are among the bytes below `(`, tested as one range;
/// the others there (white space, `!`, `#` …) are stepped over by the caller.
fn value_stops(w: u64) -> u64 {
    !(at_least(w, b'(') & not(w, b'<') & !w) & HIGH
}

/// Bytes that may end or spoil a text: `<`, `&`, `>` and non-ASCII. `&` is tested among the
/// bytes below `'`, as one range: the others there (white space, control characters, `!`,
/// `#` …) are stepped over by the caller, which notes a `\r`. `<` and `>` differ in one bit:
/// with it set both are `>`.
fn text_stops(w: u64) -> u64 {
    !(at_least(w, b'\'') & not(w | splat(0x02), b'>') & !w) & HIGH
}

/// Bytes that end or spoil the text between tags: `<`, `&`, `>` and non-ASCII.
fn markup_stops(w: u64) -> u64 {
    !(not(w, b'&') & not(w | splat(0x02), b'>') & !w) & HIGH
}

/// The first byte at or after `at` that `stops` (`letter_stops` …) marks, and its offset: a
/// scan is a loop over these that stops at the first one it cannot step over, starting again
/// past each one it can. Each word is loaded in place by [`word`], with no setup per scan,
/// as most scans end within a word or two. It always finds one: past the end of the body
/// [`word`] fills in 0xFF, which every scan takes to end it, at an offset past the body, so
/// that the caller's next read gives up.
#[inline(always)]
fn first_stop(bytes: &[u8], mut at: usize, stops: impl Fn(u64) -> u64) -> (usize, u8) {
    loop {
        let w = word(bytes, at);
        let hits = stops(w);
        if hits != 0 {
            let lane = first_lane(hits);
            return (at + lane, (w >> (8 * lane)) as u8);
        }
        at += 8;
    }
}

/// [`first_stop`] for the scans that pass over long runs (attribute values and texts,
/// base64 ids): two words per step, so one bounds check and one branch per sixteen bytes.
/// Each word's marks are exact up to its first stop, so the first word that has any holds
/// the first stop. The last bytes of the body, fewer than sixteen, take the word scan.
#[inline(always)]
fn first_stop_long(bytes: &[u8], mut at: usize, stops: impl Fn(u64) -> u64) -> (usize, u8) {
    while let Some(chunk) = bytes.get(at..).and_then(|rest| rest.first_chunk::<16>()) {
        let (lo, hi) = chunk.split_at(8);
        let lo = u64::from_le_bytes(lo.try_into().expect("eight"));
        let hi = u64::from_le_bytes(hi.try_into().expect("eight"));
        let (lo_hits, hi_hits) = (stops(lo), stops(hi));
        if lo_hits | hi_hits != 0 {
            let (w, hits, at) = if lo_hits != 0 {
                (lo, lo_hits, at)
            } else {
                (hi, hi_hits, at + 8)
            };
            let lane = first_lane(hits);
            return (at + lane, (w >> (8 * lane)) as u8);
        }
        at += 16;
    }
    first_stop(bytes, at, stops)
}

/// The lowest lane of a non-zero word holding a non-zero bit: with words loaded
/// little-endian, the first such byte in the body's order.
fn first_lane(hits: u64) -> usize {
    (hits.trailing_zeros() / 8) as usize
}

/// Where the next tag starts at or after `at`: the next `<`, with no `&` (a reference) or
/// `>` (perhaps ending a `]]>`) before it, both left to the full walk.
///
/// Between tags Exchange writes a line end and spaces, so those are tried first: XOR with
/// spaces leaves a word zero but where a byte is not a space, and the lowest such lane is
/// the tag if the run ends at one. Anything else takes the full scan.
fn markup(bytes: &[u8], at: usize) -> Fast<usize> {
    let mut p = at + usize::from(bytes.get(at) == Some(&b'\n'));
    loop {
        let others = word(bytes, p) ^ splat(b' ');
        if others != 0 {
            p += first_lane(others);
            break;
        }
        p += 8;
    }
    if bytes.get(p) == Some(&b'<') {
        return Ok(p);
    }
    match first_stop(bytes, at, markup_stops) {
        (p, b'<') => Ok(p),
        _ => Err(Bail),
    }
}

/// The eight bytes from `at` as a little-endian word, so the first byte is the lowest lane;
/// past the end of the body padded with 0xFF, a byte no scan accepts and no name holds.
#[inline(always)]
fn word(bytes: &[u8], at: usize) -> u64 {
    // One comparison rather than two: `at + 8` cannot overflow, offsets fit in `u32`.
    match bytes.get(at..at + 8) {
        Some(chunk) => u64::from_le_bytes(chunk.try_into().expect("eight")),
        None => padded(bytes.get(at..).unwrap_or_default()),
    }
}

/// The fewer than eight bytes of `rest` as a word, padded with 0xFF: taken once or twice
/// per body, at its end.
#[cold]
#[inline(never)]
fn padded(rest: &[u8]) -> u64 {
    let mut chunk = [0xFF; 8];
    chunk[..rest.len()].copy_from_slice(rest);
    u64::from_le_bytes(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_match_their_names() {
        for kind in EventType::ALL {
            assert_eq!(event_type(kind.as_str().as_bytes()), Some(kind));
        }
        assert_eq!(event_type(b"Event"), None);
    }

    /// Every scan's mask against the byte classes it stands for, for every byte in every lane
    /// after bytes that do not stop it, and before any bytes at all.
    #[test]
    fn stops_are_exact() {
        let letter = |b: u8| b.is_ascii_alphabetic();
        let value = |b: u8| b < b'(' || b == b'<' || b >= 0x80;
        let text = |b: u8| b < b'\'' || matches!(b, b'<' | b'>') || b >= 0x80;
        let markup = |b: u8| matches!(b, b'&' | b'<' | b'>') || b >= 0x80;
        type Scan<'a> = (fn(u64) -> u64, &'a dyn Fn(u8) -> bool);
        let scans: [Scan; 4] = [
            (letter_stops, &|b| !letter(b)),
            (value_stops, &value),
            (text_stops, &text),
            (markup_stops, &markup),
        ];
        for (stops, expected) in scans {
            for lane in 0..8 {
                for b in 0..=255u8 {
                    for after in [b'a', b'<', 0xFF, 0x00] {
                        let mut bytes = [after; 8];
                        bytes[..lane].fill(b'a');
                        bytes[lane] = b;
                        let mask = stops(u64::from_le_bytes(bytes));
                        let hit = mask & (0x80 << (8 * lane)) != 0;
                        assert_eq!(hit, expected(b), "byte {b:#x} in lane {lane}");
                        assert_eq!(mask & ((0x80 << (8 * lane)) - 1), 0, "before lane {lane}");
                    }
                }
            }
        }
    }

    /// `known_ns` is `Ns::of`, on the known URIs and on near misses of each.
    #[test]
    fn known_namespaces() {
        for uri in [SOAP_NS, MESSAGES_NS, TYPES_NS, ERRORS_NS, AUTODISCOVER_NS].map(str::as_bytes) {
            assert_ne!(Ns::of(uri), Ns::Other);
            let mut variants = vec![uri.to_vec(), uri[..uri.len() - 1].to_vec()];
            variants.push([uri, b"/"].concat());
            for i in 0..uri.len() {
                let mut changed = uri.to_vec();
                changed[i] ^= 0x20;
                variants.push(changed);
            }
            for variant in variants {
                assert_eq!(known_ns(&variant), Ns::of(&variant), "{variant:?}");
            }
        }
        for uri in [&b""[..], b"urn:x", XML_NS, XMLNS_NS] {
            assert_eq!(known_ns(uri), Ns::of(uri));
        }
    }

    #[test]
    fn literals() {
        let names: [&[u8]; 8] = [
            b"",
            b"a",
            b"ab",
            b"abc",
            b"abcdefg",
            b"abcdefgh",
            b"abcdefghijklmnopq",
            b"SendNotificationResponseMessage",
        ];
        for name in names {
            for other in names {
                assert_eq!(eq_lit(name, other), name == other);
            }
            for i in 0..name.len() {
                let mut changed = name.to_vec();
                changed[i] ^= 1;
                assert!(!eq_lit(&changed, name));
            }
        }
    }

    /// The two-word scan against the word scan, from every offset of bodies with one stop
    /// byte in any of the first sixteen lanes, or none.
    #[test]
    fn long_scans_are_word_scans() {
        let scans: [fn(u64) -> u64; 4] = [letter_stops, value_stops, text_stops, markup_stops];
        for stops in scans {
            for lane in 0..17 {
                for b in 0..=255u8 {
                    let mut body = [b'a'; 40];
                    body[lane] = b;
                    body[30] = b'<';
                    for at in 0..body.len() {
                        let long = first_stop_long(&body, at, stops);
                        assert_eq!(long, first_stop(&body, at, stops), "{b:#x} at {lane}");
                    }
                }
            }
        }
    }

    #[test]
    fn name_punctuation() {
        for b in 0..64u8 {
            let expected = b.is_ascii_digit() || matches!(b, b'-' | b'.' | b':');
            assert_eq!(NAME_PUNCTUATION >> b & 1 != 0, expected, "{b:#x}");
        }
    }

    #[test]
    fn prefix_keys() {
        let body = b"xmlns:xml>";
        assert_eq!(prefix_key(body, 0, 5).ok(), Some(XMLNS_KEY));
        assert_eq!(prefix_key(body, 6, 9).ok(), Some(XML_KEY));
        assert!(prefix_key(b"abcdefghi:", 0, 9).is_err());
        assert_eq!(low_bytes(0), 0);
        assert_eq!(low_bytes(8), u64::MAX);
    }
}
