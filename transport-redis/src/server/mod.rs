//! A server's consumer. It reads its topic and server streams through the shared
//! group `servers`, and the fanout stream through a group of its own (`reader.rs`),
//! each with a blocking `XREADGROUP` on a connection of its own, taking only as many
//! entries as its byte budget has room for (`pace.rs`); `housekeeping.rs` takes over
//! what dead consumers left and cleans up after them; `settle.rs` acks.

mod housekeeping;
mod pace;
mod reader;
mod settle;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use async_trait::async_trait;
use rpc_core::{Consumer, Delivery, ListenOptions, Result, Target};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::commands::{DROP_FANOUT_GROUP, DROP_IDLE_CONSUMER, create_group, mark_alive};
use crate::connection::Connection;
use crate::error::redis_error;
use crate::{Shared, blocking_connection};
use housekeeping::Housekeeping;
use reader::{ClientId, Reader};
use settle::{InFlight, Settle, delete_settled};

/// The consumer group all servers of a topic share.
const GROUP: &str = "servers";
/// Most entries taken in one read, and the most deliveries buffered for a server:
/// a server's default concurrency, so one read can fill every free handler.
const MAX_BATCH: usize = 64;

/// The keys of one server instance.
#[derive(Debug, Clone)]
struct ServerKeys {
    topic: String,
    server: String,
    fanout: String,
    /// This instance's consumer name, and the name of its fanout group.
    instance: String,
}

impl ServerKeys {
    /// Creates the groups (the shared one from the start of the streams, so messages
    /// sent before any server listened are handled; the fanout one at `$`) and sets
    /// the streams' TTLs.
    async fn declare(&self, conn: &mut Connection, ttl: Duration) -> Result<()> {
        create_group(conn, &self.topic, GROUP, "0", ttl).await?;
        create_group(conn, &self.server, GROUP, "0", ttl).await?;
        create_group(conn, &self.fanout, &self.instance, "$", ttl).await?;
        self.refresh(conn, ttl).await
    }

    /// Sets the streams' TTLs again, as a live server does while it listens.
    async fn refresh(&self, conn: &mut Connection, ttl: Duration) -> Result<()> {
        self.refresh_pipe(ttl)
            .query_async::<()>(conn)
            .await
            .map_err(|e| redis_error("refreshing stream TTLs", e))
    }

