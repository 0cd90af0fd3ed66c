//! A call whose request is out: it waits for its replies, skipping heartbeats, within
//! its deadline and call monitor, and turns failure replies into errors. A
//! multicall's [`ReplyStream`] reads its replies one by one.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::time::{Instant, timeout_at};

use super::{ClientShared, timeout_error};
use crate::auth::refused_by_server;
use crate::dispatch_failure::DispatchFailure;
use crate::error::{CodecError, Error, RemoteError, Result, TimeoutKind};
use crate::metrics::CallTimer;
use crate::reply::{PendingReplies, Replies};
use crate::target::Target;
use crate::wire::Reply;

/// A call whose request is out: waits for its replies, heartbeats and deadlines.
pub(super) struct PendingCall {
    /// Keeps the reply queue alive while the call waits, even if every `Client`
    /// handle is gone (a multicall stream outliving its client).
    client: Arc<ClientShared>,
    rx: Replies,
    _waiter: PendingReplies,
    pub(super) msg_id: Arc<str>,
    target: Arc<Target>,
    started: Instant,
    pub(super) deadline: Instant,
    call_monitor: Option<Duration>,
    /// Whether the call monitor's clock runs (once the request is published).
    monitoring: bool,
    last_heard: Instant,
}

impl PendingCall {
    /// A call registered with the reply router (`waiter`, `rx`) and started at
    /// `started`, to give up at `deadline`; the call monitor's clock waits for
    /// [`PendingCall::monitor_from_now`].
    pub(super) fn new(
        client: Arc<ClientShared>,
        (waiter, rx): (PendingReplies, Replies),
        msg_id: Arc<str>,
        target: Arc<Target>,
        started: Instant,
        deadline: Instant,
        call_monitor: Option<Duration>,
    ) -> Self {
        PendingCall {
            client,
            rx,
            _waiter: waiter,
            msg_id,
            target,
            started,
            deadline,
            call_monitor,
            monitoring: false,
            last_heard: started,
        }
    }

    /// Starts the call monitor's clock: the request is out, the server has
    /// `call_monitor` from now to answer or send a heartbeat.
    pub(super) fn monitor_from_now(&mut self) {
        self.monitoring = true;
        self.last_heard = Instant::now();
    }

    /// The error of this call timing out while it waited for `kind`.
    pub(super) fn timeout(&self, kind: TimeoutKind) -> Error {
        timeout_error(&self.target, &self.client, &self.msg_id, self.started, kind)
    }

    /// The next reply that is not a heartbeat, with no deadline: the caller bounds
    /// the wait. The call monitor's clock is not kept.
    pub(super) async fn recv_reply(&mut self) -> Result<Reply> {
        loop {
            match self.rx.next().await {
                Some(Ok(reply)) if reply.is_heartbeat() => {
                    tracing::trace!(msg_id = %self.msg_id, "heartbeat");
                }
                Some(item) => return item,
                None => return Err(Error::Closed),
            }
        }
    }

    /// The next reply that is not a heartbeat, for a caller that bounds the overall
    /// deadline itself: only a call monitor needs a timer of its own here.
    pub(super) async fn wait_reply(&mut self) -> Result<Reply> {
        match self.call_monitor {
            Some(_) => self.next_reply().await,
            None => self.recv_reply().await,
        }
    }

    /// The next reply that is not a heartbeat.
    async fn next_reply(&mut self) -> Result<Reply> {
        loop {
            let (wake, kind) = match self.call_monitor {
                Some(interval) if self.monitoring && self.last_heard + interval < self.deadline => {
                    (self.last_heard + interval, TimeoutKind::CallMonitor)
                }
                _ => (self.deadline, TimeoutKind::Reply),
            };
            match timeout_at(wake, self.rx.next()).await {
                Ok(Some(item)) => {
                    self.last_heard = Instant::now();
                    match item {
                        Ok(reply) if reply.is_heartbeat() => {
                            tracing::trace!(msg_id = %self.msg_id, "heartbeat");
                        }
                        item => return item,
                    }
                }
                Ok(None) => return Err(Error::Closed),
                Err(_) => return Err(self.timeout(kind)),
            }
        }
    }
}

/// The error of a failure reply: the failures of a server's dispatcher and of its
/// message authentication become their own variants, any other is the server's
/// failure as it sent it.
pub(super) fn failure_error(failure: RemoteError) -> Error {
    if let Some(refused) = refused_by_server(&failure) {
        return refused;
    }
    match DispatchFailure::from_remote(&failure) {
        Some(dispatch) => dispatch.into(),
        None => Error::Remote(Box::new(failure)),
    }
}

/// Decodes a call's result into the type the caller asked for.
pub(super) fn decode_result<R: DeserializeOwned>(value: Value) -> Result<R> {
    R::deserialize(value).map_err(|e| {
        Error::Codec(CodecError::new(format!(
            "result does not decode into the expected type: {e}"
        )))
    })
}

type BoxedStream<R> = Pin<Box<dyn Stream<Item = Result<R>> + Send>>;

/// The results of a [`crate::Client::multicall`], in the order the server sent them.
pub struct ReplyStream<R> {
    inner: BoxedStream<R>,
}

impl<R: DeserializeOwned + Send + 'static> ReplyStream<R> {
    /// The stream of a multicall sent; `timer` ends with the stream (or counts the
    /// multicall as cancelled if the stream is dropped before its end).
    pub(super) fn new(pending: PendingCall, timer: CallTimer) -> Self {
        let stream = futures::stream::unfold(Some((pending, timer)), |state| async move {
            let (mut pending, timer) = state?;
            let last = |timer: CallTimer, item: Result<R>| {
                timer.finish(&item);
                Some((item, None))
            };
            loop {
                let reply = match pending.next_reply().await {
                    Ok(reply) => reply,
                    Err(err) => return last(timer, Err(err)),
                };
                if let Some(failure) = reply.failure {
                    return last(timer, Err(failure_error(failure)));
                }
                match (reply.result.is_null(), reply.ending) {
                    (true, true) => {
                        timer.finish(&Ok(()));
                        return None;
                    }
                    (false, true) => return last(timer, decode_result(reply.result)),
                    (false, false) => {
                        return Some((decode_result(reply.result), Some((pending, timer))));
                    }
                    (true, false) => continue,
                }
            }
        });
        ReplyStream {
            inner: Box::pin(stream),
        }
    }
}

impl<R> Stream for ReplyStream<R> {
    type Item = Result<R>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl<R> fmt::Debug for ReplyStream<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyStream").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_replies_become_the_variants_their_senders_meant() {
        let missing = DispatchFailure::NoSuchMethod { method: "m".into() }.to_remote();
        assert!(matches!(failure_error(missing), Error::NoSuchMethod { method } if method == "m"));
        let refused = crate::auth::request_refusal(&crate::auth::AuthFailure::Unsigned);
        let message = refused.message.clone();
        assert!(matches!(failure_error(refused), Error::Authentication(m) if m == message));
        let other = RemoteError::new("ValueError", "x");
        assert!(matches!(failure_error(other), Error::Remote(_)));
        // Only our reply router reports nothing listening, as an error of its own: a
        // failure reply with that name is the sender's failure like any other.
        let named = RemoteError::new("NoResponders", "x").with_module("mqrpc.transport");
        assert!(matches!(failure_error(named), Error::Remote(_)));
    }
}
