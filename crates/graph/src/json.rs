//! Strict reading of JSON objects: every key and its value's exact text, refusing duplicate keys
//! (serde_json would silently keep the last one, so two parsers could disagree on a body).

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// Deepest nesting accepted, the same as serde_json's own recursion limit. serde_json does not
/// apply that limit when it skips a value into a `RawValue`, so it is checked here, once, over
/// the whole body.
pub(crate) const MAX_DEPTH: usize = 128;

/// Whether `text` nests arrays and objects deeper than [`MAX_DEPTH`]. Only meaningful for text
/// that is otherwise valid JSON (brackets inside strings are skipped).
pub(crate) fn too_deep(text: &[u8]) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// A JSON object's entries in their order, each value as its exact text.
pub(crate) struct Entries<'a> {
    /// Keys (unescaped) with their values' text.
    pub(crate) entries: Vec<(String, &'a RawValue)>,
    /// The first key seen twice, if any.
    pub(crate) duplicate: Option<String>,
}

impl<'a> Entries<'a> {
    /// Reads `raw`, which must be a JSON object; `None` if it is another kind of value.
    pub(crate) fn of(raw: &'a RawValue) -> Option<Entries<'a>> {
        if !raw.get().starts_with('{') {
            return None;
        }
        let mut de = serde_json::Deserializer::from_str(raw.get());
        de.deserialize_map(EntriesVisitor).ok()
    }

    /// The value text of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Entries<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries: Vec<(String, &'de RawValue)> = Vec::new();
        let mut duplicate = None;
        while let Some(key) = map.next_key::<String>()? {
            let value: &'de RawValue = map.next_value()?;
            // Objects from Graph have a handful of keys; a linear scan beats hashing here.
            if duplicate.is_none() && entries.iter().any(|(k, _)| *k == key) {
                duplicate = Some(key.clone());
            }
            entries.push((key, value));
        }
        Ok(Entries { entries, duplicate })
    }
}

/// A JSON array's elements as exact text, keeping at most `limit` but counting all.
pub(crate) fn elements(raw: &RawValue, limit: usize) -> Option<(Vec<&RawValue>, usize)> {
    if !raw.get().starts_with('[') {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.deserialize_seq(ElementsVisitor { limit }).ok()
}

struct ElementsVisitor {
    limit: usize,
}

impl<'de> Visitor<'de> for ElementsVisitor {
    type Value = (Vec<&'de RawValue>, usize);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut kept = Vec::new();
        let mut count = 0usize;
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            count += 1;
            if kept.len() < self.limit {
                kept.push(item);
            }
        }
        Ok((kept, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_brackets_outside_strings() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(!too_deep(ok.as_bytes()));
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(too_deep(deep.as_bytes()));
        let in_string = format!("[\"{}\\\"{}\"]", "[".repeat(200), "{".repeat(200));
        assert!(!too_deep(in_string.as_bytes()));
    }
}
