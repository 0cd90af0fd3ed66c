//! Publishing. Calls carry a NATS reply subject under the caller's inbox so "no
//! responders" reaches the caller at once; casts end with a round trip so `cast` returns once
//! the server has the message (or, in JetStream mode, once the stream stored it);
//! replies are published plainly.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use async_trait::async_trait;
use rpc_core::{Address, Error, Outgoing, Publisher, Result};

use crate::batch::Requests;
use crate::config::NatsConfig;
use crate::nats_error;

/// Suffix of a client's reply address under its inbox.
pub(crate) const REPLY_TOKEN: &str = "r";
/// Token under the inbox where "no responders" answers for a call arrive.
pub(crate) const NO_RESPONDERS_TOKEN: &str = "nr";

pub(crate) struct NatsPublisher {
    client: async_nats::Client,
    config: NatsConfig,
    jetstream: Option<jetstream::Context>,
    reply_prefix: String,
    /// Exchanges whose JetStream stream is known to exist.
    streams: Mutex<HashSet<String>>,
    /// The subject of the last address published to: a client mostly sends to one
    /// target, and working a subject out formats several strings.
    last_subject: Mutex<Option<(Address, async_nats::Subject)>>,
    /// The subjects of the inboxes replied to lately, checked once: a server answers
    /// the same clients again and again, and async-nats copies a subject given as a
    /// string twice per publish, where a kept `Subject` is shared.
    reply_subjects: Mutex<HashMap<String, async_nats::Subject, foldhash::fast::RandomState>>,
    /// Call requests waiting to be handed to async-nats together (see `batch.rs`).
    requests: Arc<Requests>,
}

/// How many reply subjects a publisher keeps before it starts afresh.
const REPLY_SUBJECTS: usize = 1024;

impl NatsPublisher {
    pub(crate) fn new(
        client: async_nats::Client,
        config: NatsConfig,
        jetstream: Option<jetstream::Context>,
    ) -> Self {
        NatsPublisher {
            reply_prefix: config.reply_prefix(),
            requests: Requests::new(client.clone()),
            client,
            config,
            jetstream,
            streams: Mutex::new(HashSet::new()),
            last_subject: Mutex::new(None),
            reply_subjects: Mutex::new(HashMap::default()),
        }
    }

    /// Records that the stream of `exchange` exists.
    pub(crate) fn streams_ready(&self, exchange: &str) {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(exchange.to_owned());
    }

    /// Creates the stream of `exchange` on its first cast.
    async fn ensure_stream(&self, js: &jetstream::Context, address: &Address) -> Result<()> {
        let exchange = match address {
            Address::Topic { exchange, .. } | Address::Server { exchange, .. } => exchange,
            _ => return Ok(()),
        };
        let known = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(exchange);
        if !known {
            crate::consumer::ensure_stream(js, &self.config, exchange).await?;
            self.streams_ready(exchange);
        }
        Ok(())
    }

    /// A cast in JetStream mode: published to the exchange's stream, and done once
    /// the stream stored it.
    async fn store_cast(
        &self,
        js: &jetstream::Context,
        js_subject: String,
        address: &Address,
        body: bytes::Bytes,
    ) -> Result<()> {
        NatsConfig::check_subject(&js_subject, address)?;
        self.ensure_stream(js, address).await?;
        let ack = js
            .publish(js_subject, body)
            .await
            .map_err(|e| nats_error(&format!("publishing to JetStream for {address}"), e))?;
        ack.await.map_err(|e| {
            nats_error(&format!("JetStream did not store the cast to {address}"), e)
        })?;
        Ok(())
    }

    /// A plain cast: published, and done once a round trip shows the server has it.
    async fn cast(
        &self,
        subject: async_nats::Subject,
        address: &Address,
        body: bytes::Bytes,
        limit: usize,
    ) -> Result<()> {
        let size = body.len();
        self.client
            .publish(subject, body)
            .await
            .map_err(|e| publish_error(address, e, size, limit))?;
        // When the round trip returns, the server has the cast.
        crate::round_trip(&self.client, &self.config).await
    }

    /// The subject of a reply inbox a request named, or `None` when it is not one
    /// of this transport's inboxes or cannot go into a `PUB` line.
    fn reply_subject(&self, inbox: &str) -> Option<async_nats::Subject> {
        let mut known = self
            .reply_subjects
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(subject) = known.get(inbox) {
            return Some(subject.clone());
        }
        if !inbox.starts_with(&self.reply_prefix) || !valid_inbox(inbox) {
            return None;
        }
        if known.len() >= REPLY_SUBJECTS {
            known.clear();
        }
        let subject = async_nats::Subject::from(inbox);
        known.insert(inbox.to_owned(), subject.clone());
        Some(subject)
    }

