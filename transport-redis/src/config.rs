//! The Redis backend's settings: read from a URL (`redis://`, `rediss://`) or built
//! with setters, and the key layout.
//!
//! Keys of one topic share the hash tag `{<exchange>:<topic>}` so a topic lives in
//! one Redis Cluster slot; every name is escaped so a `:`, `{` or `}` inside a topic
//! or server name cannot alias another key.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use rpc_core::options::{DEFAULT_CONNECT_TIMEOUT, Unit, UrlOption};
use rpc_core::{Error, Result, TlsFiles};

/// Where a configuration built without a URL connects.
const DEFAULT_URL: &str = "redis://127.0.0.1:6379/";

/// The options a Redis URL takes besides the TLS files, for the error about an
/// unknown one (`block_ms` and `claim_idle_ms` are the old names of `block` and
/// `claim_idle`, whose plain numbers count milliseconds).
const OPTION_NAMES: &str = "cluster, prefix, exchange, maxlen, block, claim_idle, stream_ttl, reply_ttl, \
prune_idle, max_message_size, connect_timeout, block_ms, claim_idle_ms";

/// Everything a Redis URL configures.
///
/// Read from a URL with [`RedisConfig::parse`], or built from [`Default`] (Redis at
/// `127.0.0.1:6379`, database 0) with setters named after the fields:
///
/// ```
/// use std::time::Duration;
/// use mqrpc::RedisConfig;
///
/// let config = RedisConfig::default()
///     .url("redis://:secret@cache.internal:6380/2")?
///     .prefix("app")
///     .maxlen(10_000)
///     .claim_idle(Duration::from_secs(60));
/// assert_eq!(config.maxlen, 10_000);
///
/// // The same, as a URL: durations take 500ms, 2s, or plain seconds (60, 0.5).
/// let parsed = RedisConfig::parse(
///     "redis://:secret@cache.internal:6380/2?prefix=app&maxlen=10000&claim_idle=60",
/// )?;
/// assert_eq!(parsed, config);
/// // The password is never printed.
/// assert!(!format!("{config:?}").contains("secret"));
/// # Ok::<(), mqrpc::Error>(())
/// ```
///
/// A configuration is checked when it connects
/// ([`crate::RedisTransport::with_config`]): names must not be empty, numbers and
/// durations must be positive.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The URLs handed to redis-rs (scheme, credentials, host, port, db), one per
    /// host of the URL, without mqrpc's own options. Never printed.
    pub(crate) connection_urls: Vec<String>,
    /// Whether the hosts are seed nodes of a Redis Cluster (`cluster`, default
    /// false): commands go to the node owning each key's slot, and `MOVED`, `ASK`
    /// and failovers are followed. A URL with several hosts needs it.
    pub cluster: bool,
    /// Prefix of every key (`prefix`, default `mqrpc`).
    pub prefix: String,
    /// The control exchange (`exchange`, default `openstack`), part of each topic's
    /// keys.
    pub exchange: String,
    /// Approximate cap of each stream's length (`XADD MAXLEN ~`; `maxlen`, default
    /// 100 000). Topic and server streams hold only unsettled entries, so this bounds
    /// a backlog: beyond it the oldest waiting entries are dropped. Reply streams are
    /// capped at this or 100 000, whichever is larger (their client deletes what it
    /// has read).
    pub maxlen: usize,
    /// How long one blocking read waits before it is issued again (`block`, or
    /// `block_ms` whose plain numbers are milliseconds; default 5 s).
    pub block: Duration,
    /// Entries pending this long on a consumer are taken over by another server
    /// (`XAUTOCLAIM`; `claim_idle`, or `claim_idle_ms` whose plain numbers are
    /// milliseconds; default 30 s). A live server refreshes the entries it holds, so
    /// only servers that stopped (died, lost Redis, shutting down) lose theirs; keep
    /// it above the shutdown grace period in after-handling ack mode.
    pub claim_idle: Duration,
    /// Topic, server and fanout streams expire after this long without a live server
    /// refreshing them (`stream_ttl`, default 24 h; Redis counts whole seconds).
    pub stream_ttl: Duration,
    /// A client's reply stream expires this long after the client stops refreshing it
    /// (`reply_ttl`, default 60 s; Redis counts whole seconds).
    pub reply_ttl: Duration,
    /// Fanout groups (and topic consumers) idle this long belong to dead servers and
    /// are removed (`prune_idle`, default 300 s).
    pub prune_idle: Duration,
    /// The largest message sent, in bytes (`max_message_size`, default 64 MiB).
    pub max_message_size: usize,
    /// How long one attempt to connect may take: the TCP connection, TLS and Redis's
    /// handshake. It bounds [`crate::RedisTransport::connect`] as a whole and every
    /// attempt of a reconnection (`connect_timeout`; default
    /// [`DEFAULT_CONNECT_TIMEOUT`], 10 s).
    pub connect_timeout: Duration,
    /// CA and client certificate files (`tls_ca_file`, `tls_cert_file`,
    /// `tls_key_file`); naming any turns TLS on (`rediss://`).
    pub tls_files: TlsFiles,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("connection_urls", &"<redacted>")
            .field("cluster", &self.cluster)
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

