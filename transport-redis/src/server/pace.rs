//! How many entries a server's next read takes (`COUNT`), so that what it holds in
//! memory stays within its byte budget while small entries are still read many at a
//! time.
//!
//! Redis cannot cap a read by bytes, and cannot tell an entry's size without sending
//! it. So the pace goes by the largest entry read lately: a read waits until the
//! budget has room for one such entry, and takes as many as fit in what is free. It
//! starts at one entry (after an idle spell too) and doubles while reads come back
//! full, up to the buffer's room; one big entry brings it back at once.
//!
//! What a server holds thus stays within its budget while entries keep about the
//! same size, and exceeds it by at most the one entry a read took when entries grow.
//! A reader that has waited [`RELAX_AFTER`] for room lowers what it waits for (the
//! entries that come next may be small), so that a big request held by a long
//! handler does not keep small ones waiting in Redis all that time; that too exceeds
//! the budget by one entry at most.

use std::time::Duration;

/// How long a reader waits for room for an entry as large as the largest one lately
/// before it halves that size.
pub(crate) const RELAX_AFTER: Duration = Duration::from_secs(1);

/// The pace of one reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pace {
    /// Entries the next read may take, before the budget is consulted.
    count: usize,
    /// The largest entry read lately, in bytes (0: none read yet). It halves with
    /// each read of smaller entries, so one big entry is not remembered for ever.
    largest: usize,
    /// The most entries a read ever takes.
    most: usize,
}

impl Pace {
    /// A pace that starts at one entry and never takes more than `most` at once.
    pub(crate) fn new(most: usize) -> Self {
        Pace {
            count: 1,
            largest: 0,
            most: most.max(1),
        }
    }

    /// Takes at most `most` entries at once from now on (at least one): a reader
    /// that competes with others for one group's entries takes its share.
    pub(crate) fn limit(&mut self, most: usize) {
        self.most = most.max(1);
        self.count = self.count.min(self.most);
    }

    /// The largest entry read lately, in bytes (0 before the first read).
    pub(crate) fn largest(&self) -> usize {
        self.largest
    }

    /// Bytes the budget must have free before the next read: room for one entry as
    /// large as the largest read lately. At most the whole `limit`, so an entry
    /// bigger than the budget is read alone, once everything else is handled.
    pub(crate) fn wanted(&self, limit: usize) -> usize {
        self.largest.clamp(1, limit.max(1))
    }

    /// Entries the next read asks for, given `room` in the buffer and `available`
    /// bytes in the budget: as many as fit at the largest size seen lately, one when
    /// nothing has been read yet.
    pub(crate) fn count(&self, room: usize, available: usize) -> usize {
        let by_bytes = available.checked_div(self.largest).unwrap_or(1);
        self.count.min(by_bytes).min(room).clamp(1, self.most)
    }

    /// Learns from a read that asked for `asked` entries (per stream), got at most
    /// `got` from one stream, and whose largest entry had `largest` bytes.
    pub(crate) fn read(&mut self, asked: usize, got: usize, largest: usize) {
        if got == 0 {
            return;
        }
        self.largest = largest.max(self.largest / 2);
        if got >= asked {
            self.count = asked.saturating_mul(2).min(self.most);
        }
    }

    /// A read came back empty (its block ran out): the traffic that comes next is
    /// unknown, so the next read takes one entry.
    pub(crate) fn idle(&mut self) {
        self.count = 1;
    }

