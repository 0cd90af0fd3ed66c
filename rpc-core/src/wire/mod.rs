//! The wire format shared by every backend, byte-compatible with oslo.messaging's
//! message format 2.0: an envelope `{"oslo.version": "2.0", "oslo.message": "<inner>"}`
//! whose inner JSON carries the request or reply keys, with the context flattened into
//! `_context_*` keys.
//!
//! This module holds the messages, the format's constants and the members each
//! kind of message reads. `encode` writes bodies in one pass through serde_json's
//! `Formatter`; `members` reads a body's members with serde_json alone, and
//! `decode` turns them into messages. Decoding never panics: anything that is not
//! a well-formed message is a [`CodecError`].
//!
//! [`CodecError`]: crate::CodecError

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::context::Context;
use crate::error::RemoteError;
use crate::target::Version;

mod decode;
mod encode;
mod members;
#[cfg(test)]
mod tests;

pub use decode::{decode_notification, decode_reply, decode_request};
pub use encode::{encode_notification, encode_reply, encode_request};

pub(crate) use decode::decode_routed_reply;
pub(crate) use encode::{encode_answer, encode_request_with, escaped};
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use members::{Read, read_members};

/// The envelope version this library writes and the major version it reads.
pub const ENVELOPE_VERSION: &str = "2.0";

/// What the keys of the context's members start with in the inner document.
const CONTEXT_PREFIX: &str = "_context_";

/// How deep JSON arrays and objects may nest in the values a message is read for
/// (the inner document counts as the first level), far below what would exhaust
/// the decoder's stack. Members nobody reads are skipped by serde_json without
/// recursion, so their nesting costs no stack and is not limited.
pub const MAX_DEPTH: usize = 64;

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

    /// Whether this is the last answer to its request.
    pub(crate) fn is_final(&self) -> bool {
        self.ending
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
    /// Trace context written as context members, in place of the context's own.
    pub(crate) trace: Option<&'a crate::trace::TraceHeaders>,
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
            trace: None,
        }
    }
}

/// A request's arguments, for [`encode_request_with`].
pub(crate) enum Args<'a> {
    /// As a map of values.
    Map(&'a Map<String, Value>),
    /// A JSON object already written escaped for the envelope ([`escaped`]).
    Escaped(&'a [u8]),
}

/// The members a message kind reads by name, and whether it reads its context.
pub(crate) struct Keys {
    /// The keys, in the order their values are taken from a `Read`.
    pub(crate) names: &'static [&'static str],
    /// The position of a key in `names`. A `match` on the key, which compiles to a
    /// switch on its length and word compares, is several times cheaper per member
    /// than comparing it with each name in turn.
    position: fn(&str) -> Option<usize>,
    /// Whether `_context_*` members are read.
    context: bool,
}

/// The most members a message kind reads by name ([`REQUEST`]).
const MAX_WANTED: usize = 9;

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

/// A notification as oslo.messaging's `messagingv2` driver sends it: the members
/// of its message dictionary, its `_unique_id` and its flattened context.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationMessage {
    /// `message_id`: a uuid4 with dashes.
    pub message_id: String,
    /// `publisher_id`: who sent it (`compute.host1`).
    pub publisher_id: String,
    /// `event_type`: what happened (`compute.instance.create.end`).
    pub event_type: String,
    /// `priority`, upper-case on the wire (`INFO`, `WARN`, `SAMPLE`, ...).
    pub priority: String,
    /// `payload`: any JSON value.
    pub payload: Value,
    /// `timestamp`: UTC as Python's `str(datetime)` writes it
    /// (`2026-12-06 16:41:45.766957`, without the fraction when it is zero).
    pub timestamp: String,
    /// The sender's context (`_context_*` members).
    pub context: Context,
    /// De-duplication id (`_unique_id`).
    pub unique_id: Option<String>,
}

/// The members a notification is read from, and its context.
pub(crate) const NOTIFICATION: Keys = Keys {
    names: &[
        "message_id",
        "publisher_id",
        "event_type",
        "priority",
        "payload",
        "timestamp",
        "_unique_id",
    ],
    position: |key| {
        Some(match key {
            "message_id" => 0,
            "publisher_id" => 1,
            "event_type" => 2,
            "priority" => 3,
            "payload" => 4,
            "timestamp" => 5,
            "_unique_id" => 6,
            _ => return None,
        })
    },
    context: true,
};

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