impl Default for RedisConfig {
    /// Redis at `redis://127.0.0.1:6379/`, with the defaults a URL without options
    /// gets.
    fn default() -> Self {
        RedisConfig {
            connection_urls: vec![DEFAULT_URL.to_owned()],
            cluster: false,
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
            tls_files: TlsFiles::default(),
        }
    }
}

/// An [`Error::InvalidUrl`] about a Redis URL.
fn bad(what: impl fmt::Display) -> Error {
    Error::InvalidUrl(format!("Redis URL: {what}"))
}

/// Splits a URL with several hosts, `redis://[userinfo@]h1:p1,h2:p2/db?options`,
/// into one URL per host, each with the userinfo, the path and the options (the
/// `url` crate takes one host). Credentials are everything before the last `@` of
/// the authority, so a `,` in a password needs no encoding.
fn split_hosts(url: &str) -> Vec<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return vec![url.to_owned()];
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), authority),
    };
    if !hosts.contains(',') {
        return vec![url.to_owned()];
    }
    hosts
        .split(',')
        .map(|host| format!("{scheme}://{userinfo}{host}{tail}"))
        .collect()
}

/// Parses a URL with one host or several (see [`split_hosts`]): one parsed URL per
/// host, options included.
fn parse_urls(url: &str) -> Result<Vec<url::Url>> {
    let urls = split_hosts(url)
        .iter()
        .map(|url| parse_url(url))
        .collect::<Result<Vec<_>>>()?;
    if urls.len() > 1
        && urls
            .iter()
            .any(|url| url.host_str().unwrap_or("").is_empty())
    {
        return Err(bad("a host of the list is empty"));
    }
    Ok(urls)
}

/// The error about several hosts without cluster mode.
fn several_hosts_without_cluster() -> String {
    "several hosts are the seed nodes of a Redis Cluster: add cluster=true \
     (RedisConfig::cluster), or name one host"
        .to_owned()
}

/// Parses a `redis://` or `rediss://` URL (options included).
fn parse_url(url: &str) -> Result<url::Url> {
    let parsed = url::Url::parse(url).map_err(bad)?;
    if !matches!(parsed.scheme(), "redis" | "rediss") {
        return Err(bad(format_args!(
            "unsupported scheme {:?}",
            parsed.scheme()
        )));
    }
    Ok(parsed)
}

