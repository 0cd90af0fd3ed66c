//! Notifications, as oslo.messaging's `Notifier` and notification listeners: events
//! (`compute.instance.create.end`, audits, samples) that a service emits without
//! waiting for anyone, and that every interested pool of listeners receives.
//!
//! A [`Notifier`] sends each notification to `<topic>.<priority>` on every topic it
//! has (default [`DEFAULT_NOTIFICATION_TOPIC`]); a [`NotificationListener`] takes the
//! notifications of the priorities its endpoints handle, from its own pool or from
//! the default one, and acknowledges each once its handlers are done. The messages
//! are oslo.messaging's `messagingv2` format ([`crate::wire::NotificationMessage`]).

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::context::Context;
use crate::error::{CodecError, Error, Result};
use crate::wire::NotificationMessage;

mod filter;
mod listener;
mod notifier;

pub use filter::NotificationFilter;
pub use listener::{
    NotificationEndpoint, NotificationListener, NotificationListenerBuilder, NotificationResult,
};
pub use notifier::Notifier;

/// The topic notifications go to unless told otherwise (oslo's
/// `[oslo_messaging_notifications] topics`).
pub const DEFAULT_NOTIFICATION_TOPIC: &str = "notifications";

/// How important a notification is; each priority has a queue of its own per topic
/// (`<topic>.<priority>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// `audit`
    Audit,
    /// `debug`
    Debug,
    /// `info`
    Info,
    /// `warn` (oslo's `warning` too)
    Warn,
    /// `error`
    Error,
    /// `critical`
    Critical,
    /// `sample`
    Sample,
}

impl Priority {
    /// Every priority, in oslo's order.
    pub const ALL: [Priority; 7] = [
        Priority::Audit,
        Priority::Debug,
        Priority::Info,
        Priority::Warn,
        Priority::Error,
        Priority::Critical,
        Priority::Sample,
    ];

    /// The lower-case name: the endpoint method's in oslo, and the queue suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Audit => "audit",
            Priority::Debug => "debug",
            Priority::Info => "info",
            Priority::Warn => "warn",
            Priority::Error => "error",
            Priority::Critical => "critical",
            Priority::Sample => "sample",
        }
    }

    /// The upper-case name a notification carries (`INFO`).
    pub fn wire_name(self) -> &'static str {
        match self {
            Priority::Audit => "AUDIT",
            Priority::Debug => "DEBUG",
            Priority::Info => "INFO",
            Priority::Warn => "WARN",
            Priority::Error => "ERROR",
            Priority::Critical => "CRITICAL",
            Priority::Sample => "SAMPLE",
        }
    }

    /// The routing key of this priority on `topic`: `<topic>.<priority>`.
    pub fn key(self, topic: &str) -> String {
        format!("{topic}.{}", self.as_str())
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A priority name that is not one of oslo's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown notification priority {0:?} (audit, debug, info, warn, error, critical, sample)")]
pub struct UnknownPriority(pub String);

impl FromStr for Priority {
    type Err = UnknownPriority;

    /// Either case; `warning` is `warn`, as oslo's `Notifier.warning`.
    fn from_str(name: &str) -> std::result::Result<Self, Self::Err> {
        let lower = name.to_ascii_lowercase();
        if lower == "warning" {
            return Ok(Priority::Warn);
        }
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == lower)
            .ok_or_else(|| UnknownPriority(name.to_owned()))
    }
}

/// What came with a notification besides its content: oslo's `metadata`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// The notification's `message_id`.
    pub message_id: String,
    /// When it was sent, as the sender wrote it (UTC, `2026-12-06 16:41:45.766957`).
    pub timestamp: String,
}

/// One notification received.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// The sender's context.
    pub context: Context,
    /// Who sent it.
    pub publisher_id: String,
    /// What happened.
    pub event_type: String,
    /// Its priority.
    pub priority: Priority,
    /// Its content.
    pub payload: Value,
    /// Its id and time.
    pub metadata: Metadata,
}

impl Notification {
    /// The payload decoded as `T`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.payload).map_err(|e| {
            Error::Codec(CodecError::new(format!(
                "notification payload does not decode into the expected type: {e}"
            )))
        })
    }

    /// A received message as a notification; a priority that is not oslo's is an
    /// error.
    pub(crate) fn from_message(
        message: NotificationMessage,
    ) -> std::result::Result<Self, CodecError> {
        let priority = message
            .priority
            .parse()
            .map_err(|e: UnknownPriority| CodecError::new(e.to_string()))?;
        Ok(Notification {
            context: message.context,
            publisher_id: message.publisher_id,
            event_type: message.event_type,
            priority,
            payload: message.payload,
            metadata: Metadata {
                message_id: message.message_id,
                timestamp: message.timestamp,
            },
        })
    }
}

/// `now` as Python's `str(datetime.utcnow())`: `YYYY-MM-DD HH:MM:SS.ffffff`, the
/// fraction left out when it is zero.
pub(crate) fn oslo_timestamp(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let micros = since.subsec_micros();
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    let mut text = format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}");
    if micros != 0 {
        text.push_str(&format!(".{micros:06}"));
    }
    text
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_read_as_pythons_str_of_a_datetime() {
        let at = |secs: u64, micros: u32| {
            oslo_timestamp(
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into()),
            )
        };
        assert_eq!(at(0, 0), "1970-01-01 00:00:00");
        assert_eq!(at(1_796_575_305, 766_957), "2026-12-06 16:41:45.766957");
        assert_eq!(at(951_782_400, 5), "2000-02-29 00:00:00.000005");
        assert_eq!(at(4_107_542_399, 0), "2100-02-28 23:59:59");
    }

    #[test]
    fn priorities_read_either_case_and_warning() {
        assert_eq!("INFO".parse::<Priority>(), Ok(Priority::Info));
        assert_eq!("warning".parse::<Priority>(), Ok(Priority::Warn));
        assert_eq!("WARN".parse::<Priority>(), Ok(Priority::Warn));
        assert!("loud".parse::<Priority>().is_err());
        for priority in Priority::ALL {
            assert_eq!(priority.wire_name().parse::<Priority>(), Ok(priority));
            assert_eq!(
                priority.key("notifications"),
                format!("notifications.{priority}")
            );
        }
    }
}
