//! Call requests handed to async-nats in batches.
//!
//! Every publish wakes async-nats's connection task, and tokio runs a task woken by the
//! running one right after it: handed over one by one as each caller ran, requests
//! left in a socket write each (a system call, and a wake-up of nats-server). Gathered
//! while the other ready callers run, they leave together. See docs/architecture.md,
//! "Publishing on NATS".

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::PublishError;
use bytes::Bytes;

/// A request to publish: subject, NATS reply subject, body.
pub(crate) type Request = (async_nats::Subject, async_nats::Subject, Bytes);

/// Requests that come closer together than this are load: the next one waits for
/// company even when the last batch had none. A sequential caller's requests are a
/// round trip apart, which is longer.
const BUSY_GAP: Duration = Duration::from_micros(50);

/// At most this many requests wait to be handed to async-nats (gathered, or in a batch
/// on its way). Beyond it (async-nats is not taking them, say while the connection is
/// down, or a burst of callers is larger) a caller hands over what is gathered and
/// then publishes its own, waiting as long as that takes: callers feel async-nats's
/// back-pressure and their own deadlines.
const MAX_UNSENT: usize = 1024;

/// The requests waiting to be handed over, each with its number.
struct Gathered {
    requests: Vec<(u64, Request)>,
    /// Whether a caller or a task is bound to hand over what is gathered.
    led: bool,
    next: u64,
}

pub(crate) struct Requests {
    client: async_nats::Client,
    gathered: Mutex<Gathered>,
    /// Requests not yet handed to async-nats: gathered, or in a batch on its way.
    unsent: AtomicUsize,
    /// Held while a batch is handed over, so that batches leave in order.
    handing_over: tokio::sync::Mutex<()>,
    /// Whether the last batch had more than one request: then the next one waits for
    /// company. Waiting costs a wake-up of the runtime, worth it only under load.
    gathering: AtomicBool,
    /// When the last request came, in nanoseconds since `epoch`.
    last_request: AtomicU64,
    epoch: Instant,
    /// The runtime the publisher was made on, for hand-over tasks when the caller is
    /// not on one.
    runtime: Option<tokio::runtime::Handle>,
}

/// What a caller does with its request.
enum Role {
    /// See that everything gathered is handed over, its own request (this number)
    /// among it.
    Lead(u64),
    /// Nothing: whoever leads hands its request over.
    Follow,
    /// Hand over what is gathered, then publish its request itself.
    Alone(Request),
}

impl Requests {
    pub(crate) fn new(client: async_nats::Client) -> Arc<Requests> {
        Arc::new(Requests {
            client,
            gathered: Mutex::new(Gathered {
                requests: Vec::new(),
                led: false,
                next: 0,
            }),
            unsent: AtomicUsize::new(0),
            handing_over: tokio::sync::Mutex::new(()),
            // The first request waits: a new client may well start under load.
            gathering: AtomicBool::new(true),
            last_request: AtomicU64::new(0),
            epoch: Instant::now(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        })
    }

    fn gathered(&self) -> MutexGuard<'_, Gathered> {
        self.gathered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a call's request. The caller that finds nobody bound to hand over
    /// the gathered requests leads; the others return at once, their request in the
    /// next batch. Idle (the last batch alone, and requests more than [`BUSY_GAP`]
    /// apart) the leader hands over at once, itself, and gets its own request's
    /// result. Under load it starts a task that first lets the other ready tasks of
    /// its worker run (`yield_now`: usually until they have run and the runtime has
    /// polled its drivers), so that their requests leave with its own, and returns;
    /// a failure is then logged (see [`Self::hand_over`]). A leader never waits while
    /// others' requests depend on it: a call future left pending and not polled
    /// holds up nobody else's request.
    pub(crate) async fn send(self: &Arc<Self>, request: Request) -> Result<(), PublishError> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let gap = now.saturating_sub(self.last_request.swap(now, Ordering::Relaxed));
        let role = {
            let mut gathered = self.gathered();
            if self.unsent.load(Ordering::Acquire) >= MAX_UNSENT {
                Role::Alone(request)
            } else {
                let number = gathered.next;
                gathered.next += 1;
                gathered.requests.push((number, request));
                self.unsent.fetch_add(1, Ordering::AcqRel);
                if gathered.led {
                    Role::Follow
                } else {
                    gathered.led = true;
                    Role::Lead(number)
                }
            }
        };
        match role {
            Role::Follow => Ok(()),
            Role::Alone((subject, reply, body)) => {
                self.flush().await;
                self.client.publish_with_reply(subject, reply, body).await
            }
            Role::Lead(own) => {
                let busy = u128::from(gap) < BUSY_GAP.as_nanos();
                if !busy
                    && !self.gathering.load(Ordering::Relaxed)
                    && let Ok(order) = self.handing_over.try_lock()
                {
                    // Taken before any await: nothing waits on this caller.
                    return self.hand_over_in_turn(order, Some(own)).await;
                }
                if !self.in_background(true) {
                    // No runtime to run a task on: hand over here.
                    return self.hand_over(Some(own)).await;
                }
                Ok(())
            }
        }
    }

