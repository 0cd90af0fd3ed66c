//! A server's health: whether it is consuming, reconnecting or stopped, and how long
//! since its last delivery ([`Health`], read with `Server::health` or a
//! [`HealthProbe`] that outlives the server).
//!
//! The server and its consumer share one [`ConsumerStatus`], handed to the transport
//! in [`crate::ListenOptions::status`] as the byte budget is. Reconnection is the
//! backend's business (lapin, redis-rs and async-nats each reconnect differently), so
//! the consumer reports it: it takes a [`ConnectionStatus`] for each connection it
//! reads from and says when that one is [lost](ConnectionStatus::lost) and when it
//! is [restored](ConnectionStatus::restored), subscriptions included. The server is
//! reconnecting while any of them is lost. The server itself records its deliveries
//! and its end (stopping, stopped). A consumer that reports nothing (the memory bus,
//! which has no connection to lose) is consuming for as long as it serves.
//!
//! Everything is a few atomics: recording a delivery is one clock read and one store.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// What a server is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HealthState {
    /// Subscribed: messages sent to the server's target reach it.
    Consuming,
    /// A connection of its consumer was lost; the consumer is connecting and
    /// subscribing again. Messages sent meanwhile wait in the broker where it keeps
    /// them (AMQP queues, Redis streams, JetStream casts) and are lost on core NATS.
    Reconnecting,
    /// Shutting down: no longer taking messages, letting the requests in progress
    /// finish (the grace period).
    Stopping,
    /// Stopped, by [`crate::Server::shutdown`], by dropping the server, or because
    /// its consumer ended for good. It serves no more.
    Stopped,
}

impl HealthState {
    /// The state's name, in lower case: `consuming`, `reconnecting`, `stopping`,
    /// `stopped`.
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthState::Consuming => "consuming",
            HealthState::Reconnecting => "reconnecting",
            HealthState::Stopping => "stopping",
            HealthState::Stopped => "stopped",
        }
    }

    /// Whether the server takes messages now (only [`HealthState::Consuming`]): what
    /// a readiness check asks.
    pub fn is_consuming(&self) -> bool {
        matches!(self, HealthState::Consuming)
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A server's health at one moment (`Server::health`, [`HealthProbe::health`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// What the server is doing.
    pub state: HealthState,
    /// How long ago the server last took a delivery from its consumer; `None` when it
    /// has taken none yet. A long quiet time alone is no fault (nobody may be
    /// calling); beside traffic known to flow, it points at a stuck consumer.
    pub since_last_delivery: Option<Duration>,
    /// How long the server has been in `state` (since it started, for a server that
    /// has been consuming all along).
    pub in_state_for: Duration,
    /// How many times the server went from consuming to reconnecting since it
    /// started.
    pub reconnections: u64,
}

const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const STOPPED: u8 = 2;

/// What a server, its consumer and its probes share.
struct Shared {
    started: Instant,
    /// `RUNNING`, `STOPPING` or `STOPPED`; it only goes forward.
    lifecycle: AtomicU8,
    /// Connections lost and not restored yet.
    down: AtomicUsize,
    reconnections: AtomicU64,
    /// Nanoseconds from `started` to the last delivery, plus one; 0 for none yet.
    last_delivery: AtomicU64,
    /// Nanoseconds from `started` to the last change of state.
    changed_at: AtomicU64,
    /// Told of every change of state, for [`HealthProbe::wait_for`].
    changes: watch::Sender<()>,
}

impl Shared {
    fn now(&self) -> u64 {
        nanos(self.started.elapsed())
    }

    fn changed(&self) {
        self.changed_at.store(self.now(), Ordering::Release);
        self.changes.send_replace(());
    }

