//! A client's reply inbox: one wildcard subscription under which every reply to the
//! client arrives, and where nats-server's "no responders" answers to its calls come.

use async_trait::async_trait;
use futures::StreamExt;
use rpc_core::transport::ReplyEvent;
use rpc_core::{Delivery, NoAck, Result};
use std::sync::Arc;

use crate::publisher::{NO_RESPONDERS_TOKEN, REPLY_TOKEN};
use crate::{Shared, nats_error};

/// A client's inbox: one wildcard subscription for every reply.
pub(crate) struct ReplyConsumer {
    subscriber: async_nats::Subscriber,
    no_responders_prefix: String,
}

impl ReplyConsumer {
    pub(crate) async fn start(shared: Arc<Shared>) -> Result<(String, Self)> {
        let base = format!(
            "{}{}",
            shared.config.reply_prefix(),
            rpc_core::wire::new_id()
        );
        let subscriber = shared
            .client
            .subscribe(format!("{base}.>"))
            .await
            .map_err(|e| nats_error("subscribing to the inbox", e))?;
        crate::round_trip(&shared.client, &shared.config).await?;
        Ok((
            format!("{base}.{REPLY_TOKEN}"),
            ReplyConsumer {
                subscriber,
                no_responders_prefix: format!("{base}.{NO_RESPONDERS_TOKEN}."),
            },
        ))
    }
}

#[async_trait]
impl rpc_core::ReplyConsumer for ReplyConsumer {
    async fn recv(&mut self) -> Option<Result<ReplyEvent>> {
        let message = self.subscriber.next().await?;
        let no_responders = message.status == Some(async_nats::StatusCode::NO_RESPONDERS);
        if let Some(msg_id) = message
            .subject
            .as_str()
            .strip_prefix(&self.no_responders_prefix)
            .filter(|_| no_responders)
        {
            // The server's answer to a call nobody listened for.
            let msg_id = msg_id.to_owned();
            return Some(Ok(ReplyEvent::NoResponders { msg_id }));
        }
        let reply = Delivery::new(message.payload, Box::new(NoAck));
        Some(Ok(ReplyEvent::Reply(reply)))
    }
}
