//! The wire format shared by every backend, byte-compatible with oslo.messaging's
//! message format 2.0: an envelope `{"oslo.version": "2.0", "oslo.message": "<inner>"}`
//! whose inner JSON carries the request or reply keys, with the context flattened into
//! `_context_*` keys.
//!
//! Decoding never panics: anything that is not a well-formed message is a
//! [`CodecError`].

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::context::Context;
use crate::envelope;
use crate::error::{CodecError, RemoteError};
use crate::inner;
use crate::target::Version;

/// The envelope version this library writes and the major version it reads.
pub const ENVELOPE_VERSION: &str = "2.0";
const CONTEXT_PREFIX: &str = "_context_";

/// A new correlation or de-duplication id: a uuid4 in hex, as oslo.messaging writes it.
pub fn new_id() -> String {
    fresh_id(&mut [0; ID_LEN]).to_owned()
}

/// The length of [`new_id`]'s ids.
pub(crate) const ID_LEN: usize = uuid::fmt::Simple::LENGTH;

/// A new id written into `buf`: a message's `_unique_id` needs no allocation of its
/// own. Written into a buffer: `to_string` goes through the formatting machinery.
pub(crate) fn fresh_id(buf: &mut [u8; ID_LEN]) -> &str {
    uuid::Uuid::new_v4().simple().encode_lower(buf)
}

/// A request: a call (it has a `msg_id` and a reply address) or a cast.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    /// The method to run.
    pub method: String,
    /// Keyword arguments.
    pub args: Map<String, Value>,
    /// Interface namespace; `None` is the null namespace.
    pub namespace: Option<String>,
    /// Requested interface version as sent (`None` means 1.0).
    pub version: Option<String>,
    /// The caller's context.
    pub context: Context,
    /// Correlation id of a call (`_msg_id`); `None` for a cast.
    pub msg_id: Option<String>,
    /// Where replies go (`_reply_q`); `None` for a cast.
    pub reply_to: Option<String>,
    /// Call-monitor interval in seconds (`_timeout`): the server heartbeats every half
    /// of it. Not the call timeout.
    pub call_monitor: Option<f64>,
    /// De-duplication id (`_unique_id`).
    pub unique_id: Option<String>,
    /// How many seconds the caller waits for the reply from when it sent the call
    /// (`_expires_in`, mqrpc's own member: oslo.messaging ignores it and carries the
    /// call timeout as AMQP's `expiration` instead). A server stops working for the
    /// call once that time has passed since it received the request.
    pub expires_in: Option<f64>,
}

impl Request {
    /// Whether the sender waits for a reply.
    pub fn is_call(&self) -> bool {
        self.msg_id.is_some()
    }

    /// Parses the requested version; `None` in the request means 1.0.
    pub fn parsed_version(&self) -> Result<Version, String> {
        match &self.version {
            None => Ok(Version::DEFAULT),
            Some(text) => text.parse().map_err(|_| text.clone()),
        }
    }
}

/// A reply: a result, a failure, a streamed item, an end marker or a heartbeat.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reply {
    /// The result (null on failure, on heartbeats and on the end of a stream).
    pub result: Value,
    /// The failure, when the method failed.
    pub failure: Option<RemoteError>,
    /// Whether this is the last reply for the request.
    pub ending: bool,
    /// The request's `_msg_id`.
    pub msg_id: String,
    /// This reply's own `_unique_id`.
    pub unique_id: String,
}

impl Reply {
    /// The final reply of a call with its result.
    pub fn result(msg_id: &str, result: Value) -> Self {
        Answer::result(result).into_reply(msg_id)
    }

    /// One streamed item of a multicall.
    pub fn item(msg_id: &str, item: Value) -> Self {
        Answer::item(item).into_reply(msg_id)
    }

    /// The final reply of a failed call.
    pub fn failure(msg_id: &str, failure: RemoteError) -> Self {
        Answer::failure(failure).into_reply(msg_id)
    }

    /// The end marker of a multicall stream.
    pub fn end(msg_id: &str) -> Self {
        Answer::end().into_reply(msg_id)
    }