    fn health(&self) -> Health {
        // The clock is read first: a delivery recorded after it counts as just now.
        let now = self.now();
        let state = match self.lifecycle.load(Ordering::Acquire) {
            STOPPED => HealthState::Stopped,
            STOPPING => HealthState::Stopping,
            _ if self.down.load(Ordering::Acquire) > 0 => HealthState::Reconnecting,
            _ => HealthState::Consuming,
        };
        let last = self.last_delivery.load(Ordering::Acquire);
        Health {
            state,
            since_last_delivery: (last != 0)
                .then(|| Duration::from_nanos(now.saturating_sub(last - 1))),
            in_state_for: Duration::from_nanos(
                now.saturating_sub(self.changed_at.load(Ordering::Acquire)),
            ),
            reconnections: self.reconnections.load(Ordering::Acquire),
        }
    }

    /// Moves the lifecycle forward to `to` (never back).
    fn advance(&self, to: u8) {
        if self.lifecycle.fetch_max(to, Ordering::AcqRel) < to {
            self.changed();
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Where a server's consumer reports the state of its connections, shared by the
/// server and the consumer ([`crate::ListenOptions::status`]). Cloning gives another
/// handle to the same status.
///
/// A backend takes one [`ConnectionStatus`] per connection (or subscription) it
/// reads from and reports on each; it need not report anything if it cannot lose
/// one.
#[derive(Clone)]
pub struct ConsumerStatus {
    shared: Arc<Shared>,
}

impl ConsumerStatus {
    /// A status of its own: consuming, nothing delivered yet.
    pub fn new() -> Self {
        ConsumerStatus {
            shared: Arc::new(Shared {
                started: Instant::now(),
                lifecycle: AtomicU8::new(RUNNING),
                down: AtomicUsize::new(0),
                reconnections: AtomicU64::new(0),
                last_delivery: AtomicU64::new(0),
                changed_at: AtomicU64::new(0),
                changes: watch::Sender::new(()),
            }),
        }
    }

    /// A connection to report on, up to begin with. The server is reconnecting
    /// while any connection taken here is lost; one dropped while lost no longer
    /// counts.
    pub fn connection(&self) -> ConnectionStatus {
        ConnectionStatus {
            shared: self.shared.clone(),
            lost: AtomicBool::new(false),
        }
    }

    /// The health this status describes, as the server reports it.
    pub fn health(&self) -> Health {
        self.shared.health()
    }

    /// A probe of this status.
    pub(crate) fn probe(&self) -> HealthProbe {
        HealthProbe {
            shared: self.shared.clone(),
        }
    }

    /// The server took a delivery.
    pub(crate) fn delivered(&self) {
        let at = self.shared.now().saturating_add(1);
        self.shared.last_delivery.store(at, Ordering::Release);
    }

    /// The server stopped taking messages and lets its requests finish.
    pub(crate) fn stopping(&self) {
        self.shared.advance(STOPPING);
    }

    /// Marks the server stopped when the returned guard is dropped, however its
    /// serving ends (returns, panics, or is cancelled).
    pub(crate) fn stopped_on_drop(&self) -> StoppedOnDrop {
        StoppedOnDrop(self.shared.clone())
    }
}

impl Default for ConsumerStatus {
    fn default() -> Self {
        ConsumerStatus::new()
    }
}

impl PartialEq for ConsumerStatus {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Eq for ConsumerStatus {}

impl fmt::Debug for ConsumerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConsumerStatus")
            .field(&self.shared.health())
            .finish()
    }
}

/// Marks a server stopped when dropped ([`ConsumerStatus::stopped_on_drop`]).
pub(crate) struct StoppedOnDrop(Arc<Shared>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.advance(STOPPED);
    }
}

/// One connection of a consumer, as the consumer reports it
/// ([`ConsumerStatus::connection`]). Reports are idempotent: saying `lost` twice is
/// one loss.
pub struct ConnectionStatus {
    shared: Arc<Shared>,
    lost: AtomicBool,
}

impl ConnectionStatus {
    /// The connection (or its subscription) is gone, and the consumer is getting it
    /// back. The first connection of a server to be lost makes it
    /// [`HealthState::Reconnecting`] and counts one reconnection.
    pub fn lost(&self) {
        if !self.lost.swap(true, Ordering::AcqRel)
            && self.shared.down.fetch_add(1, Ordering::AcqRel) == 0
        {
            self.shared.reconnections.fetch_add(1, Ordering::AcqRel);
            self.shared.changed();
        }
    }

