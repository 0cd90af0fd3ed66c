//! [`MemoryConfig`]: the settings of a memory bus, read from a `memory://` URL's
//! query or built in code.

use rpc_core::options::UrlOption;
use rpc_core::{Error, Result};

/// Default bound of each queue, in messages.
pub const DEFAULT_CAPACITY: usize = 10_000;
/// Default largest message, in bytes.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// The settings of a bus: how many messages each queue holds before a send waits,
/// and the largest message it carries. They apply when the bus is created; a named
/// bus that exists keeps its own.
///
/// ```
/// use mqrpc::{MemoryConfig, MemoryTransport};
///
/// let config = MemoryConfig::default().capacity(100).max_message_size(1 << 20);
/// let bus = MemoryTransport::with_config("jobs", config)?;
/// assert_eq!(bus.name(), "jobs");
/// # Ok::<(), mqrpc::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Messages each queue holds before a send waits (URL option `capacity`).
    pub capacity: usize,
    /// The largest message in bytes (URL option `max_message_size`).
    pub max_message_size: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            capacity: DEFAULT_CAPACITY,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

impl MemoryConfig {
    /// Sets [`MemoryConfig::capacity`].
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets [`MemoryConfig::max_message_size`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Reads the query options of a `memory://` URL.
    pub(crate) fn from_query<'a>(
        pairs: impl Iterator<Item = (std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
    ) -> Result<Self> {
        let mut config = MemoryConfig::default();
        for (key, value) in pairs {
            let option = UrlOption::new("memory", &key, &value);
            match option.key() {
                "capacity" => config.capacity = option.positive()?,
                "max_message_size" => config.max_message_size = option.positive()?,
                _ => return Err(option.unknown("capacity, max_message_size")),
            }
        }
        Ok(config)
    }

    /// Refuses what a URL cannot say but setters can: a zero bound.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.capacity == 0 || self.max_message_size == 0 {
            return Err(Error::InvalidConfig(
                "memory: capacity and max_message_size must be positive".to_owned(),
            ));
        }
        Ok(())
    }
}
