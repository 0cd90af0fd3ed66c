//! The codec's tests: what it writes is what oslo.messaging writes, what it reads
//! is what serde_json reads, and nothing it is given makes it panic.

use super::*;
use serde_json::json;

use crate::error::CodecError;

/// The router's decoding gives the same reply but for its `_unique_id`.
#[test]
fn routed_replies_skip_only_the_unique_id() {
    let failure = RemoteError::new("ValueError", "no");
    for answer in [
        Answer::result(json!({"a": [1, "x"]})),
        Answer::failure(failure),
        Answer::end(),
    ] {
        let body = encode_answer(&answer, "m1").expect("encodes");
        let full = decode_reply(&body).expect("decodes");
        let routed = decode_routed_reply(&body).expect("decodes");
        assert!(!full.unique_id.is_empty());
        assert!(routed.unique_id.is_empty());
        assert_eq!(
            Reply {
                unique_id: String::new(),
                ..full
            },
            routed
        );
    }
    assert!(
        decode_routed_reply(br#"{"result": 1}"#).is_err(),
        "no _msg_id"
    );
}

/// A server's answer encodes as the reply it stands for, under the request's id
/// and a fresh `_unique_id` of its own each time.
#[test]
fn answers_encode_as_their_replies_with_fresh_unique_ids() {
    let failure = RemoteError::new("ValueError", "no");
    let cases = [
        (
            Answer::result(json!({"a": [1, "x"]})),
            Reply::result("m1", json!({"a": [1, "x"]})),
        ),
        (Answer::item(json!(3)), Reply::item("m1", json!(3))),
        (
            Answer::failure(failure.clone()),
            Reply::failure("m1", failure),
        ),
        (Answer::end(), Reply::end("m1")),
        (Answer::heartbeat(), Reply::heartbeat("m1")),
    ];
    for (answer, expected) in cases {
        let first = decode_reply(&encode_answer(&answer, "m1").expect("encodes")).expect("decodes");
        let second =
            decode_reply(&encode_answer(&answer, "m1").expect("encodes")).expect("decodes");
        assert_eq!(first.unique_id.len(), ID_LEN, "{first:?}");
        assert!(
            first.unique_id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{first:?}"
        );
        assert_ne!(first.unique_id, second.unique_id);
        let unique_id = first.unique_id.clone();
        assert_eq!(
            first,
            Reply {
                unique_id,
                ..expected
            }
        );
    }
}

fn inner_of(body: &[u8]) -> Value {
    let outer: Value = serde_json::from_slice(body).expect("outer json");
    assert_eq!(outer["oslo.version"], "2.0");
    let text = outer["oslo.message"].as_str().expect("inner is a string");
    serde_json::from_str(text).expect("inner json")
}

fn envelope(inner: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": inner.to_string()}))
        .expect("encode")
}

#[test]
fn nesting_is_limited_in_the_envelope_and_in_the_inner_document() {
    let nested = |levels: usize| "[".repeat(levels) + &"]".repeat(levels);
    let inner = format!(
        r#"{{"method": "echo", "args": {{"x": {}}}}}"#,
        nested(MAX_DEPTH - 2)
    );
    let body =
        serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": inner})).expect("encode");
    decode_request(&body).expect("MAX_DEPTH levels in all are fine");
    let inner = format!(
        r#"{{"method": "echo", "args": {{"x": {}}}}}"#,
        nested(MAX_DEPTH)
    );
    let body =
        serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": inner})).expect("encode");
    let err = decode_request(&body).expect_err("too deep inside");
    assert!(err.to_string().contains("nests deeper than 64"), "{err}");
    let bare = format!(
        r#"{{"method": "echo", "args": {{"x": {}}}}}"#,
        nested(10_000)
    );
    let err = decode_request(bare.as_bytes()).expect_err("too deep, bare");
    assert!(err.to_string().contains("nests deeper"), "{err}");
    // Brackets inside strings are text, not nesting.
    let text = "[".repeat(1000);
    let request = Request {
        method: "echo".into(),
        args: json!({"x": text}).as_object().cloned().expect("object"),
        ..Request::default()
    };
    let body = encode_request(&request).expect("encode");
    assert_eq!(decode_request(&body).expect("decode").args["x"], text);
}

#[test]
fn call_with_context_matches_oslo_document() {
    let request = Request {
        method: "echo".into(),
        args: json!({"x": 1}).as_object().cloned().expect("object"),
        version: Some("1.2".into()),
        context: Context::new()
            .with("user", "u1")
            .with("request_id", "req-1"),
        msg_id: Some("d68e".into()),
        reply_to: Some("reply_ef03".into()),
        unique_id: Some("1ff1".into()),
        ..Request::default()
    };
    let body = encode_request(&request).expect("encode");
    assert_eq!(
        inner_of(&body),
        json!({
            "method": "echo", "args": {"x": 1}, "version": "1.2",
            "_msg_id": "d68e", "_reply_q": "reply_ef03", "_timeout": null,
            "_unique_id": "1ff1", "_context_user": "u1", "_context_request_id": "req-1"
        })
    );
    assert_eq!(decode_request(&body).expect("decode"), request);
}

#[test]
fn decodes_python_call_with_unknown_context_keys() {
    let body = envelope(json!({
        "method": "add", "args": {"a": 1, "b": 2}, "namespace": "calc",
        "_msg_id": "m1", "_reply_q": "reply_q1", "_timeout": 4,
        "_unique_id": "u1", "_context_user": "u1",
        "_context_traceparent": "00-abc-def-01", "_context_roles": ["admin"]
    }));
    let request = decode_request(&body).expect("decode");
    assert_eq!(request.method, "add");
    assert_eq!(request.namespace.as_deref(), Some("calc"));
    assert_eq!(request.version, None);
    assert_eq!(request.call_monitor, Some(4.0));
    assert_eq!(request.reply_to.as_deref(), Some("reply_q1"));
    assert_eq!(
        request.context.get("traceparent"),
        Some(&json!("00-abc-def-01"))
    );
    assert_eq!(request.context.get("roles"), Some(&json!(["admin"])));
    assert_eq!(request.context.len(), 3);
}

#[test]
fn cast_has_no_call_keys() {
    let request = Request {
        method: "bump".into(),
        ..Request::default()
    };
    let inner = inner_of(&encode_request(&request).expect("encode"));
    let object = inner.as_object().expect("object");
    assert_eq!(object["args"], json!({}));
    assert!(
        object["_unique_id"]
            .as_str()
            .is_some_and(|id| id.len() == 32)
    );
    for key in ["_msg_id", "_reply_q", "_timeout", "namespace", "version"] {
        assert!(!object.contains_key(key), "cast must not carry {key}");
    }
    assert!(
        !decode_request(&encode_request(&request).expect("encode"))
            .expect("decode")
            .is_call()
    );
}

#[test]
fn reply_with_failure_is_a_string_inside_the_json() {
    let failure = RemoteError::new("ValueError", "bad thing");
    let reply = Reply {
        unique_id: "u2".into(),
        ..Reply::failure("m1", failure.clone())
    };
    let body = encode_reply(&reply).expect("encode");
    let inner = inner_of(&body);
    assert_eq!(inner["result"], Value::Null);
    assert_eq!(inner["ending"], true);
    assert_eq!(inner["_msg_id"], "m1");
    let text = inner["failure"].as_str().expect("failure is a string");
    let doc: Value = serde_json::from_str(text).expect("failure json");
    assert_eq!(
        doc,
        json!({"class": "ValueError", "module": "builtins", "message": "bad thing",
               "tb": [], "args": ["bad thing"], "kwargs": {}})
    );
    assert_eq!(decode_reply(&body).expect("decode"), reply);
}

#[test]
fn decodes_python_failure_with_traceback() {
    let failure = json!({"class": "ValueError", "module": "builtins",
        "message": "('bad thing', 42)",
        "tb": ["Traceback (most recent call last):\n", "ValueError: bad\n"],
        "args": ["bad thing", 42], "kwargs": {}});
    let body = envelope(json!({"result": null, "failure": failure.to_string(),
        "ending": true, "_msg_id": "m9", "_unique_id": "u9"}));
    let reply = decode_reply(&body).expect("decode");
    let failure = reply.failure.expect("failure");
    assert_eq!(failure.class, "ValueError");
    assert_eq!(failure.traceback.len(), 2);
    assert_eq!(failure.args, vec![json!("bad thing"), json!(42)]);
}

#[test]
fn heartbeat_document() {
    let body = envelope(json!({"result": null, "failure": null, "ending": false,
        "_msg_id": "m1", "_unique_id": "u1"}));
    let reply = decode_reply(&body).expect("decode");
    assert!(reply.is_heartbeat());
    let ours = inner_of(&encode_reply(&Reply::heartbeat("m1")).expect("encode"));
    assert_eq!(ours["ending"], false);
    assert_eq!(ours["result"], Value::Null);
    assert_eq!(ours["failure"], Value::Null);
}

#[test]
fn bare_version_1_body_is_accepted() {
    let body = br#"{"method": "ping", "args": {"n": 3}, "_context_user": "bob"}"#;
    let request = decode_request(body).expect("decode");
    assert_eq!(request.method, "ping");
    assert_eq!(request.args["n"], 3);
    assert_eq!(
        request.context.get_as::<String>("user").as_deref(),
        Some("bob")
    );
    assert!(!request.is_call());
}

#[test]
fn envelope_3_is_rejected() {
    let body = serde_json::to_vec(&json!({"oslo.version": "3.0",
        "oslo.message": json!({"method": "x", "args": {}}).to_string()}))
    .expect("encode");
    let err = decode_request(&body).expect_err("3.0 must be refused");
    assert!(
        err.reason().contains("unsupported envelope version 3.0"),
        "{err}"
    );
}

#[test]
fn members_are_read_like_a_json_map() {
    // Escaped keys, a repeated key (the last one counts, as in a JSON map),
    // unknown members of any shape, and a context member spelled with an escape.
    let inner = r#"{"meth\u006fd": "first", "method": "echo", "args": {"x": 1},
        "unknown": {"deep": [1e400, "s", null]}, "_context_us\u0065r": "ann",
        "_context_user": "bob", "_msg_id": "m1", "_msg_id": "m2"}"#;
    let body =
        serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": inner})).expect("encode");
    let request = decode_request(&body).expect("decode");
    assert_eq!(request.method, "echo");
    assert_eq!(
        request.args,
        json!({"x": 1}).as_object().cloned().expect("map")
    );
    assert_eq!(request.msg_id.as_deref(), Some("m2"));
    assert_eq!(request.context.get("user"), Some(&json!("bob")));
    // Trailing text after the inner document, or an inner array, is not a message.
    for inner in [r#"{"method": "echo"} x"#, r#"[{"method": "echo"}]"#] {
        let body = serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": inner}))
            .expect("encode");
        let err = decode_request(&body).expect_err(inner);
        assert!(
            err.to_string()
                .contains("oslo.message is not a JSON object"),
            "{err}"
        );
    }
    let err = decode_reply(br#"{"_msg_id": "m", "result": 1} {}"#).expect_err("trailing");
    assert!(
        err.to_string().contains("body is not a JSON object"),
        "{err}"
    );
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let cases: Vec<&[u8]> = vec![
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2, 3]",
        b"42",
        b"{\"oslo.version\": \"2.0\", \"oslo.message\": \"{broken\"}",
        b"{\"oslo.version\": \"2.0\", \"oslo.message\": \"[]\"}",
        b"{\"oslo.version\": 2, \"oslo.message\": \"{}\"}",
        b"{\"oslo.version\": \"x.y\", \"oslo.message\": \"{}\"}",
        b"{\"args\": {}}",
        b"{\"method\": 7}",
        b"{\"method\": \"m\", \"args\": [1]}",
        b"{\"method\": \"m\", \"_msg_id\": {}}",
    ];
    for body in cases {
        assert!(
            decode_request(body).is_err(),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
    assert!(
        decode_reply(b"{\"result\": 1}").is_err(),
        "a reply needs _msg_id"
    );
    assert!(decode_reply(b"{\"_msg_id\": \"m\", \"ending\": \"yes\"}").is_err());
}

/// The members the decoder reads from `body` for a request, or its refusal.
fn read(body: &[u8]) -> Result<Read, CodecError> {
    read_members(body, &REQUEST)
}

/// The members plain serde_json reads from `body` for a request.
fn by_serde_json(body: &[u8]) -> Option<Read> {
    crate::fuzzing::members_by_serde_json(body).map(|members| Read::from_members(members, &REQUEST))
}

fn envelope_of(inner: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": inner})).expect("encode")
}

#[test]
fn reads_what_writers_write() {
    let inner = json!({
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
    let expected = Read::from_members(inner.as_object().cloned().expect("object"), &REQUEST);
    for text in [compact, python] {
        let read = read(&envelope_of(&text)).unwrap_or_else(|e| panic!("not read: {text}: {e}"));
        assert_eq!(read, expected, "{text}");
    }
}

#[test]
fn reads_what_serde_json_reads() {
    let inners = [
        r#"{}"#,
        r#" { "a" : 1 , "b" : [ ] } "#,
        r#"{"method":1,"method":"m"}"#,
        r#"{"args":01}"#,
        r#"{"args":1.}"#,
        r#"{"args":-}"#,
        r#"{"args":[1e5,-0.0,1E-2,1e+2,1e400]}"#,
        r#"{"args":+1}"#,
        r#"{"args":1,}"#,
        r#"{"args":[1,]}"#,
        r#"{"args":tru}"#,
        r#"{"args":truex}"#,
        r#"{"args":"\ud800"}"#,
        r#"{"args":"\udc00"}"#,
        r#"{"args":"\ud83d\ude00"}"#,
        r#"{"args":"\ud83d\u0041"}"#,
        r#"{"args":"\uZZZZ"}"#,
        r#"{"args":"\x"}"#,
        "{\"args\":\"tab\there\"}",
        "{\"args\":\n1}",
        r#"{"args":"\/"}"#,
        r#"[1]"#,
        r#""text""#,
        r#"{"args":1} x"#,
        r#"{"args":1}}"#,
        r#"{"args" 1}"#,
        r#"{1:1}"#,
        r#"{"args":{"b":{"c":[null]}},"_context_a":{"b":[]}}"#,
    ];
    for inner in inners {
        for body in [envelope_of(inner), inner.as_bytes().to_vec()] {
            assert_eq!(read(&body).ok(), by_serde_json(&body), "{inner}");
        }
    }
}

/// Found by the fuzzer in the hand-written reader this decoder replaced: it took a
/// raw line break as the inner document's whitespace, where the envelope's string
/// cannot hold one (serde_json and Python's `json` refuse it).
#[test]
fn raw_tabs_and_line_breaks_in_the_envelope_string_are_refused() {
    for raw in ["\r", "\n", "\t"] {
        let body = [
            r#"{"oslo.version":"2.0","oslo.message":"{\"method\":"#,
            raw,
            r#"\"m\"}"}"#,
        ]
        .concat();
        let err = decode_request(body.as_bytes()).expect_err(raw);
        assert!(err.to_string().contains("control character"), "{err}");
        assert_eq!(by_serde_json(body.as_bytes()), None, "{raw:?}");
        let escaped = body.replace(raw, &raw.escape_default().to_string());
        assert_eq!(
            decode_request(escaped.as_bytes()).expect(&escaped).method,
            "m"
        );
    }
}

#[test]
fn envelopes_are_read_as_serde_json_reads_them() {
    let read_the_same = [
        br#"{"oslo.version":"2.0","oslo.message":"{\"method\":\"m\"}"}"#.as_slice(),
        br#" {"oslo.message" : "{\"method\":\"m\"}" , "oslo.version":"2.0"} "#,
        // A signature member (`MessageAuth`), and any other member, are skipped.
        br#"{"oslo.version":"2.0","oslo.message":"{}","mqrpc.sig":"k:1:ab"}"#,
        br#"{"oslo.version":"2.0","oslo.message":"{}","x":{"y":[1,"a\"b"]}}"#,
        // Escapes anywhere, in the keys too.
        br#"{"oslo.version":"2.0","o\u0073lo.message":"\u007b\"method\":\"m\"}"}"#,
        br#"{"oslo.version":"2.0","oslo.message":"{\u0022method\u0022:\"\u00e9\"}"}"#,
        // Not an envelope: a bare 1.0 body.
        br#"{"method":"m","oslo.version":"2.0"}"#,
        br#"{"method":"m","oslo.version":null,"oslo.message":"{}"}"#,
    ];
    for body in read_the_same {
        let text = String::from_utf8_lossy(body);
        let read = read(body).unwrap_or_else(|e| panic!("not read: {text}: {e}"));
        assert_eq!(Some(read), by_serde_json(body), "{text}");
    }
    let refused = [
        br#"{"oslo.version":"2.1","oslo.message":"{}"}"#.as_slice(),
        br#"{"oslo.version":"3.0","oslo.message":"{}"}"#,
        br#"{"oslo.version":"2.0","oslo.message":"{}","oslo.message":"{}"}"#,
        br#"{"oslo.version":"2.0","oslo.message":"{}","oslo.version":"2.0"}"#,
        br#"{"oslo.version":"2.0","oslo.message":"{}","o\u0073lo.message":"{}"}"#,
        br#"{"oslo.version":"2.0","oslo.message":"{} x"}"#,
        br#"{"oslo.version":"2.0","oslo.message":"{}"} x"#,
        br#"{"oslo.version":"2.0","oslo.message":{}}"#,
        br#"{"oslo.version":2.0,"oslo.message":"{}"}"#,
        br#"{"oslo.version":"2.0","oslo.message":"\x"}"#,
        br#"{"oslo.version":"2.0","oslo.message":"{}""#,
        // An array is not an envelope, whatever it holds.
        br#"["2.0","{\"method\":\"m\"}"]"#,
        // Invalid UTF-8, in a member that is read or in one that is skipped.
        b"{\"oslo.version\":\"2.0\",\"oslo.message\":\"{\\\"method\\\":\\\"\xff\\\"}\"}",
        b"{\"oslo.version\":\"2.0\",\"oslo.message\":\"{}\",\"x\":\"\xff\"}",
    ];
    for body in refused {
        let text = String::from_utf8_lossy(body);
        assert!(read(body).is_err(), "read: {text}");
        assert_eq!(by_serde_json(body), None, "{text}");
    }
}

/// Members nobody reads are skipped by serde_json's `IgnoredAny`, which checks
/// their syntax only: a number out of range or a lone surrogate there is no error,
/// and neither is nesting (skipped in a loop, it costs no stack).
#[test]
fn members_nobody_reads_are_checked_for_syntax_only() {
    let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
    for unread in ["1e400", r#""\ud800""#, deep.as_str()] {
        let inner = format!(r#"{{"method":"m","unknown":{unread}}}"#);
        let body = envelope_of(&inner);
        assert_eq!(decode_request(&body).expect(&inner).method, "m");
        let outer = format!(r#"{{"oslo.version":"2.0","oslo.message":"{{}}","x":{unread}}}"#);
        assert!(read(outer.as_bytes()).is_ok(), "{outer}");
        let inner = format!(r#"{{"method":"m","args":{{"x":{unread}}}}}"#);
        assert!(decode_request(&envelope_of(&inner)).is_err(), "{inner}");
        let malformed = format!(r#"{{"method":"m","unknown":[{unread}}}"#);
        assert!(
            decode_request(&envelope_of(&malformed)).is_err(),
            "{malformed}"
        );
    }
}

#[test]
fn each_key_is_found_at_its_position() {
    for keys in [&REQUEST, &REPLY] {
        assert!(keys.names.len() <= MAX_WANTED);
        for (index, name) in keys.names.iter().enumerate() {
            assert_eq!((keys.position)(name), Some(index), "{name}");
        }
        for other in ["", "_context_user", "Method", "result ", "_msg_i"] {
            assert_eq!((keys.position)(other), None, "{other}");
        }
    }
}

/// The trace context of the current span (feature `otel`), written as context
/// members.
#[cfg(feature = "otel")]
mod trace_context {
    use serde_json::Map;

    use super::super::{Args, Head, decode_request, encode_request_with};
    use crate::context::Context;
    use crate::trace::{TRACEPARENT, TRACESTATE, TraceHeaders};

    fn sent(ctx: &Context, trace: &TraceHeaders) -> Context {
        let head = Head {
            trace: Some(trace),
            ..Head::new("m", ctx)
        };
        let body = encode_request_with(&head, Args::Map(&Map::new())).expect("encodes");
        decode_request(&body).expect("decodes").context
    }

    #[test]
    fn the_current_spans_context_replaces_the_applications_own() {
        let ctx = Context::new()
            .with(TRACEPARENT, "00-stale")
            .with("user", "u");
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = TraceHeaders::from_pairs(&[(TRACEPARENT, parent), (TRACESTATE, "")]);
        let received = sent(&ctx, &trace);
        assert_eq!(
            received.get_as::<String>(TRACEPARENT).as_deref(),
            Some(parent)
        );
        assert_eq!(received.get_as::<String>("user").as_deref(), Some("u"));
        assert_eq!(
            received.len(),
            2,
            "an empty tracestate is left out: {received:?}"
        );
    }

    #[test]
    fn without_a_layer_nothing_is_written() {
        let trace = TraceHeaders::current();
        assert!(trace.is_empty());
        let ctx = Context::new().with(TRACEPARENT, "kept").with("user", "u");
        assert_eq!(sent(&ctx, &trace), ctx);
    }
}

/// A notification as oslo's `messagingv2` driver writes it reads back whole, and
/// the members come in the driver's order.
#[test]
fn notifications_round_trip_in_oslos_member_order() {
    use super::{NotificationMessage, decode_notification, encode_notification};
    let message = NotificationMessage {
        message_id: "6c3a0b5e-1d2f-4a8b-9c0d-1e2f3a4b5c6d".into(),
        publisher_id: "compute.host1".into(),
        event_type: "compute.instance.create.end".into(),
        priority: "INFO".into(),
        payload: serde_json::json!({"id": 7, "nested": {"a": [1, "x"]}}),
        timestamp: "2026-12-06 16:41:45.766957".into(),
        context: crate::context::Context::new().with("user", "alice"),
        unique_id: Some("0123456789abcdef0123456789abcdef".into()),
    };
    let body = encode_notification(&message).expect("encodes");
    assert_eq!(decode_notification(&body).expect("decodes"), message);
    let envelope: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let inner = envelope["oslo.message"].as_str().expect("inner");
    let order = [
        "message_id",
        "publisher_id",
        "event_type",
        "priority",
        "payload",
        "timestamp",
        "_unique_id",
        "_context_user",
    ];
    let positions: Vec<usize> = order
        .iter()
        .map(|key| inner.find(&format!("\"{key}\"")).expect(key))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{inner}");
    // The unenveloped form of oslo's `messaging` driver reads too.
    let bare = br#"{"event_type": "e", "priority": "warn", "payload": null, "_context_a": 1}"#;
    let read = decode_notification(bare).expect("bare");
    assert_eq!(
        (read.event_type.as_str(), read.priority.as_str()),
        ("e", "warn")
    );
    assert_eq!(read.context.get("a"), Some(&serde_json::json!(1)));
    assert!(
        decode_notification(br#"{"priority": "INFO"}"#).is_err(),
        "no event_type"
    );
}
