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

/// At most this many requests wait to be handed over. Beyond it async-nats is not
/// taking them (its channel is full, say while the connection is down): a caller then
/// waits for its turn and hands its request over itself, as without batching, so
/// that callers feel the back-pressure and their own deadlines.
const MAX_GATHERED: usize = 1024;

/// The requests waiting to be handed over, each with its number.
struct Gathered {
    requests: Vec<(u64, Request)>,
    /// Whether a caller (or a task) is bound to hand over what is gathered.
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
    /// Where a hand-over whose caller went away is finished.
    runtime: Option<tokio::runtime::Handle>,
}

/// What a caller does with its request.
enum Role {
    /// Hand over everything gathered, its own request (this number) among it.
    Lead(u64),
    /// Nothing: a leader hands its request over.
    Follow,
    /// Wait for the hand-overs before it, then publish its request itself.
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
    /// the gathered requests becomes it: it hands over every request gathered by
    /// then, in order; the others return at once, their request in its batch. Under
    /// load (the last batch had company, or requests come less than [`BUSY_GAP`]
    /// apart) it first lets the other ready tasks of its worker run (`yield_now`
    /// wakes it once they have run and the runtime has polled its drivers), so that
    /// their requests leave with its own. Returns the result of its own request only.
    pub(crate) async fn send(self: &Arc<Self>, request: Request) -> Result<(), PublishError> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let gap = now.saturating_sub(self.last_request.swap(now, Ordering::Relaxed));
        let role = {
            let mut gathered = self.gathered();
            if gathered.requests.len() >= MAX_GATHERED {
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
                let mut finish = FinishIfDropped(Some(self.clone()));
                let busy = u128::from(gap) < BUSY_GAP.as_nanos();
                if busy || self.gathering.load(Ordering::Relaxed) {
                    tokio::task::yield_now().await;
                }
                let result = self.hand_over(Some(own)).await;
                finish.0 = None;
                result
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
        let _order = self.handing_over.lock().await;
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

    /// Makes sure what is gathered gets handed over although the one bound to do it
    /// went away: a task does it, and the next caller leads if that task never runs
    /// (the runtime shutting down).
    fn finish_later(self: &Arc<Self>) {
        self.gathered().led = false;
        if let Some(runtime) = &self.runtime {
            let requests = self.clone();
            runtime.spawn(async move { requests.flush().await });
        }
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

/// Finishes the hand-over a leader was bound to when the leader is dropped first.
struct FinishIfDropped(Option<Arc<Requests>>);

impl Drop for FinishIfDropped {
    fn drop(&mut self) {
        if let Some(requests) = self.0.take() {
            requests.finish_later();
        }
    }
}
