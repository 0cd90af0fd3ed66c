//! The outer layer of a 2.0 message, `{"oslo.version": "2.0", "oslo.message": "…"}`,
//! written and read without a general JSON pass.
//!
//! Every message crosses this layer twice (encoded by its sender, decoded by its
//! receiver), and the inner document is a JSON string inside it. [`Writer`] writes
//! the inner document already escaped for that string, in one pass. Most bodies are
//! read without unescaping at all (`crate::inner`); when that gives up, [`read`]
//! unescapes the inner document, finding quotes and backslashes a word at a time, for
//! the plain shape (two string members, no `\u` escapes); anything else returns
//! `None` and is read by serde_json, which also words the errors.

use std::borrow::Cow;
use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};
use serde_json::{Map, Value};

/// What [`Writer`] puts before the escaped inner document (the version is
/// [`crate::wire::ENVELOPE_VERSION`]).
const OPEN: &[u8] = br#"{"oslo.version":"2.0","oslo.message":""#;
/// What [`Writer`] puts after it.
const CLOSE: &[u8] = br#""}"#;

/// Builds a 2.0 envelope around an inner JSON object written member by member,
/// already escaped as the contents of the envelope's string: no intermediate
/// document, no second pass over it. The bytes are those of serde_json's compact
/// output of the same members, escaped.
pub(crate) struct Writer {
    body: Vec<u8>,
    /// Whether the object has no member yet (no comma before the next key).
    empty: bool,
}

impl Writer {
    /// Opens the envelope and the inner object.
    pub(crate) fn new() -> Self {
        // Sized for a typical call up front: growing from a few bytes cost several
        // copies per message.
        let mut body = Vec::with_capacity(512);
        body.extend_from_slice(OPEN);
        body.push(b'{');
        Writer { body, empty: true }
    }

    /// Starts a member whose key needs no escape, given as the key's text between
    /// quotes followed by a colon, escaped for the envelope: `br#"\"method\":"#`.
    pub(crate) fn member(&mut self, quoted_key: &'static [u8]) {
        self.separate();
        self.body.extend_from_slice(quoted_key);
    }

