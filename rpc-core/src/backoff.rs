//! Waiting between attempts, written once: [`Backoff`] says how long to wait before
//! attempt *n*, [`Retry`] runs an operation again until it succeeds, fails for good,
//! runs out of attempts or reaches its deadline. Clients, reconnect loops and
//! publishers of every backend use these two.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// How a wait is spread around its nominal value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// Each wait is drawn between half and all of the nominal wait, so peers that
    /// failed together do not retry together.
    #[default]
    UpperHalf,
    /// Exactly the nominal wait.
    None,
}

/// Capped exponential backoff: `first`, then doubling up to `max`, with [`Jitter`].
///
/// ```
/// use std::time::Duration;
/// use mqrpc::{Backoff, Jitter};
///
/// let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
///     .jitter(Jitter::None);
/// assert_eq!(backoff.delay(0), Duration::from_millis(100));
/// assert_eq!(backoff.delay(2), Duration::from_millis(400));
/// assert_eq!(backoff.delay(30), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// Waits from `first`, doubling, up to `max` (at least `first`), with jitter in the
    /// upper half.
    pub const fn new(first: Duration, max: Duration) -> Self {
        let max = if max.as_nanos() < first.as_nanos() {
            first
        } else {
            max
        };
        Backoff {
            first,
            max,
            jitter: Jitter::UpperHalf,
        }
    }

    /// Sets how waits are spread.
    pub const fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first wait.
    pub const fn first(&self) -> Duration {
        self.first
    }

    /// The longest wait.
    pub const fn max(&self) -> Duration {
        self.max
    }

    /// The wait before attempt `attempt + 1`, i.e. after `attempt + 1` failures
    /// (`delay(0)` is the wait after the first failure).
    pub fn delay(&self, attempt: u32) -> Duration {
        let nominal = self
            .first
            .checked_mul(1u32 << attempt.min(20))
            .unwrap_or(self.max)
            .min(self.max);
        match self.jitter {
            Jitter::UpperHalf => nominal.mul_f64(rand::rng().random_range(0.5..=1.0)),
            Jitter::None => nominal,
        }
    }
}

/// Runs an operation until it succeeds, with [`Backoff`] between attempts, bounded by a
/// number of attempts, a deadline, or neither (then only the operation's own errors
/// and the caller dropping the future end it: the future is cancel-safe between
/// attempts).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use mqrpc::{Backoff, Retry};
///
/// let retry = Retry::new(Backoff::new(Duration::from_millis(1), Duration::from_millis(5)))
///     .attempts(3);
/// let mut seen = 0;
/// let result: Result<(), &str> = retry
///     .run(|_attempt| { seen += 1; async { Err("down") } }, |_err| true)
///     .await;
/// assert_eq!((result, seen), (Err("down"), 3));
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    backoff: Backoff,
    attempts: Option<u32>,
    deadline: Option<Instant>,
}

impl Retry {
    /// Retries with `backoff`, without limit until [`Retry::attempts`] or
    /// [`Retry::deadline`] set one.
    pub const fn new(backoff: Backoff) -> Self {
        Retry {
            backoff,
            attempts: None,
            deadline: None,
        }
    }

    /// At most `attempts` attempts in all, the first included (at least 1).
    pub const fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = Some(if attempts == 0 { 1 } else { attempts });
        self
    }

    /// No attempt starts at or after `deadline`: when the next wait would reach it,
    /// the last error is returned at once.
    pub const fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Calls `op` with the attempt number (0 first) until it returns `Ok`, or an error
    /// that `retryable` refuses, or the attempts or the deadline run out; the last
    /// error is returned.
    pub async fn run<T, E, F, Fut>(&self, op: F, retryable: impl FnMut(&E) -> bool) -> Result<T, E>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_notify(op, retryable, |_, _, _| {}).await
    }

    /// Like [`Retry::run`], and `notify` hears of every failure that is retried, with
    /// its attempt number and the wait before the next attempt: where a reconnect
    /// loop logs "attempt failed, trying again in ...".
    pub async fn run_notify<T, E, F, Fut>(
        &self,
        mut op: F,
        mut retryable: impl FnMut(&E) -> bool,
        mut notify: impl FnMut(&E, u32, Duration),
    ) -> Result<T, E>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 0u32;
        loop {
            let err = match op(attempt).await {
                Ok(value) => return Ok(value),
                Err(err) => err,
            };
            let last = self.attempts.is_some_and(|n| attempt + 1 >= n);
            if last || !retryable(&err) {
                return Err(err);
            }
            let wait = self.backoff.delay(attempt);
            // An attempt that could only start at the deadline would overrun it.
            if self
                .deadline
                .is_some_and(|deadline| Instant::now() + wait >= deadline)
            {
                return Err(err);
            }
            notify(&err, attempt, wait);
            tokio::time::sleep(wait).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_stop_at_the_cap() {
        let b =
            Backoff::new(Duration::from_millis(10), Duration::from_millis(50)).jitter(Jitter::None);
        let delays: Vec<_> = (0..5).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [10, 20, 40, 50, 50]);
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(50));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..100 {
            let d = b.delay(0);
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        }
    }

    #[test]
    fn a_max_below_first_is_raised_to_first() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.max(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_at_success_refusal_attempts_or_deadline() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let ok: Result<u32, u32> = Retry::new(backoff)
            .run(
                |n| async move { if n < 2 { Err(n) } else { Ok(n) } },
                |_| true,
            )
            .await;
        assert_eq!(ok, Ok(2));

        let refused: Result<(), u32> = Retry::new(backoff)
            .run(|n| async move { Err(n) }, |e| *e < 1)
            .await;
        assert_eq!(refused, Err(1));

        let counted: Result<(), u32> = Retry::new(backoff)
            .attempts(4)
            .run(|n| async move { Err(n) }, |_| true)
            .await;
        assert_eq!(counted, Err(3));

        let start = Instant::now();
        let timed: Result<(), u32> = Retry::new(backoff.jitter(Jitter::None))
            .deadline(start + Duration::from_millis(2500))
            .run(|n| async move { Err(n) }, |_| true)
            .await;
        // Attempts at 0 s, 1 s and 2 s; a fourth would start at 3 s, past 2.5 s.
        assert_eq!(timed, Err(2));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn notify_hears_each_retried_failure_and_its_wait() {
        let backoff =
            Backoff::new(Duration::from_secs(1), Duration::from_secs(2)).jitter(Jitter::None);
        let mut heard = Vec::new();
        let result: Result<(), u32> = Retry::new(backoff)
            .attempts(4)
            .run_notify(
                |n| async move { Err(n) },
                |_| true,
                |err, attempt, wait| heard.push((*err, attempt, wait.as_secs())),
            )
            .await;
        // The last failure is returned, not retried: nobody hears of it.
        assert_eq!(result, Err(3));
        assert_eq!(heard, [(0, 0, 1), (1, 1, 2), (2, 2, 2)]);
    }
}