    /// A call-monitor heartbeat.
    pub fn heartbeat(msg_id: &str) -> Self {
        Answer::heartbeat().into_reply(msg_id)
    }

    /// Whether this reply only says "still working".
    pub fn is_heartbeat(&self) -> bool {
        !self.ending && self.result.is_null() && self.failure.is_none()
    }
}

/// What a server answers, without the ids: it encodes with [`encode_answer`] under
/// the request's borrowed `_msg_id` and a fresh `_unique_id` written in place, so a
/// reply costs no copy of either.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Answer {
    result: Value,
    failure: Option<RemoteError>,
    ending: bool,
}

impl Answer {
    /// The final answer with a result.
    pub(crate) fn result(result: Value) -> Self {
        Answer {
            result,
            failure: None,
            ending: true,
        }
    }

    /// One streamed item.
    pub(crate) fn item(item: Value) -> Self {
        Answer {
            ending: false,
            ..Answer::result(item)
        }
    }

    /// The final answer of a failed call.
    pub(crate) fn failure(failure: RemoteError) -> Self {
        Answer {
            failure: Some(failure),
            ..Answer::result(Value::Null)
        }
    }

    /// The end marker of a stream.
    pub(crate) fn end() -> Self {
        Answer::result(Value::Null)
    }

    /// A call-monitor heartbeat.
    pub(crate) fn heartbeat() -> Self {
        Answer {
            ending: false,
            ..Answer::result(Value::Null)
        }
    }

    fn into_reply(self, msg_id: &str) -> Reply {
        Reply {
            result: self.result,
            failure: self.failure,
            ending: self.ending,
            msg_id: msg_id.to_owned(),
            unique_id: new_id(),
        }
    }
}

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
    };
    encode_request_with(&head, Args::Map(&req.args))
}

/// A request's members but its arguments, borrowed: a client writes its target's,
/// its context's and the call's without copying them into a [`Request`] first.
pub(crate) struct Head<'a> {
    pub(crate) method: &'a str,
    pub(crate) namespace: Option<&'a str>,
    pub(crate) version: Option<Cow<'a, str>>,
    pub(crate) context: &'a Context,
    pub(crate) msg_id: Option<&'a str>,
    pub(crate) reply_to: Option<&'a str>,
    pub(crate) call_monitor: Option<f64>,
    /// `None` writes a fresh one.
    pub(crate) unique_id: Option<&'a str>,
    pub(crate) expires_in: Option<f64>,
}

impl<'a> Head<'a> {
    /// `method` with `context` and nothing else: no namespace, no version, no ids
    /// but a fresh `_unique_id`.
    pub(crate) fn new(method: &'a str, context: &'a Context) -> Self {
        Head {
            method,
            namespace: None,
            version: None,
            context,
            msg_id: None,
            reply_to: None,
            call_monitor: None,
            unique_id: None,
            expires_in: None,
        }
    }
}

