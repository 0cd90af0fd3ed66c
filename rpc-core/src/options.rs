//! The query options of a backend URL (`?connect_timeout=2s&prefetch=64`), read the
//! same way on every backend: durations take `500ms`, `2s`, `1m` or plain seconds
//! with fractions, flags take `true`/`false`/`1`/`0`/`yes`/`no`/`on`/`off`, and an
//! unknown option is an error that lists the known ones.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// How long connecting to a broker may take (TCP, TLS and the broker's handshake)
/// unless the URL's `connect_timeout` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One `key=value` option of a backend's URL, with readers for its value.
///
/// ```
/// use std::time::Duration;
/// use mqrpc::transport::options::UrlOption;
///
/// let option = UrlOption::new("Redis", "block", "250ms");
/// assert_eq!(option.duration().unwrap(), Duration::from_millis(250));
/// let option = UrlOption::new("Redis", "block", "1.5");
/// assert_eq!(option.duration().unwrap(), Duration::from_millis(1500));
/// assert!(UrlOption::new("Redis", "block", "-1").duration().is_err());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct UrlOption<'a> {
    backend: &'static str,
    key: &'a str,
    value: &'a str,
}

impl<'a> UrlOption<'a> {
    /// The option `key=value` of a URL of `backend` (named in errors: `"AMQP"`).
    pub const fn new(backend: &'static str, key: &'a str, value: &'a str) -> Self {
        UrlOption {
            backend,
            key,
            value,
        }
    }

    /// The option's name.
    pub const fn key(&self) -> &'a str {
        self.key
    }

    /// The option's value as written.
    pub const fn value(&self) -> &'a str {
        self.value
    }

    /// An [`Error::InvalidUrl`] about this option: "`<backend> URL: option <key> <what>`".
    pub fn invalid(&self, what: impl fmt::Display) -> Error {
        Error::InvalidUrl(format!("{} URL: option {} {what}", self.backend, self.key))
    }

    /// A positive duration: `500ms`, `2s`, `1.5s`, `1m`, `1h`, or plain seconds (`2`,
    /// `0.25`).
    pub fn duration(&self) -> Result<Duration> {
        self.duration_with(Unit::Seconds)
    }

    /// A positive duration where a plain number counts `plain` units: options whose
    /// old names end in `_ms` keep meaning milliseconds when no unit is written.
    pub fn duration_with(&self, plain: Unit) -> Result<Duration> {
        parse_duration(self.value, plain)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                self.invalid(format_args!(
                    "must be a positive duration such as 500ms, 2s or {} ({})",
                    plain.example(),
                    plain.meaning()
                ))
            })
    }

    /// A flag: `1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`.
    pub fn flag(&self) -> Result<bool> {
        match self.value.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(self.invalid("must be true or false")),
        }
    }

    /// A positive whole number.
    pub fn positive<T: FromStr + Default + PartialEq>(&self) -> Result<T> {
        self.value
            .trim()
            .parse::<T>()
            .ok()
            .filter(|n| *n != T::default())
            .ok_or_else(|| self.invalid("must be a positive integer"))
    }

    /// A whole number, zero allowed.
    pub fn number<T: FromStr>(&self) -> Result<T> {
        self.value
            .trim()
            .parse::<T>()
            .map_err(|_| self.invalid("must be a non-negative integer"))
    }

    /// Text that is not empty.
    pub fn text(&self) -> Result<&'a str> {
        if self.value.is_empty() {
            return Err(self.invalid("must not be empty"));
        }
        Ok(self.value)
    }

    /// The error for an option the backend does not know, listing those it does.
    pub fn unknown(&self, known: &str) -> Error {
        Error::InvalidUrl(format!(
            "{} URL: unknown option {:?} (known: {known})",
            self.backend, self.key
        ))
    }
}

/// What a plain number (no unit) means in a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unit {
    /// Seconds, fractions allowed: the default of every duration option.
    Seconds,
    /// Milliseconds: the options whose names end in `_ms`.
    Millis,
}

