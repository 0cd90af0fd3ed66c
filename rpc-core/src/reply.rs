//! The reply side of a client: one task consumes the client's reply queue and hands
//! each reply to the waiter registered under its `_msg_id`, or the error that ends
//! the call (a refused reply, the broker's "no responders"). Late or unknown replies
//! are dropped with a debug log. Waiting is event-driven, never polled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use futures::channel::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthFailure, MessageAuth, reply_refusal};
use crate::error::{Error, Result};
use crate::logs::{Escaped, Throttle};
use crate::target::Target;
use crate::transport::{ReplyConsumer, ReplyEvent, ReplyQueue};
use crate::wire::{self, Reply};

/// What a call waits on: its replies, or the error that ends it (a refused reply,
/// nothing listening), in the order they came.
pub(crate) type Replies = mpsc::UnboundedReceiver<Result<Reply>>;

/// A call waiting for its replies.
#[derive(Clone)]
struct Waiter {
    tx: mpsc::UnboundedSender<Result<Reply>>,
    /// Named in the errors the call gets from the broker rather than its server.
    target: Arc<Target>,
}

type Waiters = Arc<DashMap<Arc<str>, Waiter, foldhash::fast::RandomState>>;

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

    /// Registers a waiter for the call `msg_id` to `target`; it is removed when the
    /// returned guard drops.
    pub(crate) fn register(
        &self,
        msg_id: &Arc<str>,
        target: &Arc<Target>,
    ) -> Result<(PendingReplies, Replies)> {
        // Unbounded so that one slow multicall reader never stalls the replies of
        // every other call; a call's replies are bounded by what its server sends.
        // futures' channel allocates per message, not a block of slots per call.
        let (tx, rx) = mpsc::unbounded();
        let waiter = Waiter {
            tx,
            target: target.clone(),
        };
        self.waiters.insert(msg_id.clone(), waiter);
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
    mut consumer: Box<dyn ReplyConsumer>,
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
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(err)) => {
                tracing::warn!(error = %err, queue = %address, "reply queue reported an error");
                continue;
            }
            None => break,
        };
        let (msg_id, routed) = match event {
            ReplyEvent::Reply(delivery) => {
                let (body, acker) = delivery.into_parts();
                if !acker.is_noop()
                    && let Err(err) = acker.ack().await
                {
                    tracing::debug!(error = %err, "could not ack a reply");
                }
                let read = read_reply(&body, auth.as_ref(), max_reply, &rejections, &address);
                match read {
                    Some((reply, None)) => (reply.msg_id.clone(), Routed::Reply(reply)),
                    Some((reply, Some(failure))) => (reply.msg_id, Routed::Refused(failure)),
                    None => continue,
                }
            }
            ReplyEvent::NoResponders { msg_id } => (msg_id, Routed::NoResponders),
        };
        // Clone the waiter out so no map shard stays locked while sending.
        let waiter = waiters.get(msg_id.as_str()).map(|w| w.value().clone());
        match waiter {
            Some(waiter) => {
                if waiter
                    .tx
                    .unbounded_send(routed.for_call(&waiter.target))
                    .is_err()
                {
                    tracing::debug!("dropping reply: its call just ended");
                }
            }
            None => {
                tracing::debug!(msg_id = %Escaped(&msg_id), queue = %address,
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

/// What the reply queue brought a call.
enum Routed {
    /// A reply its server sent.
    Reply(Reply),
    /// A reply that failed authentication: the call fails now, saying why, instead
    /// of timing out.
    Refused(AuthFailure),
    /// The broker found nothing listening where the call's request went.
    NoResponders,
}

impl Routed {
    /// The next item of the call to `target`.
    fn for_call(self, target: &Target) -> Result<Reply> {
        match self {
            Routed::Reply(reply) => Ok(reply),
            Routed::Refused(failure) => Err(reply_refusal(&failure)),
            Routed::NoResponders => Err(Error::NoResponders {
                address: target.to_string(),
            }),
        }
    }
}

/// Decodes a reply's body, with the reason its authentication failed if it did;
/// `None` (logged, throttled) for a body too large, malformed, or refused without
/// naming a call.
fn read_reply(
    body: &[u8],
    auth: Option<&MessageAuth>,
    max_reply: Option<usize>,
    rejections: &Throttle,
    address: &str,
) -> Option<(Reply, Option<AuthFailure>)> {
    if let Some(limit) = max_reply.filter(|limit| body.len() > *limit) {
        // Never parsed: its size alone is reason enough. The call it was meant
        // for, if any, times out naming its deadline.
        if let Some(suppressed) = rejections.hit() {
            tracing::warn!(size = body.len(), limit, queue = %address, suppressed,
                "dropping a reply above the message size limit");
        }
        return None;
    }
    let refused = auth.and_then(|auth| auth.open(body).err());
    match wire::decode_routed_reply(body) {
        Ok(reply) => {
            if let Some(failure) = &refused
                && let Some(suppressed) = rejections.hit()
            {
                tracing::warn!(reason = %failure, size = body.len(), queue = %address,
                    suppressed, "refusing a reply that fails authentication");
            }
            Some((reply, refused))
        }
        Err(_) if refused.is_some() => {
            if let Some(suppressed) = rejections.hit() {
                tracing::warn!(size = body.len(), queue = %address, suppressed,
                    "refusing a reply that fails authentication and does not decode");
            }
            None
        }
        Err(err) => {
            if let Some(suppressed) = rejections.hit() {
                tracing::warn!(size = body.len(), error = %Escaped(&err.to_string()),
                    queue = %address, suppressed, "dropping malformed reply");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use futures::StreamExt;
    use serde_json::json;

    use super::*;
    use crate::transport::{Delivery, NoAck};

    /// A reply queue that yields what the test sends it.
    struct Scripted(mpsc::UnboundedReceiver<ReplyEvent>);

    #[async_trait]
    impl ReplyConsumer for Scripted {
        async fn recv(&mut self) -> Option<Result<ReplyEvent>> {
            self.0.next().await.map(Ok)
        }
    }

    fn reply(body: Vec<u8>) -> ReplyEvent {
        ReplyEvent::Reply(Delivery::new(body, Box::new(NoAck)))
    }

    #[tokio::test]
    async fn each_call_gets_its_replies_and_the_errors_that_name_it() {
        let auth = MessageAuth::new("k1", vec![7; 32]).expect("a key");
        let (events, rx) = mpsc::unbounded();
        let queue = ReplyQueue {
            address: "q".into(),
            consumer: Box::new(Scripted(rx)),
        };
        let router = ReplyRouter::start(queue, Some(auth.clone()), None);
        let target = Arc::new(Target::new("topic").server("host-1"));
        let (_first, mut answered) = router.register(&"m1".into(), &target).expect("open");
        let (_second, mut nobody) = router.register(&"m2".into(), &target).expect("open");
        let (_third, mut forged) = router.register(&"m3".into(), &target).expect("open");

        let signed =
            auth.seal(wire::encode_reply(&Reply::result("m1", json!(7))).expect("encodes"));
        let unsigned = wire::encode_reply(&Reply::result("m3", json!(8))).expect("encodes");
        for event in [
            ReplyEvent::NoResponders {
                msg_id: "m2".into(),
            },
            reply(unsigned),
            reply(signed),
        ] {
            events.unbounded_send(event).expect("routing");
        }

        match answered.next().await {
            Some(Ok(reply)) => assert_eq!(reply.result, json!(7)),
            other => panic!("{other:?}"),
        }
        match nobody.next().await {
            Some(Err(Error::NoResponders { address })) => assert_eq!(address, target.to_string()),
            other => panic!("{other:?}"),
        }
        match forged.next().await {
            Some(Err(Error::Authentication(message))) => {
                assert_eq!(message, "reply refused: the message is not signed")
            }
            other => panic!("{other:?}"),
        }
        router.close().await;
    }
}
