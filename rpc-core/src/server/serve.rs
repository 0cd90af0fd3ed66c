//! The serving loop: takes deliveries while a handler slot and the byte budget
//! allow, runs each request's work as a future of this one task, and at shutdown
//! drains the work within the grace period.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::future::Either;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::Serving;
use super::accept::{Accepted, RecentIds, accept};
use super::shutdown::tell_abandoned_callers;
use crate::budget::ByteBudget;
use crate::health::ConsumerStatus;
use crate::metrics::SlotLimit;
use crate::transport::{Consumer, Delivery};

pub(super) async fn serve(
    mut consumer: Box<dyn Consumer>,
    status: ConsumerStatus,
    serving: Serving,
    concurrency: usize,
    grace_period: Duration,
    mut seen: RecentIds,
    token: CancellationToken,
) {
    // However this task ends, the server's health says it stopped.
    let _stopped = status.stopped_on_drop();
    // Handlers run as futures of this task, not as tasks of their own: a request
    // then costs no spawn and no cross-thread wake-up between taking it and handling
    // it. They still run concurrently; CPU-heavy handlers should move their work to
    // `spawn_blocking` (as in any async server).
    let mut running = FuturesUnordered::new();
    // The bytes of the requests handed to `running`: the part of the budget this
    // loop can free by waiting. What a consumer has read ahead and not handed out
    // is in memory already and counts in `serving.budget`; waiting for it would
    // only stall the loop behind work that is never started.
    let working = ByteBudget::new(serving.budget.limit());
    // Takes a delivery: checks and decodes it, and returns the future that runs its
    // work (or only settles it), for the running set.
    let mut start = |mut delivery: Delivery| {
        // Held until the request's work is done, so the budget counts it as long as
        // its bytes (or the arguments decoded from them) live.
        let charge = (delivery.take_charge())
            .unwrap_or_else(|| serving.budget.charge(delivery.body().len()));
        // The metrics' guard last: it reads the bytes held once the charges are gone.
        let charge = (
            charge,
            working.charge(delivery.body().len()),
            serving.metrics.request_started(),
        );
        let ttl = delivery.time_to_live();
        let (body, acker) = delivery.into_parts();
        match accept(body, acker, ttl, &serving, &mut seen) {
            // A panic anywhere in a request (a handler, or an argument's `Deserialize`)
            // ends that request, never the server. Boxed: the request's future is
            // kilobytes, and a future pushed by value was copied three times on its way
            // into the set.
            Accepted::Work(work) => Either::Left(
                AssertUnwindSafe(Box::pin(work.run(serving.clone())))
                    .catch_unwind()
                    .map(move |outcome| {
                        drop(charge);
                        if outcome.is_err() {
                            tracing::error!("a request panicked outside its handler; dropped");
                        }
                    }),
            ),
            // Settling a refused message takes a slot too, so a flood of bad messages is
            // bounded like work and never stalls this loop.
            Accepted::Settle(settle) => Either::Right(settle.run().map(move |()| drop(charge))),
        }
    };
    'serving: loop {
        // Take a delivery only when a handler slot is free, so waiting work stays in
        // the broker and not in this process.
        // Likewise when the requests held use up the byte budget: a handler that
        // finishes gives its bytes back.
        if running.len() >= concurrency {
            serving.metrics.slot_wait(SlotLimit::Concurrency);
        } else if !running.is_empty() && working.is_exhausted() {
            serving.metrics.slot_wait(SlotLimit::Bytes);
        }
        while running.len() >= concurrency || (!running.is_empty() && working.is_exhausted()) {
            tokio::select! {
                biased;
                _ = token.cancelled() => break 'serving,
                _ = running.next() => {}
            }
        }
        // One receive future per delivery, kept while handlers finish beside it.
        let mut receiving = consumer.recv();
        let next = loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => break 'serving,
                Some(()) = running.next(), if !running.is_empty() => {}
                next = &mut receiving => break next,
            }
        };
        drop(receiving);
        match next {
            Some(Ok(delivery)) => {
                status.delivered();
                running.push(start(delivery));
            }
            Some(Err(err)) => {
                tracing::warn!(error = %err, topic = %serving.topic, "consumer reported an error");
            }
            None => {
                tracing::warn!(topic = %serving.topic, "consumer closed; server stops serving");
                break;
            }
        }
    }
    status.stopping();
    if let Err(err) = consumer.stop().await {
        tracing::warn!(error = %err, "could not stop consuming cleanly");
    }
    // Acked with the broker on receipt but not handed out yet: nobody else will get
    // them, so they run here.
    for delivery in consumer.take_settled() {
        running.push(start(delivery));
    }
    let in_flight = running.len();
    let drained = tokio::time::timeout(grace_period, async {
        while running.next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            in_flight,
            remaining = running.len(),
            ?grace_period,
            "grace period over; dropping handlers still running"
        );
        drop(running);
        tell_abandoned_callers(&serving).await;
    }
    if let Err(err) = consumer.close().await {
        tracing::warn!(error = %err, "could not close the consumer cleanly");
    }
}
