//! The outer layer of a 2.0 message, `{"oslo.version": "2.0", "oslo.message": "…"}`,
//! written and read without a general JSON pass.
//!
//! Every message crosses this layer twice (encoded by its sender, decoded by its
//! receiver), and the inner document is escaped into and out of a JSON string each
//! time. A general JSON escaper looks at every byte; here runs without a quote or a
//! backslash are found with `memchr` and copied whole. Reading takes a fast path only
//! for the plain shape (two string members, no `\u` escapes); anything else returns
//! `None` and is read by serde_json, which also words the errors.

use std::borrow::Cow;

/// What [`write`] puts before the escaped inner document (the version is
/// [`crate::wire::ENVELOPE_VERSION`]).
const OPEN: &[u8] = br#"{"oslo.version":"2.0","oslo.message":""#;
/// What [`write`] puts after it.
const CLOSE: &[u8] = br#""}"#;

/// Wraps `inner`, a compact serde_json document, in a 2.0 envelope.
///
/// Compact serde_json output holds no control characters (it escapes them inside
/// strings and writes no whitespace), so a quote and a backslash are the only bytes
/// that need an escape here.
pub(crate) fn write(inner: &[u8]) -> Vec<u8> {
    debug_assert!(
        inner.iter().all(|&b| b >= 0x20),
        "inner document is not compact JSON"
    );
    // Escaping adds one byte per quote or backslash, about one in eight bytes of a
    // typical document; a quarter leaves room for escape-heavy payloads.
    let mut body = Vec::with_capacity(OPEN.len() + inner.len() + inner.len() / 4 + CLOSE.len());
    body.extend_from_slice(OPEN);
    let mut rest = inner;
    while let Some(at) = memchr::memchr2(b'"', b'\\', rest) {
        body.extend_from_slice(&rest[..at]);
        body.push(b'\\');
        body.push(rest[at]);
        rest = &rest[at + 1..];
    }
    body.extend_from_slice(rest);
    body.extend_from_slice(CLOSE);
    body
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

/// The index of the first quote or backslash at or after `from`. Most escapes of an
/// inner document are its quotes, a few bytes apart: the next few bytes are looked at
/// one by one before a vector search (which pays a setup each time) takes the rest.
fn special(body: &[u8], from: usize) -> Option<usize> {
    const NEAR: usize = 16;
    let near = body.get(from..)?;
    let (head, tail) = near.split_at(near.len().min(NEAR));
    match head.iter().position(|&b| b == b'"' || b == b'\\') {
        Some(at) => Some(from + at),
        None => memchr::memchr2(b'"', b'\\', tail).map(|at| from + head.len() + at),
    }
}

fn skip_ws(body: &[u8], mut at: usize) -> usize {
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
        out.extend_from_slice(&body[run..i]);
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
        let inner = json!({
            "method": "echo",
            "args": {"payload": "quote \" backslash \\ slash / controls \n\t\u{1} é 😀"},
            "nested": {"a": [1, 2, {"b": "\\\""}]},
        })
        .to_string();
        let body = write(inner.as_bytes());
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
    fn agrees_with_serde_json_wherever_it_reads() {
        // Every prefix and one-byte corruption of a real envelope: where the fast
        // path gives an answer, it is serde_json's answer.
        let inner = json!({"method": "m", "args": {"x": "a\"b\\c/d\ne"}}).to_string();
        let body = write(inner.as_bytes());
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