impl Unit {
    fn example(self) -> &'static str {
        match self {
            Unit::Seconds => "1.5",
            Unit::Millis => "1500",
        }
    }

    fn meaning(self) -> &'static str {
        match self {
            Unit::Seconds => "a plain number is seconds",
            Unit::Millis => "a plain number is milliseconds",
        }
    }
}

/// Reads a duration: a non-negative finite number followed by `ms`, `s`, `m` or `h`,
/// or a plain number counted in `plain` units. `None` when it is none of these.
///
/// ```
/// use std::time::Duration;
/// use mqrpc::transport::options::{Unit, parse_duration};
///
/// assert_eq!(parse_duration("2s", Unit::Seconds), Some(Duration::from_secs(2)));
/// assert_eq!(parse_duration("0.5", Unit::Seconds), Some(Duration::from_millis(500)));
/// assert_eq!(parse_duration("500", Unit::Millis), Some(Duration::from_millis(500)));
/// assert_eq!(parse_duration("1m", Unit::Millis), Some(Duration::from_secs(60)));
/// assert_eq!(parse_duration("soon", Unit::Seconds), None);
/// ```
pub fn parse_duration(text: &str, plain: Unit) -> Option<Duration> {
    let text = text.trim();
    // A plain number first, so that an exponent (`1e3`, `2E-1`) is not read as a unit.
    if let Ok(value) = text.parse::<f64>() {
        let seconds_per_unit = match plain {
            Unit::Seconds => 1.0,
            Unit::Millis => 0.001,
        };
        return (value.is_finite() && value >= 0.0)
            .then(|| Duration::try_from_secs_f64(value * seconds_per_unit).ok())
            .flatten();
    }
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds_per_unit = match unit.trim() {
        "" => match plain {
            Unit::Seconds => 1.0,
            Unit::Millis => 0.001,
        },
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    let value: f64 = number.trim().parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    Duration::try_from_secs_f64(value * seconds_per_unit).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_plain_numbers() {
        let s = |t| parse_duration(t, Unit::Seconds);
        assert_eq!(s("2"), Some(Duration::from_secs(2)));
        assert_eq!(s("2.5"), Some(Duration::from_millis(2500)));
        assert_eq!(s(" 250ms "), Some(Duration::from_millis(250)));
        assert_eq!(s("3s"), Some(Duration::from_secs(3)));
        assert_eq!(s("2m"), Some(Duration::from_secs(120)));
        assert_eq!(s("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(s("0"), Some(Duration::ZERO));
        assert_eq!(s("1e3"), Some(Duration::from_secs(1000)));
        assert_eq!(s("2E-1"), Some(Duration::from_millis(200)));
        for bad in [
            "", "ms", "-1", "NaN", "inf", "1e400", "2 weeks", "3d", "1.2.3",
        ] {
            assert_eq!(s(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_duration("1500", Unit::Millis),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_duration("2s", Unit::Millis),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn option_errors_name_the_backend_and_the_option() {
        let zero = UrlOption::new("NATS", "ack_wait", "0").duration();
        let text = zero.map_or_else(|e| e.to_string(), |d| format!("accepted {d:?}"));
        assert!(text.contains("NATS URL: option ack_wait"), "{text}");
        let flag = UrlOption::new("AMQP", "durable", "maybe").flag();
        assert!(matches!(flag, Err(Error::InvalidUrl(m)) if m.contains("must be true or false")));
        assert!(matches!(
            UrlOption::new("AMQP", "durable", "ON").flag(),
            Ok(true)
        ));
        assert!(matches!(
            UrlOption::new("R", "maxlen", "12").positive::<u64>(),
            Ok(12)
        ));
        assert!(
            UrlOption::new("R", "maxlen", "0")
                .positive::<u64>()
                .is_err()
        );
        let unknown = UrlOption::new("Redis", "colour", "red").unknown("prefix, maxlen");
        assert!(
            unknown
                .to_string()
                .contains("unknown option \"colour\" (known: prefix, maxlen)")
        );
    }
}
