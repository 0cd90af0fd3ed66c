//! Settling what a server read: a delivery per stream entry, the acker that acks
//! (and deletes) it, the entries held while handled, and the batched deletion of
//! entries read with `NOACK`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::streams::StreamId;
use rpc_core::{Acker, Charge, Delivery, Result};
use tokio::sync::mpsc;

use super::GROUP;
use crate::Shared;
use crate::commands::{DELETE_SETTLED, SETTLE_SHARED};
use crate::connection::Connection;
use crate::entry::{expiry, take_field};
use crate::error::redis_error;
use crate::publisher::{BODY_FIELD, now_millis};

/// Entries of the shared group this instance holds (read and not yet settled), by
/// stream and id. Housekeeping keeps their idle time fresh so no other server claims
/// them while this one lives, and never hands them out a second time.
pub(super) type InFlight = Arc<Mutex<HashSet<(String, String)>>>;

/// How the deliveries of one reader are settled.
#[derive(Clone)]
pub(super) enum Settle {
    /// Read into the group's pending list; acking is an `XACK` (and an `XDEL` when
    /// only the servers' group reads the stream). Shared-group entries are tracked.
    Ack(Option<InFlight>),
    /// Read with `NOACK` (the server acks on receipt anyway): nothing is pending, no
    /// round trip stands before the handler, and handled shared-group entries are
    /// deleted in batches by a background task.
    OnRead(Option<mpsc::UnboundedSender<(String, String)>>),
}

/// How many entry ids one `DELETE_SETTLED` call takes (Lua's stack bounds `unpack`).
const DELETE_CHUNK: usize = 512;

/// Deletes handled `NOACK` entries, batching what arrives together; ends when every
/// acker and reader holding a sender is gone.
pub(super) async fn delete_settled(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<(String, String)>,
) {
    let mut conn = shared.commands.clone();
    let mut batch: HashMap<String, Vec<String>> = HashMap::new();
    while let Some((key, id)) = rx.recv().await {
        batch.entry(key).or_default().push(id);
        let mut taken = 1;
        while taken < DELETE_CHUNK * 4 {
            let Ok((key, id)) = rx.try_recv() else { break };
            batch.entry(key).or_default().push(id);
            taken += 1;
        }
        for (key, ids) in batch.drain() {
            for chunk in ids.chunks(DELETE_CHUNK) {
                if let Err(err) = DELETE_SETTLED.run::<i64>(&mut conn, &key, chunk).await {
                    // The stream's MAXLEN trims what could not be deleted.
                    tracing::debug!(error = %err, stream = %key, "deleting handled entries failed");
                }
            }
        }
    }
}

pub(super) fn lock(in_flight: &InFlight) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
    in_flight.lock().unwrap_or_else(|e| e.into_inner())
}

/// Turns a stream entry into a delivery carrying `charge`, the entry's bytes counted
/// against the server's budget; an expired call is acked and skipped. Entries of the
/// shared group are tracked in `in_flight` until settled.
pub(super) async fn delivery(
    shared: &Arc<Shared>,
    key: &str,
    group: &str,
    entry: StreamId,
    settle: &Settle,
    charge: Charge,
) -> Option<Delivery> {
    let StreamId { id, mut map, .. } = entry;
    let expires = expiry(&map);
    // Moved, not copied: an entry can be tens of megabytes.
    let body = Bytes::from(take_field(&mut map, BODY_FIELD).unwrap_or_default());
    drop(map);
    if let Settle::Ack(Some(in_flight)) = settle {
        lock(in_flight).insert((key.to_owned(), id.clone()));
    }
    let acker = RedisAcker {
        conn: shared.commands.clone(),
        key: key.to_owned(),
        group: group.to_owned(),
        id,
        body: body.clone(),
        settle: settle.clone(),
    };
    let now = now_millis();
    if expires.is_some_and(|at| at < now) {
        tracing::debug!(stream = key, "dropping a call whose caller stopped waiting");
        if let Err(err) = Box::new(acker).ack().await {
            tracing::debug!(error = %err, "could not ack an expired entry");
        }
        return None;
    }
    let delivery = Delivery::new(body, Box::new(acker)).with_charge(charge);
    Some(match expires {
        Some(at) => delivery.with_time_to_live(Duration::from_millis(at.saturating_sub(now))),
        None => delivery,
    })
}

/// Settles one stream entry.
struct RedisAcker {
    conn: Connection,
    key: String,
    group: String,
    id: String,
    body: Bytes,
    settle: Settle,
}

impl RedisAcker {
    async fn xack(&mut self) -> Result<()> {
        let in_flight = match &mut self.settle {
            Settle::OnRead(deletes) => {
                if let Some(deletes) = deletes.take() {
                    // The deleter is gone only once the consumer is: MAXLEN trims.
                    let _ = deletes.send((self.key.clone(), self.id.clone()));
                }
                return Ok(());
            }
            Settle::Ack(in_flight) => in_flight.take(),
        };
        let settled = if self.group == GROUP {
            // A topic or server stream is read by one group: a settled entry is of no
            // more use, unless a watcher (`monitor`) registered a group to keep them.
            SETTLE_SHARED
                .run::<i64>(&mut self.conn, &self.key, (&self.group, &self.id))
                .await
                .map(drop)
        } else {
            redis::cmd("XACK")
                .arg(&self.key)
                .arg(&self.group)
                .arg(&self.id)
                .query_async::<()>(&mut self.conn)
                .await
        };
        let settled = settled.map_err(|e| redis_error("XACK", e));
        if let Some(in_flight) = in_flight {
            lock(&in_flight).remove(&(self.key.clone(), self.id.clone()));
        }
        settled
    }
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        // Unsettled: the entry stays pending and, once idle, another server claims it.
        if let Settle::Ack(Some(in_flight)) = &self.settle {
            lock(in_flight).remove(&(self.key.clone(), self.id.clone()));
        }
    }
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.xack().await
    }

    async fn reject(mut self: Box<Self>, requeue: bool) -> Result<()> {
        // A fanout entry read with NOACK is not added again: every other server of
        // the topic reads its own copy, and they would get it twice.
        let fanout_on_read = matches!(self.settle, Settle::OnRead(_)) && self.group != GROUP;
        if requeue && !fanout_on_read {
            // Streams cannot put an entry back: add it again, then settle the old one.
            redis::cmd("XADD")
                .arg(&self.key)
                .arg("*")
                .arg(BODY_FIELD)
                .arg(&self.body[..])
                .query_async::<()>(&mut self.conn)
                .await
                .map_err(|e| redis_error("requeueing", e))?;
        }
        self.xack().await
    }
}
