//! One blocking `XREADGROUP` loop of a server: it reads what the buffer and the
//! byte budget have room for, hands entries over, declares its groups again when
//! they vanish, and lets a stop wake its blocked read (`CLIENT UNBLOCK`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::streams::StreamReadReply;
use rpc_core::transport::ConnectionStatus;
use rpc_core::{ByteBudget, Delivery, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::pace::{Pace, RELAX_AFTER};
use super::settle::{Settle, delivery};
use super::{MAX_BATCH, ServerKeys, give_back};
use crate::connection::Connection;
use crate::entry::entry_size;
use crate::error::{is_connection_error, is_forbidden_or_unknown, is_missing_group};
use crate::{BACKOFF, Shared};

/// The longest a `NOACK` read blocks when Redis does not let this user wake it
/// (`CLIENT ID` or `CLIENT UNBLOCK` refused), so that a stopping server waits for it
/// briefly. Otherwise a stop wakes the read (see `Reader::read`).
const ON_READ_BLOCK: Duration = Duration::from_millis(500);

/// How long a stopping reader waits for its read to end after asking Redis to wake
/// it, before asking again (the read may not have reached Redis yet).
const UNBLOCK_RETRY: Duration = Duration::from_millis(20);

/// Sends `CLIENT UNBLOCK` for `id` from the `commands` connection, on a cluster to
/// the node the id is of; how many connections it woke (0 or 1).
async fn unblock(commands: &Connection, id: &ClientId) -> redis::RedisResult<i64> {
    let ClientId::Known(id, node) = id else {
        return Ok(0);
    };
    let mut commands = commands.clone();
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("UNBLOCK").arg(*id);
    match node {
        Some((host, port)) => commands.query_node(host, *port, &cmd).await,
        // One Redis: the key is not looked at.
        None => commands.query_at("", &cmd).await,
    }
}

/// The id and the node (`laddr`: host and port) of a `CLIENT INFO` reply.
fn parse_client_info(info: &str) -> Option<(i64, (String, u16))> {
    let field = |name: &str| {
        info.split_ascii_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
    };
    let id = field("id")?.parse().ok()?;
    let (host, port) = field("laddr")?.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((id, (host.to_owned(), port.parse().ok()?)))
}

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
    /// The most entries a read of the shared group takes, as housekeeping shares a
    /// batch among the group's consumers (see [`share_of_batch`]); `None` for the
    /// fanout reader, which has its group to itself.
    ///
    /// [`share_of_batch`]: super::housekeeping::share_of_batch
    pub(super) share: Option<Arc<AtomicUsize>>,
    /// Where this reader's connection is reported lost when a read fails, and
    /// restored when Redis answers on it again (the server's health).
    pub(super) connection: ConnectionStatus,
}

