//! One blocking `XREADGROUP` loop of a server: it reads what the buffer and the
//! byte budget have room for, hands entries over, declares its groups again when
//! they vanish, and lets a stop wake its blocked read (`CLIENT UNBLOCK`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::streams::StreamReadReply;
use rpc_core::{ByteBudget, Delivery, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::pace::{Pace, RELAX_AFTER};
use super::settle::{Settle, delivery};
use super::{MAX_BATCH, ServerKeys, give_back};
use crate::connection::Connection;
use crate::entry::entry_size;
use crate::error::{is_connection_error, is_missing_group};
use crate::{BACKOFF, Shared};

/// The longest a `NOACK` read blocks when Redis does not let this user wake it
/// (`CLIENT ID` or `CLIENT UNBLOCK` refused), so that a stopping server waits for it
/// briefly. Otherwise a stop wakes the read (see `Reader::read`).
const ON_READ_BLOCK: Duration = Duration::from_millis(500);

/// How long a stopping reader waits for its read to end after asking Redis to wake
/// it, before asking again (the read may not have reached Redis yet).
const UNBLOCK_RETRY: Duration = Duration::from_millis(20);

/// One blocking `XREADGROUP` loop.
pub(super) struct Reader {
    pub(super) settle: Settle,
    pub(super) shared: Arc<Shared>,
    pub(super) conn: Connection,
    pub(super) group: String,
    pub(super) consumer: String,
    pub(super) streams: Vec<String>,
    pub(super) keys: ServerKeys,
    pub(super) tx: mpsc::Sender<Result<Delivery>>,
    pub(super) stop: CancellationToken,
    /// The server's budget: every entry read is charged to it, and reads wait for it.
    pub(super) budget: ByteBudget,
    /// This reader's connection as Redis knows it, so that a stop can wake its
    /// blocked read.
    pub(super) client_id: ClientId,
    /// Where the shared group's reader says how large its entries are lately, for
    /// the claims of housekeeping; `None` for the fanout reader.
    pub(super) largest: Option<Arc<AtomicUsize>>,
}

/// A reading connection's id (`CLIENT ID`), which `CLIENT UNBLOCK` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientId {
    /// Not asked yet, or the connection was lost since (a new one has a new id).
    Unknown,
    /// The id, and this user may unblock it.
    Known(i64),
    /// Redis refused `CLIENT ID` or `CLIENT UNBLOCK` (an ACL): a stop waits for the
    /// read to end by itself, so `NOACK` reads block for at most `ON_READ_BLOCK`.
    Refused,
}

impl Reader {
    /// Whether entries are read with `NOACK` (nothing pending at Redis).
    fn on_read(&self) -> bool {
        matches!(self.settle, Settle::OnRead(_))
    }

