//! Settling deliveries: a server delivery's acker, and the wait for an ack or reject
//! that gives up once the delivery's channel is gone (lapin does not always answer
//! then), so no server waits for good on a settlement.

use std::sync::Arc;

use async_trait::async_trait;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use rpc_core::{Acker, Error, Result, TransportErrorKind};

use crate::error::lapin_error;

/// How long an ack or reject may take on a channel that still looks open.
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a pending ack or reject looks at its channel's state.
const SETTLE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Waits for an ack or reject lapin sends, but not past the loss of its channel:
/// lapin does not always resolve a settlement queued just before its connection was
/// cut, and a server waiting for it would wait for good (a batch ack would hold up
/// its whole consumer). A lost channel answers `Ok(false)`, as lapin does for an
/// acker whose channel is gone; the broker requeues what it did not get settled.
pub(super) async fn until_lost(
    channel: &Channel,
    settle: impl std::future::Future<Output = lapin::Result<bool>>,
) -> lapin::Result<bool> {
    let mut settle = std::pin::pin!(settle);
    let started = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout(SETTLE_POLL, &mut settle).await {
            Ok(outcome) => return outcome,
            Err(_) if !channel.status().connected() || started.elapsed() > SETTLE_LIMIT => {
                return Ok(false);
            }
            Err(_) => {}
        }
    }
}

/// Settles a server delivery on the channel it came from.
pub(super) struct AmqpAcker {
    pub(super) acker: lapin::Acker,
    /// Keeps the channel open until the delivery is settled, and tells when it is
    /// lost.
    pub(super) channel: Arc<Channel>,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        let acked = until_lost(&self.channel, self.acker.ack(BasicAckOptions::default()));
        settled(acked.await, "acknowledging")
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        let rejected = self.acker.reject(BasicRejectOptions { requeue });
        settled(until_lost(&self.channel, rejected).await, "rejecting")
    }
}

/// lapin answers `Ok(false)` when the delivery's channel is gone: the broker has
/// already requeued the message, so the settlement failed.
pub(super) fn settled(outcome: lapin::Result<bool>, what: &str) -> Result<()> {
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::transport_msg(
            TransportErrorKind::Disconnected,
            format!("{what} failed: the delivery's channel is closed (the broker requeued it)"),
        )),
        Err(err) => Err(lapin_error(what, err)),
    }
}