    /// The subject of a topic, server or fanout address (`None` for a reply), or an
    /// error when it is too long for NATS.
    fn subject(&self, address: &Address) -> Result<Option<async_nats::Subject>> {
        // Replies (a server's every publish) have no subject: no lock for them.
        if matches!(address, Address::Reply(_)) {
            return Ok(None);
        }
        let c = &self.config;
        let mut last = self.last_subject.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((known, subject)) = last.as_ref()
            && known == address
        {
            return Ok(Some(subject.clone()));
        }
        let subject = match address {
            Address::Topic { exchange, topic } => c.topic_subject(exchange, topic),
            Address::Server {
                exchange,
                topic,
                server,
            } => c.server_subject(exchange, topic, server),
            Address::Fanout { exchange, topic } => c.fanout_subject(exchange, topic),
            Address::Reply(_) => return Ok(None),
        };
        NatsConfig::check_subject(&subject, address)?;
        let subject = async_nats::Subject::from(subject);
        *last = Some((address.clone(), subject.clone()));
        Ok(Some(subject))
    }
}

/// Whether a reply inbox named by a request can go into a `PUB` line as it is: no
/// white space or control character (which would split or end the protocol line),
/// and not empty. async-nats does not check published subjects here (see
/// `NatsTransport`), and the inbox comes from the network.
fn valid_inbox(inbox: &str) -> bool {
    !inbox.is_empty() && crate::config::protocol_safe(inbox)
}

fn publish_error(
    address: &Address,
    err: async_nats::PublishError,
    size: usize,
    limit: usize,
) -> Error {
    if err.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded {
        return Error::MessageTooLarge { size, limit };
    }
    nats_error(&format!("publishing to {address}"), err)
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn send(&self, address: &Address, message: Outgoing) -> Result<()> {
        let limit = crate::message_limit(&self.client, &self.config);
        let size = message.body.len();
        Error::check_size(size, limit)?;
        let Some(subject) = self.subject(address)? else {
            // A reply. Requests may name any reply address; only inboxes are written.
            let Address::Reply(inbox) = address else {
                return Ok(());
            };
            let Some(inbox) = self.reply_subject(inbox) else {
                return Err(Error::Undeliverable {
                    address: address.to_string(),
                });
            };
            return self
                .client
                .publish(inbox, message.body)
                .await
                .map_err(|e| publish_error(address, e, size, limit));
        };
        if let Some(call) = &message.call {
            // The NATS reply subject exists only for "no responders"; servers answer
            // the `_reply_q` inside the message.
            let base = (call.reply_to.strip_suffix(REPLY_TOKEN))
                .and_then(|base| base.strip_suffix('.'))
                .unwrap_or(&call.reply_to);
            let no_responders = [base, NO_RESPONDERS_TOKEN, &call.msg_id].join(".");
            return self
                .requests
                .send((subject, no_responders.into(), message.body))
                .await
                .map_err(|e| publish_error(address, e, size, limit));
        }
        // The rarer paths are boxed: every send's future is moved into a box (the
        // trait is object-safe), and their state made it several times larger.
        Box::pin(self.requests.flush()).await;
        if let Some(js) = &self.jetstream
            && let Some(js_subject) = self.config.jetstream_subject(address)
        {
            return Box::pin(self.store_cast(js, js_subject, address, message.body)).await;
        }
        Box::pin(self.cast(subject, address, message.body, limit)).await
    }
}

#[cfg(test)]
mod tests {
    use super::valid_inbox;

    #[test]
    fn inboxes_with_white_space_or_control_characters_are_refused() {
        for good in ["mqrpc.%reply.0a1b.r", "p.%reply.ünï.r", "x"] {
            assert!(valid_inbox(good), "{good:?}");
        }
        for bad in [
            "",
            "mqrpc.%reply.a\r\nPUB evil 4\r\nboom",
            "mqrpc.%reply.a b",
            "mqrpc.%reply.a\tb",
            "mqrpc.%reply.a\u{7f}",
            "mqrpc.%reply.ü\u{a0}x",
            "mqrpc.%reply.ü\u{85}x",
        ] {
            assert!(!valid_inbox(bad), "{bad:?}");
        }
    }
}
