//! URL parsing (`redis://`, `rediss://`) and the key layout.
//!
//! Keys of one topic share the hash tag `{<exchange>:<topic>}` so a topic lives in
//! one Redis Cluster slot; every name is escaped so a `:`, `{` or `}` inside a topic
//! or server name cannot alias another key.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use rpc_core::{Error, Result};

/// Everything a Redis URL configures.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The URL handed to redis-rs (scheme, credentials, host, port, db), without
    /// mqrpc's own options. Never printed.
    pub(crate) connection_url: String,
    /// Prefix of every key (default `mqrpc`).
    pub prefix: String,
    /// The control exchange (default `openstack`), part of each topic's keys.
    pub exchange: String,
    /// Approximate cap of each stream's length (`XADD MAXLEN ~`, default 100 000).
    /// Topic and server streams hold only unsettled entries, so this bounds a backlog:
    /// beyond it the oldest waiting entries are dropped. Reply streams are capped at
    /// this or 100 000, whichever is larger (their client deletes what it has read).
    pub maxlen: usize,
    /// How long one blocking read waits before it is issued again.
    pub block: Duration,
    /// Entries pending this long on a consumer are taken over by another server
    /// (`XAUTOCLAIM`). A live server refreshes the entries it holds, so only servers
    /// that stopped (died, lost Redis, shutting down) lose theirs; keep it above the
    /// shutdown grace period in after-handling ack mode.
    pub claim_idle: Duration,
    /// Topic, server and fanout streams expire after this long without a live server
    /// refreshing them.
    pub stream_ttl: Duration,
    /// A client's reply stream expires this long after the client stops refreshing it.
    pub reply_ttl: Duration,
    /// Fanout groups (and topic consumers) idle this long belong to dead servers and
    /// are removed.
    pub prune_idle: Duration,
    /// The largest message sent.
    pub max_message_size: usize,
    /// How long one attempt to connect may take: the TCP connection, TLS and Redis's
    /// handshake. It bounds [`crate::RedisTransport::connect`] as a whole and every
    /// attempt of a reconnection (`connect_timeout`, in seconds, decimals allowed;
    /// default 10 s).
    pub connect_timeout: Duration,
    /// CA and client certificate files (`tls_ca_file`, `tls_cert_file`,
    /// `tls_key_file`); naming any turns TLS on (`rediss://`).
    pub tls_files: rpc_core::TlsFiles,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("connection_url", &"<redacted>")
            .field("prefix", &self.prefix)
            .field("exchange", &self.exchange)
            .field("maxlen", &self.maxlen)
            .field("block", &self.block)
            .field("claim_idle", &self.claim_idle)
            .field("stream_ttl", &self.stream_ttl)
            .field("reply_ttl", &self.reply_ttl)
            .field("prune_idle", &self.prune_idle)
            .field("max_message_size", &self.max_message_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls_files", &self.tls_files)
            .finish()
    }
}

impl RedisConfig {
    /// Parses `redis://[[user]:password@]host[:port][/db][?options]` or `rediss://...`.
    ///
    /// Options: `prefix`, `exchange`, `maxlen`, `block_ms`, `claim_idle_ms`,
    /// `stream_ttl` (seconds), `reply_ttl` (seconds), `prune_idle` (seconds),
    /// `max_message_size` (bytes), `connect_timeout` (seconds, decimals allowed:
    /// `connect_timeout=2.5`), and the TLS files `tls_ca_file`, `tls_cert_file`,
    /// `tls_key_file`, which turn TLS on. Unknown options are errors.
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |what: String| Error::InvalidUrl(format!("Redis URL: {what}"));
        let mut parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        if !matches!(parsed.scheme(), "redis" | "rediss") {
            return Err(bad(format!("unsupported scheme {:?}", parsed.scheme())));
        }
        let mut config = RedisConfig {
            connection_url: String::new(),
            prefix: "mqrpc".to_owned(),
            exchange: rpc_core::DEFAULT_EXCHANGE.to_owned(),
            maxlen: 100_000,
            block: Duration::from_secs(5),
            claim_idle: Duration::from_secs(30),
            stream_ttl: Duration::from_secs(24 * 3600),
            reply_ttl: Duration::from_secs(60),
            prune_idle: Duration::from_secs(300),
            max_message_size: 64 * 1024 * 1024,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls_files: rpc_core::TlsFiles::default(),
        };
        let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
        for (key, value) in &pairs {
            let number = || -> Result<u64> {
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad(format!("option {key} must be a positive integer")))
            };
            if config.tls_files.set_option(key, value).is_some() {
                continue;
            }
            match key.as_str() {
                "prefix" | "exchange" => {
                    if value.is_empty() {
                        return Err(bad(format!("option {key} must not be empty")));
                    }
                    if key == "prefix" {
                        config.prefix = value.clone();
                    } else {
                        config.exchange = value.clone();
                    }
                }
                "maxlen" => config.maxlen = number()? as usize,
                "block_ms" => config.block = Duration::from_millis(number()?),
                "claim_idle_ms" => config.claim_idle = Duration::from_millis(number()?),
                "stream_ttl" => config.stream_ttl = Duration::from_secs(number()?),
                "reply_ttl" => config.reply_ttl = Duration::from_secs(number()?),
                "prune_idle" => config.prune_idle = Duration::from_secs(number()?),
                "max_message_size" => config.max_message_size = number()? as usize,
                "connect_timeout" => {
                    config.connect_timeout = seconds(value).ok_or_else(|| {
                        bad(format!("option {key} must be a positive number of seconds"))
                    })?;
                }
                other => {
                    return Err(bad(format!(
                        "unknown option {other:?} (known: prefix, exchange, maxlen, block_ms, \
                         claim_idle_ms, stream_ttl, reply_ttl, prune_idle, max_message_size, \
                         connect_timeout, {})",
                        rpc_core::TlsFiles::OPTION_NAMES
                    )));
                }
            }
        }
        config.tls_files.validate()?;
        if config.tls_files.any() && parsed.scheme() == "redis" {
            parsed
                .set_scheme("rediss")
                .map_err(|()| bad("cannot switch to rediss://".to_owned()))?;
        }
        parsed.set_query(None);
        config.connection_url = parsed.to_string();
        Ok(config)
    }

    fn base(&self, exchange: &str, topic: &str) -> String {
        format!(
            "{}:{{{}:{}}}",
            escape(&self.prefix),
            escape(exchange),
            escape(topic)
        )
    }

    /// The stream all servers of a topic share.
    pub fn topic_key(&self, exchange: &str, topic: &str) -> String {
        format!("{}:topic", self.base(exchange, topic))
    }

    /// The stream of one named server of a topic.
    pub fn server_key(&self, exchange: &str, topic: &str, server: &str) -> String {
        format!("{}:server:{}", self.base(exchange, topic), escape(server))
    }

    /// The fanout stream of a topic.
    pub fn fanout_key(&self, exchange: &str, topic: &str) -> String {
        format!("{}:fanout", self.base(exchange, topic))
    }

    /// The key a live server instance refreshes, so its fanout group is not pruned.
    pub fn alive_key(&self, instance: &str) -> String {
        format!("{}:alive:{}", escape(&self.prefix), escape(instance))
    }

    /// Prefix of every reply stream.
    pub fn reply_prefix(&self) -> String {
        format!("{}:reply:", escape(&self.prefix))
    }
}

