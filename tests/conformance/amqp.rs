//! The conformance suite on RabbitMQ. `MQRPC_AMQP_URL` names the broker (default
//! `amqp://guest:guest@127.0.0.1:5672/?topic_ttl=300`); every transport is a connection of its own.

use crate::suite::{Backend, broker_unavailable};

fn url() -> String {
    std::env::var("MQRPC_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".to_owned())
}

pub async fn backend() -> Option<Backend> {
    let url = url();
    if let Err(err) = mqrpc::connect(&url).await {
        return broker_unavailable("amqp", &err);
    }
    Some(Backend::new("amqp", move || {
        let url = url.clone();
        async move {
            mqrpc::connect(&url)
                .await
                .expect("RabbitMQ answered a moment ago")
        }
    }))
}

conformance_suite!(backend);
