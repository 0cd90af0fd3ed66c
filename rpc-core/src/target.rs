//! Where a message goes (`Target`) and which interface version it speaks (`Version`).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The exchange used when a target names none: oslo.messaging's `control_exchange`.
pub const DEFAULT_EXCHANGE: &str = "openstack";

/// Where a message goes and which interface it speaks.
///
/// A client's target needs a `topic`; a server's target needs a `topic` and a
/// `server`. Built with chained setters:
///
/// ```
/// use mqrpc::{Target, Version};
/// let target = Target::new("compute").server("host-1").version(Version::new(1, 3));
/// assert_eq!(target.topic, "compute");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Target {
    /// Scope of the topic; `None` means the transport's default (`openstack`).
    pub exchange: Option<String>,
    /// The name of the interface set, shared by every server that implements it.
    pub topic: String,
    /// One named server of the topic.
    pub server: Option<String>,
    /// Deliver to every server of the topic (casts only).
    pub fanout: bool,
    /// The RPC interface name; `None` is the null namespace.
    pub namespace: Option<String>,
    /// The interface version.
    pub version: Option<Version>,
}

impl Target {
    /// A target on `topic`, everything else unset.
    pub fn new(topic: impl Into<String>) -> Self {
        Target {
            topic: topic.into(),
            ..Target::default()
        }
    }

    /// Sets the exchange.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    /// Directs the target at one named server.
    pub fn server(mut self, server: impl Into<String>) -> Self {
        self.server = Some(server.into());
        self
    }

    /// Makes the target a fanout (every server of the topic).
    pub fn fanout(mut self, fanout: bool) -> Self {
        self.fanout = fanout;
        self
    }

    /// Sets the namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Sets the version.
    pub fn version(mut self, version: Version) -> Self {
        self.version = Some(version);
        self
    }

    /// The exchange, or `default` when unset.
    pub fn exchange_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.exchange.as_deref().unwrap_or(default)
    }

    pub(crate) fn require_topic(&self) -> Result<()> {
        if self.topic.is_empty() {
            return Err(Error::InvalidTarget("a topic is required".to_owned()));
        }
        Ok(())
    }

    /// Checks that a server can listen on this target (topic and server set).
    pub fn validate_for_listen(&self) -> Result<()> {
        self.require_topic()?;
        match self.server.as_deref() {
            Some(server) if !server.is_empty() => Ok(()),
            _ => Err(Error::InvalidTarget(
                "a server needs a target with both topic and server set".to_owned(),
            )),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(exchange) = &self.exchange {
            write!(f, "{exchange}/")?;
        }
        f.write_str(&self.topic)?;
        if let Some(server) = &self.server {
            write!(f, ".{server}")?;
        }
        if self.fanout {
            f.write_str(" (fanout)")?;
        }
        Ok(())
    }
}

/// An interface version `major.minor[.revision]`.
///
/// Compatibility follows oslo.messaging: an implementation serves a request when the
/// majors are equal and the requested minor is not above the implemented one (and, when
/// the minors are equal, likewise for the revision).
///
/// ```
/// use mqrpc::Version;
/// let implemented: Version = "1.3".parse().unwrap();
/// assert!(implemented.serves(&"1.2".parse().unwrap()));
/// assert!(!implemented.serves(&"1.4".parse().unwrap()));
/// assert!(!implemented.serves(&"2.0".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    /// Incompatible changes.
    pub major: u32,
    /// Compatible additions.
    pub minor: u32,
    /// Optional third part; `None` compares as 0.
    pub revision: Option<u32>,
}

impl Version {
    /// `major.minor`.
    pub const fn new(major: u32, minor: u32) -> Self {
        Version {
            major,
            minor,
            revision: None,
        }
    }

    /// `major.minor.revision`.
    pub const fn with_revision(major: u32, minor: u32, revision: u32) -> Self {
        Version {
            major,
            minor,
            revision: Some(revision),
        }
    }

    /// Version 1.0, what a request or endpoint without a version speaks.
    pub const DEFAULT: Version = Version::new(1, 0);

    /// Whether an implementation of `self` can serve a request for `requested`.
    pub fn serves(&self, requested: &Version) -> bool {
        if self.major != requested.major || requested.minor > self.minor {
            return false;
        }
        if requested.minor == self.minor {
            return requested.revision.unwrap_or(0) <= self.revision.unwrap_or(0);
        }
        true
    }
}

impl Default for Version {
    fn default() -> Self {
        Version::DEFAULT
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if let Some(revision) = self.revision {
            write!(f, ".{revision}")?;
        }
        Ok(())
    }
}

/// A string that is not `X.Y` or `X.Y.Z` with decimal parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version {0:?}: expected \"major.minor\" or \"major.minor.revision\"")]
pub struct ParseVersionError(String);

impl FromStr for Version {
    type Err = ParseVersionError;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        let fail = || ParseVersionError(text.to_owned());
        let mut parts = text.split('.');
        let mut number = || -> std::result::Result<Option<u32>, ParseVersionError> {
            match parts.next() {
                None => Ok(None),
                Some(part) if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) => {
                    part.parse().map(Some).map_err(|_| fail())
                }
                Some(_) => Err(fail()),
            }
        };
        let major = number()?.ok_or_else(fail)?;
        let minor = number()?.ok_or_else(fail)?;
        let revision = number()?;
        if number()?.is_some() {
            return Err(fail());
        }
        Ok(Version {
            major,
            minor,
            revision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        text.parse().expect("valid version")
    }

    #[test]
    fn parses_two_and_three_parts() {
        assert_eq!(v("1.2"), Version::new(1, 2));
        assert_eq!(v("2.10.3"), Version::with_revision(2, 10, 3));
        assert_eq!(v("1.2").to_string(), "1.2");
        assert_eq!(v("1.2.3").to_string(), "1.2.3");
    }

    #[test]
    fn rejects_malformed_versions() {
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "a.b",
            "1.2.3.4",
            "1.-2",
            "1. 2",
            "99999999999.0",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn compatibility_follows_oslo() {
        let implemented = v("1.3");
        assert!(implemented.serves(&v("1.0")));
        assert!(implemented.serves(&v("1.3")));
        assert!(!implemented.serves(&v("1.4")));
        assert!(!implemented.serves(&v("2.0")));
        assert!(!implemented.serves(&v("0.9")));
        // Revisions only matter when the minors are equal.
        assert!(v("1.3.2").serves(&v("1.3.1")));
        assert!(!v("1.3").serves(&v("1.3.1")));
        assert!(v("1.4").serves(&v("1.3.9")));
    }

    #[test]
    fn listening_needs_topic_and_server() {
        assert!(Target::new("t").validate_for_listen().is_err());
        assert!(Target::new("").server("s").validate_for_listen().is_err());
        assert!(Target::new("t").server("s").validate_for_listen().is_ok());
    }
}
