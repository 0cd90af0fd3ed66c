//! oslo.messaging's RabbitMQ topology: the names and flags of exchanges, queues and
//! bindings, and the declarations that create them (idempotent, repeated after every
//! reconnection).
//!
//! | entity | name | kind / binding |
//! |---|---|---|
//! | control exchange | `openstack` (or the URL's `exchange`) | topic |
//! | topic queue | `<topic>` | bound with key `<topic>` |
//! | server queue | `<topic>.<server>` | bound with key `<topic>.<server>` |
//! | fanout exchange | `<topic>_fanout` | fanout, auto-delete (durable with `transient_quorum`) |
//! | fanout queue | `<topic>_fanout_<uuid>` | one per server, `x-expires` |
//! | reply queue | `reply_<uuid>` | reached through the default exchange, `x-expires` |
//! | notification queue | `<topic>.<priority>` | bound with key `<topic>.<priority>`; declared by notifiers too |
//! | pool queue | `<pool>` | bound with key `<topic>.<priority>` of each of its listeners' routes |
//!
//! Topic, server and notification queues are quorum queues with `quorum`, fanout and
//! reply queues with `transient_quorum` (both durable, as quorum queues must be).
//! Notification queues never get an `x-expires` (as in oslo): they keep what is sent
//! until a listener takes it.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use rpc_core::{Error, Result};

use crate::config::AmqpConfig;
use crate::error::lapin_error;

/// An AMQP short string (at most 255 bytes), or a clear error naming what was too long.
pub(crate) fn short(text: &str) -> Result<ShortString> {
    ShortString::try_new(text).map_err(|_| {
        Error::InvalidTarget(format!(
            "AMQP names are at most 255 bytes; {} bytes given (starting {:?})",
            text.len(),
            text.chars().take(40).collect::<String>()
        ))
    })
}

pub(crate) fn server_queue(topic: &str, server: &str) -> String {
    format!("{topic}.{server}")
}

pub(crate) fn fanout_exchange(topic: &str) -> String {
    format!("{topic}_fanout")
}

pub(crate) fn fanout_queue(topic: &str) -> String {
    format!("{topic}_fanout_{}", rpc_core::wire::new_id())
}

pub(crate) fn reply_queue() -> String {
    format!("reply_{}", rpc_core::wire::new_id())
}

/// Declares the control (topic) exchange.
pub(crate) async fn declare_topic_exchange(
    channel: &Channel,
    config: &AmqpConfig,
    exchange: &str,
) -> Result<()> {
    channel
        .exchange_declare(
            short(exchange)?,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: config.durable_queues(),
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("declaring exchange {exchange}"), e))
}

/// Declares a topic's fanout exchange as oslo declares it: auto-delete, and durable
/// with `transient_quorum` (oslo's `rabbit_transient_quorum_queue`), so both sides
/// declare it alike (RabbitMQ refuses an inequivalent `durable` with 406
/// PRECONDITION_FAILED).
pub(crate) async fn declare_fanout_exchange(
    channel: &Channel,
    config: &AmqpConfig,
    topic: &str,
) -> Result<()> {
    let name = fanout_exchange(topic);
    channel
        .exchange_declare(
            short(&name)?,
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                durable: config.transient_quorum,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("declaring exchange {name}"), e))
}

/// Declares a queue (`<topic>` or `<topic>.<server>`) bound to the exchange with its own
/// name as key.
pub(crate) async fn declare_shared_queue(
    channel: &Channel,
    config: &AmqpConfig,
    exchange: &str,
    name: &str,
) -> Result<()> {
    declare_notification_queue(channel, config, exchange, name, name).await
}

/// Declares a queue that outlives its consumers (a topic or server queue; a
/// notification queue: the default group's `<topic>.<priority>`, or a pool's
/// `<pool>`) as oslo.messaging declares them: durable and quorum as the
/// configuration says, and an `x-expires` only when `topic_ttl` asks for one (oslo
/// never sets it); then binds it to `exchange` with `key`.
pub(crate) async fn declare_notification_queue(
    channel: &Channel,
    config: &AmqpConfig,
    exchange: &str,
    queue: &str,
    key: &str,
) -> Result<()> {
    let mut arguments = expiry(config.topic_ttl);
    if config.quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    channel
        .queue_declare(
            short(queue)?,
            QueueDeclareOptions {
                durable: config.durable_queues(),
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(|e| lapin_error(&format!("declaring queue {queue}"), e))?;
    bind(channel, queue, exchange, key).await
}

/// Declares a transient queue (fanout or reply) with oslo's `x-expires`: classic and
/// not durable, or with `transient_quorum` a quorum queue (durable, as quorum queues
/// must be; never exclusive or auto-delete, which they refuse; `x-expires` still
/// removes it once unused).
pub(crate) async fn declare_transient_queue(
    channel: &Channel,
    config: &AmqpConfig,
    name: &str,
) -> Result<()> {
    let mut arguments = expiry(config.transient_ttl);
    if config.transient_quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    channel
        .queue_declare(
            short(name)?,
            QueueDeclareOptions {
                durable: config.transient_quorum,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(|e| lapin_error(&format!("declaring queue {name}"), e))?;
    Ok(())
}

/// Queue arguments with `x-expires` when a time-to-live is set.
fn expiry(ttl: Option<std::time::Duration>) -> FieldTable {
    let mut arguments = FieldTable::default();
    if let Some(ttl) = ttl {
        // RabbitMQ refuses an `x-expires` of 0: a sub-millisecond one is 1 ms.
        let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
    }
    arguments
}

/// Declares a queue only this connection uses, deleted with it.
pub(crate) async fn declare_private_queue(channel: &Channel, name: &str) -> Result<()> {
    channel
        .queue_declare(
            short(name)?,
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("declaring queue {name}"), e))?;
    Ok(())
}

pub(crate) async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<()> {
    channel
        .queue_bind(
            short(queue)?,
            short(exchange)?,
            short(key)?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("binding queue {queue} to {exchange}"), e))
}
