//! The prefetch of a server's consumer, following the size of its deliveries:
//! RabbitMQ has no prefetch in bytes, so the prefetch in messages is the server's byte
//! budget divided by the largest recent delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use rpc_core::ByteBudget;

/// How many deliveries a window of the prefetch controller spans at least.
const SIZE_WINDOW: u32 = 16;

/// A server consumer's byte budget, and its prefetch derived from the size of recent
/// deliveries: `budget / largest`, at least 1 and at most `max`.
pub(super) struct Sizing {
    pub(super) budget: ByteBudget,
    /// The prefetch new subscriptions use (read by the consumer task).
    pub(super) prefetch: Arc<AtomicU16>,
    /// The ceiling: the URL's `prefetch`, or the server's concurrency.
    max: u16,
    /// The largest delivery of the current window, and how many it has seen.
    largest: usize,
    seen: u32,
}

impl Sizing {
    /// Charges `budget`; the prefetch starts at `max` in `prefetch`, shared with the
    /// task that subscribes.
    pub(super) fn new(budget: ByteBudget, prefetch: Arc<AtomicU16>, max: u16) -> Self {
        Sizing {
            budget,
            prefetch,
            max,
            largest: 0,
            seen: 0,
        }
    }

    /// The prefetch for deliveries of at most `largest` bytes.
    fn wanted(&self, largest: usize) -> u16 {
        let fits = self.budget.limit() / largest.max(1);
        u16::try_from(fits).unwrap_or(u16::MAX).clamp(1, self.max)
    }

    /// Counts a delivery of `size` bytes; a new prefetch when it should change: at
    /// once when the delivery is too big for the current one, at the end of a window
    /// of deliveries when the largest of them leaves room for at least twice as many
    /// (or for the ceiling).
    pub(super) fn observe(&mut self, size: usize) -> Option<u16> {
        let current = self.prefetch.load(Ordering::Relaxed);
        self.largest = self.largest.max(size);
        self.seen = self.seen.saturating_add(1);
        let mut change = None;
        if self.wanted(size) < current {
            change = Some(self.wanted(self.largest));
        } else if self.seen >= SIZE_WINDOW.max(2 * u32::from(current)) {
            let wanted = self.wanted(self.largest);
            if wanted > current && (wanted >= current.saturating_mul(2) || wanted == self.max) {
                change = Some(wanted);
            }
            self.largest = 0;
            self.seen = 0;
        }
        let change = change?;
        self.largest = 0;
        self.seen = 0;
        self.prefetch.store(change, Ordering::Relaxed);
        Some(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizing(limit: usize, max: u16) -> Sizing {
        Sizing::new(ByteBudget::new(limit), Arc::new(AtomicU16::new(max)), max)
    }

    #[test]
    fn prefetch_follows_the_size_of_deliveries() {
        const MIB: usize = 1024 * 1024;
        let mut s = sizing(64 * MIB, 64);
        // Small deliveries leave the prefetch at its ceiling.
        for _ in 0..200 {
            assert_eq!(s.observe(10_000), None);
        }
        // One too big for it lowers it at once: budget / size.
        assert_eq!(s.observe(8 * MIB), Some(8));
        assert_eq!(s.observe(8 * MIB), None);
        // Bigger than the budget: one at a time.
        assert_eq!(s.observe(100 * MIB), Some(1));
        // Raised only after a whole window of smaller ones.
        for _ in 0..SIZE_WINDOW - 1 {
            assert_eq!(s.observe(MIB), None);
        }
        assert_eq!(s.observe(MIB), Some(64));
        // A raise that would not double the prefetch waits (no churn).
        let mut s = sizing(64 * MIB, 64);
        assert_eq!(s.observe(3 * MIB), Some(21));
        for _ in 0..2 * 21 {
            assert_eq!(s.observe(2 * MIB + MIB / 2), None);
        }
        assert_eq!(s.prefetch.load(Ordering::Relaxed), 21);
    }
}
