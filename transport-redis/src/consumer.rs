//! Consumers. A server reads its topic and server streams through the shared group
//! `servers`, and the fanout stream through a group of its own, each with a blocking
//! `XREADGROUP` on a connection of its own, taking only as many entries as its byte
//! budget has room for (see `pace.rs`); a stop wakes a blocked read with
//! `CLIENT UNBLOCK`. A housekeeping task takes over entries that dead consumers left
//! pending (`XAUTOCLAIM`), deletes entries every group has settled, keeps the
//! streams' TTLs fresh and prunes groups and consumers of servers and watchers that
//! died. A client reads its reply stream with a blocking `XREAD`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::Value;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use rpc_core::{
    Acker, ByteBudget, Charge, Consumer, Delivery, Error, ListenOptions, NoAck, Result, Target,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::pace::{Pace, RELAX_AFTER};
use crate::publisher::{BODY_FIELD, EXPIRES_FIELD, backoff, is_connection_error, now_millis};
use crate::{Shared, connection_manager, redis_error};

/// The consumer group all servers of a topic share.
const GROUP: &str = "servers";
/// Most entries taken in one read, and the most deliveries buffered for a server:
/// a server's default concurrency, so one read can fill every free handler.
const MAX_BATCH: usize = 64;

/// Destroys a server's fanout group, and the stream with the last group.
const DROP_FANOUT_GROUP: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
if #redis.call('XINFO', 'GROUPS', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 1
";

/// Acks an entry of a topic or server stream and deletes it when the stream has no
/// group but the servers' (a watcher's group keeps entries for it to read).
static SETTLE_SHARED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if #redis.call('XINFO', 'GROUPS', KEYS[1]) == 1 then redis.call('XDEL', KEYS[1], ARGV[2]) end
return 1
",
    )
});

/// Deletes entries read with `NOACK` once handled, unless a watcher keeps them.
static DELETE_SETTLED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if #redis.call('XINFO', 'GROUPS', KEYS[1]) == 1 then return redis.call('XDEL', KEYS[1], unpack(ARGV)) end
return 0
",
    )
});

/// The longest a `NOACK` read blocks when Redis does not let this user wake it
/// (`CLIENT ID` or `CLIENT UNBLOCK` refused), so that a stopping server waits for it
/// briefly. Otherwise a stop wakes the read (see `Reader::read`).
const ON_READ_BLOCK: Duration = Duration::from_millis(500);

/// How long a stopping reader waits for its read to end after asking Redis to wake
/// it, before asking again (the read may not have reached Redis yet).
const UNBLOCK_RETRY: Duration = Duration::from_millis(20);

/// Deletes the entries of a stream that every group has read and settled: those
/// before both the next entry any group has yet to read and the oldest entry any
/// group still has pending (`XTRIM ... MINID`). Settles that were lost (a cut
/// connection) and entries a watcher's group kept while it was there end so.
/// Returns how many entries went.
static TRIM_SETTLED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if type(groups) ~= 'table' or groups.err or #groups == 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  -- Beyond 2^52 a Lua number loses the exactness this needs: leave the stream.
  if ms == nil or seq == nil or ms > 4503599627370496 or seq > 4503599627370496 then return nil end
  return ms, seq
end
local floor_ms, floor_seq
local function lower(ms, seq)
  if floor_ms == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
end
for _, group in ipairs(groups) do
  local name, pending, last
  for i = 1, #group, 2 do
    local field = group[i]
    if field == 'name' then name = group[i + 1]
    elseif field == 'pending' then pending = group[i + 1]
    elseif field == 'last-delivered-id' then last = group[i + 1] end
  end
  local ms, seq = parse(last)
  if ms == nil then return 0 end
  lower(ms, seq + 1)
  if pending and pending > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], name)
    local pms, pseq = parse(oldest[2])
    if pms == nil then return 0 end
    lower(pms, pseq)
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', floor_ms, floor_seq))
",
    )
});

/// How many entry ids one `DELETE_SETTLED` call takes (Lua's stack bounds `unpack`).
const DELETE_CHUNK: usize = 512;

/// Removes a consumer from a group unless it still has pending entries.
const DROP_IDLE_CONSUMER: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending == 0 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return #pending
";

/// The keys of one server instance.
#[derive(Debug, Clone)]
struct ServerKeys {
    topic: String,
    server: String,
    fanout: String,
    /// This instance's consumer name, and the name of its fanout group.
    instance: String,
}

fn is_missing_group(err: &redis::RedisError) -> bool {
    err.code() == Some("NOGROUP")
}

/// Creates a group (and its stream, with `MKSTREAM`) and gives the stream a TTL if
/// it has none, in one script: a server that dies between the two steps must not
/// leave a stream without a TTL. A group that exists already is accepted.
static CREATE_GROUP: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local created = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
if type(created) == 'table' and created.err and not string.find(created.err, '^BUSYGROUP') then
  return created
