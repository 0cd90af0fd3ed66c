//! Turning the members read from a body into a [`Request`] or a [`Reply`]: which
//! are required, which types they must have, and what oslo tolerates.

use serde_json::{Map, Value};

use super::members::read_members;
use super::{
    Keys, NOTIFICATION, NotificationMessage, REPLY, REQUEST, ROUTED_REPLY, Reply, Request,
};
use crate::context::Context;
use crate::error::{CodecError, RemoteError};

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

/// Decodes a notification body (enveloped 2.0, as the `messagingv2` driver sends
/// it, or bare, as the `messaging` driver does). `event_type` and `priority` are
/// required; an absent `publisher_id`, `message_id` or `timestamp` reads as empty
/// and an absent payload as null.
pub fn decode_notification(body: &[u8]) -> Result<NotificationMessage, CodecError> {
    let keys = NOTIFICATION.names;
    let mut read = read_members(body, &NOTIFICATION)?;
    let mut string = |index: usize| take_string(read.take(index), keys[index]);
    let message_id = string(0)?.unwrap_or_default();
    let publisher_id = string(1)?.unwrap_or_default();
    let event_type = string(2)?.ok_or_else(|| CodecError::new("notification has no event_type"))?;
    let priority = string(3)?.ok_or_else(|| CodecError::new("notification has no priority"))?;
    let payload = read.take(4).unwrap_or(Value::Null);
    let timestamp = match read.take(5) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text,
        // A number or another JSON value: kept as its JSON text.
        Some(other) => other.to_string(),
    };
    let unique_id = take_string(read.take(6), keys[6])?;
    Ok(NotificationMessage {
        message_id,
        publisher_id,
        event_type,
        priority,
        payload,
        timestamp,
        context: Context::from(read.context),
        unique_id,
    })
}

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
