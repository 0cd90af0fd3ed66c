//! The work of one accepted request: settle it when its [`super::AckMode`] says,
//! dispatch it, and for a call answer its caller (results, streamed items,
//! failures, heartbeats) until it is done or the caller's deadline passes.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::time::Instant;
use tracing::{Instrument, Span};

use super::shutdown::Unfinished;
use super::{AckMode, Replier, Serving};
use crate::control::{CONTROL_NAMESPACE, InFlight};
use crate::endpoint::{Invocation, panic_failure};
use crate::error::RemoteError;
use crate::logs::Escaped;
use crate::metrics::Handled;
use crate::timing::MIN_CALL_MONITOR;
use crate::trace::{self, ServerRequest};
use crate::transport::{Acker, Address};
use crate::wire::{Answer, Request};

/// One accepted request and its unsettled acker. The ack happens in the request's
/// own task (before dispatch, or after handling), never in the receiving loop, so a
/// broker round trip per ack does not serialise the server.
pub(super) struct Work {
    pub(super) request: Request,
    pub(super) acker: Box<dyn Acker>,
    pub(super) ack_mode: AckMode,
    /// When the caller stops waiting, if the request says.
    pub(super) deadline: Option<Instant>,
}

impl Work {
    pub(super) async fn run(self, serving: Serving) {
        let Work {
            request,
            acker,
            ack_mode,
            deadline,
        } = self;
        let acker = match ack_mode {
            _ if acker.is_noop() => None,
            AckMode::BeforeDispatch => {
                if let Err(err) = acker.ack().await {
                    tracing::warn!(error = %err, method = %Escaped(&request.method),
                        "discarding request: acknowledgement failed");
                    return;
                }
                None
            }
            AckMode::AfterHandling => Some(acker),
        };
        // A request still held by the broker goes to another server if this one stops
        // before it is handled; one already taken from the broker does not.
        let redelivered_if_dropped = acker.is_some();
        // The counts a status reports: the application's requests, not the asking.
        let in_flight = (request.namespace.as_deref() != Some(CONTROL_NAMESPACE))
            .then(|| InFlight::start(&serving.stats));
        let span = trace::server_span(&ServerRequest {
            backend: serving.backend,
            topic: &serving.topic,
            namespace: request.namespace.as_deref(),
            method: &request.method,
            message_id: request.msg_id.as_deref().or(request.unique_id.as_deref()),
            call: request.msg_id.is_some(),
            context: &request.context,
        });
        async {
            let Request {
                method,
                args,
                namespace,
                version,
                context,
                msg_id,
                reply_to,
                call_monitor,
                ..
            } = request;
            let timer = serving.metrics.handling(&method);
            let invocation = serving.dispatcher.dispatch(
                namespace.as_deref(),
                version.as_deref(),
                &method,
                context,
                args,
            );
            match (msg_id, reply_to) {
                (Some(msg_id), Some(reply_to)) => {
                    let reply_to = Address::Reply(reply_to);
                    let call = Call {
                        replier: &serving.replier,
                        msg_id: &msg_id,
                        reply_to: &reply_to,
                        in_flight: in_flight.as_ref(),
                    };
                    let mut unfinished = Unfinished {
                        abandoned: &serving.abandoned,
                        msg_id: &msg_id,
                        reply_to: &reply_to,
                        armed: !redelivered_if_dropped,
                    };
                    let handled = call.answer(invocation, call_monitor, deadline).await;
                    unfinished.armed = false;
                    record_handled(handled);
                    timer.finish(handled);
                }
                (msg_id, _) => {
                    if msg_id.is_some() {
                        tracing::warn!("call without a reply address (_reply_q); no reply sent");
                    }
                    let handled = run_cast(invocation).await;
                    record_handled(handled);
                    timer.finish(handled);
                }
            }
            drop(in_flight);
            if let Some(acker) = acker
                && let Err(err) = acker.ack().await
            {
                tracing::warn!(error = %err, "could not ack handled request");
            }
        }
        .instrument(span)
        .await;
    }
}

async fn run_cast(invocation: Invocation) -> Handled {
    let (handled, failure) = match invocation {
        Invocation::Failed(failure) => (Handled::Error, Some(failure)),
        Invocation::NotServed(failure) => {
            (Handled::not_served(&failure), Some(failure.to_remote()))
        }
        Invocation::Unary(future) => match AssertUnwindSafe(future).catch_unwind().await {
            Ok(Ok(_)) => (Handled::Ok, None),
            Ok(Err(failure)) => (Handled::Error, Some(failure)),
            Err(panic) => (Handled::Panic, Some(panic_failure(&*panic))),
        },
        Invocation::Stream(stream) => {
            let mut stream = AssertUnwindSafe(stream).catch_unwind();
            let mut ended = (Handled::Ok, None);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(Ok(_)) => {}
                    Ok(Err(f)) => {
                        ended = (Handled::Error, Some(f));
                        break;
                    }
                    Err(panic) => {
                        ended = (Handled::Panic, Some(panic_failure(&*panic)));
                        break;
                    }
                }
            }
            ended
        }
    };
    if let Some(failure) = failure {
        tracing::warn!(class = %Escaped(&failure.class), message = %Escaped(&failure.message),
            "cast failed");
    }
    handled
}