end
redis.call('EXPIRE', KEYS[1], ARGV[3], 'NX')
return 1
",
    )
});

/// Creates `group` on `key` from `start`, accepting one that exists already; a
/// stream this makes expires after `ttl` (an existing TTL is left alone).
async fn create_group(
    conn: &mut ConnectionManager,
    key: &str,
    group: &str,
    start: &str,
    ttl: Duration,
) -> Result<()> {
    CREATE_GROUP
        .key(key)
        .arg(group)
        .arg(start)
        .arg(ttl.as_secs().max(1))
        .invoke_async::<i64>(conn)
        .await
        .map(drop)
        .map_err(|err| redis_error(&format!("creating group {group} on {key}"), err))
}

impl ServerKeys {
    /// Creates the groups (the shared one from the start of the streams, so messages
    /// sent before any server listened are handled; the fanout one at `$`) and sets
    /// the streams' TTLs.
    async fn declare(&self, conn: &mut ConnectionManager, ttl: Duration) -> Result<()> {
        create_group(conn, &self.topic, GROUP, "0", ttl).await?;
        create_group(conn, &self.server, GROUP, "0", ttl).await?;
        create_group(conn, &self.fanout, &self.instance, "$", ttl).await?;
        self.refresh(conn, ttl).await
    }

    async fn refresh(&self, conn: &mut ConnectionManager, ttl: Duration) -> Result<()> {
        let mut pipe = redis::pipe();
        for key in [&self.topic, &self.server, &self.fanout] {
            pipe.cmd("EXPIRE")
                .arg(key)
                .arg(ttl.as_secs().max(1))
                .ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| redis_error("refreshing stream TTLs", e))
    }
}

/// Entries of the shared group this instance holds (read and not yet settled), by
/// stream and id. Housekeeping keeps their idle time fresh so no other server claims
/// them while this one lives, and never hands them out a second time.
type InFlight = Arc<Mutex<HashSet<(String, String)>>>;

/// How the deliveries of one reader are settled.
#[derive(Clone)]
enum Settle {
    /// Read into the group's pending list; acking is an `XACK` (and an `XDEL` when
    /// only the servers' group reads the stream). Shared-group entries are tracked.
    Ack(Option<InFlight>),
    /// Read with `NOACK` (the server acks on receipt anyway): nothing is pending, no
    /// round trip stands before the handler, and handled shared-group entries are
    /// deleted in batches by a background task.
    OnRead(Option<mpsc::UnboundedSender<(String, String)>>),
}

/// Deletes handled `NOACK` entries, batching what arrives together; ends when every
/// acker and reader holding a sender is gone.
async fn delete_settled(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<(String, String)>) {
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
                if let Err(err) = DELETE_SETTLED
                    .key(&key)
                    .arg(chunk)
                    .invoke_async::<i64>(&mut conn)
                    .await
                {
                    // The stream's MAXLEN trims what could not be deleted.
                    tracing::debug!(error = %err, stream = %key, "deleting handled entries failed");
                }
            }
        }
    }
}

fn lock(in_flight: &InFlight) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
    in_flight.lock().unwrap_or_else(|e| e.into_inner())
}

