//! What the serving loop does with a delivery before any work: size limit,
//! authentication, decoding, duplicate suppression and the caller's deadline. It
//! yields the work to run, or how to settle a message that is not run.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::Serving;
use super::work::Work;
use crate::auth::{AuthFailure, request_refusal};
use crate::control::CONTROL_NAMESPACE;
use crate::logs::{Escaped, Throttle};
use crate::metrics::RejectReason;
use crate::timing::MAX_TIMEOUT;
use crate::transport::{Acker, Address};
use crate::wire::{self, Answer, Request};

/// No call is worked on for longer than this, whatever its `_expires_in` says.
const MAX_CALL_LIFETIME: Duration = MAX_TIMEOUT;

/// What to do with a delivery: run it, or only settle it.
// Lives for one `match`; boxing the work would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(super) enum Accepted {
    Work(Work),
    Settle(Settle),
}

/// A delivery that is not run: acked (a duplicate) or rejected for good.
pub(super) struct Settle {
    acker: Box<dyn Acker>,
    ack: bool,
}

impl Settle {
    fn reject(acker: Box<dyn Acker>) -> Accepted {
        Accepted::Settle(Settle { acker, ack: false })
    }

    pub(super) async fn run(self) {
        let settled = if self.ack {
            self.acker.ack().await
        } else {
            self.acker.reject(false).await
        };
        if let Err(err) = settled {
            tracing::debug!(error = %err, ack = self.ack, "could not settle a refused message");
        }
    }
}

/// Checks and decodes a delivery; returns the work to run, or how to settle it.
pub(super) fn accept(
    body: Bytes,
    acker: Box<dyn Acker>,
    ttl: Option<Duration>,
    serving: &Serving,
    seen: &mut RecentIds,
) -> Accepted {
    let received = Instant::now();
    if let Some(limit) = serving.max_request.filter(|limit| body.len() > *limit) {
        // Dropped for good and never parsed: its size alone is reason enough.
        serving.metrics.rejected(RejectReason::TooLarge);
        if let Some(suppressed) = serving.rejections.hit() {
            tracing::warn!(size = body.len(), limit, topic = %Escaped(&serving.topic),
                suppressed, "rejecting a request above the message size limit");
        }
        return Settle::reject(acker);
    }
    if let Some(failure) = serving
        .auth
        .as_ref()
        .and_then(|auth| auth.open(&body).err())
    {
        serving.metrics.rejected(RejectReason::of_auth(&failure));
        if let Some(suppressed) = serving.rejections.hit() {
            tracing::warn!(reason = %failure, size = body.len(), topic = %Escaped(&serving.topic),
                suppressed, "rejecting a request that fails authentication");
        }
        // A caller with a wrong key learns why instead of timing out; a replay (a
        // copy of a request already taken) gets no answer, like a duplicate. At most
        // a few refusals are on their way at once, so a flood costs no more.
        let answer = !matches!(failure, AuthFailure::Replayed);
        let permit = answer
            .then(|| serving.refusals.clone().try_acquire_owned().ok())
            .flatten();
        if let (
            Some(permit),
            Ok(Request {
                msg_id: Some(msg_id),
                reply_to: Some(reply_to),
                ..
            }),
        ) = (permit, wire::decode_request(&body))
        {
            let replier = serving.replier.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let answer = Answer::failure(request_refusal(&failure));
                if let Err(err) = replier
                    .send(&Address::Reply(reply_to), &msg_id, &answer)
                    .await
                {
                    tracing::debug!(error = %err, "could not tell the caller its request was refused");
                }
            });
        }
        return Settle::reject(acker);
    }
    let request = match wire::decode_request(&body) {
        Ok(request) => request,
        Err(err) => {
            // A poison message is dropped for good, never retried.
            serving.metrics.rejected(RejectReason::Malformed);
            if let Some(suppressed) = serving.rejections.hit() {
                tracing::warn!(size = body.len(), error = %Escaped(&err.to_string()),
                    topic = %Escaped(&serving.topic), suppressed, "rejecting malformed message");
            }
            tracing::trace!(prefix = %String::from_utf8_lossy(&body[..body.len().min(64)]),
                "malformed message prefix");
            return Settle::reject(acker);
        }
    };
    if !serving.discoverable && request.namespace.as_deref() == Some(CONTROL_NAMESPACE) {
        // Not answered at all: a failure reply would tell the asker this server is there.
        tracing::debug!(method = %Escaped(&request.method),
            "dropping a control request: this server is not discoverable");
        return Accepted::Settle(Settle { acker, ack: true });
    }
    if let Some(unique_id) = &request.unique_id
        && !seen.insert(unique_id, received)
    {
        serving.metrics.rejected(RejectReason::Duplicate);
        tracing::info!(unique_id = %Escaped(unique_id), method = %Escaped(&request.method),
            "dropping duplicate request");
        return Accepted::Settle(Settle { acker, ack: true });
    }
    // The caller waits `_expires_in` from sending; past it nobody waits for the
    // reply. A request without it (from oslo.messaging) may still carry the
    // transport's time to live (AMQP's `expiration`, the call timeout). The
    // caller's own figure goes first: a transport's may come from the caller's
    // wall clock, which need not agree with this server's.
    let expires_in = match request.expires_in {
        Some(secs) => Duration::try_from_secs_f64(secs.min(MAX_CALL_LIFETIME.as_secs_f64())).ok(),
        None => ttl,
    }
    .map(|limit| limit.min(MAX_CALL_LIFETIME));
    let deadline = expires_in.and_then(|limit| received.checked_add(limit));
    Accepted::Work(Work {
        request,
        acker,
        ack_mode: serving.ack_mode,
        deadline,
    })
}

