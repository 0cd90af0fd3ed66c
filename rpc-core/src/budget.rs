//! A budget of bytes for the deliveries a server has taken from its broker and not
//! yet finished handling, shared between the server and its consumer.
//!
//! Counting deliveries alone does not bound memory: 64 deliveries of 50 MB are
//! 3.2 GB. A server charges every delivery it holds against its [`ByteBudget`]
//! until the request's work is done; its consumer reads the budget to take fewer
//! messages from the broker when they are big (and, where the broker keeps them,
//! leaves the rest waiting there).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Bytes of taken-but-unhandled deliveries a server holds unless told otherwise.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

/// A shared count of bytes held against a limit. Cloning gives another handle to the
/// same budget.
///
/// Charges are taken by whoever first holds a message's bytes (the consumer as it
/// reads them from the broker, or the server on receipt) and released when the
/// [`Charge`] is dropped. One message larger than the whole budget is still let
/// through when nothing else is held, so a big message can never wedge a server.
#[derive(Clone)]
pub struct ByteBudget {
    inner: Arc<Inner>,
}

struct Inner {
    limit: usize,
    held: AtomicUsize,
    freed: Notify,
}

impl ByteBudget {
    /// A budget of `limit` bytes (at least 1).
    pub fn new(limit: usize) -> Self {
        ByteBudget {
            inner: Arc::new(Inner {
                limit: limit.max(1),
                held: AtomicUsize::new(0),
                freed: Notify::new(),
            }),
        }
    }

    /// A budget that never runs out (for consumers that are not a server's).
    pub fn unlimited() -> Self {
        ByteBudget::new(usize::MAX)
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.inner.held.load(Ordering::Acquire)
    }

    /// Bytes that may still be taken before the limit is reached.
    pub fn available(&self) -> usize {
        self.inner.limit.saturating_sub(self.held())
    }

    /// Whether the limit is reached: a consumer should take no more from its broker.
    pub fn is_exhausted(&self) -> bool {
        self.held() >= self.inner.limit
    }

    /// Counts `bytes` already taken, whatever the budget has left: the bytes are in
    /// memory already, and the budget must say so.
    pub fn charge(&self, bytes: usize) -> Charge {
        self.inner.held.fetch_add(bytes, Ordering::AcqRel);
        Charge {
            budget: self.clone(),
            bytes,
        }
    }

    /// Counts `bytes` if they fit in what is left, or if nothing is held at all (a
    /// message bigger than the whole budget goes through alone); `None` otherwise.
    pub fn try_charge(&self, bytes: usize) -> Option<Charge> {
        let held = &self.inner.held;
        let mut now = held.load(Ordering::Acquire);
        loop {
            let fits = now == 0 || now.checked_add(bytes).is_some_and(|n| n <= self.inner.limit);
            if !fits {
                return None;
            }
            match held.compare_exchange_weak(now, now + bytes, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    return Some(Charge {
                        budget: self.clone(),
                        bytes,
                    });
                }
                Err(actual) => now = actual,
            }
        }
    }

    /// Waits until at least `bytes` are available (at most the whole limit is waited
    /// for, so a message bigger than the budget waits only for an empty budget).
    pub async fn until_available(&self, bytes: usize) {
        let wanted = bytes.min(self.inner.limit);
        loop {
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.available() >= wanted {
                return;
            }
            freed.await;
        }
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.inner.held.fetch_sub(bytes, Ordering::AcqRel);
            self.inner.freed.notify_waiters();
        }
    }
}

impl PartialEq for ByteBudget {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for ByteBudget {}

impl Default for ByteBudget {
    fn default() -> Self {
        ByteBudget::new(DEFAULT_MAX_PENDING_BYTES)
    }
}

impl fmt::Debug for ByteBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByteBudget")
            .field("limit", &self.inner.limit)
            .field("held", &self.held())
            .finish()
    }
}

/// Bytes counted against a [`ByteBudget`]; dropping it gives them back.
#[must_use = "dropping a charge releases its bytes at once"]
pub struct Charge {
    budget: ByteBudget,
    bytes: usize,
}

impl Charge {
    /// The bytes this charge holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Charge").field("bytes", &self.bytes).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::ByteBudget;

    #[test]
    fn charges_count_until_dropped() {
        let budget = ByteBudget::new(100);
        let a = budget.charge(60);
        assert_eq!((budget.held(), budget.available()), (60, 40));
        assert!(budget.try_charge(50).is_none());
        let b = budget.try_charge(40).expect("fits");
        assert!(budget.is_exhausted());
        drop((a, b));
        assert_eq!(budget.held(), 0);
        // Bigger than the whole budget: only alone.
        let big = budget.try_charge(500).expect("alone");
        assert!(budget.try_charge(1).is_none());
        drop(big);
    }

    #[tokio::test]
    async fn waiting_ends_when_bytes_are_released() {
        let budget = ByteBudget::new(100);
        let held = budget.charge(100);
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.until_available(1_000).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
    }
}
