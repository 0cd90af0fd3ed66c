//! The reply side of a client: one task consumes the client's reply queue and hands
//! each reply to the waiter registered under its `_msg_id`. Late or unknown replies
//! are dropped with a debug log. Waiting is event-driven, never polled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use futures::channel::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthFailure, MessageAuth, refusal};
use crate::error::{Error, Result};
use crate::logs::{Escaped, Throttle};
use crate::transport::{Consumer, ReplyQueue};
use crate::wire::{self, Reply};

type Waiters = Arc<DashMap<Arc<str>, mpsc::UnboundedSender<Reply>, foldhash::fast::RandomState>>;

/// Routes the replies of one client's reply queue to the calls waiting for them.
pub(crate) struct ReplyRouter {
    address: Arc<str>,
    waiters: Waiters,
    closed: Arc<AtomicBool>,
    shutdown: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl ReplyRouter {
    /// Starts consuming `queue`; replies larger than `max_reply` bytes are dropped
    /// unparsed.
    pub(crate) fn start(
        queue: ReplyQueue,
        auth: Option<MessageAuth>,
        max_reply: Option<usize>,
    ) -> Self {
        let waiters: Waiters = Arc::new(DashMap::default());
        let closed = Arc::new(AtomicBool::new(false));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(route(
            queue.consumer,
            waiters.clone(),
            closed.clone(),
            shutdown.clone(),
            queue.address.clone(),
            auth,
            max_reply,
        ));
        ReplyRouter {
            address: queue.address.into(),
            waiters,
            closed,
            shutdown,
            task: Mutex::new(Some(task)),
        }
    }

    /// The address servers reply to.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// The address servers reply to, shared.
    pub(crate) fn shared_address(&self) -> Arc<str> {
        self.address.clone()
    }

    /// Registers a waiter for `msg_id`; it is removed when the returned guard drops.
    pub(crate) fn register(
        &self,
        msg_id: &Arc<str>,
    ) -> Result<(PendingReplies, mpsc::UnboundedReceiver<Reply>)> {
        // Unbounded so that one slow multicall reader never stalls the replies of
        // every other call; a call's replies are bounded by what its server sends.
        // futures' channel allocates per message, not a block of slots per call.
        let (tx, rx) = mpsc::unbounded();
        self.waiters.insert(msg_id.clone(), tx);
        let guard = PendingReplies {
            waiters: self.waiters.clone(),
            msg_id: msg_id.clone(),
        };
        // Checked after inserting: the router sets `closed` before it clears the
        // waiters, so a waiter inserted after the clear sees the flag here.
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok((guard, rx))
    }
}

impl ReplyRouter {
    /// Stops consuming, releases the reply queue at the broker and fails the calls
    /// still waiting with `Closed`.
    pub(crate) async fn close(&self) {
        self.shutdown.cancel();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for ReplyRouter {
    fn drop(&mut self) {
        // The consumer goes with the task, which releases the reply queue. Cancelled
        // first: a task still running sees that its queue's end is no surprise.
        self.shutdown.cancel();
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// Unregisters a call's waiter when the call ends, however it ends.
pub(crate) struct PendingReplies {
    waiters: Waiters,
    msg_id: Arc<str>,
}

impl Drop for PendingReplies {
    fn drop(&mut self) {
        self.waiters.remove(&*self.msg_id);
    }
}

async fn route(
    mut consumer: Box<dyn Consumer>,
    waiters: Waiters,
    closed: Arc<AtomicBool>,
    shutdown: CancellationToken,
    address: String,
    auth: Option<MessageAuth>,
    max_reply: Option<usize>,
) {
    // Refused replies are logged once per interval, with a count of the others.
    let rejections = Throttle::default();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => {
                if let Err(err) = consumer.close().await {
                    tracing::debug!(error = %err, queue = %address, "closing the reply queue failed");
                }
                break;
            }
            next = consumer.recv() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(err)) => {
                tracing::warn!(error = %err, queue = %address, "reply queue reported an error");
                continue;
            }
            None => break,
        };
        let (body, acker) = delivery.into_parts();
        if !acker.is_noop()
            && let Err(err) = acker.ack().await
        {
            tracing::debug!(error = %err, "could not ack a reply");
        }
        if let Some(limit) = max_reply.filter(|limit| body.len() > *limit) {
            // Never parsed: its size alone is reason enough. The call it was meant
            // for, if any, times out naming its deadline.
            if let Some(suppressed) = rejections.hit() {
                tracing::warn!(size = body.len(), limit, queue = %address, suppressed,
                    "dropping a reply above the message size limit");
            }
            continue;
        }
        let refused = auth.as_ref().and_then(|auth| auth.open(&body).err());
        let reply = match wire::decode_routed_reply(&body) {
            Ok(reply) if refused.is_some() => {
                let failure = refused.unwrap_or(AuthFailure::Unsigned);
                if let Some(suppressed) = rejections.hit() {
                    tracing::warn!(reason = %failure, size = body.len(), queue = %address,
                        suppressed, "refusing a reply that fails authentication");
                }
                // The call it names fails now, saying why, instead of timing out.
                Reply::failure(&reply.msg_id, refusal("reply", &failure))
            }
            Ok(reply) => reply,
            Err(_) if refused.is_some() => {
                if let Some(suppressed) = rejections.hit() {
                    tracing::warn!(size = body.len(), queue = %address, suppressed,
                        "refusing a reply that fails authentication and does not decode");
                }
                continue;
            }
            Err(err) => {
                if let Some(suppressed) = rejections.hit() {
                    tracing::warn!(size = body.len(), error = %Escaped(&err.to_string()),
                        queue = %address, suppressed, "dropping malformed reply");
                }
                continue;
            }
        };
        // Clone the sender out so no map shard stays locked while sending.
        let waiter = waiters
            .get(reply.msg_id.as_str())
            .map(|w| w.value().clone());
        match waiter {
            Some(tx) => {
                if tx.unbounded_send(reply).is_err() {
                    tracing::debug!("dropping reply: its call just ended");
                }
            }
            None => {
                tracing::debug!(msg_id = %Escaped(&reply.msg_id), queue = %address,
                    "no call is waiting for this reply (late or foreign); dropped");
            }
        }
    }
    if !shutdown.is_cancelled() {
        tracing::warn!(queue = %address, in_flight = waiters.len(),
            "reply queue closed; calls in flight and later calls fail with Closed");
    }
    closed.store(true, Ordering::SeqCst);
    // Dropping the senders wakes every waiter with `Closed`.
    waiters.clear();
}
