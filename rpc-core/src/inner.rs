//! Reading a 2.0 envelope's inner document straight from the envelope's text.
//!
//! The inner document is JSON written inside a JSON string: each of its quotes
//! appears as `\"`, each of its backslashes as `\\`. Unescaping that string and then
//! parsing the result walks every byte twice and copies the document once; here the
//! inner document's tokens are read in the escaped text itself, and its strings are
//! copied once, straight into the values built from them.
//!
//! This is a fast path, not a second decoder. It reads the shapes writers produce
//! (mqrpc's [`crate::envelope::Writer`], Python's `json.dumps` with or without
//! `ensure_ascii`) and returns `None` for anything else: another envelope shape, an
//! escape of the envelope's string it does not expect (`\u`, `\b`, …), JSON that is
//! malformed or nests deeper than [`MAX_DEPTH`]. The caller then reads the body the
//! general way (unescape, then serde_json), which decides what is wrong and says so.
//! So whatever this module accepts, the general path accepts with the same values;
//! the tests and the `envelope_decode` fuzz target compare the two.

use std::borrow::Cow;
use std::str::FromStr;

use serde_json::{Map, Number, Value};

use crate::envelope::{skip_ws, splat};
use crate::wire::{ENVELOPE_VERSION, MAX_DEPTH};

/// Calls `member` with each top-level member of the inner document of `body`, in
/// order, or returns `None` (possibly after some calls) when `body` is not a plain
/// 2.0 envelope this reader takes.
/// Only members for which `wanted` says where they go are built, and handed to
/// `member` with that answer; the others are read with the same checks and dropped,
/// without allocating.
pub(crate) fn members<'a, W>(
    body: &'a [u8],
    wanted: impl Fn(&str) -> Option<W>,
    mut member: impl FnMut(Cow<'a, str>, W, Value),
) -> Option<()> {
    // One validation of the whole body; every slice taken later starts and ends
    // next to an ASCII byte, so it is valid too.
    let text = std::str::from_utf8(body).ok()?;
    let mut cursor = Cursor { text, at: 0 };
    cursor.plain_ws();
    cursor.eat(b'{')?;
    let (mut version, mut message) = (false, false);
    loop {
        cursor.plain_ws();
        // Keys or values with escapes, a repeated `oslo.` member, and any other member
        // whose value is not a plain string, are for the general path.
        let key = cursor.plain_string()?;
        cursor.plain_colon()?;
        match key {
            "oslo.version" if !version => {
                cursor.eat(b'"')?;
                cursor.eat_all(ENVELOPE_VERSION.as_bytes())?;
                cursor.eat(b'"')?;
                version = true;
            }
            "oslo.message" if !message => {
                cursor.eat(b'"')?;
                cursor.document(&wanted, &mut member)?;
                cursor.eat(b'"')?;
                message = true;
            }
            "oslo.version" | "oslo.message" => return None,
            // Another member (a `MessageAuth` signature): skipped, as the general
            // path's envelope ignores it.
            _ => {
                cursor.plain_string()?;
            }
        }
        cursor.plain_ws();
        match cursor.next()? {
            b',' => {}
            b'}' => break,
            _ => return None,
        }
    }
    cursor.plain_ws();
    (version && message && cursor.at == body.len()).then_some(())
}

/// The high bit of each byte of `word` (read little-endian) that ends a run of a
/// string's plain bytes: a quote, a backslash or a control character. Only the
/// lowest is exact (a borrow can mark the bytes above it).
const fn stops(word: u64) -> u64 {
    const ONES: u64 = splat(0x01);
    const HIGH: u64 = splat(0x80);
    let quote = word ^ splat(b'"');
    let backslash = word ^ splat(b'\\');
    let control = word.wrapping_sub(splat(0x20)) & !word;
    (quote.wrapping_sub(ONES) & !quote | backslash.wrapping_sub(ONES) & !backslash | control) & HIGH
}