/// A reading connection's id (`CLIENT ID`), which `CLIENT UNBLOCK` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ClientId {
    /// Not asked yet, or the connection was lost since (a new one has a new id).
    Unknown,
    /// The id, and this user may unblock it. On a cluster, with the node (host and
    /// port, as the cluster client names it) that the connection is to: ids are
    /// per node, and `CLIENT UNBLOCK` must go to that one, not to whichever node
    /// owns the slot when the stop comes (after a failover, another).
    Known(i64, Option<(String, u16)>),
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
        // Whether the last read failed for want of a connection: the next read that
        // works is on a new one (redis-rs reconnects on its own).
        let mut lost = false;
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
            if let Some(share) = &self.share {
                pace.limit(share.load(Ordering::Relaxed));
            }
            // COUNT is per stream: the shared group's read may bring it from both.
            let count = pace.count(room, self.budget.available() / self.streams.len().max(1));
            if self.client_id == ClientId::Unknown {
                // Abandoning the question is harmless: a stop need not wait for it.
                let stop = self.stop.clone();
                self.client_id = tokio::select! {
                    _ = stop.cancelled() => return,
                    id = self.identify(None) => id,
                };
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
            if read.is_ok() {
                self.connection.restored();
                if lost {
                    lost = false;
                    rpc_core::metrics::reconnected("redis");
                }
            }
            match read {
                Ok(None) => {
                    pace.idle();
                    if let ClientId::Known(_, Some(_)) = self.client_id {
                        // A cluster client may have moved the read to a new master
                        // after a failover without failing it: that connection has
                        // another id, on another node. Asked again while idle, the
                        // only time a stop waits on a blocked read: one round trip,
                        // and the probe only when the answer changed.
                        let known = std::mem::replace(&mut self.client_id, ClientId::Unknown);
                        let stop = self.stop.clone();
                        self.client_id = tokio::select! {
                            _ = stop.cancelled() => return,
                            id = self.identify(Some(known)) => id,
                        };
                    }
                }
                Ok(Some(reply)) => {
                    attempt = 0;
                    if self.hand_over(reply, count, &mut pace).await {
                        return;
                    }
                }
                Err(err) if is_missing_group(&err) => {
                    // Redis answered on this connection: it is back.
                    self.connection.restored();
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
                    // Read again after a backoff, on a connection redis-rs makes
                    // anew if this one is gone: not consuming until Redis answers.
                    self.connection.lost();
                    if self.client_id != ClientId::Refused {
                        // Perhaps a new connection next time, with an id of its own.
                        self.client_id = ClientId::Unknown;
                    }
                    let wait = BACKOFF.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    if is_connection_error(&err) {
                        lost = true;
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

    /// Asks Redis for this reader's connection id (on a cluster, and the node it is
    /// to), and checks that this user may unblock it (`CLIENT UNBLOCK` of a
    /// connection that is not blocked answers 0) unless it is `known` already.
    async fn identify(&mut self, known: Option<ClientId>) -> ClientId {
        // On a cluster, the node the read goes to: the one owning the streams' slot.
        let found = if self.shared.config.cluster {
            self.conn
                .query_at::<String>(&self.streams[0], redis::cmd("CLIENT").arg("INFO"))
                .await
                .and_then(|info| {
                    parse_client_info(&info).ok_or_else(|| {
                        (redis::ErrorKind::Client, "unexpected CLIENT INFO reply").into()
                    })
                })
                .map(|(id, node)| (id, Some(node)))
        } else {
            self.conn
                .query_at::<i64>(&self.streams[0], redis::cmd("CLIENT").arg("ID"))
                .await
                .map(|id| (id, None))
        };
        let (id, node) = match found {
            Ok(found) => {
                // Redis answered on the reading connection: after a loss, the first
                // sign that it is back, without waiting out a blocking read.
                self.connection.restored();
                found
            }
            Err(err) if is_forbidden_or_unknown(&err) => {
                self.connection.restored();
                tracing::debug!(error = %err, "CLIENT ID refused; a stop waits for the blocked read");
                return ClientId::Refused;
            }
            // Lost connections, a cluster changing...: asked again next time.
            Err(_) => return ClientId::Unknown,
        };
        let found = ClientId::Known(id, node);
        if known.as_ref() == Some(&found) {
            return found;
        }
        let probe = unblock(&self.shared.commands, &found).await;
        match probe {
            Ok(_) => found,
            Err(err) if is_forbidden_or_unknown(&err) => {
                tracing::debug!(error = %err, "CLIENT UNBLOCK refused; a stop waits for the blocked read");
                ClientId::Refused
            }
            // A lost connection, or the commands connection does not know that node
            // (yet): a failover it has not seen, or a node announcing another
            // address than it listens on. Asked again next time.
            Err(_) => ClientId::Unknown,
        }
    }

    /// Runs one blocking read; `None` when the consumer stopped and the read is
    /// over without entries to hand over.
    ///
    /// A stop does not abandon a read in flight: Redis may have answered it already,
    /// and with `NOACK` what it took exists nowhere else. The stop wakes it instead
    /// (`CLIENT UNBLOCK`, from the commands connection, on a cluster to the node the
    /// reader's id is of: Redis then answers the read as if its block ran out, taking
    /// nothing), and the entries of a read answered before are given back. So
    /// stopping an idle server costs two round trips, not the rest of a block. A read
    /// that cannot be woken (its id unknown, or the cluster client moved it to
    /// another node) is waited for when it is `NOACK`, and abandoned otherwise (what
    /// it took stays pending, for another server to claim).
    async fn read(
        &mut self,
        cmd: &redis::Cmd,
        block: Duration,
    ) -> Option<redis::RedisResult<Option<StreamReadReply>>> {
        let on_read = matches!(self.settle, Settle::OnRead(_));
        let read = cmd.query_async::<Option<StreamReadReply>>(&mut self.conn);
        tokio::pin!(read);
        tokio::select! {
            biased;
            read = &mut read => return Some(read),
            _ = self.stop.cancelled() => {}
        }
        let give_up = tokio::time::Instant::now() + block + Duration::from_secs(1);
        if let ClientId::Known(..) = self.client_id {
            let id = self.client_id.clone();
            let commands = self.shared.commands.clone();
            loop {
                let nudge = async {
                    let unblock = unblock(&commands, &id);
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
                    break;
                }
            }
        }
        if on_read {
            // What a NOACK read returns exists nowhere else: wait for it, however
            // long (the connection's response timeout bounds it). A read that woke
            // has ended by now; one that did not (its connection was moved to
            // another node by the cluster client) ends with its block.
            Some(read.await)
        } else {
            // What it took stays pending, for another server to claim.
            None
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

#[cfg(test)]
mod tests {
    #[test]
    fn client_info_gives_the_id_and_the_node() {
        let info = "id=42 addr=127.0.0.1:50212 laddr=127.0.0.1:17001 fd=9 name= age=3\n";
        assert_eq!(
            super::parse_client_info(info),
            Some((42, ("127.0.0.1".to_owned(), 17001)))
        );
        let v6 = "id=7 addr=[::1]:5000 laddr=[::1]:17002 fd=9";
        assert_eq!(
            super::parse_client_info(v6),
            Some((7, ("::1".to_owned(), 17002)))
        );
        assert_eq!(super::parse_client_info("id=7 fd=9"), None);
    }
}
