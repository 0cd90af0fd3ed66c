//! The Redis commands and Lua scripts that servers, their housekeeping and watchers
//! share: creating a consumer group with its stream's TTL, alive keys, and the
//! scripts that settle, trim and prune atomically.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{FromRedisValue, ToRedisArgs};

use rpc_core::Result;

use crate::connection::Connection;
use crate::error::command_error;

/// A Lua script of one key (`KEYS[1]`). On one Redis it runs as redis-rs's
/// [`redis::Script`] does: `EVALSHA`, and on `NOSCRIPT` `SCRIPT LOAD` then
/// `EVALSHA` again. On a cluster redis-rs would send that `SCRIPT LOAD` to every
/// master, and fail while a dead one is still listed (a failover): there it runs
/// as `EVAL` with its body, which the key's master alone needs (the scripts are
/// short, and Redis caches what `EVAL` compiled).
pub(crate) struct Lua {
    body: &'static str,
    script: LazyLock<redis::Script>,
}

/// A [`Lua`] script from its body, a literal.
macro_rules! lua {
    ($body:expr) => {
        Lua {
            body: $body,
            script: LazyLock::new(|| redis::Script::new($body)),
        }
    };
}

impl Lua {
    /// Runs the script on `key` (its `KEYS[1]`) with `args` (its `ARGV`).
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        conn: &mut Connection,
        key: &str,
        args: impl ToRedisArgs,
    ) -> redis::RedisResult<T> {
        if matches!(conn, Connection::Cluster(_)) {
            return redis::cmd("EVAL")
                .arg(self.body)
                .arg(1)
                .arg(key)
                .arg(args)
                .query_async(conn)
                .await;
        }
        let mut invocation = self.script.key(key);
        invocation.arg(args);
        invocation.invoke_async(conn).await
    }
}

/// Destroys a server's fanout group, and the stream with the last group.
pub(crate) static DROP_FANOUT_GROUP: Lua = lua!(
    r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
if #redis.call('XINFO', 'GROUPS', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 1
"
);

/// Acks an entry of a topic or server stream and deletes it when the stream has no
/// group but the servers' (a watcher's group keeps entries for it to read).
pub(crate) static SETTLE_SHARED: Lua = lua!(
    r"
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if #redis.call('XINFO', 'GROUPS', KEYS[1]) == 1 then redis.call('XDEL', KEYS[1], ARGV[2]) end
return 1
"
);

/// Deletes entries read with `NOACK` once handled, unless a watcher keeps them.
pub(crate) static DELETE_SETTLED: Lua = lua!(
    r"
if #redis.call('XINFO', 'GROUPS', KEYS[1]) == 1 then return redis.call('XDEL', KEYS[1], unpack(ARGV)) end
return 0
"
);

/// Deletes the entries of a stream that every group has read and settled: those
/// before both the next entry any group has yet to read and the oldest entry any
/// group still has pending (`XTRIM ... MINID`). Settles that were lost (a cut
/// connection) and entries a watcher's group kept while it was there end so.
/// Returns how many entries went.
pub(crate) static TRIM_SETTLED: Lua = lua!(
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
"
);

/// Removes a consumer from a group unless it still has pending entries.
pub(crate) static DROP_IDLE_CONSUMER: Lua = lua!(
    r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending == 0 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return #pending
"
);

/// Creates a group (and its stream, with `MKSTREAM`) and gives the stream a TTL if
/// it has none, in one script: a server that dies between the two steps must not
/// leave a stream without a TTL. A group that exists already is accepted.
static CREATE_GROUP: Lua = lua!(
    r"
local created = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
if type(created) == 'table' and created.err and not string.find(created.err, '^BUSYGROUP') then
  return created
end
redis.call('EXPIRE', KEYS[1], ARGV[3], 'NX')
return 1
"
);

/// Creates `group` on `key` from `start`, accepting one that exists already; a
/// stream this makes expires after `ttl` (an existing TTL is left alone).
pub(crate) async fn create_group(
    conn: &mut Connection,
    key: &str,
    group: &str,
    start: &str,
    ttl: Duration,
) -> Result<()> {
    CREATE_GROUP
        .run::<i64>(conn, key, (group, start, ttl.as_secs().max(1)))
        .await
        .map(drop)
        .map_err(|err| command_error(conn, &format!("creating group {group} on {key}"), err))
}

/// Sets a server's or watcher's alive key, which expires after `ttl` unless set again.
pub(crate) async fn mark_alive(
    conn: &mut Connection,
    key: &str,
    ttl: Duration,
) -> redis::RedisResult<()> {
    mark_alive_cmd(key, ttl).query_async::<()>(conn).await
}

/// The command [`mark_alive`] runs.
pub(crate) fn mark_alive_cmd(key: &str, ttl: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key)
        .arg(1)
        .arg("PX")
        .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    cmd
}

/// Adds a notification to its stream (`KEYS[1]`), making the stream first when it
/// does not exist: with the default group (`ARGV[1]`) at `0`, so that it keeps
/// every notification from this first one on, and a TTL of `ARGV[2]` seconds. Then
/// `XADD ... MAXLEN ~ ARGV[3]` of the body `ARGV[4]`. One script: a notifier that
/// dies between the steps must leave neither a stream without its default group
/// nor one without a TTL.
pub(crate) static NOTIFY_CREATE: Lua = lua!(
    r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'b', ARGV[4])
"
);

/// Declares a notification listener's group on its stream (`KEYS[1]`): the default
/// group (`ARGV[1]`) at `0` with the stream (`MKSTREAM`), as a notifier would make
/// them, then the listener's own group (`ARGV[2]`, a pool's; the default group
/// itself otherwise) at `ARGV[3]`; groups that exist are kept where they are. The
/// stream's TTL is set to `ARGV[4]` seconds: a listener keeps it alive.
pub(crate) static DECLARE_NOTIFY: Lua = lua!(
    r"
local function create(group, start)
  local created = redis.pcall('XGROUP', 'CREATE', KEYS[1], group, start, 'MKSTREAM')
  if type(created) == 'table' and created.err and not string.find(created.err, '^BUSYGROUP') then
    return created
  end
  return nil
end
local failed = create(ARGV[1], '0')
if failed then return failed end
if ARGV[2] ~= ARGV[1] then
  failed = create(ARGV[2], ARGV[3])
  if failed then return failed end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"
);