/// Turns a stream entry into a delivery carrying `charge`, the entry's bytes counted
/// against the server's budget; an expired call is acked and skipped. Entries of the
/// shared group are tracked in `in_flight` until settled.
async fn delivery(
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

/// The time (Unix ms) after which the entry is not worth handling, if it says.
fn expiry(map: &HashMap<String, Value>) -> Option<u64> {
    match map.get(EXPIRES_FIELD)? {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

/// The bytes of an entry's fields, names and values: what reading it put in memory.
fn entry_size(map: &HashMap<String, Value>) -> usize {
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

fn take_field(map: &mut HashMap<String, Value>, field: &str) -> Option<Vec<u8>> {
    match map.remove(field)? {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.into_bytes()),
        _ => None,
    }
}

/// A server's consumer.
pub(crate) struct ServerConsumer {
    /// Read with NOACK: deliveries buffered here exist nowhere else.
    settle_on_receipt: bool,
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    keys: ServerKeys,
    cleaned: bool,
}

impl ServerConsumer {
    pub(crate) async fn start(
        shared: Arc<Shared>,
        target: &Target,
        options: &ListenOptions,
    ) -> Result<Self> {
        let prefetch = options.prefetch;
        let config = &shared.config;
        let exchange = target.exchange_or(&config.exchange);
        let server = target.server.clone().unwrap_or_default();
        let keys = ServerKeys {
            topic: config.topic_key(exchange, &target.topic),
            server: config.server_key(exchange, &target.topic, &server),
            fanout: config.fanout_key(exchange, &target.topic),
            instance: format!("{server}:{}", &rpc_core::wire::new_id()[..12]),
        };
        let mut conn = shared.commands.clone();
        keys.declare(&mut conn, config.stream_ttl).await?;
        // Alive from the start: another server pruning before this one's first
        // housekeeping tick must not take its new fanout group for a dead one's.
        mark_alive(
            &mut conn,
            &config.alive_key(&keys.instance),
            config.prune_idle,
        )
        .await
        .map_err(|e| redis_error("marking the server alive", e))?;
        let blocking_timeout = config.block + Duration::from_secs(5);
        let shared_reader = connection_manager(&shared.client, config, blocking_timeout).await?;
        let fanout_reader = connection_manager(&shared.client, config, blocking_timeout).await?;
        let (tx, rx) = mpsc::channel(prefetch.clamp(1, MAX_BATCH));
        let stop = CancellationToken::new();
        let in_flight: InFlight = Arc::default();
        // The largest entry the shared group's reader read lately, for claims.
        let largest = Arc::new(AtomicUsize::new(0));
        let deletes = options.settle_on_receipt.then(|| {
            let (deletes, rx) = mpsc::unbounded_channel();
            tokio::spawn(delete_settled(shared.clone(), rx));
            deletes
        });
        let reader = |conn, group: &str, streams: Vec<String>| Reader {
            settle: match &deletes {
                // Fanout entries are trimmed by MAXLEN: other servers still read them.
                Some(deletes) => Settle::OnRead((group == GROUP).then(|| deletes.clone())),
                None => Settle::Ack((group == GROUP).then(|| in_flight.clone())),
            },
            shared: shared.clone(),
            conn,
            group: group.to_owned(),
            consumer: keys.instance.clone(),
            streams,
            keys: keys.clone(),
            tx: tx.clone(),
            stop: stop.clone(),
            budget: options.budget.clone(),
            client_id: ClientId::Unknown,
            largest: (group == GROUP).then(|| largest.clone()),
        };
        let tasks = vec![
            tokio::spawn(
                reader(
                    shared_reader,
                    GROUP,
                    vec![keys.topic.clone(), keys.server.clone()],
                )
                .run(),
            ),
            tokio::spawn(reader(fanout_reader, &keys.instance, vec![keys.fanout.clone()]).run()),
            tokio::spawn(
                Housekeeping {
                    shared: shared.clone(),
                    keys: keys.clone(),
                    in_flight: in_flight.clone(),
                    tx,
                    stop: stop.clone(),
                    budget: options.budget.clone(),
                    largest,
                }
                .run(),
            ),
        ];
        tracing::debug!(instance = %keys.instance, topic = %keys.topic, "listening on Redis streams");
        Ok(ServerConsumer {
            settle_on_receipt: options.settle_on_receipt,
            rx,
            stop,
            tasks,
            shared,
            keys,
            cleaned: false,
        })
    }
}

/// Leaves the groups this instance joined: its fanout group (and the fanout stream
/// with the last group), and its consumer entries unless they hold pending work.
async fn leave(shared: &Shared, keys: &ServerKeys) -> Result<()> {
    let mut conn = shared.commands.clone();
    redis::cmd("DEL")
        .arg(shared.config.alive_key(&keys.instance))
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| redis_error("DEL", e))?;
    redis::Script::new(DROP_FANOUT_GROUP)
        .key(&keys.fanout)
        .arg(&keys.instance)
        .invoke_async::<i64>(&mut conn)
        .await
        .map_err(|e| redis_error("leaving the fanout", e))?;
    for key in [&keys.topic, &keys.server] {
        redis::Script::new(DROP_IDLE_CONSUMER)
            .key(key)
            .arg(GROUP)
            .arg(&keys.instance)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| redis_error("leaving the group", e))?;
    }
    Ok(())
}

#[async_trait]
impl Consumer for ServerConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.stop.cancel();
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.stop.cancel();
        // Wakes a task blocked handing over a delivery nobody will take any more.
        self.rx.close();
        // Deliveries read but never handed out (see `give_back`).
        while let Ok(delivery) = self.rx.try_recv() {
            if let Ok(delivery) = delivery {
                give_back(self.settle_on_receipt, delivery).await;
            }
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.cleaned = true;
        leave(&self.shared, &self.keys).await
    }
}

impl Drop for ServerConsumer {
    fn drop(&mut self) {
        self.stop.cancel();
        if self.cleaned {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            let keys = self.keys.clone();
            runtime.spawn(async move {
                if let Err(err) = leave(&shared, &keys).await {
                    tracing::debug!(error = %err, "could not leave Redis groups");
                }
            });
        }
    }
}

/// A delivery read but not handed out while the consumer stops. Read with `NOACK`
/// (`on_read`), a topic or server entry exists only here: it is added to its stream
/// again for another server (a fanout entry is not: every other server has its own
/// copy; see `RedisAcker::reject`). Otherwise it is still pending and another server
/// claims it.
async fn give_back(on_read: bool, delivery: Delivery) {
    if on_read {
        let (_, acker) = delivery.into_parts();
        if let Err(err) = acker.reject(true).await {
            tracing::warn!(error = %err, "could not put back a request read before stopping");
        }
    }
}