    pub(super) async fn run(mut self) {
        let on_read = self.on_read();
        let mut pace = Pace::new(MAX_BATCH);
        let mut attempt = 0u32;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            // Read only as much as there is room for, in the buffer and in the byte
            // budget: waiting work stays in Redis.
            let room = tokio::select! {
                _ = self.stop.cancelled() => return,
                permit = self.tx.reserve() => match permit {
                    Ok(permit) => { drop(permit); self.tx.capacity().max(1) }
                    Err(_) => return,
                },
            };
            let wanted = pace.wanted(self.budget.limit());
            if self.budget.available() < wanted {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    () = self.budget.until_available(wanted) => {}
                    () = tokio::time::sleep(RELAX_AFTER) => {
                        pace.relax();
                        if let Some(shared) = &self.largest {
                            shared.store(pace.largest(), Ordering::Relaxed);
                        }
                    }
                }
                continue;
            }
            // COUNT is per stream: the shared group's read may bring it from both.
            let count = pace.count(room, self.budget.available() / self.streams.len().max(1));
            if self.client_id == ClientId::Unknown {
                self.client_id = self.identify().await;
            }
            let block = match self.client_id {
                // A NOACK read cannot be abandoned (what it returns would be lost), so
                // a stop waits for it: unless Redis lets the stop wake it, keep it short.
                ClientId::Refused | ClientId::Unknown if on_read => {
                    self.shared.config.block.min(ON_READ_BLOCK)
                }
                _ => self.shared.config.block,
            };
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(count)
                .arg("BLOCK")
                .arg(u64::try_from(block.as_millis().max(1)).unwrap_or(u64::MAX));
            if on_read {
                cmd.arg("NOACK");
            }
            cmd.arg("STREAMS").arg(&self.streams);
            for _ in &self.streams {
                cmd.arg(">");
            }
            let Some(read) = self.read(&cmd, block).await else {
                return;
            };
            match read {
                Ok(None) => {
                    pace.idle();
                    if self.shared.config.cluster && self.client_id != ClientId::Refused {
                        // A cluster client may have moved the read to a new master
                        // after a failover without failing it: that connection has
                        // another id. Asked again while idle, the only time a stop
                        // waits on a blocked read.
                        self.client_id = ClientId::Unknown;
                    }
                }
                Ok(Some(reply)) => {
                    attempt = 0;
                    if self.hand_over(reply, count, &mut pace).await {
                        return;
                    }
                }
                Err(err) if is_missing_group(&err) => {
                    // The streams vanished (a Redis restart, or expiry): declare again.
                    tracing::warn!(streams = ?self.streams, "consumer group missing; creating it again");
                    let mut conn = self.shared.commands.clone();
                    if let Err(err) = self
                        .keys
                        .declare(&mut conn, self.shared.config.stream_ttl)
                        .await
                    {
                        tracing::warn!(error = %err, "could not re-create consumer groups");
                        tokio::time::sleep(BACKOFF.delay(attempt)).await;
                        attempt = attempt.saturating_add(1);
                    }
                }
                Err(err) => {
                    if self.client_id != ClientId::Refused {
                        // Perhaps a new connection next time, with an id of its own.
                        self.client_id = ClientId::Unknown;
                    }
                    let wait = BACKOFF.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    if is_connection_error(&err) {
                        tracing::warn!(error = %err, ?wait, "reading from Redis failed; retrying");
                    } else {
                        tracing::error!(error = %err, ?wait, "XREADGROUP refused; retrying");
                    }
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Asks Redis for this reader's connection id, and checks that this user may
    /// unblock it (`CLIENT UNBLOCK` of a connection that is not blocked answers 0).
    async fn identify(&mut self) -> ClientId {
        // On a cluster, the node the read goes to: the one owning the streams' slot.
        let id: redis::RedisResult<i64> = self
            .conn
            .query_at(&self.streams[0], redis::cmd("CLIENT").arg("ID"))
            .await;
        let id = match id {
            Ok(id) => id,
            Err(err) if is_connection_error(&err) => return ClientId::Unknown,
            Err(err) => {
                tracing::debug!(error = %err, "CLIENT ID refused; a stop waits for the blocked read");
                return ClientId::Refused;
            }
        };
        let mut commands = self.shared.commands.clone();
        let probe: redis::RedisResult<i64> = commands
            .query_at(
                &self.streams[0],
                redis::cmd("CLIENT").arg("UNBLOCK").arg(id),
            )
            .await;
        match probe {
            Ok(_) => ClientId::Known(id),
            Err(err) if is_connection_error(&err) => ClientId::Unknown,
            Err(err) => {
                tracing::debug!(error = %err, "CLIENT UNBLOCK refused; a stop waits for the blocked read");
                ClientId::Refused
            }
        }
    }

    /// Runs one blocking read; `None` when the consumer stopped and the read is
    /// over without entries to hand over.
    ///
    /// A stop does not abandon a read in flight: Redis may have answered it already,
    /// and with `NOACK` what it took exists nowhere else. The stop wakes it instead
    /// (`CLIENT UNBLOCK`, from the commands connection: Redis then answers the read
    /// as if its block ran out, taking nothing), and the entries of a read answered
    /// before are given back. So stopping an idle server costs two round trips, not
    /// the rest of a block.
    async fn read(
        &mut self,
        cmd: &redis::Cmd,
        block: Duration,
    ) -> Option<redis::RedisResult<Option<StreamReadReply>>> {
        let read = cmd.query_async::<Option<StreamReadReply>>(&mut self.conn);
        tokio::pin!(read);
        tokio::select! {
            biased;
            read = &mut read => return Some(read),
            _ = self.stop.cancelled() => {}
        }
        let give_up = tokio::time::Instant::now() + block + Duration::from_secs(1);
        match self.client_id {
            ClientId::Known(id) => loop {
                let mut commands = self.shared.commands.clone();
                let stream = self.streams[0].clone();
                let nudge = async move {
                    let mut unblock = redis::cmd("CLIENT");
                    unblock.arg("UNBLOCK").arg(id);
                    let unblock = commands.query_at::<i64>(&stream, &unblock);
                    let _ = tokio::time::timeout(Duration::from_secs(1), unblock).await;
                    // Answered 0 when the read has not reached Redis yet: again.
                    tokio::time::sleep(UNBLOCK_RETRY).await;
                };
                tokio::select! {
                    biased;
                    read = &mut read => return Some(read),
                    () = nudge => {}
                }
                if tokio::time::Instant::now() >= give_up {
                    return None;
                }
            },
            // What a NOACK read returns exists nowhere else: wait for it.
            _ if matches!(self.settle, Settle::OnRead(_)) => {
                tokio::time::timeout_at(give_up, read).await.ok()
            }
            // What it took stays pending, for another server to claim.
            _ => None,
        }
    }

    /// Hands a read's entries over, each charged to the budget; returns whether the
    /// consumer is stopping (the entries not handed out are then given back).
    async fn hand_over(&mut self, reply: StreamReadReply, asked: usize, pace: &mut Pace) -> bool {
        let on_read = self.on_read();
        let mut stopping = false;
        let mut most = 0;
        let mut largest = 0;
        for stream in reply.keys {
            most = most.max(stream.ids.len());
            for entry in stream.ids {
                let size = entry_size(&entry.map);
                largest = largest.max(size);
                let charge = self.budget.charge(size);
                let Some(delivery) = delivery(
                    &self.shared,
                    &stream.key,
                    &self.group,
                    entry,
                    &self.settle,
                    charge,
                )
                .await
                else {
                    continue;
                };
                if stopping || self.stop.is_cancelled() {
                    stopping = true;
                    give_back(on_read, delivery).await;
                    continue;
                }
                let reserved = tokio::select! {
                    _ = self.stop.cancelled() => None,
                    permit = self.tx.reserve() => permit.ok(),
                };
                match reserved {
                    Some(permit) => permit.send(Ok(delivery)),
                    None => {
                        stopping = true;
                        give_back(on_read, delivery).await;
                    }
                }
            }
        }
        pace.read(asked, most, largest);
        if let Some(shared) = &self.largest {
            shared.store(pace.largest(), Ordering::Relaxed);
        }
        stopping
    }
}
