//! The bodies of the fuzz targets in `fuzz/` (feature `fuzzing`), and the unit test
//! that replays their seeds, their corpus and every crash ever found
//! (`fuzz/regressions`), so a fixed crash stays fixed in a normal `cargo test`.

use std::sync::LazyLock;

use futures::StreamExt;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value};

use crate::auth::{AuthFailure, MessageAuth};
use crate::dispatcher::Dispatcher;
use crate::endpoint::{Endpoint, Invocation};
use crate::error::RemoteError;
use crate::target::Version;
use crate::wire::{self, Reply};

/// Decodes `data` as a request and as a reply: the decoder reads what plain
/// serde_json reads, from `data` and from `data` as the inner document of an
/// envelope; whatever decodes must encode again and decode to the same value.
pub fn decode(data: &[u8]) {
    agrees_with_serde_json(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let envelope = serde_json::json!({"oslo.version": "2.0", "oslo.message": text});
        agrees_with_serde_json(&serde_json::to_vec(&envelope).expect("an envelope encodes"));
    }
    if let Ok(mut request) = wire::decode_request(data) {
        let body = wire::encode_request(&request).expect("a decoded request encodes");
        let again = wire::decode_request(&body).expect("a re-encoded request decodes");
        // Encoding gives a request without a `_unique_id` one, as oslo does.
        if request.unique_id.is_none() {
            request.unique_id.clone_from(&again.unique_id);
        }
        assert_eq!(again, request, "request round trip");
    }
    if let Ok(reply) = wire::decode_reply(data) {
        let body = wire::encode_reply(&reply).expect("a decoded reply encodes");
        let again = wire::decode_reply(&body).expect("a re-encoded reply decodes");
        assert_eq!(again.msg_id, reply.msg_id, "reply round trip");
        assert_eq!(again.result, reply.result, "reply round trip");
        assert_eq!(again.ending, reply.ending, "reply round trip");
    }
}

/// The top-level members of a body's inner document as plain serde_json reads
/// them: the body as a [`Value`], its envelope members as `#[derive(Deserialize)]`
/// reads them (a repeated one is an error, null is absent), the inner document (or
/// a bare body) as a map of [`Value`]s; `None` where any of that fails, where the
/// envelope's version is not 2.0, or where the map nests deeper than
/// [`wire::MAX_DEPTH`].
pub(crate) fn members_by_serde_json(body: &[u8]) -> Option<Map<String, Value>> {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(rename = "oslo.version")]
        version: Option<String>,
        #[serde(rename = "oslo.message")]
        message: Option<String>,
    }
    let Value::Object(whole) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    let members = match (envelope.version, envelope.message) {
        (Some(version), Some(message)) => {
            let version: Version = version.parse().ok()?;
            if (version.major, version.minor) != (2, 0) {
                return None;
            }
            match serde_json::from_str(&message).ok()? {
                Value::Object(members) => members,
                _ => return None,
            }
        }
        _ => whole,
    };
    fn depth(value: &Value) -> usize {
        match value {
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            Value::Object(members) => 1 + members.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    let members = Value::Object(members);
    if depth(&members) > wire::MAX_DEPTH {
        return None;
    }
    match members {
        Value::Object(members) => Some(members),
        _ => None,
    }
}

/// The decoder against plain serde_json ([`members_by_serde_json`]): where serde_json
/// reads a body, the decoder reads the same members from it, and a request decoded
/// from it carries their values. The decoder may read more: members it does not
/// read are skipped by serde_json's `IgnoredAny`, which checks their syntax only
/// (not their depth, the range of their numbers or the pairing of their `\u`
/// escapes), so there serde_json must at least take the body's syntax.
fn agrees_with_serde_json(body: &[u8]) {
    let reference = members_by_serde_json(body);
    for keys in [&wire::REQUEST, &wire::REPLY] {
        let ours = wire::read_members(body, keys);
        match (ours, &reference) {
            (Ok(ours), Some(members)) => {
                let theirs = wire::Read::from_members(members.clone(), keys);
                assert_eq!(
                    ours, theirs,
                    "the decoder and serde_json read different members"
                );
            }
            (Err(err), Some(_)) => panic!("the decoder refuses what serde_json reads: {err}"),
            (Ok(_), None) => assert!(
                serde_json::from_slice::<IgnoredAny>(body).is_ok(),
                "the decoder reads what is not JSON"
            ),
            (Err(_), None) => {}
        }
    }
    let (Ok(request), Some(members)) = (wire::decode_request(body), reference) else {
        return;
    };
    let member = |key: &str| members.get(key).filter(|value| !value.is_null());
    assert_eq!(
        member("method"),
        Some(&Value::String(request.method.clone()))
    );
    let args = member("args")
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    assert_eq!(args, Value::Object(request.args.clone()), "args");
    for (key, value) in [
        ("_msg_id", &request.msg_id),
        ("_reply_q", &request.reply_to),
        ("namespace", &request.namespace),
        ("version", &request.version),
        ("_unique_id", &request.unique_id),
    ] {
        assert_eq!(
            member(key).and_then(Value::as_str),
            value.as_deref(),
            "{key}"
        );
    }
    let context: Map<String, Value> = members
        .iter()
        .filter_map(|(key, value)| Some((key.strip_prefix("_context_")?.to_owned(), value.clone())))
        .collect();
    assert_eq!(&context, request.context.as_map(), "context");
}

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(Deserialize)]
struct Echo {
    payload: Value,
}

#[derive(Deserialize)]
struct Count {
    n: u32,
}

#[derive(Deserialize)]
struct Fail {
    message: String,
}

