//! Helpers for logging what peers send: escaped text, and warnings limited to one
//! line per interval.
//!
//! A method name, an error message or a queue name comes from the network: printed
//! as it is, a newline in it starts a second, genuine-looking log line, and a flood
//! of bad messages becomes a flood of lines. [`Escaped`] and [`Throttle`] prevent
//! both.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long peer-controlled text may be in a log line before it is cut.
const MAX_LOGGED_CHARS: usize = 200;

/// How often a throttled warning is written at most, unless told otherwise.
pub const DEFAULT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Peer-controlled text made safe for a log line: control characters (line breaks
/// included), backslashes and Unicode line and paragraph separators are escaped as
/// Rust escapes them, and text beyond 200 characters is cut (the line says how long
/// it was).
#[derive(Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (count, c) in self.0.chars().enumerate() {
            if count == MAX_LOGGED_CHARS {
                return write!(f, "…({} bytes)", self.0.len());
            }
            if c.is_control() || matches!(c, '\\' | '\u{2028}' | '\u{2029}') {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Lets one warning through per interval and counts the others, so that repeated
/// rejections (a flood of malformed messages, say) write one line per interval
/// with how many were suppressed since the last line.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// At most one line per `interval`. A `const fn`, so a throttle can be a
    /// `static` for warnings that have no owner to hold one.
    pub const fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            state: Mutex::new(ThrottleState {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Records one occurrence. `Some(suppressed)` when a line may be written now
    /// (with how many occurrences were not written since the last one); `None` when
    /// this one is only counted.
    pub fn hit(&self) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let now = Instant::now();
        match state.last {
            Some(last) if now.duration_since(last) < self.interval => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }

    /// When the occurrences counted since the last line may be written, if any were
    /// counted. A caller that wants a burst that then stopped reported too (not only
    /// at the next occurrence) calls [`Throttle::hit`] again at that instant.
    pub fn due(&self) -> Option<Instant> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let last = state.last.filter(|_| state.suppressed > 0)?;
        Some(last + self.interval)
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(DEFAULT_WARN_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Escaped, Throttle};

    #[test]
    fn escaped_text_stays_on_one_line() {
        let text =
            Escaped("add\n2026-01-01T00:00:00Z ERROR forged\r\u{2028}\\x\u{1b}[31m").to_string();
        assert!(!text.contains(['\n', '\r', '\u{2028}', '\u{1b}']), "{text}");
        assert_eq!(
            text,
            "add\\n2026-01-01T00:00:00Z ERROR forged\\r\\u{2028}\\\\x\\u{1b}[31m"
        );
        let long = "é".repeat(300);
        let cut = Escaped(&long).to_string();
        assert!(cut.ends_with("…(600 bytes)"), "{cut}");
        assert_eq!(cut.chars().filter(|c| *c == 'é').count(), 200);
    }

    #[test]
    fn throttle_counts_what_it_suppresses() {
        let throttle = Throttle::new(Duration::from_millis(500));
        assert_eq!(throttle.due(), None);
        assert_eq!(throttle.hit(), Some(0));
        assert_eq!(throttle.due(), None, "nothing suppressed yet");
        assert_eq!(throttle.hit(), None);
        assert_eq!(throttle.hit(), None);
        let due = throttle.due().expect("two suppressed");
        std::thread::sleep(Duration::from_millis(550));
        assert!(due <= std::time::Instant::now());
        assert_eq!(throttle.hit(), Some(2));
        assert_eq!(throttle.hit(), None);
    }
}