/// Answers one call.
struct Call<'a> {
    replier: &'a Replier,
    msg_id: &'a str,
    /// An [`Address::Reply`].
    reply_to: &'a Address,
    /// Counted as handled when the final reply leaves.
    in_flight: Option<&'a InFlight<'a>>,
}

impl Call<'_> {
    /// Runs the call and replies, heartbeating if asked, until it is done or its
    /// `deadline` passes: then the caller has stopped waiting, and its handler or
    /// stream is dropped unfinished.
    async fn answer(
        &self,
        invocation: Invocation,
        call_monitor: Option<f64>,
        deadline: Option<Instant>,
    ) -> Handled {
        let answering = self.answer_until_done(invocation, call_monitor);
        match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, answering).await {
                Ok(handled) => handled,
                Err(_) => {
                    tracing::debug!("the caller's deadline passed; the call's work stops");
                    Handled::Deadline
                }
            },
            None => answering.await,
        }
    }

    async fn answer_until_done(
        &self,
        invocation: Invocation,
        call_monitor: Option<f64>,
    ) -> Handled {
        let work = self.reply_all(invocation);
        let interval = call_monitor
            .filter(|t| *t >= MIN_CALL_MONITOR.as_secs_f64())
            // The value comes from the network: no panic on absurd ones, and no
            // heartbeat interval beyond a day.
            .and_then(|t| Duration::try_from_secs_f64(t / 2.0).ok())
            .map(|d| d.min(Duration::from_secs(86_400)));
        match interval {
            // Boxed: this future is stored inline in every request's future, and most
            // calls ask for no heartbeats; moving a large future costs every request.
            Some(interval) => {
                Box::pin(async move {
                    let mut work = std::pin::pin!(work);
                    tokio::select! {
                        handled = &mut work => handled,
                        _ = self.heartbeats(interval) => work.await,
                    }
                })
                .await
            }
            None => work.await,
        }
    }

    /// Sends a heartbeat every `interval`; returns only when one cannot be sent.
    async fn heartbeats(&self, interval: Duration) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            ticks.tick().await;
            if let Err(err) = self
                .replier
                .send(self.reply_to, self.msg_id, &Answer::heartbeat())
                .await
            {
                tracing::debug!(error = %err, "heartbeat not delivered; heartbeats stop");
                return;
            }
        }
    }

    async fn reply_all(&self, invocation: Invocation) -> Handled {
        match invocation {
            Invocation::Failed(failure) => {
                self.reply(Answer::failure(failure)).await;
                Handled::Error
            }
            Invocation::NotServed(failure) => {
                self.reply(Answer::failure(failure.to_remote())).await;
                Handled::not_served(&failure)
            }
            Invocation::Unary(future) => {
                let (reply, handled) = match AssertUnwindSafe(future).catch_unwind().await {
                    Ok(Ok(value)) => (Answer::result(value), Handled::Ok),
                    Ok(Err(failure)) => (Answer::failure(failure), Handled::Error),
                    Err(panic) => {
                        tracing::error!("handler panicked; sending the failure to the caller");
                        (Answer::failure(panic_failure(&*panic)), Handled::Panic)
                    }
                };
                self.reply(reply).await;
                handled
            }
            // Boxed, like the heartbeats above: streams are the rarer kind.
            Invocation::Stream(stream) => Box::pin(self.reply_stream(stream)).await,
        }
    }

    async fn reply_stream(
        &self,
        stream: BoxStream<'static, Result<Value, RemoteError>>,
    ) -> Handled {
        let mut stream = AssertUnwindSafe(stream).catch_unwind();
        while let Some(item) = stream.next().await {
            match item {
                Ok(Ok(Value::Null)) => {
                    tracing::warn!("streamed item is null (reads as a heartbeat); skipped");
                }
                Ok(Ok(value)) => {
                    // The caller is gone: the handler did nothing wrong.
                    if !self.reply(Answer::item(value)).await {
                        return Handled::Ok;
                    }
                }
                Ok(Err(failure)) => {
                    self.reply(Answer::failure(failure)).await;
                    return Handled::Error;
                }
                Err(panic) => {
                    tracing::error!("streaming handler panicked; sending the failure");
                    self.reply(Answer::failure(panic_failure(&*panic))).await;
                    return Handled::Panic;
                }
            }
        }
        self.reply(Answer::end()).await;
        Handled::Ok
    }

    /// Sends a reply; a reply that cannot be delivered is logged and dropped.
    async fn reply(&self, answer: Answer) -> bool {
        if answer.is_final()
            && let Some(in_flight) = self.in_flight
        {
            in_flight.finish();
        }
        match self.replier.send(self.reply_to, self.msg_id, &answer).await {
            Ok(()) => true,
            Err(err) => {
                let reply_to = match self.reply_to {
                    Address::Reply(queue) => queue.as_str(),
                    _ => "",
                };
                // A request may name any reply address: a flood of undeliverable ones
                // writes one line per interval.
                if let Some(suppressed) = self.replier.dropped.hit() {
                    tracing::warn!(error = %Escaped(&err.to_string()), reply_to = %Escaped(reply_to),
                        suppressed, "reply dropped");
                }
                false
            }
        }
    }
}

/// Marks the current (server) span failed unless the request was handled well.
fn record_handled(handled: Handled) {
    if !matches!(handled, Handled::Ok) {
        trace::record_error(&Span::current(), handled.as_str());
    }
}