    /// Starts a member: its key is `prefix` followed by `name`.
    pub(crate) fn key(&mut self, prefix: &str, name: &str) -> serde_json::Result<()> {
        self.separate();
        if needs_escape(prefix.as_bytes()) || needs_escape(name.as_bytes()) {
            let mut key = String::with_capacity(prefix.len() + name.len());
            key.push_str(prefix);
            key.push_str(name);
            self.serde(&key)?;
        } else {
            self.body.extend_from_slice(br#"\""#);
            self.body.extend_from_slice(prefix.as_bytes());
            self.body.extend_from_slice(name.as_bytes());
            self.body.extend_from_slice(br#"\""#);
        }
        self.body.push(b':');
        Ok(())
    }

    /// The comma before every member but the first.
    fn separate(&mut self) {
        if !std::mem::take(&mut self.empty) {
            self.body.push(b',');
        }
    }

    /// Writes a string value, or `null` for `None`.
    pub(crate) fn optional_string(&mut self, text: Option<&str>) -> serde_json::Result<()> {
        match text {
            Some(text) => self.string(text),
            None => {
                self.body.extend_from_slice(b"null");
                Ok(())
            }
        }
    }

    /// Writes a string value.
    pub(crate) fn string(&mut self, text: &str) -> serde_json::Result<()> {
        if needs_escape(text.as_bytes()) {
            return self.serde(text);
        }
        self.body.extend_from_slice(br#"\""#);
        self.body.extend_from_slice(text.as_bytes());
        self.body.extend_from_slice(br#"\""#);
        Ok(())
    }

    /// Writes a JSON value.
    pub(crate) fn value(&mut self, value: &Value) -> serde_json::Result<()> {
        match value {
            Value::Null => self.body.extend_from_slice(b"null"),
            Value::Bool(true) => self.body.extend_from_slice(b"true"),
            Value::Bool(false) => self.body.extend_from_slice(b"false"),
            Value::Number(number) => self.serde(number)?,
            Value::String(text) => self.string(text)?,
            Value::Array(items) => {
                self.body.push(b'[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        self.body.push(b',');
                    }
                    self.value(item)?;
                }
                self.body.push(b']');
            }
            Value::Object(members) => self.object(members)?,
        }
        Ok(())
    }

    /// Writes an object value.
    pub(crate) fn object(&mut self, members: &Map<String, Value>) -> serde_json::Result<()> {
        self.body.push(b'{');
        for (index, (name, value)) in members.iter().enumerate() {
            if index > 0 {
                self.body.push(b',');
            }
            self.string(name)?;
            self.body.push(b':');
            self.value(value)?;
        }
        self.body.push(b'}');
        Ok(())
    }

    /// Writes any serializable value as serde_json would (numbers, and strings that
    /// need escapes).
    pub(crate) fn serde<T: Serialize + ?Sized>(&mut self, value: &T) -> serde_json::Result<()> {
        write_escaped(&mut self.body, value)
    }

    /// Writes text that [`escaped`] produced: a value already escaped for the
    /// envelope's string.
    pub(crate) fn escaped(&mut self, text: &[u8]) {
        self.body.extend_from_slice(text);
    }

    /// Closes the inner object and the envelope.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.body.push(b'}');
        self.body.extend_from_slice(CLOSE);
        self.body
    }
}

/// Any serializable value as compact JSON escaped for the envelope's string, the
/// bytes [`Writer`] writes for it: to be written later with [`Writer::escaped`],
/// once or (a call's arguments, on each attempt) several times.
pub(crate) fn escaped<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    let mut text = Vec::with_capacity(128);
    write_escaped(&mut text, value)?;
    Ok(text)
}

/// Appends `value` to `out` as serde_json writes it, escaped for the envelope's
/// string.
fn write_escaped<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> serde_json::Result<()> {
    value.serialize(&mut serde_json::Serializer::with_formatter(
        out,
        InsideString,
    ))
}

/// Whether JSON must escape a byte of `text`: a quote, a backslash or a control
/// character. Looked at eight bytes at a time; the answer is exact (a borrow
/// between bytes only happens after a byte that is itself flagged).
fn needs_escape(text: &[u8]) -> bool {
    let mut at = 0;
    while let Some(word) = word_at(text, at) {
        let word = u64::from_le_bytes(word);
        let below_space = word.wrapping_sub(splat(0x20)) & !word & splat(0x80);
        if below_space | specials(word) != 0 {
            return true;
        }
        at += 8;
    }
    text[at..]
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// The two lower-case hex digits of `byte`, as a `\u00XX` escape ends.
fn hex(byte: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    [
        DIGITS[usize::from(byte >> 4)],
        DIGITS[usize::from(byte & 0xf)],
    ]
}

/// serde_json's compact output, written as the contents of a JSON string. Compact
/// output has no whitespace and no raw control characters, so the only bytes that
/// need a second escape are the quotes around its strings and the backslashes of
/// its own escapes: each is known where serde_json writes it, and nothing is
/// scanned (a string's text between escapes holds neither).
struct InsideString;

impl Formatter for InsideString {
    fn begin_string<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(br#"\""#)
    }

    fn end_string<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(br#"\""#)
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        // The inner escape (`\"`, `\n`, `\u001f`, ...) escaped again: its backslash,
        // and the quote or backslash it stands for.
        let escaped: &[u8] = match escape {
            CharEscape::Quote => br#"\\\""#,
            CharEscape::ReverseSolidus => br"\\\\",
            CharEscape::Solidus => br"\\/",
            CharEscape::Backspace => br"\\b",
            CharEscape::FormFeed => br"\\f",
            CharEscape::LineFeed => br"\\n",
            CharEscape::CarriageReturn => br"\\r",
            CharEscape::Tab => br"\\t",
            CharEscape::AsciiControl(byte) => {
                let [high, low] = hex(byte);
                return writer.write_all(&[b'\\', b'\\', b'u', b'0', b'0', high, low]);
            }
        };
        writer.write_all(escaped)
    }

    // Only a `RawValue` writes one, and its text may hold whitespace of any kind:
    // every byte is looked at (a rare path).
    fn write_raw_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        for &byte in fragment.as_bytes() {
            match byte {
                b'"' | b'\\' => writer.write_all(&[b'\\', byte])?,
                0x00..=0x1f => {
                    let [high, low] = hex(byte);
                    writer.write_all(&[b'\\', b'u', b'0', b'0', high, low])?;
                }
                _ => writer.write_all(&[byte])?,
            }
        }
        Ok(())
    }
}

/// The inner document of a plain 2.0 envelope: exactly the members `oslo.version`
/// (the string `"2.0"`) and `oslo.message` (a string), in either order, with any
/// JSON whitespace. `None` for anything else (another version, a bare 1.0 body, other
/// members, a `\u` escape, invalid UTF-8, malformed JSON): the caller then reads the
/// body with serde_json.
///
/// One leniency against strict JSON: a raw tab, newline or carriage return inside
/// the message string is kept as it is (it can only end up as whitespace between the
/// inner document's tokens, or be refused by the inner parse inside its strings).
pub(crate) fn read(body: &[u8]) -> Option<Cow<'_, str>> {
    let mut at = skip_ws(body, 0);
    if body.get(at) != Some(&b'{') {
        return None;
    }
    let (mut version, mut message) = (None, None);
    at = skip_ws(body, at + 1);
    loop {
        let (key, next) = key(body, at)?;
        at = skip_ws(body, next);
        if body.get(at) != Some(&b':') {
            return None;
        }
        at = skip_ws(body, at + 1);
        let (value, next) = string(body, at)?;
        let slot = match key {
            b"oslo.version" => &mut version,
            b"oslo.message" => &mut message,
            _ => return None,
        };
        if slot.replace(value).is_some() {
            return None;
        }
        at = skip_ws(body, next);
        match body.get(at) {
            Some(b',') => at = skip_ws(body, at + 1),
            Some(b'}') => break,
            _ => return None,
        }
    }
    if skip_ws(body, at + 1) != body.len() || version?.as_ref() != crate::wire::ENVELOPE_VERSION {
        return None;
    }
    message
}