/// The ids seen within the duplicate window (at most `max` of them), to drop
/// redelivered copies.
pub(super) struct RecentIds {
    order: VecDeque<(Instant, SeenId)>,
    /// The ids in oslo's form, 32 lower-case hex digits (a uuid4's), as numbers:
    /// no allocation per id, and a table a busy server keeps in cache.
    hex: HashSet<u128, foldhash::fast::RandomState>,
    /// Every other id, as it came.
    other: HashSet<Arc<str>, foldhash::fast::RandomState>,
    window: Duration,
    max: usize,
    shortened: Throttle,
}

/// An id as [`RecentIds`] keeps it: exactly, in one of its two sets.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SeenId {
    Hex(u128),
    Other(Arc<str>),
}

impl SeenId {
    /// `id` as a number when it is 32 lower-case hex digits (each such text is
    /// one number, and no other text is), else as text.
    fn of(id: &str) -> Self {
        let bytes = id.as_bytes();
        if bytes.len() == 32 && bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            // Cannot fail: 32 hex digits fit 128 bits, and there is no sign.
            if let Ok(number) = u128::from_str_radix(id, 16) {
                return SeenId::Hex(number);
            }
        }
        SeenId::Other(Arc::from(id))
    }
}

impl RecentIds {
    pub(super) fn new(window: Duration, max: usize) -> Self {
        RecentIds {
            order: VecDeque::new(),
            hex: HashSet::default(),
            other: HashSet::default(),
            window,
            max,
            shortened: Throttle::default(),
        }
    }

    /// Records `id`, seen at `now`; false when it was seen within the window.
    pub(super) fn insert(&mut self, id: &str, now: Instant) -> bool {
        while let Some((seen_at, _)) = self.order.front()
            && now.saturating_duration_since(*seen_at) > self.window
        {
            self.forget_oldest();
        }
        let id = SeenId::of(id);
        if self.contains(&id) {
            return false;
        }
        if self.max == 0 {
            return true;
        }
        if self.order.len() >= self.max
            && let Some(seen_at) = self.forget_oldest()
            && let Some(suppressed) = self.shortened.hit()
        {
            let kept = now.saturating_duration_since(seen_at);
            tracing::warn!(kept = ?kept, window = ?self.window, max_ids = self.max, suppressed,
                "duplicate window cut short by its id limit: a copy redelivered later than \
                 this would run again (see ServerBuilder::max_duplicate_ids)");
        }
        match &id {
            SeenId::Hex(number) => self.hex.insert(*number),
            SeenId::Other(text) => self.other.insert(text.clone()),
        };
        self.order.push_back((now, id));
        true
    }

    fn contains(&self, id: &SeenId) -> bool {
        match id {
            SeenId::Hex(number) => self.hex.contains(number),
            SeenId::Other(text) => self.other.contains(text),
        }
    }

    /// Forgets the oldest id; gives when it was seen.
    fn forget_oldest(&mut self) -> Option<Instant> {
        let (seen_at, id) = self.order.pop_front()?;
        match id {
            SeenId::Hex(number) => self.hex.remove(&number),
            SeenId::Other(text) => self.other.remove(&text),
        };
        Some(seen_at)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::RecentIds;

    #[test]
    fn recent_ids_forget_the_oldest_past_the_limit() {
        let now = Instant::now();
        let mut ids = RecentIds::new(Duration::from_secs(60), 2);
        assert!(ids.insert("a", now));
        assert!(!ids.insert("a", now));
        assert!(ids.insert("b", now));
        assert!(ids.insert("c", now));
        assert!(ids.insert("a", now), "a fell out of the window");
        assert!(!ids.insert("c", now));
    }

    #[test]
    fn recent_ids_are_kept_for_the_window_by_time() {
        let start = Instant::now();
        let mut ids = RecentIds::new(Duration::from_secs(60), 100_000);
        // Many more ids than the old fixed count of 1024, all within the window.
        for n in 0..5_000 {
            assert!(ids.insert(&n.to_string(), start + Duration::from_millis(n)));
        }
        let later = start + Duration::from_secs(59);
        assert!(
            !ids.insert("0", later),
            "the first id is still within the window"
        );
        let past = start + Duration::from_secs(61);
        assert!(ids.insert("0", past), "the first id left the window");
        assert!(
            !ids.insert("4999", past),
            "a later id is still within the window"
        );
    }

    #[test]
    fn hex_ids_and_other_ids_are_kept_apart_and_exactly() {
        let now = Instant::now();
        let mut ids = RecentIds::new(Duration::from_secs(60), 10);
        let uuid = "0123456789abcdef0123456789abcdef";
        assert!(ids.insert(uuid, now));
        assert!(!ids.insert(uuid, now));
        // Upper case, a sign or another length is another id, not the same number.
        for other in [
            "0123456789ABCDEF0123456789ABCDEF",
            "+123456789abcdef0123456789abcdef",
            "123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdef0",
        ] {
            assert!(ids.insert(other, now), "{other} taken for {uuid}");
            assert!(!ids.insert(other, now), "{other} not remembered");
        }
        assert!(!ids.insert(uuid, now));
        // Past the limit the oldest goes first, hex or not.
        let mut ids = RecentIds::new(Duration::from_secs(60), 2);
        let second = "fedcba9876543210fedcba9876543210";
        assert!(ids.insert(uuid, now));
        assert!(ids.insert("text", now));
        assert!(ids.insert(second, now));
        assert!(ids.insert(uuid, now), "the oldest was forgotten");
        assert!(!ids.insert(second, now));
    }

    #[test]
    fn no_ids_kept_when_the_limit_is_zero() {
        let now = Instant::now();
        let mut ids = RecentIds::new(Duration::from_secs(60), 0);
        assert!(ids.insert("a", now));
        assert!(ids.insert("a", now));
    }
}