/// The index of the first quote, backslash or control character at or after `at`.
fn stop(bytes: &[u8], at: usize) -> Option<usize> {
    let mut words = bytes.get(at..)?.chunks_exact(8);
    let mut offset = at;
    for word in &mut words {
        let found = stops(u64::from_le_bytes(word.try_into().ok()?));
        if found != 0 {
            return Some(offset + (found.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    (words.remainder().iter())
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|i| offset + i)
}

/// The four hex digits at `at` as a number.
fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    let digits = bytes.get(at..at.checked_add(4)?)?;
    digits
        .iter()
        .try_fold(0u32, |n, &d| Some(n << 4 | char::from(d).to_digit(16)?))
}

struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    fn eat_all(&mut self, expected: &[u8]) -> Option<()> {
        let end = self.at.checked_add(expected.len())?;
        (self.bytes().get(self.at..end)? == expected).then(|| self.at = end)
    }

    /// Whitespace of the envelope itself.
    fn plain_ws(&mut self) {
        self.at = skip_ws(self.bytes(), self.at);
    }

    /// A string of the envelope with no escape in it, quotes included.
    fn plain_string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let end = stop(self.bytes(), start)?;
        // A backslash (an escape) or a control character is for the general path.
        if self.bytes()[end] != b'"' {
            return None;
        }
        self.at = end + 1;
        self.text.get(start..end)
    }

    /// The colon after an envelope key, with the whitespace around it.
    fn plain_colon(&mut self) -> Option<()> {
        self.plain_ws();
        self.eat(b':')?;
        self.plain_ws();
        Some(())
    }

    /// Whitespace of the inner document: a space, or a tab or line break escaped
    /// (`\n`, `\r`, `\t`). A raw tab or line break would be a control character
    /// inside the envelope's string, which no JSON parser takes (the general path
    /// refuses it).
    fn ws(&mut self) {
        let bytes = self.bytes();
        loop {
            match bytes.get(self.at) {
                Some(b' ') => self.at += 1,
                Some(b'\\') if matches!(bytes.get(self.at + 1), Some(b'n' | b'r' | b't')) => {
                    self.at += 2;
                }
                _ => return,
            }
        }
    }

    /// An inner quote, written `\"`.
    fn quote(&mut self) -> Option<()> {
        self.eat_all(br#"\""#)
    }

    /// The inner document: an object whose members go to `member`. Leaves the
    /// cursor on the envelope string's closing quote.
    fn document<W>(
        &mut self,
        wanted: &impl Fn(&str) -> Option<W>,
        member: &mut impl FnMut(Cow<'a, str>, W, Value),
    ) -> Option<()> {
        self.ws();
        self.eat(b'{')?;
        self.items(b'}', |cursor| {
            let key = cursor.key()?;
            match wanted(&key) {
                Some(to) => {
                    let value = cursor.value(1)?;
                    member(key, to, value);
                }
                None => cursor.skip(1)?,
            }
            Some(())
        })?;
        self.ws();
        Some(())
    }

    /// The items of a container whose opening bracket was read, up to and with its
    /// `close`, separated by commas: `item` reads each one.
    fn items(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.ws();
        if self.peek()? == close {
            self.at += 1;
            return Some(());
        }
        loop {
            item(self)?;
            self.ws();
            match self.next()? {
                b',' => {}
                byte if byte == close => return Some(()),
                _ => return None,
            }
        }
    }

    /// `"key":` of an object's member.
    fn key(&mut self) -> Option<Cow<'a, str>> {
        self.ws();
        self.quote()?;
        let key = self.string()?;
        self.ws();
        self.eat(b':')?;
        Some(key)
    }

    /// `"key": value` of an object at `depth`.
    fn member(&mut self, depth: usize) -> Option<(Cow<'a, str>, Value)> {
        let key = self.key()?;
        let value = self.value(depth)?;
        Some((key, value))
    }

    /// A value inside a container at `depth`, read with [`Cursor::value`]'s checks
    /// but not built: no string is copied (unless it has escapes) and no container
    /// is allocated.
    fn skip(&mut self, depth: usize) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'\\' => {
                self.quote()?;
                self.string().map(drop)
            }
            b'{' => {
                let depth = Self::deeper(depth)?;
                self.at += 1;
                self.items(b'}', |cursor| {
                    cursor.key()?;
                    cursor.skip(depth)
                })
            }
            b'[' => {
                let depth = Self::deeper(depth)?;
                self.at += 1;
                self.items(b']', |cursor| cursor.skip(depth))
            }
            // The scalars allocate nothing.
            _ => self.value(depth).map(drop),
        }
    }

    /// A value inside a container at `depth`.
    fn value(&mut self, depth: usize) -> Option<Value> {
        self.ws();
        Some(match self.peek()? {
            b'\\' => {
                self.quote()?;
                Value::String(self.string()?.into_owned())
            }
            b'{' => {
                let depth = Self::deeper(depth)?;
                self.at += 1;
                let mut object = Map::new();
                self.items(b'}', |cursor| {
                    let (key, value) = cursor.member(depth)?;
                    object.insert(key.into_owned(), value);
                    Some(())
                })?;
                Value::Object(object)
            }
            b'[' => {
                let depth = Self::deeper(depth)?;
                self.at += 1;
                let mut array = Vec::new();
                self.items(b']', |cursor| {
                    array.push(cursor.value(depth)?);
                    Some(())
                })?;
                Value::Array(array)
            }
            b't' => {
                self.eat_all(b"true")?;
                Value::Bool(true)
            }
            b'f' => {
                self.eat_all(b"false")?;
                Value::Bool(false)
            }
            b'n' => {
                self.eat_all(b"null")?;
                Value::Null
            }
            b'-' | b'0'..=b'9' => {
                let start = self.at;
                while matches!(
                    self.peek(),
                    Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                ) {
                    self.at += 1;
                }
                // serde_json reads the number: the same checks, the same value.
                Value::Number(Number::from_str(self.text.get(start..self.at)?).ok()?)
            }
            _ => return None,
        })
    }

    /// The depth inside a new container opened at `depth`, if within the limit.
    fn deeper(depth: usize) -> Option<usize> {
        (depth < MAX_DEPTH).then_some(depth + 1)
    }

    /// The rest of an inner string whose opening quote was read, with its escapes
    /// resolved; borrowed when it has none.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let (text, bytes) = (self.text, self.bytes());
        let start = self.at;
        let mut run = start;
        let mut owned: Option<String> = None;
        loop {
            let at = stop(bytes, run)?;
            // A bare quote would end the envelope's string inside an inner string,
            // and JSON strings hold no raw control characters.
            if bytes[at] != b'\\' {
                return None;
            }
            let plain = text.get(run..at)?;
            let escaped = *bytes.get(at + 1)?;
            if escaped == b'"' {
                self.at = at + 2;
                return Some(match owned {
                    None => Cow::Borrowed(plain),
                    Some(mut owned) => {
                        owned.push_str(plain);
                        Cow::Owned(owned)
                    }
                });
            }
            let out = owned.get_or_insert_with(String::new);
            out.push_str(plain);
            run = match escaped {
                // `\/` of the envelope: a plain slash.
                b'/' => {
                    out.push('/');
                    at + 2
                }
                // `\\` of the envelope: the backslash of an inner escape.
                b'\\' => self.inner_escape(out, at + 2)?,
                _ => return None,
            };
        }
    }

    /// Resolves the inner escape whose letter is at `at` (after its backslash),
    /// onto `out`; returns the index after it.
    fn inner_escape(&self, out: &mut String, at: usize) -> Option<usize> {
        let bytes = self.bytes();
        let (c, next) = match *bytes.get(at)? {
            // The escaped character is itself escaped for the envelope: `\"`, `\\`.
            b'\\' => match *bytes.get(at + 1)? {
                b'"' => ('"', at + 2),
                b'\\' => ('\\', at + 2),
                _ => return None,
            },
            b'/' => ('/', at + 1),
            b'b' => ('\u{8}', at + 1),
            b'f' => ('\u{c}', at + 1),
            b'n' => ('\n', at + 1),
            b'r' => ('\r', at + 1),
            b't' => ('\t', at + 1),
            b'u' => {
                let unit = hex4(bytes, at + 1)?;
                match unit {
                    0xD800..=0xDBFF => {
                        // A surrogate pair: the low half follows as `\\uXXXX`.
                        if bytes.get(at + 5..at + 8)? != br"\\u" {
                            return None;
                        }
                        let low = hex4(bytes, at + 8)?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return None;
                        }
                        let c = char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))?;
                        (c, at + 12)
                    }
                    _ => (char::from_u32(unit)?, at + 5),
                }
            }
            _ => return None,
        };
        out.push(c);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The members the fast path reads, or `None`.
    fn fast(body: &[u8]) -> Option<Vec<(String, Value)>> {
        let mut read = Vec::new();
        members(
            body,
            |_| Some(()),
            |key, (), value| read.push((key.into_owned(), value)),
        )?;
        Some(read)
    }

    /// Whether the fast path takes `body` when it skips every member, and that it
    /// then hands out none.
    fn skipping(body: &[u8]) -> bool {
        let mut handed = 0;
        let taken = members(body, |_| None::<()>, |_, (), _| handed += 1).is_some();
        assert_eq!(handed, 0);
        taken
    }

    /// The members by the general path: the envelope by serde_json, then its string.
    fn general(body: &[u8]) -> Option<Vec<(String, Value)>> {
        // Other envelope members are ignored, as `wire`'s general path ignores them.
        let envelope: Map<String, Value> = serde_json::from_slice(body).ok()?;
        if envelope.get("oslo.version")? != ENVELOPE_VERSION {
            return None;
        }
        let inner = envelope.get("oslo.message")?.as_str()?;
        crate::wire::check_depth(inner.as_bytes()).ok()?;
        let object: Map<String, Value> = serde_json::from_str(inner).ok()?;
        Some(object.into_iter().collect())
    }

    fn envelope(inner: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"oslo.version": "2.0", "oslo.message": inner}))
            .unwrap_or_default()
    }

    /// Sorted by key, last value of a key kept, as a map holds them.
    fn as_map(members: Vec<(String, Value)>) -> Map<String, Value> {
        members.into_iter().collect()
    }

    #[test]
    fn reads_what_writers_write() {
        let inner = serde_json::json!({
            "method": "echo",
            "args": {"payload": "x\"y\\z\n\u{1}é😀/", "n": [1, -2, 3.5, 1e300, -0, 18446744073709551615u64],
                     "t": true, "f": false, "none": null, "o": {"": {}}, "a": [[], {}]},
            "_context_user": "ü",
            "version": "1.3",
        });
        let compact = inner.to_string();
        // Python's json.dumps: ", " and ": " separators, non-ASCII as \u escapes.
        let python = compact
            .replace("\",\"", "\", \"")
            .replace("\":", "\": ")
            .replace('é', "\\u00e9")
            .replace('ü', "\\u00fc")
            .replace('😀', "\\ud83d\\ude00");
        for text in [compact, python] {
            let body = envelope(&text);
            let read = fast(&body).unwrap_or_else(|| panic!("not read: {text}"));
            assert_eq!(Value::Object(as_map(read)), inner, "{text}");
        }
    }

    #[test]
    fn agrees_with_the_general_path() {
        let inners = [
            r#"{}"#,
            r#" { "a" : 1 , "b" : [ ] } "#,
            r#"{"a":1,"a":2}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":-}"#,
            r#"{"a":1e5,"b":-0.0,"c":1E-2,"d":1e+2}"#,
            r#"{"a":+1}"#,
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":tru}"#,
            r#"{"a":truex}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00"}"#,
            r#"{"a":"\ud83d\ude00"}"#,
            r#"{"a":"\ud83d\u0041"}"#,
            r#"{"a":"\uZZZZ"}"#,
            r#"{"a":"\x"}"#,
            "{\"a\":\"tab\there\"}",
            "{\"a\":\n1}",
            r#"{"a":"\/"}"#,
            r#"[1]"#,
            r#""text""#,
            r#"{"a":1} x"#,
            r#"{"a":1}}"#,
            r#"{"a" 1}"#,
            r#"{1:1}"#,
            r#"{"a":{"b":{"c":[null]}}}"#,
        ];
        for inner in inners {
            let body = envelope(inner);
            let (fast, general) = (fast(&body), general(&body));
            // Members that are not wanted are checked as strictly as those built.
            assert_eq!(skipping(&body), fast.is_some(), "{inner}");
            // These are all shapes the fast path reads when they are valid JSON.
            assert_eq!(fast.map(as_map), general.map(as_map), "{inner}");
        }
        // Nesting: within the limit is read, beyond it left to the general path.
        let nested = |n: usize| format!("{{\"a\":{}1{}}}", "[".repeat(n), "]".repeat(n));
        assert!(fast(&envelope(&nested(MAX_DEPTH - 1))).is_some());
        assert!(fast(&envelope(&nested(MAX_DEPTH))).is_none());
        let objects = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
        assert!(skipping(&envelope(&nested(MAX_DEPTH - 1))));
        assert!(!skipping(&envelope(&nested(MAX_DEPTH))));
        for n in [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1] {
            let (deep_list, deep_object) = (envelope(&nested(n)), envelope(&objects(n)));
            assert_eq!(skipping(&deep_list), fast(&deep_list).is_some(), "{n}");
            assert_eq!(skipping(&deep_object), fast(&deep_object).is_some(), "{n}");
        }
        assert!(skipping(&envelope(&objects(MAX_DEPTH))));
        assert!(!skipping(&envelope(&objects(MAX_DEPTH + 1))));
    }

    /// Found by the fuzzer: the fast path took a raw line break as the inner
    /// document's whitespace, where the envelope's string cannot hold one.
    #[test]
    fn raw_tabs_and_line_breaks_in_the_envelope_string_are_refused() {
        for raw in ["\r", "\n", "\t"] {
            let body = [
                r#"{"oslo.version":"2.0","oslo.message":"{\"a\":"#,
                raw,
                r#"1}"}"#,
            ]
            .concat();
            assert_eq!(fast(body.as_bytes()), None, "{raw:?}");
            assert_eq!(general(body.as_bytes()), None, "{raw:?}");
            let escaped = body.replace(raw, &raw.escape_default().to_string());
            assert!(fast(escaped.as_bytes()).is_some(), "{escaped}");
        }
    }

    #[test]
    fn takes_only_the_plain_envelope() {
        let read = [
            br#"{"oslo.version":"2.0","oslo.message":"{}"}"#.as_slice(),
            br#" {"oslo.message" : "{}" , "oslo.version":"2.0"} "#,
            // A signature member (`MessageAuth`), skipped as the general path skips it.
            br#"{"oslo.version":"2.0","oslo.message":"{}","mqrpc.sig":"k:1:ab"}"#,
        ];
        let general_path = [
            br#"{"oslo.version":"2.1","oslo.message":"{}"}"#.as_slice(),
            br#"{"oslo.version":"2.0"}"#,
            br#"{"oslo.version":"2.0","oslo.message":"{}","x":1}"#,
            br#"{"oslo.version":"2.0","oslo.message":"{}","x":"a\"b"}"#,
            br#"{"oslo.version":"2.0","oslo.message":"{}","oslo.message":"{}"}"#,
            br#"{"oslo.version":"2.0","oslo.message":"{}","oslo.version":"2.0"}"#,
            br#"{"oslo.version":"2.0","oslo.message":"{}","o\u0073lo.message":"x"}"#,
            br#"{"oslo.version":"2.0","oslo.message":"{} x"}"#,
            br#"{"oslo.version":"2.0","oslo.message":"{}"} x"#,
            br#"{"oslo.version":"2.0","oslo.message":"{\u0022a\u0022:1}"}"#,
            b"{\"oslo.version\":\"2.0\",\"oslo.message\":\"{\\\"a\\\":\\\"\xff\\\"}\"}",
        ];
        for body in read {
            let text = String::from_utf8_lossy(body);
            assert!(fast(body).is_some(), "not read: {text}");
            // The general path reads the same members from it.
            assert_eq!(fast(body).map(as_map), general(body).map(as_map), "{text}");
            let keys = &crate::wire::REQUEST;
            assert_eq!(
                crate::wire::read_fast(body, keys),
                crate::wire::read_general(body, keys).ok(),
                "{text}"
            );
        }
        for body in general_path {
            let text = String::from_utf8_lossy(body);
            assert!(fast(body).is_none(), "read: {text}");
        }
    }

    #[test]
    fn stops_at_every_first_quote_backslash_or_control() {
        for len in 0..20 {
            for special in [b'"', b'\\', 0x00, 0x1f] {
                for at in 0..len {
                    let mut bytes = vec![b'a'; len];
                    // Bytes that look like specials to a careless test: 0x20, 0x7f, 0xff.
                    for (i, b) in bytes.iter_mut().enumerate() {
                        *b = [b'a', 0x20, 0x7f, 0xa0][i % 4];
                    }
                    bytes[at] = special;
                    if at + 1 < len {
                        bytes[at + 1] = 0x01;
                    }
                    assert_eq!(stop(&bytes, 0), Some(at), "{bytes:?}");
                }
                assert_eq!(stop(&vec![b'a'; len], 0), None);
            }
        }
    }
}