impl RedisConfig {
    /// Parses `redis://[[user]:password@]host[:port][/db][?options]` or `rediss://...`.
    ///
    /// A Redis Cluster: `redis://[[user]:password@]h1:p1,h2:p2,h3:p3/?cluster=true`
    /// (or `rediss://`). Each host is a seed node: one is enough, the others are
    /// found from it, and more let the transport connect while some are down. Every
    /// node takes the same credentials, and a cluster has database 0 only. Several
    /// hosts without `cluster=true` are an error.
    ///
    /// Options: `cluster` (`true`/`false`, default false), `prefix`, `exchange`, `maxlen`, `block`, `claim_idle`, `stream_ttl`,
    /// `reply_ttl`, `prune_idle`, `connect_timeout` (durations: `500ms`, `2s`, `1m`, or
    /// plain seconds with fractions, `2.5`), `max_message_size` (bytes), and the TLS
    /// files `tls_ca_file`, `tls_cert_file`, `tls_key_file`, which turn TLS on. The old
    /// names `block_ms` and `claim_idle_ms` are aliases of `block` and `claim_idle`
    /// whose plain numbers count milliseconds (`block_ms=2000` is `block=2s`).
    /// Unknown options are errors.
    pub fn parse(url: &str) -> Result<Self> {
        let mut parsed = parse_urls(url)?;
        let mut config = RedisConfig::default();
        let pairs: Vec<(String, String)> = parsed
            .first()
            .map(|first| first.query_pairs().into_owned().collect())
            .unwrap_or_default();
        for (key, value) in &pairs {
            if config.tls_files.set_option(key, value).is_some() {
                continue;
            }
            let option = UrlOption::new("Redis", key, value);
            match key.as_str() {
                "cluster" => config.cluster = option.flag()?,
                "prefix" => config.prefix = option.text()?.to_owned(),
                "exchange" => config.exchange = option.text()?.to_owned(),
                "maxlen" => config.maxlen = option.positive()?,
                "block" => config.block = option.duration()?,
                "block_ms" => config.block = option.duration_with(Unit::Millis)?,
                "claim_idle" => config.claim_idle = option.duration()?,
                "claim_idle_ms" => config.claim_idle = option.duration_with(Unit::Millis)?,
                "stream_ttl" => config.stream_ttl = option.duration()?,
                "reply_ttl" => config.reply_ttl = option.duration()?,
                "prune_idle" => config.prune_idle = option.duration()?,
                "max_message_size" => config.max_message_size = option.positive()?,
                "connect_timeout" => config.connect_timeout = option.duration()?,
                _ => {
                    return Err(
                        option.unknown(&format!("{OPTION_NAMES}, {}", TlsFiles::OPTION_NAMES))
                    );
                }
            }
        }
        config.tls_files.validate()?;
        if parsed.len() > 1 && !config.cluster {
            return Err(bad(several_hosts_without_cluster()));
        }
        for url in &mut parsed {
            url.set_query(None);
        }
        config.connection_urls = parsed.iter().map(ToString::to_string).collect();
        config.check_cluster_db().map_err(bad)?;
        Ok(config)
    }

    /// Connects to the Redis of `url`: `redis://[[user]:password@]host[:port][/db]`,
    /// or `rediss://...` for TLS; for a Redis Cluster, one or several seed nodes
    /// (`redis://h1:p1,h2:p2,h3:p3`) with [`RedisConfig::cluster`]. The URL carries no
    /// options (the setters set them; see [`RedisConfig::parse`] to read both from one
    /// URL).
    pub fn url(mut self, url: &str) -> Result<Self> {
        let parsed = parse_urls(url)?;
        if parsed.iter().any(|url| url.query().is_some()) {
            return Err(bad(
                "RedisConfig::url takes no options: use the setters, or RedisConfig::parse",
            ));
        }
        self.connection_urls = parsed.iter().map(ToString::to_string).collect();
        Ok(self)
    }

