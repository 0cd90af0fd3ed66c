//! The NATS baseline of `mqrpc bench --raw`, with async-nats: core request/reply
//! (`Client::request` against a subscriber that publishes to the reply subject), and
//! a shape whose requests and replies are as long as mqrpc's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use uuid::Uuid;

use tokio::task::JoinHandle;

use super::{EchoServers, Keep, Padding, connecting, padded};
use crate::bench::caller::{Caller, Pair};

/// An echo server on a connection of its own: a subscriber of `subject`, or with
/// `handled` (where it counts its requests) one of the queue group `echo`.
async fn echo_server(
    url: &str,
    subject: &async_nats::Subject,
    shorter_by: usize,
    handled: Option<Arc<AtomicU64>>,
) -> Result<JoinHandle<()>> {
    let server = connecting("to NATS", async_nats::connect(url))
        .await
        .context("server")?;
    let subscribed = match handled {
        None => server.subscribe(subject.clone()).await,
        Some(_) => server.queue_subscribe(subject.clone(), "echo".into()).await,
    };
    let mut requests =
        subscribed.with_context(|| format!("server: cannot subscribe to {subject}"))?;
    server
        .flush()
        .await
        .context("server: cannot flush the subscription")?;
    Ok(tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let Some(reply) = message.reply else { continue };
            if let Some(handled) = &handled {
                handled.fetch_add(1, Ordering::Relaxed);
            }
            let mut body = message.payload;
            body.truncate(body.len().saturating_sub(shorter_by));
            if let Err(err) = server.publish(reply, body).await {
                tracing::warn!("raw bench: NATS echo server cannot reply: {err}");
                break;
            }
        }
    }))
}

/// Core NATS request/reply: `Client::request` on the echo server's subject.
struct NatsCaller {
    client: async_nats::Client,
    subject: async_nats::Subject,
    /// Bytes added to each payload, and taken off each reply.
    padding: Padding,
}

#[async_trait]
impl Caller for NatsCaller {
    async fn call(&self, payload: Bytes) -> Result<Bytes> {
        let size = payload.len();
        let mut reply = self
            .client
            .request(self.subject.clone(), padded(payload, self.padding.request))
            .await
            .context("NATS request failed")?
            .payload;
        reply.truncate(size);
        Ok(reply)
    }
}

/// The NATS echo pair; with `padding`, requests and replies are as long as mqrpc's;
/// competing echo servers are subscribers of one queue group.
pub(super) async fn pair(url: &str, padding: Padding, servers: &EchoServers<'_>) -> Result<Pair> {
    let subject = async_nats::Subject::from(format!("raw-bench.{}", Uuid::new_v4().simple()));
    let shorter_by = padding.reply_shorter_by();
    let tasks = match servers {
        EchoServers::One => vec![echo_server(url, &subject, shorter_by, None).await?],
        EchoServers::Competing(handled) => {
            let mut tasks = Vec::with_capacity(handled.len());
            for handled in *handled {
                let counted = Some(handled.clone());
                tasks.push(echo_server(url, &subject, shorter_by, counted).await?);
            }
            tasks
        }
    };
    let keep = Keep {
        tasks,
        redis_keys: None,
    };

    // The client, on another connection.
    let client = connecting("to NATS", async_nats::connect(url))
        .await
        .context("client")?;
    Ok(Pair {
        caller: Arc::new(NatsCaller {
            client,
            subject,
            padding,
        }),
        _keep: Box::new(keep),
    })
}