/// A request's arguments, for [`encode_request_with`].
pub(crate) enum Args<'a> {
    /// As a map of values.
    Map(&'a Map<String, Value>),
    /// A JSON object already written escaped for the envelope
    /// ([`envelope::escaped`]).
    Escaped(&'a [u8]),
}

/// Encodes the request `head` with `args`: a client encodes its keyword arguments
/// once and writes them from there into every attempt's body.
pub(crate) fn encode_request_with(head: &Head<'_>, args: Args<'_>) -> Result<Vec<u8>, CodecError> {
    let mut out = envelope::Writer::new();
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
    for (key, value) in head.context.iter() {
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
    let mut out = envelope::Writer::new();
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
fn unique_id_member(out: &mut envelope::Writer, given: Option<&str>) -> Result<(), CodecError> {
    out.member(br#"\"_unique_id\":"#);
    let mut id = [0; ID_LEN];
    out.string(given.unwrap_or_else(|| fresh_id(&mut id)))?;
    Ok(())
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    #[serde(rename = "oslo.version", borrow, default)]
    version: Option<Cow<'a, str>>,
    #[serde(rename = "oslo.message", borrow, default)]
    message: Option<Cow<'a, str>>,
}

/// How deep JSON arrays and objects may nest in a message (the envelope and its
/// inner document each), far below what would exhaust a decoder's stack.
pub const MAX_DEPTH: usize = 64;

/// Fails when arrays and objects in `json` nest deeper than [`MAX_DEPTH`]; brackets
/// inside strings do not count. Cheap: one pass over the bytes, no allocation.
pub(crate) fn check_depth(json: &[u8]) -> Result<(), CodecError> {
    // No more opening brackets than the limit cannot nest deeper than it, strings
    // or not; most messages have a handful, counted by a vector search.
    if memchr::memchr2_iter(b'{', b'[', json)
        .take(MAX_DEPTH + 1)
        .count()
        <= MAX_DEPTH
    {
        return Ok(());
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                // Jump through the string to its closing quote, skipping escapes
                // (most bytes of a message are inside strings).
                i += 1;
                loop {
                    let rest = json.get(i..).unwrap_or_default();
                    let Some(at) = memchr::memchr2(b'"', b'\\', rest) else {
                        return Ok(());
                    };
                    i += at;
                    if json[i] == b'"' {
                        break;
                    }
                    i += 2;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(CodecError::new(format!(
                        "JSON nests deeper than {MAX_DEPTH} levels"
                    )));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The inner document of a body: the text inside an envelope, or a bare 1.0 body.
enum Inner<'a> {
    Enveloped(Cow<'a, str>),
    Bare(&'a [u8]),
}

/// Opens the envelope (or takes a bare 1.0 body as it is) and returns the inner text.
fn unwrap_envelope(body: &[u8]) -> Result<Inner<'_>, CodecError> {
    if let Some(message) = envelope::read(body) {
        check_depth(message.as_bytes())?;
        return Ok(Inner::Enveloped(message));
    }
    check_depth(body)?;
    let envelope: EnvelopeIn<'_> = serde_json::from_slice(body)
        .map_err(|e| CodecError::new(format!("body is not a JSON object: {e}")))?;
    match (envelope.version, envelope.message) {
        (Some(version), Some(message)) => {
            let parsed: Version = version
                .parse()
                .map_err(|_| CodecError::new(format!("bad envelope version {version:?}")))?;
            if parsed.major != 2 || parsed.minor > 0 {
                return Err(CodecError::new(format!(
                    "unsupported envelope version {version} (this library reads 2.0)"
                )));
            }
            check_depth(message.as_bytes())?;
            Ok(Inner::Enveloped(message))
        }
        // Not an envelope: oslo takes any other object as an unenveloped 1.0 message.
        _ => Ok(Inner::Bare(body)),
    }
}

/// A JSON object key, borrowed from the input when it holds no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }
            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
            fn visit_string<E>(self, key: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// The members a message kind reads by name, and whether it reads its context.
pub(crate) struct Keys {
    /// The keys, in the order their values are taken from a [`Read`].
    pub(crate) names: &'static [&'static str],
    /// The position of a key in `names`. A `match` on the key, which compiles to a
    /// switch on its length and word compares, is several times cheaper per member
    /// than comparing it with each name in turn.
    position: fn(&str) -> Option<usize>,
    /// Whether `_context_*` members are read.
    context: bool,
}

/// The top-level members of an inner document that a message kind reads: the values
/// of its keys (by position; a repeated key keeps its last value, as a JSON map
/// would) and, with `context`, every `_context_*` member.
struct Members<'r> {
    keys: &'static Keys,
    /// Filled in place: a `Read` returned by value is copied at every step out.
    read: &'r mut Read,
}

/// The most members a message kind reads by name ([`REQUEST`]).
const MAX_WANTED: usize = 9;

#[derive(Debug, PartialEq)]
pub(crate) struct Read {
    /// By the position of their key in [`Keys::names`]; on the stack, not allocated.
    values: [Option<Value>; MAX_WANTED],
    context: Map<String, Value>,
}

impl Read {
    fn new() -> Self {
        Read {
            values: [const { None }; MAX_WANTED],
            context: Map::new(),
        }
    }

    fn take(&mut self, index: usize) -> Option<Value> {
        self.values.get_mut(index).and_then(Option::take)
    }

    /// Where the member `key` goes, or `None` when it is not read.
    fn wanted(keys: &Keys, key: &str) -> Option<Wanted> {
        match (keys.position)(key) {
            Some(index) => Some(Wanted::At(index)),
            None => (keys.context && key.starts_with(CONTEXT_PREFIX)).then_some(Wanted::Context),
        }
    }

    /// Keeps the value of the member `key`, found [`Wanted`] where it is.
    fn fill(&mut self, wanted: Wanted, key: &str, value: Value) {
        match wanted {
            Wanted::At(index) => {
                if let Some(slot) = self.values.get_mut(index) {
                    *slot = Some(value);
                }
            }
            Wanted::Context => {
                let name = key.get(CONTEXT_PREFIX.len()..).unwrap_or_default();
                self.context.insert(name.to_owned(), value);
            }
        }
    }
}

/// Where a member that is read goes.
#[derive(Clone, Copy)]
enum Wanted {
    /// The value at this position of [`Keys::names`].
    At(usize),
    /// A `_context_` member, into the context.
    Context,
}

impl<'de> serde::de::DeserializeSeed<'de> for Members<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Members<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = access.next_key::<Key<'de>>()? {
            match Read::wanted(self.keys, &key) {
                Some(wanted) => self.read.fill(wanted, &key, access.next_value()?),
                // Skipped without being built.
                None => access.next_value::<serde::de::IgnoredAny>().map(drop)?,
            }
        }
        Ok(())
    }
}

/// Reads the members of a body's inner document: straight from the envelope's text
/// when it has the plain shape ([`inner`]), by the general path otherwise.
fn read_members(body: &[u8], keys: &'static Keys) -> Result<Read, CodecError> {
    match read_fast(body, keys) {
        Some(read) => Ok(read),
        None => read_general(body, keys),
    }
}

/// The fast path of [`read_members`]: `None` where it gives up.
pub(crate) fn read_fast(body: &[u8], keys: &'static Keys) -> Option<Read> {
    let mut read = Read::new();
    inner::members(
        body,
        |key| Read::wanted(keys, key),
        |key, wanted, value| read.fill(wanted, &key, value),
    )?;
    Some(read)
}

/// The general path of [`read_members`]: the envelope unescaped, then serde_json;
/// every error is found and worded here.
pub(crate) fn read_general(body: &[u8], keys: &'static Keys) -> Result<Read, CodecError> {
    fn read_all<'de, R: serde_json::de::Read<'de>>(
        mut de: serde_json::Deserializer<R>,
        members: Members<'_>,
    ) -> serde_json::Result<()> {
        use serde::de::DeserializeSeed;
        members.deserialize(&mut de)?;
        de.end()
    }
    let mut read = Read::new();
    let members = Members {
        keys,
        read: &mut read,
    };
    let (outcome, what) = match unwrap_envelope(body)? {
        Inner::Enveloped(text) => (
            read_all(serde_json::Deserializer::from_str(&text), members),
            "oslo.message",
        ),
        Inner::Bare(body) => (
            read_all(serde_json::Deserializer::from_slice(body), members),
            "body",
        ),
    };
    outcome.map_err(|e| CodecError::new(format!("{what} is not a JSON object: {e}")))?;
    Ok(read)
}

fn take_string(value: Option<Value>, key: &str) -> Result<Option<String>, CodecError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(CodecError::new(format!(
            "{key} must be a string, found {}",
            kind_of(&other)
        ))),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The members a request is read from, in the order of [`decode_request`]'s reads,
/// and its context.
pub(crate) const REQUEST: Keys = Keys {
    names: &[
        "method",
        "args",
        "namespace",
        "version",
        "_msg_id",
        "_reply_q",
        "_timeout",
        "_unique_id",
        "_expires_in",
    ],
    position: |key| {
        Some(match key {
            "method" => 0,
            "args" => 1,
            "namespace" => 2,
            "version" => 3,
            "_msg_id" => 4,
            "_reply_q" => 5,
            "_timeout" => 6,
            "_unique_id" => 7,
            "_expires_in" => 8,
            _ => return None,
        })
    },
    context: true,
};

/// Decodes a request body (enveloped 2.0 or bare 1.0).
pub fn decode_request(body: &[u8]) -> Result<Request, CodecError> {
    let keys = REQUEST.names;
    let mut read = read_members(body, &REQUEST)?;
    let method = take_string(read.take(0), keys[0])?
        .ok_or_else(|| CodecError::new("request has no method"))?;
    let args = match read.take(1) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(args)) => args,
        Some(other) => {
            return Err(CodecError::new(format!(
                "args must be an object, found {}",
                kind_of(&other)
            )));
        }
    };
    let mut string = |index: usize| take_string(read.take(index), keys[index]);
    let namespace = string(2)?;
    let version = string(3)?;
    let msg_id = string(4)?;
    let reply_to = string(5)?;
    let call_monitor = match read.take(6) {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        // oslo logs and ignores a monitor value it cannot read; so do we.
        Some(other) => {
            tracing::debug!(found = kind_of(&other), "ignoring non-numeric _timeout");
            None
        }
    };
    let unique_id = take_string(read.take(7), keys[7])?;
    // Like `_timeout`: a value that is not a number of seconds is ignored.
    let expires_in = match read.take(8) {
        Some(Value::Number(n)) => n.as_f64().filter(|secs| *secs >= 0.0),
        _ => None,
    };
    Ok(Request {
        method,
        args,
        namespace,
        version,
        context: Context::from(read.context),
        msg_id,
        reply_to,
        call_monitor,
        unique_id,
        expires_in,
    })
}

/// The members a reply is read from.
pub(crate) const REPLY: Keys = Keys {
    names: &["_msg_id", "result", "failure", "ending", "_unique_id"],
    position: |key| {
        Some(match key {
            "_msg_id" => 0,
            "result" => 1,
            "failure" => 2,
            "ending" => 3,
            "_unique_id" => 4,
            _ => return None,
        })
    },
    context: false,
};

/// The members a client's reply router reads: [`REPLY`]'s but `_unique_id`, which
/// routing never looks at (one string fewer to copy out of every reply). `names`
/// still lists it, unread; so a reply whose `_unique_id` is not a string is routed,
/// where [`decode_reply`] refuses it.
const ROUTED_REPLY: Keys = Keys {
    position: |key| match key {
        "_unique_id" => None,
        key => (REPLY.position)(key),
    },
    ..REPLY
};

/// Decodes a reply body.
pub fn decode_reply(body: &[u8]) -> Result<Reply, CodecError> {
    decode_reply_reading(body, &REPLY)
}

/// [`decode_reply`] for routing: the reply's own `_unique_id` is left empty.
pub(crate) fn decode_routed_reply(body: &[u8]) -> Result<Reply, CodecError> {
    decode_reply_reading(body, &ROUTED_REPLY)
}

fn decode_reply_reading(body: &[u8], members: &'static Keys) -> Result<Reply, CodecError> {
    let keys = members.names;
    let mut read = read_members(body, members)?;
    let msg_id = take_string(read.take(0), keys[0])?
        .ok_or_else(|| CodecError::new("reply has no _msg_id"))?;
    let result = read.take(1).unwrap_or(Value::Null);
    let failure = match read.take(2) {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(decode_failure(&text)),
        Some(Value::Object(object)) => Some(
            RemoteError::from_failure_value(Value::Object(object))
                .map_err(|e| CodecError::new(format!("bad failure object: {e}")))?,
        ),
        Some(other) => {
            return Err(CodecError::new(format!(
                "failure must be a string, found {}",
                kind_of(&other)
            )));
        }
    };
    // Every oslo.messaging since 2015 sends `ending`; a reply without it is taken as
    // final (the separate end marker of older servers then arrives late and is
    // dropped).
    let ending = match read.take(3) {
        Some(Value::Bool(ending)) => ending,
        None | Some(Value::Null) => true,
        Some(other) => {
            return Err(CodecError::new(format!(
                "ending must be a boolean, found {}",
                kind_of(&other)
            )));
        }
    };
    let unique_id = take_string(read.take(4), keys[4])?.unwrap_or_default();
    Ok(Reply {
        result,
        failure,
        ending,
        msg_id,
        unique_id,
    })
}

/// A failure document that does not parse still reaches the caller, as its text.
fn decode_failure(text: &str) -> RemoteError {
    let parsed = serde_json::from_str(text).and_then(RemoteError::from_failure_value);
    parsed.unwrap_or_else(|_| RemoteError {
        class: "RemoteError".to_owned(),
        module: String::new(),
        message: text.to_owned(),
        traceback: Vec::new(),
        args: Vec::new(),
        kwargs: Map::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            let first =
                decode_reply(&encode_answer(&answer, "m1").expect("encodes")).expect("decodes");
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

    /// The depth check's verdict, by the plain definition: a bracket counts unless it
    /// is inside a string; a backslash in a string escapes the next byte.
    fn depth_by_definition(json: &[u8]) -> usize {
        let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
        for &byte in json {
            match (in_string, escaped, byte) {
                (true, true, _) => escaped = false,
                (true, false, b'\\') => escaped = true,
                (true, false, b'"') => in_string = false,
                (true, false, _) => {}
                (false, _, b'"') => in_string = true,
                (false, _, b'{' | b'[') => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                (false, _, b'}' | b']') => depth = depth.saturating_sub(1),
                (false, _, _) => {}
            }
        }
        deepest
    }

    #[test]
    fn depth_check_skips_strings_and_escapes_exactly() {
        let deep = "[".repeat(MAX_DEPTH + 1);
        let cases = [
            format!(r#"{{"a": "{deep}"}}"#),
            format!(r#"{{"a": "\"{deep}"}}"#),
            format!(r#"{{"a": "\\"{deep}"}}"#),
            format!(r#"{{"a": "x\\\"{deep}\\", "b": {deep}"#),
            format!(r#"["\u0022{deep}", {deep}]"#),
            format!("\"unterminated {deep}"),
            "\"ends in a backslash\\".to_owned(),
            format!("{deep}\"\\"),
            "\\".to_owned(),
            String::new(),
        ];
        for case in cases {
            let expected = depth_by_definition(case.as_bytes()) <= MAX_DEPTH;
            assert_eq!(check_depth(case.as_bytes()).is_ok(), expected, "{case}");
        }
    }

    #[test]
    fn nesting_is_limited_in_the_envelope_and_in_the_inner_document() {
        let nested = |levels: usize| "[".repeat(levels) + &"]".repeat(levels);
        let inner = format!(
            r#"{{"method": "echo", "args": {{"x": {}}}}}"#,
            nested(MAX_DEPTH - 2)
        );
        let body = serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": inner}))
            .expect("encode");
        decode_request(&body).expect("MAX_DEPTH levels in all are fine");
        let inner = format!(
            r#"{{"method": "echo", "args": {{"x": {}}}}}"#,
            nested(MAX_DEPTH)
        );
        let body = serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": inner}))
            .expect("encode");
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

    #[test]
    fn members_are_read_like_a_json_map() {
        // Escaped keys, a repeated key (the last one counts, as in a JSON map),
        // unknown members of any shape, and a context member spelled with an escape.
        let inner = r#"{"meth\u006fd": "first", "method": "echo", "args": {"x": 1},
            "unknown": {"deep": [1e400, "s", null]}, "_context_us\u0065r": "ann",
            "_context_user": "bob", "_msg_id": "m1", "_msg_id": "m2"}"#;
        let body = serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": inner}))
            .expect("encode");
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
}
