//! A client's reply stream: made with a TTL the client keeps refreshing, read with a
//! blocking `XREAD`, trimmed of what was read, made again when Redis lost it, and
//! deleted when the client closes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rpc_core::{Consumer, Delivery, Result};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::connection::Connection;
use crate::entry::{READ_COUNT, ReadOutcome, read_after};
use crate::error::{command_error, is_connection_error};
use crate::{BACKOFF, Shared, blocking_connection};

/// A client's reply stream.
pub(crate) struct ReplyConsumer {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    key: String,
}

/// Creates an empty stream (a group created with `MKSTREAM`, then destroyed) with a TTL.
async fn create_reply_stream(conn: &mut Connection, key: &str, ttl: Duration) -> Result<()> {
    create_reply_stream_pipe(key, ttl)
        .query_async::<()>(conn)
        .await
        .map_err(|e| command_error(conn, "creating the reply stream", e))
}

/// The transaction [`create_reply_stream`] runs, on `key` alone.
pub(crate) fn create_reply_stream_pipe(key: &str, ttl: Duration) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic()
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
        .ignore();
    pipe
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
        let reader = blocking_connection(&shared.client, &shared.config, block).await?;
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

async fn read_replies(
    shared: Arc<Shared>,
    mut reader: Connection,
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
                let wait = BACKOFF.delay(attempt);
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
