//! Retries of idempotent calls ([`RetryPolicy`]): the errors worth another attempt
//! are those [`Error::is_retryable`] names, and the waits between attempts follow a
//! [`Backoff`].

use std::future::Future;
use std::time::Duration;

use crate::backoff::{Backoff, Retry};
use crate::error::{Error, Result};

/// Retries of idempotent calls: how many attempts in all, and the backoff between
/// them (doubling from `first_backoff` up to `max_backoff`, each wait drawn between
/// half and all of that, so clients that failed together do not retry together).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub attempts: u32,
    /// Wait before the first retry.
    pub first_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// `attempts` attempts in all, waits from 100 ms up to 5 s.
    pub fn new(attempts: u32) -> Self {
        RetryPolicy {
            attempts: attempts.max(1),
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// Sets the first and the longest wait.
    pub fn backoff_between(mut self, first: Duration, max: Duration) -> Self {
        self.first_backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// The wait before retry number `retry` (0 for the first retry).
    pub fn backoff(&self, retry: u32) -> Duration {
        self.waits().delay(retry)
    }

    fn waits(&self) -> Backoff {
        Backoff::new(self.first_backoff, self.max_backoff)
    }

    /// Runs `attempt` until it succeeds, fails with an error that is not
    /// retryable, or the attempts run out; returns the last outcome. `method` names
    /// the call in the log.
    pub(crate) async fn run<T, F, Fut>(&self, method: &str, attempt: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        Retry::new(self.waits())
            .attempts(self.attempts)
            .run_notify(attempt, Error::is_retryable, |err, _, wait| {
                tracing::debug!(error = %err, ?wait, method, "retrying an idempotent call");
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TransportErrorKind;

    #[test]
    fn retry_backoff_doubles_with_jitter_and_caps() {
        let policy = RetryPolicy::new(5)
            .backoff_between(Duration::from_millis(100), Duration::from_millis(300));
        for retry in 0..6 {
            let wait = policy.backoff(retry);
            let full =
                Duration::from_millis(100 * (1 << retry.min(20))).min(Duration::from_millis(300));
            assert!(
                wait >= full / 2 && wait <= full,
                "retry {retry}: {wait:?} of {full:?}"
            );
        }
        assert_eq!(RetryPolicy::new(0).attempts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn only_retryable_errors_are_tried_again_up_to_the_attempts() {
        let policy = RetryPolicy::new(3);
        let mut tries = 0;
        let nobody: Result<()> = policy
            .run("m", |_| {
                tries += 1;
                async {
                    Err(Error::NoResponders {
                        address: "x".into(),
                    })
                }
            })
            .await;
        assert!(matches!(nobody, Err(Error::NoResponders { .. })));
        assert_eq!(tries, 3, "retried until the attempts ran out");

        let mut tries = 0;
        let missing: Result<()> = policy
            .run("m", |_| {
                tries += 1;
                async { Err(Error::NoSuchMethod { method: "m".into() }) }
            })
            .await;
        assert!(matches!(missing, Err(Error::NoSuchMethod { .. })));
        assert_eq!(tries, 1, "not retryable");

        let recovered = policy
            .run("m", |n| async move {
                match n {
                    0 => Err(Error::transport_msg(
                        TransportErrorKind::Disconnected,
                        "gone",
                    )),
                    n => Ok(n),
                }
            })
            .await;
        assert!(matches!(recovered, Ok(1)), "{recovered:?}");
    }
}