    /// The reader has waited [`RELAX_AFTER`] for room: it waits for half as much.
    pub(crate) fn relax(&mut self) {
        self.largest /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::Pace;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn starts_at_one_and_doubles_while_reads_come_back_full() {
        let mut pace = Pace::new(64);
        let budget = 64 * MIB;
        let mut counts = Vec::new();
        for _ in 0..8 {
            let count = pace.count(64, budget);
            counts.push(count);
            pace.read(count, count, 300);
        }
        assert_eq!(counts, [1, 2, 4, 8, 16, 32, 64, 64]);
        // The buffer's room caps it.
        assert_eq!(pace.count(5, budget), 5);
        // A read that finds fewer entries than it asked for leaves it alone.
        pace.read(64, 3, 300);
        assert_eq!(pace.count(64, budget), 64);
        // After an idle spell it starts again at one.
        pace.idle();
        assert_eq!(pace.count(64, budget), 1);
    }

    #[test]
    fn a_limit_caps_reads_from_then_on() {
        let mut pace = Pace::new(64);
        for _ in 0..8 {
            let count = pace.count(64, 64 * MIB);
            pace.read(count, count, 300);
        }
        assert_eq!(pace.count(64, 64 * MIB), 64);
        pace.limit(2);
        assert_eq!(pace.count(64, 64 * MIB), 2);
        pace.read(2, 2, 300);
        assert_eq!(
            pace.count(64, 64 * MIB),
            2,
            "full reads do not grow past it"
        );
        pace.limit(0);
        assert_eq!(pace.count(64, 64 * MIB), 1, "one entry at least");
        pace.limit(64);
        pace.read(1, 1, 300);
        assert_eq!(pace.count(64, 64 * MIB), 2, "grows again from where it was");
    }

    #[test]
    fn big_entries_are_read_as_many_as_fit() {
        let mut pace = Pace::new(64);
        let limit = 64 * MIB;
        for _ in 0..7 {
            let count = pace.count(64, limit);
            pace.read(count, count, 300);
        }
        assert_eq!(pace.count(64, limit), 64);
        // A read brings 60 MB entries: from now on one fits in the whole budget.
        pace.read(64, 64, 60 * MIB);
        assert_eq!(pace.count(64, limit), 1);
        assert_eq!(pace.wanted(limit), 60 * MIB);
        // With 20 MiB free, not even one fits: the reader waits for `wanted`.
        assert!(20 * MIB < pace.wanted(limit));
        // 10 MB entries: six fit in 64 MiB.
        let mut pace = Pace::new(64);
        pace.read(1, 1, 10 * 1000 * 1000);
        pace.read(2, 2, 10 * 1000 * 1000);
        assert_eq!(pace.count(64, limit), 4);
        pace.read(4, 4, 10 * 1000 * 1000);
        assert_eq!(pace.count(64, limit), 6);
        assert_eq!(pace.count(64, 25 * 1000 * 1000), 2);
    }

    #[test]
    fn waiting_long_lowers_what_is_waited_for() {
        let mut pace = Pace::new(64);
        pace.read(1, 1, 60 * MIB);
        // A long handler holds 60 MiB of a 64 MiB budget: 4 MiB are free.
        let free = 4 * MIB;
        let mut waited = 0;
        while pace.wanted(64 * MIB) > free {
            pace.relax();
            waited += 1;
        }
        assert_eq!(waited, 4);
        assert_eq!(pace.count(64, free), 1);
        // A small entry comes: the pace picks up from there.
        pace.read(1, 1, 1000);
        assert!(pace.wanted(64 * MIB) < free);
        assert!(pace.count(64, free) > 1);
    }

    #[test]
    fn an_entry_bigger_than_the_budget_waits_for_all_of_it() {
        let mut pace = Pace::new(64);
        pace.read(1, 1, 100 * MIB);
        assert_eq!(pace.wanted(64 * MIB), 64 * MIB);
        assert_eq!(pace.count(64, 64 * MIB), 1);
    }

    #[test]
    fn a_big_entry_is_forgotten_after_reads_of_small_ones() {
        let mut pace = Pace::new(64);
        pace.read(1, 1, 60 * MIB);
        let mut reads = 0;
        while pace.largest() > 1000 {
            let count = pace.count(64, 64 * MIB);
            pace.read(count, count, 1000);
            reads += 1;
            assert!(reads < 40, "still {pace:?}");
        }
        assert_eq!(pace.count(64, 64 * MIB), 64);
    }
}