/// One blocking `XREADGROUP` loop.
struct Reader {
    settle: Settle,
    shared: Arc<Shared>,
    conn: ConnectionManager,
    group: String,
    consumer: String,
    streams: Vec<String>,
    keys: ServerKeys,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
    /// The server's budget: every entry read is charged to it, and reads wait for it.
    budget: ByteBudget,
    /// This reader's connection as Redis knows it, so that a stop can wake its
    /// blocked read.
    client_id: ClientId,
    /// Where the shared group's reader says how large its entries are lately, for
    /// the claims of housekeeping; `None` for the fanout reader.
    largest: Option<Arc<AtomicUsize>>,
}

/// A reading connection's id (`CLIENT ID`), which `CLIENT UNBLOCK` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientId {
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

    async fn run(mut self) {
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
                Ok(None) => pace.idle(),
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
                        tokio::time::sleep(backoff(attempt)).await;
                        attempt = attempt.saturating_add(1);
                    }
                }
                Err(err) => {
                    if self.client_id != ClientId::Refused {
                        // Perhaps a new connection next time, with an id of its own.
                        self.client_id = ClientId::Unknown;
                    }
                    let wait = backoff(attempt);
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
        let id: redis::RedisResult<i64> = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut self.conn)
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
        let probe: redis::RedisResult<i64> = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(id)
            .query_async(&mut commands)
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
                let nudge = async move {
                    let mut unblock = redis::cmd("CLIENT");
                    unblock.arg("UNBLOCK").arg(id);
                    let unblock = unblock.query_async::<i64>(&mut commands);
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

/// Claims abandoned entries, deletes settled ones, refreshes TTLs and prunes dead
/// servers' and watchers' groups.
struct Housekeeping {
    in_flight: InFlight,
    shared: Arc<Shared>,
    keys: ServerKeys,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
    /// The server's budget, which claimed entries are charged to.
    budget: ByteBudget,
    /// The largest entry the shared group's reader read lately (0: none yet).
    largest: Arc<AtomicUsize>,
}

impl Housekeeping {
    async fn run(self) {
        let config = &self.shared.config;
        let tick = (config.claim_idle / 2)
            .min(config.stream_ttl / 3)
            .min(config.prune_idle / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(10));
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = tokio::time::Instant::now();
        let mut last_prune = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let mut conn = self.shared.commands.clone();
            if let Err(err) = self.keep_alive(&mut conn).await {
                tracing::debug!(error = %err, "keeping held entries fresh failed");
            }
            for key in [&self.keys.topic, &self.keys.server] {
                if let Err(err) = self.claim(key).await {
                    tracing::debug!(error = %err, stream = %key, "claiming abandoned entries failed");
                }
                if let Err(err) = self.trim(&mut conn, key).await {
                    tracing::debug!(error = %err, stream = %key, "deleting settled entries failed");
                }
            }
            if last_refresh.elapsed() >= config.stream_ttl / 3 {
                last_refresh = tokio::time::Instant::now();
                if let Err(err) = self.keys.refresh(&mut conn, config.stream_ttl).await {
                    tracing::debug!(error = %err, "refreshing TTLs failed");
                }
            }
            if last_prune.elapsed() >= config.prune_idle / 2 {
                last_prune = tokio::time::Instant::now();
                if let Err(err) = self.prune(&mut conn).await {
                    tracing::debug!(error = %err, "pruning dead servers' groups failed");
                }
                if let Err(err) = self.prune_watchers(&mut conn).await {
                    tracing::debug!(error = %err, "pruning dead watchers' groups failed");
                }
            }
        }
    }

    /// Takes over entries pending longer than `claim_idle` (their consumer died or
    /// hangs) and hands them to this server.
    async fn claim(&self, key: &str) -> Result<()> {
        let room = self.tx.capacity();
        if room == 0 {
            return Ok(());
        }
        // As many as the budget has room for at the size of the entries read lately
        // (one when none has been read); none while it has no room for one: they
        // wait for the next tick.
        let largest = self.largest.load(Ordering::Relaxed);
        let available = self.budget.available();
        if available < largest.clamp(1, self.budget.limit()) {
            return Ok(());
        }
        let count = available
            .checked_div(largest)
            .unwrap_or(1)
            .min(room)
            .clamp(1, MAX_BATCH);
        let mut conn = self.shared.commands.clone();
        let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(key)
            .arg(GROUP)
            .arg(&self.keys.instance)
            .arg(u64::try_from(self.shared.config.claim_idle.as_millis()).unwrap_or(u64::MAX))
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("XAUTOCLAIM", e))?;
        if !claimed.claimed.is_empty() {
            tracing::info!(
                stream = key,
                count = claimed.claimed.len(),
                "took over entries a dead consumer left pending"
            );
        }
        for entry in claimed.claimed {
            if lock(&self.in_flight).contains(&(key.to_owned(), entry.id.clone())) {
                // Ours already, read and not yet settled: not a second time.
                continue;
            }
            let charge = self.budget.charge(entry_size(&entry.map));
            if let Some(delivery) = delivery(
                &self.shared,
                key,
                GROUP,
                entry,
                &Settle::Ack(Some(self.in_flight.clone())),
                charge,
            )
            .await
            {
                tokio::select! {
                    _ = self.stop.cancelled() => return Err(Error::Closed),
                    sent = self.tx.send(Ok(delivery)) => if sent.is_err() { return Err(Error::Closed) },
                }
            }
        }
        Ok(())
    }

    /// Deletes the entries of `key` that every group has read and settled (see
    /// `TRIM_SETTLED`).
    async fn trim(&self, conn: &mut ConnectionManager, key: &str) -> Result<()> {
        let trimmed: i64 = TRIM_SETTLED
            .key(key)
            .invoke_async(conn)
            .await
            .map_err(|e| redis_error("deleting settled entries", e))?;
        if trimmed > 0 {
            tracing::debug!(
                stream = key,
                count = trimmed,
                "deleted entries every group had settled"
            );
        }
        Ok(())
    }

    /// Resets the idle time of the entries this instance holds, so other servers see
    /// them as taken, however long their handlers run; and says this instance lives.
    async fn keep_alive(&self, conn: &mut ConnectionManager) -> Result<()> {
        let held: Vec<(String, String)> = lock(&self.in_flight).iter().cloned().collect();
        let mut pipe = redis::pipe();
        for key in [&self.keys.topic, &self.keys.server] {
            let ids: Vec<&String> = held
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, id)| id)
                .collect();
            if !ids.is_empty() {
                pipe.cmd("XCLAIM")
                    .arg(key)
                    .arg(GROUP)
                    .arg(&self.keys.instance)
                    .arg(0)
                    .arg(&ids)
                    .arg("JUSTID")
                    .ignore();
            }
        }
        pipe.cmd("SET")
            .arg(self.shared.config.alive_key(&self.keys.instance))
            .arg(1)
            .arg("PX")
            .arg(u64::try_from(self.shared.config.prune_idle.as_millis()).unwrap_or(u64::MAX))
            .ignore();
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| redis_error("refreshing held entries", e))
    }

    /// Removes fanout groups whose consumers have all been idle past `prune_idle`, and
    /// shared-group consumers idle that long with nothing pending.
    async fn prune(&self, conn: &mut ConnectionManager) -> Result<()> {
        let limit = u128::from(
            u64::try_from(self.shared.config.prune_idle.as_millis()).unwrap_or(u64::MAX),
        );
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.keys.fanout)
            .query_async(conn)
            .await
            .map_err(|e| redis_error("XINFO GROUPS", e))?;
        for group in groups.groups {
            if group.name == self.keys.instance {
                continue;
            }
            // A live server refreshes its key every tick, even while too busy to read.
            if self.is_alive(conn, &group.name).await? {
                continue;
            }
            let consumers: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&self.keys.fanout)
                .arg(&group.name)
                .query_async(conn)
                .await
                .map_err(|e| redis_error("XINFO CONSUMERS", e))?;
            if group.consumers == 0 || consumers.consumers.iter().all(|c| c.idle as u128 > limit) {
                tracing::info!(group = %group.name, "removing the fanout group of a server that is gone");
                redis::Script::new(DROP_FANOUT_GROUP)
                    .key(&self.keys.fanout)
                    .arg(&group.name)
                    .invoke_async::<i64>(conn)
                    .await
                    .map_err(|e| redis_error("removing a fanout group", e))?;
            }
        }
        for key in [&self.keys.topic, &self.keys.server] {
            let consumers: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(key)
                .arg(GROUP)
                .query_async(conn)
                .await
                .map_err(|e| redis_error("XINFO CONSUMERS", e))?;
            for consumer in consumers.consumers {
                if consumer.name != self.keys.instance
                    && consumer.pending == 0
                    && consumer.idle as u128 > limit
                {
                    redis::Script::new(DROP_IDLE_CONSUMER)
                        .key(key)
                        .arg(GROUP)
                        .arg(&consumer.name)
                        .invoke_async::<i64>(conn)
                        .await
                        .map_err(|e| redis_error("removing an idle consumer", e))?;
                }
            }
        }
        Ok(())
    }

    /// Whether the server or watcher `name` has refreshed its alive key lately.
    async fn is_alive(&self, conn: &mut ConnectionManager, name: &str) -> Result<bool> {
        redis::cmd("EXISTS")
            .arg(self.shared.config.alive_key(name))
            .query_async(conn)
            .await
            .map_err(|e| redis_error("EXISTS", e))
    }

    /// Removes the keep-groups of watchers whose alive key has expired: they died
    /// without removing them, and each makes servers keep settled entries.
    async fn prune_watchers(&self, conn: &mut ConnectionManager) -> Result<()> {
        for key in [&self.keys.topic, &self.keys.server] {
            let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(key)
                .query_async(conn)
                .await
                .map_err(|e| redis_error("XINFO GROUPS", e))?;
            for group in groups.groups {
                if !group.name.starts_with(WATCHER_GROUP_PREFIX) {
                    continue;
                }
                if !self.is_alive(conn, &group.name).await? {
                    tracing::info!(group = %group.name, stream = %key,
                        "removing the keep-group of a watcher that is gone");
                    redis::cmd("XGROUP")
                        .arg("DESTROY")
                        .arg(key)
                        .arg(&group.name)
                        .query_async::<()>(conn)
                        .await
                        .map_err(|e| redis_error("removing a watcher's group", e))?;
                }
            }
        }
        Ok(())
    }
}