    /// Hands over every request not yet handed over (waiting for a batch on its way
    /// first), so that a cast sent after a call by the same task cannot overtake the
    /// call's request. Failures are logged (see [`Self::hand_over`]).
    pub(crate) async fn flush(self: &Arc<Self>) {
        if self.unsent.load(Ordering::Acquire) > 0
            && let Err(err) = self.hand_over(None).await
        {
            tracing::warn!(error = %err, "a request could not be published");
        }
    }

    /// Hands every gathered request to async-nats, in order, after any batch on its
    /// way. Returns the result of request number `own` if it was among them (`Ok`
    /// otherwise); another's failure is logged: async-nats refuses a publish when
    /// the client is closed (which also ends every call waiting on it) or when the
    /// body is above a `max_payload` that shrank after `send` checked it (a
    /// reconnection to another server), and that call then times out. Cancel-safe:
    /// the requests not handed over go back to the front and a task finishes them
    /// (async-nats's send loses nothing when dropped).
    async fn hand_over(self: &Arc<Self>, own: Option<u64>) -> Result<(), PublishError> {
        let order = self.handing_over.lock().await;
        self.hand_over_in_turn(order, own).await
    }

    /// [`Self::hand_over`], its turn taken.
    async fn hand_over_in_turn(
        self: &Arc<Self>,
        _order: tokio::sync::MutexGuard<'_, ()>,
        own: Option<u64>,
    ) -> Result<(), PublishError> {
        let taken = {
            let mut gathered = self.gathered();
            gathered.led = false;
            std::mem::take(&mut gathered.requests)
        };
        self.gathering.store(taken.len() > 1, Ordering::Relaxed);
        let mut batch = Batch {
            requests: taken,
            sent: 0,
            owner: self,
        };
        let mut result = Ok(());
        while let Some((number, (subject, reply, body))) = batch.requests.get(batch.sent) {
            let sent = (self.client)
                .publish_with_reply(subject.clone(), reply.clone(), body.clone())
                .await;
            let number = *number;
            batch.sent += 1;
            self.unsent.fetch_sub(1, Ordering::AcqRel);
            match sent {
                Err(err) if Some(number) == own => result = Err(err),
                Err(err) => tracing::warn!(error = %err, "a request could not be published"),
                Ok(()) => {}
            }
        }
        result
    }

    /// Hands over what is gathered on a task of its own (after a `yield_now` when
    /// `wait`), on the caller's runtime or else the one the publisher was made on.
    /// `false` when there is none.
    fn in_background(self: &Arc<Self>, wait: bool) -> bool {
        let Some(runtime) = tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.runtime.clone())
        else {
            return false;
        };
        let requests = self.clone();
        runtime.spawn(async move {
            if wait {
                tokio::task::yield_now().await;
            }
            requests.flush().await;
        });
        true
    }

    /// Makes sure what a dropped hand-over put back gets handed over: a task does
    /// it, and the next caller leads meanwhile (whether or not that task ever runs,
    /// say on a runtime shutting down).
    fn finish_later(self: &Arc<Self>) {
        self.gathered().led = false;
        self.in_background(false);
    }
}

/// A batch on its way; dropped early, it puts back what it did not hand over, in
/// front of what was gathered since, and has it finished.
struct Batch<'a> {
    requests: Vec<(u64, Request)>,
    sent: usize,
    owner: &'a Arc<Requests>,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.sent >= self.requests.len() {
            return;
        }
        {
            let mut gathered = self.owner.gathered();
            let newer = std::mem::take(&mut gathered.requests);
            gathered.requests.extend(self.requests.drain(self.sent..));
            gathered.requests.extend(newer);
        }
        self.owner.finish_later();
    }
}