    /// The pipeline [`ServerKeys::refresh`] runs: one `EXPIRE` per stream (one slot).
    fn refresh_pipe(&self, ttl: Duration) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for key in [&self.topic, &self.server, &self.fanout] {
            pipe.cmd("EXPIRE")
                .arg(key)
                .arg(ttl.as_secs().max(1))
                .ignore();
        }
        pipe
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
        let shared_reader = blocking_connection(&shared.client, config, config.block).await?;
        let fanout_reader = blocking_connection(&shared.client, config, config.block).await?;
        let (tx, rx) = mpsc::channel(prefetch.clamp(1, MAX_BATCH));
        let stop = CancellationToken::new();
        let in_flight: InFlight = Arc::default();
        // The largest entry the shared group's reader read lately, for claims.
        let largest = Arc::new(AtomicUsize::new(0));
        // The most entries one read of the shared group takes: this server's share of
        // a batch among the group's consumers, kept by housekeeping.
        let share = Arc::new(AtomicUsize::new(MAX_BATCH));
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
            share: (group == GROUP).then(|| share.clone()),
            connection: options.status.connection(),
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
                    share,
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
    DROP_FANOUT_GROUP
        .run::<i64>(&mut conn, &keys.fanout, &keys.instance)
        .await
        .map_err(|e| redis_error("leaving the fanout", e))?;
    for key in [&keys.topic, &keys.server] {
        DROP_IDLE_CONSUMER
            .run::<i64>(&mut conn, key, (GROUP, &keys.instance))
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

/// On a Redis Cluster a pipeline (or transaction) must keep to one slot: Redis
/// refuses one that does not (`CROSSSLOT`), and the fault tests cannot see it (a
/// server only logs it). These build every pipeline the crate sends, as the code
/// does, and check that its keys hash to one slot.
#[cfg(test)]
mod one_slot {
    use std::time::Duration;

    use redis::cluster_routing::Slot;

    use super::{ServerKeys, housekeeping::claim_held};
    use crate::config::RedisConfig;

    /// The keys of `cmd`, for the commands the crate pipelines.
    fn keys(cmd: &redis::Cmd) -> Vec<Vec<u8>> {
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let name = String::from_utf8_lossy(&args[0]).to_uppercase();
        match name.as_str() {
            "XREAD" | "XREADGROUP" => {
                let streams = args
                    .iter()
                    .position(|a| a.eq_ignore_ascii_case(b"STREAMS"))
                    .expect("STREAMS");
                let rest = &args[streams + 1..];
                rest[..rest.len() / 2].to_vec()
            }
            "XGROUP" => vec![args[2].clone()],
            "XCLAIM" | "XTRIM" | "EXPIRE" | "SET" | "XADD" => vec![args[1].clone()],
            other => panic!("keys of {other} unknown to this test"),
        }
    }

    /// Panics unless every key of `pipe` hashes to one slot; returns how many keys.
    fn assert_one_slot(what: &str, pipe: &redis::Pipeline) -> usize {
        let keys: Vec<Vec<u8>> = pipe.cmd_iter().flat_map(keys).collect();
        let slots: Vec<Slot> = keys.iter().map(Slot::for_key).collect();
        assert!(
            slots.windows(2).all(|w| w[0] == w[1]),
            "{what}: keys in several slots: {:?}",
            keys.iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect::<Vec<_>>()
        );
        keys.len()
    }

    #[test]
    fn every_pipeline_keeps_to_one_slot() {
        let config = RedisConfig::parse("redis://127.0.0.1:17000/?cluster=true").expect("URL");
        let ttl = Duration::from_secs(60);
        for (exchange, topic, server) in [
            ("openstack", "compute", "host-1"),
            ("a{b}", "t:{x}", "s}{"),
            ("", "", ""),
        ] {
            let keys = ServerKeys {
                topic: config.topic_key(exchange, topic),
                server: config.server_key(exchange, topic, server),
                fanout: config.fanout_key(exchange, topic),
                instance: format!("{server}:0123456789ab"),
            };
            assert_eq!(assert_one_slot("refresh", &keys.refresh_pipe(ttl)), 3);
            let held = vec![
                (keys.topic.clone(), "1-0".to_owned()),
                (keys.server.clone(), "2-0".to_owned()),
            ];
            assert_eq!(assert_one_slot("keep_alive", &claim_held(&keys, &held)), 2);
            let streams = [keys.topic.clone(), keys.server.clone(), keys.fanout.clone()];
            let ids = ["0-0".to_owned(), "0-0".to_owned(), "0-0".to_owned()];
            let read = crate::entry::read_after_pipe(&streams, &ids, ttl, true);
            assert_eq!(assert_one_slot("read_after", &read), 6);
            for key in &streams {
                let mut xadd = redis::cmd("XADD");
                xadd.arg(key).arg("*").arg("b").arg("x");
                let create = crate::publisher::create_stream_pipe(xadd, key, ttl);
                assert_eq!(assert_one_slot("publish (create)", &create), 2);
            }
        }
        let reply = format!("{}abc", config.reply_prefix());
        let pipe = crate::replies::create_reply_stream_pipe(&reply, ttl);
        assert_eq!(assert_one_slot("create_reply_stream", &pipe), 3);
        let read = crate::entry::read_after_pipe(&[reply], &["0-0".to_owned()], ttl, true);
        assert_eq!(assert_one_slot("read_after (reply)", &read), 2);
    }
}