/// How long connecting may take unless the URL says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A positive, finite number of seconds (`2`, `2.5`, `0.25`), as a duration.
fn seconds(text: &str) -> Option<Duration> {
    let value: f64 = text.trim().parse().ok()?;
    if !(value.is_finite() && value > 0.0) {
        return None;
    }
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
}

/// Escapes the characters that structure a key: `%`, `:`, `{`, `}`.
fn escape(name: &str) -> Cow<'_, str> {
    if !name.contains(['%', ':', '{', '}']) {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_and_stripped() {
        let c =
            RedisConfig::parse("redis://:s3cret@127.0.0.1:6379/2?prefix=t&maxlen=50&block_ms=100")
                .expect("parse");
        assert_eq!(c.prefix, "t");
        assert_eq!(c.maxlen, 50);
        assert_eq!(c.block, Duration::from_millis(100));
        assert_eq!(c.connection_url, "redis://:s3cret@127.0.0.1:6379/2");
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn bad_urls_are_clear_errors_without_secrets() {
        for url in [
            "http://h",
            "redis://:s3cret@h?bogus=1",
            "redis://:s3cret@h?maxlen=0",
            "redis://:s3cret@h?prefix=",
            "redis://:s3cret@h?connect_timeout=0",
            "redis://:s3cret@h?connect_timeout=-1",
            "redis://:s3cret@h?connect_timeout=soon",
            "redis://:s3cret@h?connect_timeout=inf",
            "redis://:s3cret@h?connect_timeout=NaN",
        ] {
            let err = RedisConfig::parse(url).expect_err(url);
            assert!(matches!(err, Error::InvalidUrl(_)), "{err:?}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn connect_timeout_takes_decimal_seconds() {
        for (url, expected) in [
            ("redis://h?connect_timeout=2.5", Duration::from_millis(2500)),
            ("redis://h?connect_timeout=1", Duration::from_secs(1)),
            ("redis://h?connect_timeout=0.25", Duration::from_millis(250)),
        ] {
            let c = RedisConfig::parse(url).expect(url);
            assert_eq!(c.connect_timeout, expected, "{url}");
            assert_eq!(c.connection_url, "redis://h", "{url}");
        }
    }

    #[test]
    fn keys_share_a_hash_tag_and_cannot_alias() {
        let c = RedisConfig::parse("redis://h").expect("parse");
        assert_eq!(
            c.topic_key("openstack", "calc"),
            "mqrpc:{openstack:calc}:topic"
        );
        assert_eq!(
            c.server_key("openstack", "calc", "host-1"),
            "mqrpc:{openstack:calc}:server:host-1"
        );
        assert_eq!(
            c.fanout_key("openstack", "calc"),
            "mqrpc:{openstack:calc}:fanout"
        );
        // A topic with separators stays inside its own hash tag.
        assert_ne!(c.topic_key("a:b", "c"), c.topic_key("a", "b:c"));
        assert_ne!(
            c.server_key("x", "t:server:s", "u"),
            c.server_key("x", "t", "s:server:u")
        );
        assert_eq!(c.topic_key("x", "{t}"), "mqrpc:{x:%7Bt%7D}:topic");
    }
}