    /// Sets [`RedisConfig::cluster`]: the URL's hosts are seed nodes of a Redis
    /// Cluster.
    ///
    /// ```
    /// use mqrpc::RedisConfig;
    ///
    /// let config = RedisConfig::default()
    ///     .url("redis://10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000")?
    ///     .cluster(true);
    /// assert_eq!(config, RedisConfig::parse(
    ///     "redis://10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000?cluster=true",
    /// )?);
    /// # Ok::<(), mqrpc::Error>(())
    /// ```
    pub fn cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// Sets [`RedisConfig::prefix`].
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`RedisConfig::exchange`].
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Sets [`RedisConfig::maxlen`].
    pub fn maxlen(mut self, maxlen: usize) -> Self {
        self.maxlen = maxlen;
        self
    }

    /// Sets [`RedisConfig::block`].
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }

    /// Sets [`RedisConfig::claim_idle`].
    pub fn claim_idle(mut self, claim_idle: Duration) -> Self {
        self.claim_idle = claim_idle;
        self
    }

    /// Sets [`RedisConfig::stream_ttl`].
    pub fn stream_ttl(mut self, stream_ttl: Duration) -> Self {
        self.stream_ttl = stream_ttl;
        self
    }

    /// Sets [`RedisConfig::reply_ttl`].
    pub fn reply_ttl(mut self, reply_ttl: Duration) -> Self {
        self.reply_ttl = reply_ttl;
        self
    }

    /// Sets [`RedisConfig::prune_idle`].
    pub fn prune_idle(mut self, prune_idle: Duration) -> Self {
        self.prune_idle = prune_idle;
        self
    }

    /// Sets [`RedisConfig::max_message_size`].
    pub fn max_message_size(mut self, max_message_size: usize) -> Self {
        self.max_message_size = max_message_size;
        self
    }

    /// Sets [`RedisConfig::connect_timeout`].
    pub fn connect_timeout(mut self, connect_timeout: Duration) -> Self {
        self.connect_timeout = connect_timeout;
        self
    }

    /// Sets [`RedisConfig::tls_files`]; naming any file turns TLS on.
    pub fn tls_files(mut self, tls_files: TlsFiles) -> Self {
        self.tls_files = tls_files;
        self
    }

    /// Checks what [`RedisConfig::parse`] checks of each option, for a configuration
    /// built with setters: a zero `prune_idle`, say, would make Redis refuse every
    /// alive key.
    pub(crate) fn validate(&self) -> Result<()> {
        let invalid = |what: &str| Err(Error::InvalidConfig(format!("Redis: {what}")));
        if self.connection_urls.len() > 1 && !self.cluster {
            return invalid(&several_hosts_without_cluster());
        }
        if let Err(what) = self.check_cluster_db() {
            return invalid(what);
        }
        if self.prefix.is_empty() || self.exchange.is_empty() {
            return invalid("prefix and exchange must not be empty");
        }
        if self.maxlen == 0 || self.max_message_size == 0 {
            return invalid("maxlen and max_message_size must be positive");
        }
        for (name, duration) in [
            ("block", self.block),
            ("claim_idle", self.claim_idle),
            ("stream_ttl", self.stream_ttl),
            ("reply_ttl", self.reply_ttl),
            ("prune_idle", self.prune_idle),
            ("connect_timeout", self.connect_timeout),
        ] {
            if duration.is_zero() {
                return invalid(&format!("{name} must be a positive duration"));
            }
        }
        self.tls_files.validate()
    }

    /// A cluster has database 0 only: a URL naming another is a mistake.
    fn check_cluster_db(&self) -> std::result::Result<(), &'static str> {
        let other_db = |url: &String| {
            url::Url::parse(url)
                .is_ok_and(|url| !matches!(url.path().trim_start_matches('/'), "" | "0"))
        };
        if self.cluster && self.connection_urls.iter().any(other_db) {
            return Err("a Redis Cluster has database 0 only: remove the /db from the URL");
        }
        Ok(())
    }

    /// The URLs redis-rs connects to (one host, or a cluster's seeds), with
    /// credentials.
    pub(crate) fn connection_urls(&self) -> &[String] {
        &self.connection_urls
    }

    /// The URLs redis-rs connects to: `rediss://` when TLS files are named, since
    /// they ask for TLS whatever the scheme said.
    pub(crate) fn client_urls(&self) -> Result<Vec<String>> {
        self.connection_urls
            .iter()
            .map(|connection_url| {
                if !self.tls_files.any() || !connection_url.starts_with("redis://") {
                    return Ok(connection_url.clone());
                }
                let mut url = url::Url::parse(connection_url)
                    .map_err(|_| bad("the server address is not a URL"))?;
                url.set_scheme("rediss")
                    .map_err(|()| bad("cannot switch to rediss://"))?;
                Ok(url.to_string())
            })
            .collect()
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

    /// The notification stream of a routing key `<topic>.<priority>` of an
    /// exchange: `<prefix>:{<exchange>:<topic>}:notify:<priority>`. It shares the
    /// topic's hash tag, so the streams of a topic's priorities, which one listener
    /// reads at once, are in one Redis Cluster slot. A key without a `.` is a topic
    /// alone: `<prefix>:{<exchange>:<key>}:notify`.
    pub fn notification_key(&self, exchange: &str, key: &str) -> String {
        match key.rsplit_once('.') {
            Some((topic, priority)) => {
                format!("{}:notify:{}", self.base(exchange, topic), escape(priority))
            }
            None => format!("{}:notify", self.base(exchange, key)),
        }
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
        assert_eq!(c.connection_urls, ["redis://:s3cret@127.0.0.1:6379/2"]);
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
            assert_eq!(c.connection_urls, ["redis://h"], "{url}");
        }
    }

    #[test]
    fn every_duration_takes_units_and_fractions_and_old_names_count_millis() {
        let c = RedisConfig::parse(
            "redis://h?block=250ms&claim_idle=1.5&stream_ttl=2m&reply_ttl=30s\
             &prune_idle=0.5&connect_timeout=2s",
        )
        .expect("parse");
        assert_eq!(c.block, Duration::from_millis(250));
        assert_eq!(c.claim_idle, Duration::from_millis(1500));
        assert_eq!(c.stream_ttl, Duration::from_secs(120));
        assert_eq!(c.reply_ttl, Duration::from_secs(30));
        assert_eq!(c.prune_idle, Duration::from_millis(500));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        // The old names: a plain number is milliseconds, a unit says what it says.
        let c = RedisConfig::parse("redis://h?block_ms=2000&claim_idle_ms=1s").expect("parse");
        assert_eq!(c.block, Duration::from_secs(2));
        assert_eq!(c.claim_idle, Duration::from_secs(1));
        for url in [
            "redis://h?block=0",
            "redis://h?block_ms=0ms",
            "redis://h?stream_ttl=soon",
            "redis://h?prune_idle=-1",
        ] {
            let err = RedisConfig::parse(url).expect_err(url).to_string();
            assert!(err.contains("must be a positive duration"), "{err}");
        }
        let err = RedisConfig::parse("redis://h?bogus=1").expect_err("unknown");
        let text = err.to_string();
        assert!(
            text.contains("unknown option \"bogus\"") && text.contains("block_ms, claim_idle_ms"),
            "{text}"
        );
    }

    #[test]
    fn setters_build_what_a_url_would() {
        let built = RedisConfig::default()
            .url("rediss://u:pw@h:6380/3")
            .expect("url")
            .prefix("app")
            .exchange("x")
            .maxlen(10)
            .block(Duration::from_millis(100))
            .claim_idle(Duration::from_secs(2))
            .stream_ttl(Duration::from_secs(3))
            .reply_ttl(Duration::from_secs(4))
            .prune_idle(Duration::from_secs(5))
            .max_message_size(1000)
            .connect_timeout(Duration::from_secs(6));
        let parsed = RedisConfig::parse(
            "rediss://u:pw@h:6380/3?prefix=app&exchange=x&maxlen=10&block=100ms&claim_idle=2\
             &stream_ttl=3&reply_ttl=4&prune_idle=5&max_message_size=1000&connect_timeout=6",
        )
        .expect("parse");
        assert_eq!(built, parsed);
        assert!(built.validate().is_ok());
        assert_eq!(
            RedisConfig::default(),
            RedisConfig::parse(DEFAULT_URL).expect("parse")
        );
        assert!(RedisConfig::default().url("redis://h?prefix=a").is_err());
        assert!(RedisConfig::default().url("http://h").is_err());
        for broken in [
            RedisConfig::default().prefix(""),
            RedisConfig::default().maxlen(0),
            RedisConfig::default().prune_idle(Duration::ZERO),
        ] {
            assert!(
                matches!(broken.validate(), Err(Error::InvalidConfig(_))),
                "{broken:?}"
            );
        }
    }

    #[test]
    fn tls_files_switch_to_rediss_when_connecting() {
        let c = RedisConfig::parse("redis://h:1/?tls_ca_file=/ca.pem").expect("parse");
        assert_eq!(c.client_urls().expect("url"), ["rediss://h:1/"]);
        let mut files = TlsFiles::default();
        files.ca_file = Some("/ca.pem".into());
        let c = RedisConfig::default().tls_files(files);
        assert_eq!(c.client_urls().expect("url"), ["rediss://127.0.0.1:6379/"]);
        assert_eq!(
            RedisConfig::default().client_urls().expect("url"),
            ["redis://127.0.0.1:6379/"]
        );
    }

    #[test]
    fn several_hosts_are_cluster_seeds() {
        let c = RedisConfig::parse("redis://:p,w@a:7000,b:7001,c/?cluster=true&prefix=x")
            .expect("parse");
        assert!(c.cluster);
        assert_eq!(c.prefix, "x");
        assert_eq!(
            c.connection_urls,
            [
                "redis://:p,w@a:7000/",
                "redis://:p,w@b:7001/",
                "redis://:p,w@c/"
            ]
        );
        // One host is a seed too.
        let one = RedisConfig::parse("rediss://h:7000?cluster=true").expect("parse");
        assert!(one.cluster);
        assert_eq!(one.connection_urls, ["rediss://h:7000"]);
        assert!(!RedisConfig::parse("redis://h").expect("parse").cluster);
        // Several hosts without cluster=true: say what to add.
        let err = RedisConfig::parse("redis://:s3cret@a,b").expect_err("no cluster");
        assert!(matches!(err, Error::InvalidUrl(_)), "{err:?}");
        assert!(err.to_string().contains("cluster=true"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        for url in [
            "redis://a,,b?cluster=true",
            "redis://a,b/2?cluster=true",
            "redis://a?cluster=maybe",
        ] {
            let err = RedisConfig::parse(url).expect_err(url);
            assert!(matches!(err, Error::InvalidUrl(_)), "{url}: {err:?}");
        }
        // Built in code: the same, checked when connecting.
        let built = RedisConfig::default()
            .url("redis://:p,w@a:7000,b:7001,c/")
            .expect("url")
            .prefix("x")
            .cluster(true);
        assert_eq!(built, c);
        assert!(built.validate().is_ok());
        let unclustered = built.cluster(false);
        assert!(
            matches!(unclustered.validate(), Err(Error::InvalidConfig(ref m)) if m.contains("cluster=true")),
            "{unclustered:?}"
        );
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
        // Notifications: a stream per priority, in the topic's slot.
        assert_eq!(
            c.notification_key("openstack", "notifications.info"),
            "mqrpc:{openstack:notifications}:notify:info"
        );
        assert_eq!(
            c.notification_key("x", "a.b.error"),
            "mqrpc:{x:a.b}:notify:error"
        );
        assert_ne!(c.notification_key("x", "t"), c.notification_key("x", "t."));
        assert_ne!(
            c.notification_key("x", "a.b"),
            c.notification_key("x", "a:b.c")
        );
    }
}
