//! The NATS baseline of `mqrpc bench --raw`, with async-nats: core request/reply
//! (`Client::request` against a subscriber that publishes to the reply subject), and
//! a shape whose requests and replies are as long as mqrpc's.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use uuid::Uuid;

use super::{Keep, Padding, connecting, padded};
use crate::bench::caller::{Caller, Pair};

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

/// The NATS echo pair; with `padding`, requests and replies are as long as mqrpc's.
pub(super) async fn pair(url: &str, padding: Padding) -> Result<Pair> {
    let subject = async_nats::Subject::from(format!("raw-bench.{}", Uuid::new_v4().simple()));

    // The echo server, on its own connection.
    let server = connecting("to NATS", async_nats::connect(url))
        .await
        .context("server")?;
    let mut requests = server
        .subscribe(subject.clone())
        .await
        .with_context(|| format!("server: cannot subscribe to {subject}"))?;
    server
        .flush()
        .await
        .context("server: cannot flush the subscription")?;
    let shorter_by = padding.reply_shorter_by();
    let server_task = tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let Some(reply) = message.reply else { continue };
            let mut body = message.payload;
            body.truncate(body.len().saturating_sub(shorter_by));
            if let Err(err) = server.publish(reply, body).await {
                tracing::warn!("raw bench: NATS echo server cannot reply: {err}");
                break;
            }
        }
    });
    let keep = Keep {
        tasks: vec![server_task],
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
