//! Stream entries: the fields an entry carries (body, expiry, size), and reading
//! entries after given ids without a group (`XREAD`), as the reply reader and the
//! watcher do.

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;
use redis::streams::StreamReadReply;
use rpc_core::{Delivery, NoAck, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::connection::Connection;
use crate::publisher::{BODY_FIELD, EXPIRES_FIELD};

/// The time (Unix ms) after which the entry is not worth handling, if it says.
pub(crate) fn expiry(map: &HashMap<String, Value>) -> Option<u64> {
    match map.get(EXPIRES_FIELD)? {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

/// The bytes of an entry's fields, names and values: what reading it put in memory.
pub(crate) fn entry_size(map: &HashMap<String, Value>) -> usize {
    map.iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    Value::BulkString(bytes) => bytes.len(),
                    Value::SimpleString(text) => text.len(),
                    _ => 0,
                }
        })
        .sum()
}

/// Moves a field's value out of an entry, without copying it: an entry can be tens
/// of megabytes.
pub(crate) fn take_field(map: &mut HashMap<String, Value>, field: &str) -> Option<Vec<u8>> {
    match map.remove(field)? {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.into_bytes()),
        _ => None,
    }
}

/// What one grouped-less read of some streams came to.
pub(crate) enum ReadOutcome {
    /// This many entries (maybe none) were handed over; read again.
    Read(usize),
    /// The consumer is stopping or gone.
    Stopped,
    /// Redis failed the read.
    Failed(redis::RedisError),
}

/// How many entries `XREAD` takes at once.
pub(crate) const READ_COUNT: usize = 256;

/// The pipeline [`read_after`] runs: the `XTRIM`s, with `trim`, then the `XREAD`.
/// `keys` are one topic's (or one reply stream): one slot.
pub(crate) fn read_after_pipe(
    keys: &[String],
    ids: &[String],
    block: Duration,
    trim: bool,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    if trim {
        for (key, id) in keys.iter().zip(ids.iter()) {
            pipe.cmd("XTRIM").arg(key).arg("MINID").arg(id).ignore();
        }
    }
    pipe.cmd("XREAD")
        .arg("COUNT")
        .arg(READ_COUNT)
        .arg("BLOCK")
        .arg(u64::try_from(block.as_millis().max(1)).unwrap_or(u64::MAX))
        .arg("STREAMS")
        .arg(keys)
        .arg(ids);
    pipe
}

/// One blocking `XREAD` of `keys` after `ids`, handing every entry over as a
/// delivery with nothing to settle and advancing `ids`. With `trim`, the entries
/// before `ids` are deleted first (`XTRIM ... MINID`, in the same round trip): the
/// reader is their only reader and has them.
pub(crate) async fn read_after(
    reader: &mut Connection,
    keys: &[String],
    ids: &mut [String],
    block: Duration,
    trim: bool,
    tx: &mpsc::Sender<Result<Delivery>>,
    stop: &CancellationToken,
) -> ReadOutcome {
    let pipe = read_after_pipe(keys, ids, block, trim);
    let read: redis::RedisResult<(Option<StreamReadReply>,)> = tokio::select! {
        _ = stop.cancelled() => return ReadOutcome::Stopped,
        read = pipe.query_async(reader) => read,
    };
    let reply = match read {
        Ok((None,)) => return ReadOutcome::Read(0),
        Ok((Some(reply),)) => reply,
        Err(err) => return ReadOutcome::Failed(err),
    };
    let mut count = 0;
    for stream in reply.keys {
        let Some(slot) = keys.iter().position(|k| *k == stream.key) else {
            continue;
        };
        for entry in stream.ids {
            count += 1;
            ids[slot].clone_from(&entry.id);
            let mut map = entry.map;
            let body = take_field(&mut map, BODY_FIELD).unwrap_or_default();
            tokio::select! {
                _ = stop.cancelled() => return ReadOutcome::Stopped,
                sent = tx.send(Ok(Delivery::new(body, Box::new(NoAck)))) => {
                    if sent.is_err() {
                        return ReadOutcome::Stopped;
                    }
                }
            }
        }
    }
    ReadOutcome::Read(count)
}
