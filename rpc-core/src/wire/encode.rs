//! Writing bodies: the 2.0 envelope and its inner document in one pass, the inner
//! document written already escaped as the envelope's string by serde_json itself,
//! through the [`InsideString`] formatter, instead of serialized and escaped again.

use std::borrow::Cow;
use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};
use serde_json::{Map, Value};

use super::{
    Answer, Args, CONTEXT_PREFIX, Head, ID_LEN, NotificationMessage, Reply, Request, fresh_id,
};
use crate::error::{CodecError, RemoteError};

/// Encodes a request into an enveloped body. The members are written in the order
/// oslo.messaging writes them.
pub fn encode_request(req: &Request) -> Result<Vec<u8>, CodecError> {
    let head = Head {
        method: &req.method,
        namespace: req.namespace.as_deref(),
        version: req.version.as_deref().map(Cow::Borrowed),
        context: &req.context,
        msg_id: req.msg_id.as_deref(),
        reply_to: req.reply_to.as_deref(),
        call_monitor: req.call_monitor,
        unique_id: req.unique_id.as_deref(),
        expires_in: req.expires_in,
        trace: None,
    };
    encode_request_with(&head, Args::Map(&req.args))
}

/// Encodes the request `head` with `args`: a client encodes its keyword arguments
/// once and writes them from there into every attempt's body.
pub(crate) fn encode_request_with(head: &Head<'_>, args: Args<'_>) -> Result<Vec<u8>, CodecError> {
    let mut out = Writer::new();
    out.member(br#"\"method\":"#);
    out.string(head.method)?;
    out.member(br#"\"args\":"#);
    match args {
        Args::Map(args) => out.object(args)?,
        Args::Escaped(text) => out.escaped(text),
    }
    if let Some(namespace) = head.namespace {
        out.member(br#"\"namespace\":"#);
        out.string(namespace)?;
    }
    if let Some(version) = &head.version {
        out.member(br#"\"version\":"#);
        out.string(version)?;
    }
    if let Some(msg_id) = head.msg_id {
        out.member(br#"\"_msg_id\":"#);
        out.string(msg_id)?;
    }
    // oslo always sends both keys on calls (null when unset). A cast carries
    // neither, but a request decoded with them (found by the fuzzer) must encode
    // back to what it was.
    let call = head.msg_id.is_some();
    if call || head.reply_to.is_some() {
        out.member(br#"\"_reply_q\":"#);
        out.optional_string(head.reply_to)?;
    }
    if call || head.call_monitor.is_some() {
        out.member(br#"\"_timeout\":"#);
        out.serde(&head.call_monitor)?;
    }
    if let Some(expires_in) = head.expires_in {
        out.member(br#"\"_expires_in\":"#);
        out.serde(&expires_in)?;
    }
    unique_id_member(&mut out, head.unique_id)?;
    let trace = head.trace.filter(|trace| !trace.is_empty());
    for (key, value) in head.context.iter() {
        if trace.is_some_and(|trace| trace.replaces(key)) {
            continue;
        }
        out.key(CONTEXT_PREFIX, key)?;
        out.value(value)?;
    }
    for (key, value) in trace.into_iter().flat_map(|trace| trace.pairs()) {
        out.key(CONTEXT_PREFIX, key)?;
        out.string(value)?;
    }
    Ok(out.finish())
}

/// Encodes a notification into an enveloped body, its members in the order
/// oslo.messaging's `messagingv2` driver writes them; `unique_id: None` writes a
/// fresh one.
pub fn encode_notification(message: &NotificationMessage) -> Result<Vec<u8>, CodecError> {
    let mut out = Writer::new();
    out.member(br#"\"message_id\":"#);
    out.string(&message.message_id)?;
    out.member(br#"\"publisher_id\":"#);
    out.string(&message.publisher_id)?;
    out.member(br#"\"event_type\":"#);
    out.string(&message.event_type)?;
    out.member(br#"\"priority\":"#);
    out.string(&message.priority)?;
    out.member(br#"\"payload\":"#);
    out.value(&message.payload)?;
    out.member(br#"\"timestamp\":"#);
    out.string(&message.timestamp)?;
    unique_id_member(&mut out, message.unique_id.as_deref())?;
    for (key, value) in message.context.iter() {
        out.key(CONTEXT_PREFIX, key)?;
        out.value(value)?;
    }
    Ok(out.finish())
}

/// Encodes a reply into an enveloped body; every key is always present.
pub fn encode_reply(reply: &Reply) -> Result<Vec<u8>, CodecError> {
    let Reply {
        result,
        failure,
        ending,
        msg_id,
        unique_id,
    } = reply;
    write_reply(result, failure.as_ref(), *ending, msg_id, Some(unique_id))
}

/// Encodes `answer` as the reply to `msg_id`, with a fresh `_unique_id`.
pub(crate) fn encode_answer(answer: &Answer, msg_id: &str) -> Result<Vec<u8>, CodecError> {
    write_reply(
        &answer.result,
        answer.failure.as_ref(),
        answer.ending,
        msg_id,
        None,
    )
}

/// A reply's members in oslo's order; `unique_id: None` writes a fresh one.
fn write_reply(
    result: &Value,
    failure: Option<&RemoteError>,
    ending: bool,
    msg_id: &str,
    unique_id: Option<&str>,
) -> Result<Vec<u8>, CodecError> {
    let mut out = Writer::new();
    out.member(br#"\"result\":"#);
    out.value(result)?;
    out.member(br#"\"failure\":"#);
    // A JSON document inside the JSON document, as oslo sends it.
    let failure = failure.map(RemoteError::to_failure_json);
    out.optional_string(failure.transpose()?.as_deref())?;
    out.member(br#"\"ending\":"#);
    out.serde(&ending)?;
    out.member(br#"\"_msg_id\":"#);
    out.string(msg_id)?;
    unique_id_member(&mut out, unique_id)?;
    Ok(out.finish())
}

/// The `_unique_id` member: `given`, or a fresh id written in place.
fn unique_id_member(out: &mut Writer, given: Option<&str>) -> Result<(), CodecError> {
    out.member(br#"\"_unique_id\":"#);
    let mut id = [0; ID_LEN];
    out.string(given.unwrap_or_else(|| fresh_id(&mut id)))?;
    Ok(())
}

/// What [`Writer`] puts before the escaped inner document (the version is
/// [`super::ENVELOPE_VERSION`]).
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

/// A word of eight bytes with every byte set to `byte`.
const fn splat(byte: u8) -> u64 {
    u64::from_ne_bytes([byte; 8])
}

/// The high bit of each byte of `word` (read little-endian) that is a quote or a
/// backslash. Bits above the lowest may be false positives (a borrow carries into
/// the next byte), but only ever above a true one: whether any is set is exact.
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Envelopes a JSON object through [`Writer`], member by member.
    fn write(document: &Value) -> Vec<u8> {
        let mut out = Writer::new();
        for (key, value) in document.as_object().expect("an object") {
            out.key("", key).expect("key");
            out.value(value).expect("value");
        }
        out.finish()
    }

    /// The inner document of an envelope, as serde_json reads it.
    fn inner_text(body: &[u8]) -> String {
        let value: Value = serde_json::from_slice(body).expect("the envelope is JSON");
        let object = value.as_object().expect("an object");
        assert_eq!(object.len(), 2);
        assert_eq!(object["oslo.version"], super::super::ENVELOPE_VERSION);
        object["oslo.message"]
            .as_str()
            .expect("a string")
            .to_owned()
    }

    #[test]
    fn writes_what_serde_json_writes() {
        let document = json!({
            "method": "echo",
            "args": {"payload": "quote \" backslash \\ slash / controls \n\t\u{1} é 😀"},
            "nested": {"a": [1, 2, {"b": "\\\""}]},
            "numbers": [0, -1, 1.5, 1e300, null, true, false],
            "": "",
            "key \" with \\ escapes\u{7}": {"": [[], {}, "\u{1f}"]},
        });
        let body = write(&document);
        assert_eq!(inner_text(&body), document.to_string());
        // The envelope around it is serde_json's compact output too.
        let message = Value::String(document.to_string());
        let expected = format!(r#"{{"oslo.version":"2.0","oslo.message":{message}}}"#);
        assert_eq!(String::from_utf8(body).expect("utf-8"), expected);
    }

    #[test]
    fn escaped_values_are_written_as_the_writer_writes_them() {
        let value = json!({"a": ["x\"y", 1.25, {"\n": null}]});
        let mut out = Writer::new();
        out.member(br#"\"v\":"#);
        out.escaped(&escaped(&value).expect("escapes"));
        let mut direct = Writer::new();
        direct.member(br#"\"v\":"#);
        direct.value(&value).expect("value");
        assert_eq!(out.finish(), direct.finish());
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
        assert_eq!(
            inner_text(&out.finish()),
            r#"{"_context_user":"u","_context_a\"b":1.5}"#
        );
    }
}