/// Settles one stream entry.
struct RedisAcker {
    conn: ConnectionManager,
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
                .key(&self.key)
                .arg(&self.group)
                .arg(&self.id)
                .invoke_async::<i64>(&mut self.conn)
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

/// A client's reply stream.
pub(crate) struct ReplyConsumer {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    key: String,
}

/// Creates an empty stream (a group created with `MKSTREAM`, then destroyed) with a TTL.
async fn create_reply_stream(conn: &mut ConnectionManager, key: &str, ttl: Duration) -> Result<()> {
    redis::pipe()
        .atomic()
        .cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg("init")
        .arg("$")
        .arg("MKSTREAM")
        .ignore()
        .cmd("XGROUP")
        .arg("DESTROY")
        .arg(key)
        .arg("init")
        .ignore()
        .cmd("EXPIRE")
        .arg(key)
        .arg(ttl.as_secs().max(1))
        .ignore()
        .query_async::<()>(conn)
        .await
        .map_err(|e| redis_error("creating the reply stream", e))
}

impl ReplyConsumer {
    pub(crate) async fn start(shared: Arc<Shared>) -> Result<(String, Self)> {
        let key = format!(
            "{}{}",
            shared.config.reply_prefix(),
            rpc_core::wire::new_id()
        );
        let mut conn = shared.commands.clone();
        create_reply_stream(&mut conn, &key, shared.config.reply_ttl).await?;
        let block = shared.config.block.min(shared.config.reply_ttl / 3);
        let reader = connection_manager(
            &shared.client,
            &shared.config,
            block + Duration::from_secs(5),
        )
        .await?;
        let (tx, rx) = mpsc::channel(1024);
        let stop = CancellationToken::new();
        let task = tokio::spawn(read_replies(
            shared.clone(),
            reader,
            key.clone(),
            block,
            tx,
            stop.clone(),
        ));
        Ok((
            key.clone(),
            ReplyConsumer {
                rx,
                stop,
                task: Some(task),
                shared,
                key,
            },
        ))
    }
}

/// What one grouped-less read of some streams came to.
enum ReadOutcome {
    /// This many entries (maybe none) were handed over; read again.
    Read(usize),
    /// The consumer is stopping or gone.
    Stopped,
    /// Redis failed the read.
    Failed(redis::RedisError),
}

/// How many entries `XREAD` takes at once.
const READ_COUNT: usize = 256;

/// One blocking `XREAD` of `keys` after `ids`, handing every entry over as a
/// delivery with nothing to settle and advancing `ids`. With `trim`, the entries
/// before `ids` are deleted first (`XTRIM ... MINID`, in the same round trip): the
/// reader is their only reader and has them.
async fn read_after(
    reader: &mut ConnectionManager,
    keys: &[String],
    ids: &mut [String],
    block: Duration,
    trim: bool,
    tx: &mpsc::Sender<Result<Delivery>>,
    stop: &CancellationToken,
) -> ReadOutcome {
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
        .arg(&*ids);
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

async fn read_replies(
    shared: Arc<Shared>,
    mut reader: ConnectionManager,
    key: String,
    block: Duration,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
) {
    let ttl = shared.config.reply_ttl;
    let keys = [key.clone()];
    let mut last_id = ["0-0".to_owned()];
    // Entries read since the stream was last trimmed, and whether Redis lets us trim.
    let mut read_since_trim = 0usize;
    let mut trimming = true;
    let mut last_refresh = tokio::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        if last_refresh.elapsed() >= ttl / 3 {
            let mut conn = shared.commands.clone();
            let refreshed: redis::RedisResult<i64> = redis::cmd("EXPIRE")
                .arg(&key)
                .arg(ttl.as_secs().max(1))
                .query_async(&mut conn)
                .await;
            match refreshed {
                Ok(1) => last_refresh = tokio::time::Instant::now(),
                Ok(_) => {
                    // The stream is gone (a Redis restart): make it again.
                    tracing::warn!(stream = %key, "reply stream vanished; creating it again");
                    last_id = ["0-0".to_owned()];
                    read_since_trim = 0;
                    if create_reply_stream(&mut conn, &key, ttl).await.is_ok() {
                        last_refresh = tokio::time::Instant::now();
                    }
                }
                Err(err) => tracing::debug!(error = %err, "refreshing the reply stream TTL failed"),
            }
        }
        // Replies read are deleted once a batch's worth has gathered: the stream then
        // holds what is unread, however many calls are in flight (a cap on its length
        // would drop unread replies in a burst).
        let trim = trimming && read_since_trim >= READ_COUNT;
        match read_after(&mut reader, &keys, &mut last_id, block, trim, &tx, &stop).await {
            ReadOutcome::Read(count) => {
                attempt = 0;
                read_since_trim = if trim { count } else { read_since_trim + count };
            }
            ReadOutcome::Stopped => return,
            // Redis answered, but refused something: the trim fails the whole pipeline
            // (an ACL without XTRIM, a server without MINID), and retrying it would stop
            // the replies for good. Read without it; the reply cap bounds the stream.
            ReadOutcome::Failed(err) if trim && !is_connection_error(&err) => {
                trimming = false;
                tracing::warn!(error = %err, stream = %key,
                    "trimming the reply stream failed; read replies are no longer deleted");
            }
            ReadOutcome::Failed(err) => {
                let wait = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %err, ?wait, "reading replies failed; retrying");
                // A lost connection may mean a restarted Redis: check the stream at once.
                last_refresh = tokio::time::Instant::now()
                    .checked_sub(ttl)
                    .unwrap_or_else(tokio::time::Instant::now);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

async fn delete_reply_stream(shared: &Shared, key: &str) {
    let mut conn = shared.commands.clone();
    let deleted: redis::RedisResult<()> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
    if let Err(err) = deleted {
        tracing::debug!(error = %err, stream = key, "could not delete the reply stream; it expires");
    }
}

#[async_trait]
impl Consumer for ReplyConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.stop.cancel();
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.stop.cancel();
        self.rx.close();
        if let Some(task) = self.task.take() {
            let _ = task.await;
            delete_reply_stream(&self.shared, &self.key).await;
        }
        Ok(())
    }
}

impl Drop for ReplyConsumer {
    fn drop(&mut self) {
        self.stop.cancel();
        if self.task.take().is_none() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            let key = self.key.clone();
            runtime.spawn(async move { delete_reply_stream(&shared, &key).await });
        }
    }
}

/// How the name of a watcher's keep-group starts.
const WATCHER_GROUP_PREFIX: &str = "monitor:";

/// A watcher of a topic: reads the topic, server and fanout streams without a group,
/// from their ends at the time it starts, so servers still get every entry.
pub(crate) struct MonitorConsumer {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: CancellationToken,
    shared: Arc<Shared>,
    /// Streams where this watcher registered a group so servers keep settled entries.
    kept: Vec<String>,
    group: String,
}

impl MonitorConsumer {
    pub(crate) async fn start(shared: Arc<Shared>, target: &Target) -> Result<Self> {
        let config = &shared.config;
        let exchange = target.exchange_or(&config.exchange);
        let mut conn = shared.commands.clone();
        let mut keys = vec![
            config.topic_key(exchange, &target.topic),
            config.fanout_key(exchange, &target.topic),
        ];
        let pattern = config.server_key(exchange, &target.topic, "*");
        let servers: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("listing server streams", e))?;
        keys.extend(servers);
        // A group on the topic and server streams tells servers to keep settled entries
        // (they delete them only when their group is the stream's only one).
        let group = format!("{WATCHER_GROUP_PREFIX}{}", rpc_core::wire::new_id());
        let kept: Vec<String> = keys
            .iter()
            .filter(|k| !k.ends_with(":fanout"))
            .cloned()
            .collect();
        for key in &kept {
            // MKSTREAM may create the stream: it expires like any other.
            create_group(&mut conn, key, &group, "$", config.stream_ttl).await?;
        }
        let mut ids = Vec::with_capacity(keys.len());
        for key in &keys {
            let last: Vec<StreamId> = redis::cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async::<redis::streams::StreamRangeReply>(&mut conn)
                .await
                .map(|reply| reply.ids)
                .map_err(|e| redis_error("reading a stream's end", e))?;
            ids.push(
                last.first()
                    .map_or_else(|| "0-0".to_owned(), |entry| entry.id.clone()),
            );
        }
        let block = config.block;
        let reader = connection_manager(
            &shared.client,
            &shared.config,
            block + Duration::from_secs(5),
        )
        .await?;
        let (tx, rx) = mpsc::channel(1024);
        let stop = CancellationToken::new();
        // Says the keep-groups are wanted: servers remove those of a watcher whose
        // key has expired (it died without removing them).
        let alive = config.alive_key(&group);
        mark_alive(&mut conn, &alive, config.prune_idle)
            .await
            .map_err(|e| redis_error("marking the watcher alive", e))?;
        tokio::spawn(keep_watcher_alive(
            shared.commands.clone(),
            alive,
            config.prune_idle,
            stop.clone(),
        ));
        let kept_slots = keys
            .iter()
            .enumerate()
            .filter(|(_, key)| kept.contains(key))
            .map(|(slot, _)| slot)
            .collect();
        tokio::spawn(
            Watch {
                reader,
                commands: shared.commands.clone(),
                advanced: ids.clone(),
                keys,
                ids,
                kept: kept_slots,
                group: group.clone(),
                block,
                stream_ttl: config.stream_ttl,
                tx,
                stop: stop.clone(),
            }
            .run(),
        );
        Ok(MonitorConsumer {
            rx,
            stop,
            shared,
            kept,
            group,
        })
    }
}

