//! A watcher of a topic (`Transport::monitor`): plain subscriptions beside the
//! servers' queue groups, so it sees every message without taking any from them.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use rpc_core::transport::Merged;
use rpc_core::{Consumer, Delivery, NoAck, Result, Target};

use crate::config::NatsConfig;
use crate::{Deliveries, Shared, nats_error};

fn plain(subscriber: async_nats::Subscriber) -> Deliveries {
    subscriber
        .map(|message| Ok(Delivery::new(message.payload, Box::new(NoAck))))
        .boxed()
}

/// A watcher of a topic: plain (not queue-group) subscriptions to the topic, every
/// server subject of it and its fanout, so servers still get every message.
pub(crate) struct Monitor {
    streams: Merged<Deliveries>,
}

impl Monitor {
    pub(crate) async fn start(shared: Arc<Shared>, target: &Target) -> Result<Self> {
        let config = &shared.config;
        let exchange = target.exchange_or(&config.exchange).to_owned();
        let mut streams = Merged::new();
        let mut subjects = vec![
            config.topic_subject(&exchange, &target.topic),
            format!("{}.s.*", config.topic_subject(&exchange, &target.topic)),
            config.fanout_subject(&exchange, &target.topic),
        ];
        if shared.jetstream.is_some() {
            // JetStream casts are ordinary messages on their subjects too.
            let topic = rpc_core::Address::Topic {
                exchange: exchange.clone(),
                topic: target.topic.clone(),
            };
            if let Some(js_topic) = config.jetstream_subject(&topic) {
                subjects.push(format!("{js_topic}.s.*"));
                subjects.push(js_topic);
            }
        }
        for subject in subjects {
            NatsConfig::check_subject(&subject, target)?;
            let subscriber = shared
                .client
                .subscribe(subject)
                .await
                .map_err(|e| nats_error("subscribing", e))?;
            streams.push(plain(subscriber));
        }
        crate::round_trip(&shared.client, config).await?;
        Ok(Monitor { streams })
    }
}

#[async_trait]
impl Consumer for Monitor {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.streams.next().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.streams = Merged::new();
        Ok(())
    }
}