/// A word of eight bytes with every byte set to `byte`.
pub(crate) const fn splat(byte: u8) -> u64 {
    u64::from_ne_bytes([byte; 8])
}

/// The high bit of each byte of `word` (read little-endian) that is a quote or a
/// backslash. Bits above the lowest may be false positives (a borrow carries into
/// the next byte), so only the lowest one is used: it is always exact.
const fn specials(word: u64) -> u64 {
    const ONES: u64 = splat(0x01);
    const HIGH: u64 = splat(0x80);
    let quote = word ^ splat(b'"');
    let backslash = word ^ splat(b'\\');
    (quote.wrapping_sub(ONES) & !quote | backslash.wrapping_sub(ONES) & !backslash) & HIGH
}

/// The eight bytes at `at`, if there are eight.
fn word_at(bytes: &[u8], at: usize) -> Option<[u8; 8]> {
    bytes.get(at..at.checked_add(8)?)?.try_into().ok()
}

/// The index of the first quote or backslash at or after `from`. Most escapes of an
/// inner document are its quotes, a few bytes apart: the next two words are tested
/// eight bytes at a time (no call, no setup) before a vector search, which pays a
/// setup on every call, takes a longer run.
fn special(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    for _ in 0..2 {
        let Some(word) = word_at(bytes, at) else {
            let tail = bytes.get(at..)?;
            return tail
                .iter()
                .position(|&b| b == b'"' || b == b'\\')
                .map(|i| at + i);
        };
        let found = specials(u64::from_le_bytes(word));
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    memchr::memchr2(b'"', b'\\', &bytes[at..]).map(|i| at + i)
}

/// Appends `bytes[from..to]`. Most runs between escapes are shorter than a word: it
/// is copied whole and the excess cut, which costs a store instead of a `memcpy`
/// call.
fn push_run(out: &mut Vec<u8>, bytes: &[u8], from: usize, to: usize) {
    match word_at(bytes, from) {
        Some(word) if to - from <= 8 => {
            let keep = out.len() + (to - from);
            out.extend_from_slice(&word);
            out.truncate(keep);
        }
        _ => out.extend_from_slice(&bytes[from..to]),
    }
}

pub(crate) fn skip_ws(body: &[u8], mut at: usize) -> usize {
    while matches!(body.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// The bytes of the key starting at `at`, and the index after its closing quote.
/// A key with an escape is not one of ours, whatever it spells: `None`.
fn key(body: &[u8], at: usize) -> Option<(&[u8], usize)> {
    if body.get(at) != Some(&b'"') {
        return None;
    }
    let start = at + 1;
    let end = special(body, start)?;
    (body[end] == b'"').then(|| (&body[start..end], end + 1))
}

/// The string starting at `at` with its escapes resolved, and the index after its
/// closing quote, in one pass; `None` for `\u` escapes (left to serde_json, which
/// pairs surrogates), unknown escapes, an unterminated string and invalid UTF-8.
fn string(body: &[u8], at: usize) -> Option<(Cow<'_, str>, usize)> {
    if body.get(at) != Some(&b'"') {
        return None;
    }
    let start = at + 1;
    let mut i = start;
    let mut out: Option<Vec<u8>> = None;
    let mut run = start;
    loop {
        i = special(body, i)?;
        if body[i] == b'"' {
            break;
        }
        let out = out.get_or_insert_with(|| Vec::with_capacity(body.len() - start));
        push_run(out, body, run, i);
        out.push(match body.get(i + 1)? {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            _ => return None,
        });
        i += 2;
        run = i;
    }
    let text = match out {
        None => Cow::Borrowed(std::str::from_utf8(&body[start..i]).ok()?),
        Some(mut out) => {
            out.extend_from_slice(&body[run..i]);
            Cow::Owned(String::from_utf8(out).ok()?)
        }
    };
    Some((text, i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// Envelopes a JSON object through [`Writer`], member by member.
    fn write(document: &Value) -> Vec<u8> {
        let mut out = Writer::new();
        for (key, value) in document.as_object().expect("an object") {
            out.key("", key).expect("key");
            out.value(value).expect("value");
        }
        out.finish()
    }

    /// What serde_json makes of an envelope, for comparison.
    fn by_serde(body: &[u8]) -> Option<String> {
        let value: Value = serde_json::from_slice(body).ok()?;
        let object = value.as_object()?;
        if object.len() != 2 || object.get("oslo.version")? != "2.0" {
            return None;
        }
        Some(object.get("oslo.message")?.as_str()?.to_owned())
    }

    #[test]
    fn writes_what_serde_json_reads_back() {
        let document = json!({
            "method": "echo",
            "args": {"payload": "quote \" backslash \\ slash / controls \n\t\u{1} é 😀"},
            "nested": {"a": [1, 2, {"b": "\\\""}]},
            "numbers": [0, -1, 1.5, 1e300, null, true, false],
            "": "",
            "key \" with \\ escapes\u{7}": {"": [[], {}, "\u{1f}"]},
        });
        let inner = document.to_string();
        let body = write(&document);
        assert_eq!(by_serde(&body).as_deref(), Some(inner.as_str()));
        assert_eq!(read(&body).as_deref(), Some(inner.as_str()));
    }

    #[test]
    fn reads_what_python_writes() {
        // json.dumps with its default separators and ensure_ascii.
        let body = br#"{"oslo.version": "2.0", "oslo.message": "{\"method\": \"echo\", \"args\": {\"s\": \"caf\\u00e9\"}}"}"#;
        let expected = r#"{"method": "echo", "args": {"s": "caf\u00e9"}}"#;
        assert_eq!(read(body).as_deref(), Some(expected));
        let reordered = br#" { "oslo.message" : "{}" ,
            "oslo.version" : "2.0" } "#;
        assert_eq!(read(reordered).as_deref(), Some("{}"));
    }

    #[test]
    fn leaves_every_other_shape_to_serde_json() {
        let others: [&[u8]; 12] = [
            br#"{"oslo.version":"2.1","oslo.message":"{}"}"#,
            br#"{"oslo.version":"2.0"}"#,
            br#"{"oslo.version":"2.0","oslo.message":"{}","extra":1}"#,
            br#"{"oslo.version":"2.0","oslo.message":"{}","oslo.message":"{}"}"#,
            br#"{"oslo.version":"2.0","oslo.message":"\u007b}"}"#,
            br#"{"oslo.version":"2.0","oslo.message":"\x"}"#,
            br#"{"oslo.version":"2.0","oslo.message":{}}"#,
            br#"{"oslo.version":"2.0","oslo.message":"{}"} x"#,
            br#"{"oslo.version":"2.0","oslo.message":"{}""#,
            br#"{"oslo.version":"2.0","oslo.message":"\"#,
            br#"{"method":"echo"}"#,
            b"{\"oslo.version\":\"2.0\",\"oslo.message\":\"\xff\"}",
        ];
        for body in others {
            assert_eq!(read(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn finds_every_first_quote_or_backslash() {
        // Every position of a quote or backslash in runs around the word and scan
        // boundaries, with bytes next to them that differ from them by one bit or a
        // borrow (`!`, `#`, `[`, `]`, 0x80 and above).
        let fillers = [b'x', b'!', b'#', b'[', b']', 0x22 ^ 0x80, 0x5c ^ 0x80, 0xff];
        for len in 0..40 {
            for filler in fillers {
                for (special_at, byte) in (0..len).flat_map(|at| [(at, b'"'), (at, b'\\')]) {
                    let mut bytes = vec![filler; len];
                    bytes[special_at] = byte;
                    for from in 0..=len + 1 {
                        let naive = bytes
                            .get(from..)
                            .and_then(|rest| rest.iter().position(|&b| b == b'"' || b == b'\\'))
                            .map(|i| from + i);
                        assert_eq!(special(&bytes, from), naive, "{bytes:?} from {from}");
                    }
                }
            }
        }
    }

    #[test]
    fn knows_which_text_needs_escapes() {
        for len in 0..20 {
            for at in 0..len {
                for byte in [0x00, 0x1f, 0x20, b'"', b'\\', b'!', b'#', 0x7f, 0x80, 0xff] {
                    let mut text = vec![b'x'; len];
                    text[at] = byte;
                    let naive = byte < 0x20 || byte == b'"' || byte == b'\\';
                    assert_eq!(needs_escape(&text), naive, "{text:?}");
                }
            }
            assert!(!needs_escape(&vec![b'x'; len]));
        }
    }

    #[test]
    fn prefixed_keys_are_one_key() {
        let mut out = Writer::new();
        out.key("_context_", "user").expect("key");
        out.string("u").expect("value");
        out.key("_context_", "a\"b").expect("key");
        out.value(&json!(1.5)).expect("value");
        let inner = read(&out.finish()).expect("an envelope").into_owned();
        assert_eq!(inner, r#"{"_context_user":"u","_context_a\"b":1.5}"#);
    }

    #[test]
    fn copies_runs_of_every_length() {
        let bytes: Vec<u8> = (0..40).collect();
        for from in 0..bytes.len() {
            for to in from..=bytes.len() {
                let mut out = vec![7];
                push_run(&mut out, &bytes, from, to);
                assert_eq!(out[0], 7);
                assert_eq!(&out[1..], &bytes[from..to]);
            }
        }
    }

    #[test]
    fn agrees_with_serde_json_wherever_it_reads() {
        // Every prefix and one-byte corruption of a real envelope: where the fast
        // path gives an answer, it is serde_json's answer.
        let body = write(&json!({"method": "m", "args": {"x": "a\"b\\c/d\ne"}}));
        let mut checked = 0;
        for len in 0..=body.len() {
            for flip in [None, Some(b'"'), Some(b'\\'), Some(b'}'), Some(b' ')] {
                let mut case = body[..len].to_vec();
                if let (Some(byte), Some(last)) = (flip, case.last_mut()) {
                    *last = byte;
                }
                if let Some(fast) = read(&case) {
                    assert_eq!(Some(fast.into_owned()), by_serde(&case));
                    checked += 1;
                }
            }
        }
        assert!(checked > 0);
    }
}