/// Sets a server's or watcher's alive key, which expires after `ttl` unless set again.
async fn mark_alive(
    conn: &mut ConnectionManager,
    key: &str,
    ttl: Duration,
) -> redis::RedisResult<()> {
    redis::cmd("SET")
        .arg(key)
        .arg(1)
        .arg("PX")
        .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
        .query_async::<()>(conn)
        .await
}

/// Refreshes a watcher's alive key three times per `ttl` until the watcher stops.
async fn keep_watcher_alive(
    mut conn: ConnectionManager,
    key: String,
    ttl: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(err) = mark_alive(&mut conn, &key, ttl).await {
            tracing::debug!(error = %err, "refreshing the watcher's alive key failed");
        }
    }
}

/// A watcher's reading task.
struct Watch {
    reader: ConnectionManager,
    commands: ConnectionManager,
    /// The streams read, and the last id read in each.
    keys: Vec<String>,
    ids: Vec<String>,
    /// Where the keep-group stands on each stream (as `ids`).
    advanced: Vec<String>,
    /// The streams (slots of `keys`) where the watcher has its keep-group.
    kept: Vec<usize>,
    group: String,
    block: Duration,
    stream_ttl: Duration,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
}

impl Watch {
    async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            // Others read these streams too: a watcher never trims them.
            match read_after(
                &mut self.reader,
                &self.keys,
                &mut self.ids,
                self.block,
                false,
                &self.tx,
                &self.stop,
            )
            .await
            {
                ReadOutcome::Read(count) => {
                    attempt = 0;
                    if count > 0 {
                        self.advance().await;
                    }
                }
                ReadOutcome::Stopped => return,
                ReadOutcome::Failed(err) => {
                    let wait = backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %err, ?wait, "watching the topic failed; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Moves the keep-group to what the watcher has read (`XGROUP SETID`), so that
    /// servers may delete what comes before (see `TRIM_SETTLED`) while the watcher
    /// is still there. A group servers removed meanwhile (this watcher was cut off
    /// longer than `prune_idle`) is made again where the watcher stands.
    async fn advance(&mut self) {
        for &slot in &self.kept {
            let (key, id) = (&self.keys[slot], &self.ids[slot]);
            if *id == self.advanced[slot] {
                continue;
            }
            let moved: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("SETID")
                .arg(key)
                .arg(&self.group)
                .arg(id)
                .query_async(&mut self.commands)
                .await;
            let moved = match moved {
                // A stopping watcher removes its groups: not made again then (one made
                // in a race with the stop is pruned, its alive key being gone).
                Err(err) if is_missing_group(&err) && !self.stop.is_cancelled() => {
                    create_group(&mut self.commands, key, &self.group, id, self.stream_ttl).await
                }
                other => other.map_err(|e| redis_error("XGROUP SETID", e)),
            };
            match moved {
                Ok(()) => self.advanced[slot].clone_from(id),
                Err(err) => tracing::debug!(error = %err, stream = %key,
                    "could not move the watcher's group; servers keep its entries longer"),
            }
        }
    }
}

#[async_trait]
impl Consumer for MonitorConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.stop.cancel();
        self.rx.close();
        let kept = std::mem::take(&mut self.kept);
        let alive = self.shared.config.alive_key(&self.group);
        drop_watch_groups(
            self.shared.commands.clone(),
            kept,
            self.group.clone(),
            alive,
        )
        .await;
        Ok(())
    }
}

/// Removes a watcher's keep-groups, so servers delete settled entries again, and
/// its alive key.
async fn drop_watch_groups(
    mut conn: ConnectionManager,
    kept: Vec<String>,
    group: String,
    alive: String,
) {
    if let Err(err) = redis::cmd("DEL")
        .arg(&alive)
        .query_async::<()>(&mut conn)
        .await
    {
        tracing::debug!(error = %err, "could not remove the watcher's alive key");
    }
    for key in kept {
        let destroyed: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(&key)
            .arg(&group)
            .query_async(&mut conn)
            .await;
        if let Err(err) = destroyed {
            tracing::debug!(error = %err, "could not remove the watcher's group");
        }
    }
}

impl Drop for MonitorConsumer {
    fn drop(&mut self) {
        self.stop.cancel();
        let kept = std::mem::take(&mut self.kept);
        if kept.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drop_watch_groups(
                self.shared.commands.clone(),
                kept,
                self.group.clone(),
                self.shared.config.alive_key(&self.group),
            ));
        }
    }
}