    /// The connection is back, subscribed again: messages reach the consumer.
    pub fn restored(&self) {
        if self.lost.swap(false, Ordering::AcqRel)
            && self.shared.down.fetch_sub(1, Ordering::AcqRel) == 1
        {
            self.shared.changed();
        }
    }

    /// Whether the connection was reported lost and not restored since.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionStatus {
    fn drop(&mut self) {
        self.restored();
    }
}

impl fmt::Debug for ConnectionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionStatus")
            .field("lost", &self.is_lost())
            .finish()
    }
}

/// A handle on a server's health that can be cloned, sent to another task (an HTTP
/// health endpoint) and kept after the server is gone: it then reports
/// [`HealthState::Stopped`]. Get one with `Server::health_probe`.
#[derive(Clone)]
pub struct HealthProbe {
    shared: Arc<Shared>,
}

impl HealthProbe {
    /// The server's health now.
    pub fn health(&self) -> Health {
        self.shared.health()
    }

    /// Waits until the server's health satisfies `until`, and returns it. Checked
    /// now and after every change of state or reconnection count, not after each
    /// delivery: a condition on [`Health::since_last_delivery`] alone is checked
    /// only at those times. Cancel-safe; bound it with a timeout where the state
    /// may never come.
    pub async fn wait_for(&self, mut until: impl FnMut(&Health) -> bool) -> Health {
        let mut changes = self.shared.changes.subscribe();
        loop {
            let health = self.health();
            if until(&health) {
                return health;
            }
            // The sender lives in `shared`, which this probe holds: it never closes.
            if changes.changed().await.is_err() {
                return self.health();
            }
        }
    }
}

impl fmt::Debug for HealthProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HealthProbe").field(&self.health()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_status_is_consuming_with_no_delivery() {
        let health = ConsumerStatus::new().health();
        assert_eq!(health.state, HealthState::Consuming);
        assert_eq!(health.since_last_delivery, None);
        assert_eq!(health.reconnections, 0);
    }

    #[test]
    fn reconnecting_while_any_connection_is_lost() {
        let status = ConsumerStatus::new();
        let (a, b) = (status.connection(), status.connection());
        a.lost();
        a.lost();
        b.lost();
        assert_eq!(status.health().state, HealthState::Reconnecting);
        a.restored();
        assert_eq!(status.health().state, HealthState::Reconnecting);
        b.restored();
        b.restored();
        assert_eq!(status.health().state, HealthState::Consuming);
        // Both were lost at once: one reconnection.
        assert_eq!(status.health().reconnections, 1);
        a.lost();
        assert_eq!(status.health().reconnections, 2);
        drop(a);
        assert_eq!(status.health().state, HealthState::Consuming);
    }

    #[test]
    fn the_lifecycle_only_goes_forward_and_wins_over_connections() {
        let status = ConsumerStatus::new();
        let conn = status.connection();
        conn.lost();
        status.stopping();
        assert_eq!(status.health().state, HealthState::Stopping);
        drop(status.stopped_on_drop());
        status.stopping();
        conn.restored();
        assert_eq!(status.health().state, HealthState::Stopped);
    }

    #[test]
    fn a_delivery_is_remembered() {
        let status = ConsumerStatus::new();
        status.delivered();
        let since = status.health().since_last_delivery.expect("a delivery");
        assert!(since < Duration::from_secs(3600), "{since:?}");
    }

    #[tokio::test]
    async fn a_probe_wakes_on_a_change_of_state() {
        let status = ConsumerStatus::new();
        let probe = status.probe();
        let conn = status.connection();
        let waiting = tokio::spawn({
            let probe = probe.clone();
            async move {
                probe
                    .wait_for(|h| h.state == HealthState::Reconnecting)
                    .await
            }
        });
        conn.lost();
        let seen = waiting.await.expect("the waiter");
        assert_eq!(seen.state, HealthState::Reconnecting);
        assert_eq!(seen.reconnections, 1);
        drop(status);
        drop(conn);
        assert_eq!(probe.health().state, HealthState::Consuming);
    }
}