/// Endpoints like a real server's: two versions in the null namespace, one in a
/// named namespace, typed arguments, a stream and a failing method; none of their
/// methods waits. The `dispatch` target dispatches to them, the `server` target
/// serves them.
pub fn endpoints() -> Vec<Endpoint> {
    let main = Endpoint::new()
        .version(Version::new(1, 3))
        .method("add", |_ctx, args: Add| async move {
            Ok::<_, RemoteError>(args.a.wrapping_add(args.b))
        })
        .method("echo", |_ctx, args: Echo| async move {
            Ok::<_, RemoteError>(args.payload)
        })
        .method("fail", |_ctx, args: Fail| async move {
            Err::<(), _>(RemoteError::new("ValueError", args.message))
        })
        .stream_method("count", |_ctx, args: Count| {
            futures::stream::iter((0..args.n.min(64)).map(Ok::<_, RemoteError>))
        });
    let old = Endpoint::new()
        .version(Version::new(2, 0))
        .method("add", |_ctx, args: Add| async move {
            Ok::<_, RemoteError>(args.a.wrapping_sub(args.b))
        });
    let admin = Endpoint::new()
        .namespace("admin")
        .method("echo", |_ctx, args: Echo| async move {
            Ok::<_, RemoteError>(args.payload)
        });
    vec![main, old, admin]
}

static DISPATCHER: LazyLock<Dispatcher> = LazyLock::new(|| Dispatcher::new(endpoints()));

/// Decodes `data` as a request, dispatches it as a server would and runs the
/// method to its end, encoding every reply a server would send.
pub fn dispatch(data: &[u8]) {
    let Ok(request) = wire::decode_request(data) else {
        return;
    };
    let msg_id = request.msg_id.clone().unwrap_or_default();
    let invocation = DISPATCHER.dispatch(
        request.namespace.as_deref(),
        request.version.as_deref(),
        &request.method,
        request.context,
        request.args,
    );
    let send = |reply: Reply| {
        let body = wire::encode_reply(&reply).expect("a reply encodes");
        wire::decode_reply(&body).expect("a reply decodes");
    };
    futures::executor::block_on(async {
        match invocation {
            Invocation::Failed(failure) => send(Reply::failure(&msg_id, failure)),
            Invocation::NotServed(failure) => send(Reply::failure(&msg_id, failure.to_remote())),
            Invocation::Unary(future) => match future.await {
                Ok(value) => send(Reply::result(&msg_id, value)),
                Err(failure) => send(Reply::failure(&msg_id, failure)),
            },
            Invocation::Stream(mut stream) => {
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(value) => send(Reply::item(&msg_id, value)),
                        Err(failure) => send(Reply::failure(&msg_id, failure)),
                    }
                }
                send(Reply::end(&msg_id));
            }
        }
    });
}

/// The key the `auth_open` target signs and checks with.
static AUTH: LazyLock<MessageAuth> =
    LazyLock::new(|| MessageAuth::new("fuzz", [0x5a_u8; 32]).expect("a valid key id and key"));

/// Checks `data` as a received signed message: it is refused without a panic (a
/// valid signature needs the key). Where `data` is a body the codec could write (it
/// ends in `}`), it is also signed: the signed body is accepted once, refused as a
/// replay the second time, and refused once any one of its bytes is changed.
pub fn auth(data: &[u8]) {
    // A replay memory per input: the same input sealed twice within a millisecond
    // carries the same signature.
    let auth = AUTH.own_memory();
    assert!(auth.open(data).is_err(), "an unsigned input was accepted");
    if data.last() != Some(&b'}') {
        return;
    }
    let sealed = auth.seal(data.to_vec());
    if let Some(at) = data.first().map(|&b| usize::from(b) * 7 % sealed.len()) {
        let mut altered = sealed.clone();
        altered[at] ^= 1;
        assert!(auth.open(&altered).is_err(), "an altered body was accepted");
    }
    assert_eq!(auth.open(&sealed), Ok(()), "a signed body was refused");
    assert_eq!(
        auth.open(&sealed),
        Err(AuthFailure::Replayed),
        "a replay was accepted"
    );
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every file of `fuzz/seeds/<target>` and `fuzz/regressions/<target>` (kept in
    /// git), and of `fuzz/corpus/<target>` where a fuzz run left one.
    fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut found = Vec::new();
        for kind in ["seeds", "regressions", "corpus"] {
            let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
                continue;
            };
            for entry in dir.flatten() {
                let path = entry.path();
                if let Ok(bytes) = std::fs::read(&path) {
                    found.push((path, bytes));
                }
            }
        }
        found
    }

    #[test]
    fn fuzz_corpus_and_regressions_replay_without_panics() {
        let decode = inputs("envelope_decode");
        let dispatch = inputs("dispatch");
        let auth = inputs("auth_open");
        assert!(
            !decode.is_empty() && !dispatch.is_empty() && !auth.is_empty(),
            "the seed inputs are in fuzz/seeds"
        );
        for (path, bytes) in &decode {
            let outcome = std::panic::catch_unwind(|| super::decode(bytes));
            assert!(outcome.is_ok(), "decode panicked on {}", path.display());
        }
        for (path, bytes) in &dispatch {
            let outcome = std::panic::catch_unwind(|| super::dispatch(bytes));
            assert!(outcome.is_ok(), "dispatch panicked on {}", path.display());
        }
        for (path, bytes) in &auth {
            let outcome = std::panic::catch_unwind(|| super::auth(bytes));
            assert!(outcome.is_ok(), "auth panicked on {}", path.display());
        }
        eprintln!(
            "replayed {} decode, {} dispatch and {} auth inputs",
            decode.len(),
            dispatch.len(),
            auth.len()
        );
    }
}
