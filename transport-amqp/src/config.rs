//! URL parsing: `amqp://`, `amqps://` and oslo.messaging's `rabbit://`, with several
//! comma-separated hosts, oslo's virtual-host rules and query options. Passwords
//! never appear in `Debug` output or in errors.

use std::fmt;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use rpc_core::{Error, Result};

/// Default `x-expires` of reply and fanout queues: oslo's
/// `rabbit_transient_queues_ttl` of 1800 s.
pub const DEFAULT_TRANSIENT_TTL: Duration = Duration::from_secs(1800);
/// AMQP heartbeat asked of the broker unless the URL says otherwise.
pub const DEFAULT_HEARTBEAT: u16 = 30;
/// The largest message sent unless the URL says otherwise: RabbitMQ 4's default
/// `max_message_size` (16 MiB; 3.x brokers accept up to 128 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// How long connecting may take unless the URL says otherwise (`connect_timeout`):
/// the TCP connect, the TLS handshake and the AMQP handshake of one attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One broker host of the URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Host {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// User name.
    pub username: String,
    /// Password (never printed).
    pub password: String,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Everything an AMQP URL configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// Brokers to try, in order (rotated on each reconnection).
    pub hosts: Vec<Host>,
    /// Virtual host.
    pub vhost: String,
    /// TLS (`amqps://`, or `ssl=true` on `rabbit://`).
    pub tls: bool,
    /// The control exchange (oslo's `control_exchange`, default `openstack`).
    pub exchange: String,
    /// Durable exchange and topic/server queues (`amqp_durable_queues`).
    pub durable: bool,
    /// Quorum topic/server queues (`rabbit_quorum_queue`; implies durable).
    pub quorum: bool,
    /// AMQP heartbeat in seconds (0 disables).
    pub heartbeat: u16,
    /// Prefetch of server consumers; `None` uses the server's concurrency limit.
    pub prefetch: Option<u16>,
    /// `x-expires` of reply and fanout queues; `None` disables it.
    pub transient_ttl: Option<Duration>,
    /// `x-expires` of topic and server queues; `None` (the default, as in oslo) keeps
    /// them until deleted.
    pub topic_ttl: Option<Duration>,
    /// The largest message sent.
    pub max_message_size: usize,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// CA and client certificate files (`tls_ca_file`, `tls_cert_file`,
    /// `tls_key_file`, or oslo's `ssl_*` names); naming any turns TLS on.
    pub tls_files: rpc_core::TlsFiles,
    /// Compression of every body this transport sends (`compression`, oslo's
    /// `kombu_compression`); `None` sends them as they are. Compressed bodies are
    /// read whatever this says.
    pub compression: Option<Compression>,
    /// How long one connection attempt may take: TCP connect, TLS handshake and
    /// AMQP handshake together (`connect_timeout`, seconds, default
    /// [`DEFAULT_CONNECT_TIMEOUT`]). It bounds the first connect and every
    /// reconnection attempt.
    pub connect_timeout: Duration,
    /// Reply-queue names a server answers besides the shape oslo.messaging and mqrpc
    /// give their own (`reply_` and 32 lowercase hex digits): the URL's
    /// `allow_reply_queues` (see [`ReplyQueues`]).
    pub reply_queues: ReplyQueues,
}

/// Which queues a server publishes replies to.
///
/// A request names its reply queue (`_reply_q`), and the reply goes through the
/// default exchange, which reaches every queue of the virtual host by name. So that a
/// request cannot make a server put reply-shaped messages into another service's
/// queue, a server replies only to names of the shape oslo.messaging and mqrpc
/// give their reply queues, `reply_` followed by 32 lowercase hex digits (a uuid4
/// without dashes), and drops other replies (the publish fails with
/// `Error::InvalidTarget`, which the server logs as one line without content).
///
/// Peers that name their reply queues otherwise (oslo.messaging with
/// `use_queue_manager = true` names them `reply_<host>:<process>:<n>`) are allowed
/// with the URL option `allow_reply_queues`: a comma-separated list of exact names,
/// or prefixes written with a trailing `*` (`allow_reply_queues=reply_*` accepts
/// every name that starts with `reply_`; a lone `*` accepts every name, as mqrpc did
/// before it confined replies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyQueues {
    /// Names accepted exactly.
    pub names: Vec<String>,
    /// Prefixes: a name that starts with one is accepted (an empty prefix accepts
    /// every name).
    pub prefixes: Vec<String>,
}

impl ReplyQueues {
    /// The length of the hex part of a standard reply-queue name.
    const HEX_DIGITS: usize = 32;

    /// Whether `name` has the standard shape: `reply_` and 32 lowercase hex digits.
    pub fn is_standard(name: &str) -> bool {
        name.strip_prefix("reply_").is_some_and(|hex| {
            hex.len() == Self::HEX_DIGITS
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    }

    /// Whether a server may publish a reply to the queue `name`.
    pub fn allows(&self, name: &str) -> bool {
        Self::is_standard(name)
            || self.names.iter().any(|allowed| allowed == name)
            || self
                .prefixes
                .iter()
                .any(|prefix| name.starts_with(prefix.as_str()))
    }

    /// Reads the value of `allow_reply_queues`: comma-separated names and `prefix*`
    /// patterns; empty items are ignored.
    pub fn parse(value: &str) -> Self {
        let mut allowed = ReplyQueues::default();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.strip_suffix('*') {
                Some(prefix) => allowed.prefixes.push(prefix.to_owned()),
                None => allowed.names.push(item.to_owned()),
            }
        }
        allowed
    }
}

/// How sent bodies are compressed, as kombu compresses them: the body is replaced by
/// the compressed stream and the header `compression` names it, so Python peers
/// (oslo.messaging on kombu) inflate it whatever their own setting is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// A zlib stream, header `application/x-gzip` (kombu's `gzip`).
    Gzip,
    /// A bzip2 stream, header `application/x-bz2` (kombu's `bzip2`).
    Bzip2,
}

impl Compression {
    /// The value of the `compression` header.
    pub fn header(self) -> &'static str {
        match self {
            Compression::Gzip => "application/x-gzip",
            Compression::Bzip2 => "application/x-bz2",
        }
    }

    /// The compression a `compression` header names, if mqrpc reads it.
    pub fn from_header(header: &str) -> Option<Self> {
        [Compression::Gzip, Compression::Bzip2]
            .into_iter()
            .find(|compression| compression.header() == header)
    }

    /// A reader of `body` inflated.
    pub fn decoder(self, body: &[u8]) -> Box<dyn std::io::Read + '_> {
        match self {
            Compression::Gzip => Box::new(flate2::read::ZlibDecoder::new(body)),
            Compression::Bzip2 => Box::new(bzip2::read::BzDecoder::new(body)),
        }
    }

    /// `body`, compressed.
    pub fn compress(self, body: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let out = Vec::with_capacity(body.len() / 2 + 64);
        // Writing to a Vec cannot fail.
        match self {
            Compression::Gzip => {
                let mut encoder =
                    flate2::write::ZlibEncoder::new(out, flate2::Compression::default());
                let _ = encoder.write_all(body);
                encoder.finish().unwrap_or_default()
            }
            Compression::Bzip2 => {
                let mut encoder = bzip2::write::BzEncoder::new(out, bzip2::Compression::default());
                let _ = encoder.write_all(body);
                encoder.finish().unwrap_or_default()
            }
        }
    }
}

impl AmqpConfig {
    /// Parses an AMQP URL.
    ///
    /// `SCHEME://[user[:password]@]host[:port][,[user[:password]@]host[:port]...][/vhost][?options]`
    /// where SCHEME is `amqp`, `amqps` or `rabbit`. The virtual host follows
    /// oslo.messaging: none or empty means `/`, `//` and `/%2F` mean `/`. Options
    /// (oslo's option names are accepted too): `exchange` (`control_exchange`),
    /// `durable` (`amqp_durable_queues`), `quorum` (`rabbit_quorum_queue`), `heartbeat`
    /// (`heartbeat_timeout_threshold`), `prefetch` (`rabbit_qos_prefetch_count`),
    /// `transient_ttl` (`rabbit_transient_queues_ttl`, seconds, 0 = none), `topic_ttl`
    /// (seconds of `x-expires` on topic and server queues; not set by default), `ssl`,
    /// `max_message_size`, `max_backoff` (seconds), `compression` (`kombu_compression`:
    /// `gzip` or `bzip2`, for what this transport sends), `connect_timeout` (seconds,
    /// decimals allowed, default 10: one connection attempt's TCP, TLS and AMQP
    /// handshake), `allow_reply_queues` (reply-queue names a server answers besides
    /// `reply_<32 hex digits>`, see [`ReplyQueues`]), and the TLS files `tls_ca_file`,
    /// `tls_cert_file`, `tls_key_file` (`ssl_ca_file`, `ssl_cert_file`,
    /// `ssl_key_file`), which turn TLS on.
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |what: &str| Error::InvalidUrl(format!("AMQP URL: {what}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected amqp://, amqps:// or rabbit://"))?;
        let mut tls = match scheme.to_ascii_lowercase().as_str() {
            "amqp" | "rabbit" | "kombu" => false,
            "amqps" => true,
            other => return Err(bad(&format!("unsupported scheme {other:?}"))),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (netlocs, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let vhost = match path {
            None | Some("") => "/".to_owned(),
            Some(path) => decode(path, "virtual host")?,
        };
        let mut config = AmqpConfig {
            hosts: Vec::new(),
            vhost,
            tls,
            exchange: rpc_core::DEFAULT_EXCHANGE.to_owned(),
            durable: false,
            quorum: false,
            heartbeat: DEFAULT_HEARTBEAT,
            prefetch: None,
            transient_ttl: Some(DEFAULT_TRANSIENT_TTL),
            topic_ttl: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_backoff: Duration::from_secs(10),
            tls_files: rpc_core::TlsFiles::default(),
            compression: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reply_queues: ReplyQueues::default(),
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value, key)?;
            config.set_option(key, &value, &mut tls)?;
        }
        config.tls_files.validate()?;
        config.tls = tls || config.tls_files.any();
        let tls = config.tls;
        let default_port = if tls { 5671 } else { 5672 };
        for netloc in netlocs.split(',') {
            config.hosts.push(parse_host(netloc, default_port)?);
        }
        Ok(config)
    }

    fn set_option(&mut self, key: &str, value: &str, tls: &mut bool) -> Result<()> {
        let bad = || {
            Error::InvalidUrl(format!(
                "AMQP URL: option {key} has an invalid value {value:?}"
            ))
        };
        let flag = || match value.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(bad()),
        };
        if self.tls_files.set_option(key, value).is_some() {
            return Ok(());
        }
        match key {
            "exchange" | "control_exchange" => {
                if value.is_empty() {
                    return Err(bad());
                }
                self.exchange = value.to_owned();
            }
            "durable" | "amqp_durable_queues" => self.durable = flag()?,
            "quorum" | "rabbit_quorum_queue" => self.quorum = flag()?,
            "ssl" | "tls" => *tls = flag()?,
            "heartbeat" | "heartbeat_timeout_threshold" => {
                self.heartbeat = value.parse().map_err(|_| bad())?;
            }
            "prefetch" | "rabbit_qos_prefetch_count" => {
                let n: u16 = value.parse().map_err(|_| bad())?;
                self.prefetch = (n > 0).then_some(n);
            }
            "transient_ttl" | "rabbit_transient_queues_ttl" => {
                let secs: u64 = value.parse().map_err(|_| bad())?;
                self.transient_ttl = (secs > 0).then(|| Duration::from_secs(secs));
            }
            "topic_ttl" => {
                let secs: u64 = value.parse().map_err(|_| bad())?;
                self.topic_ttl = (secs > 0).then(|| Duration::from_secs(secs));
            }
            "max_message_size" => {
                self.max_message_size = value.parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
            }
            "max_backoff" => {
                let secs: f64 = value.parse().map_err(|_| bad())?;
                self.max_backoff = Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(bad)?;
            }
            "connect_timeout" => {
                let secs: f64 = value.parse().map_err(|_| bad())?;
                self.connect_timeout = Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(bad)?;
            }
            "allow_reply_queues" => {
                let allowed = ReplyQueues::parse(value);
                self.reply_queues.names.extend(allowed.names);
                self.reply_queues.prefixes.extend(allowed.prefixes);
            }
            "compression" | "kombu_compression" => {
                self.compression = match value.to_ascii_lowercase().as_str() {
                    "" | "none" => None,
                    "gzip" => Some(Compression::Gzip),
                    // oslo's help names `bz2`; kombu itself knows only `bzip2`.
                    "bzip2" | "bz2" => Some(Compression::Bzip2),
                    _ => {
                        return Err(Error::InvalidUrl(format!(
                            "AMQP URL: compression {value:?} is not supported (gzip, bzip2 \
                             or none)"
                        )));
                    }
                };
            }
            other => {
                return Err(Error::InvalidUrl(format!(
                    "AMQP URL: unknown option {other:?} (known: exchange, durable, quorum, \
                     heartbeat, prefetch, transient_ttl, topic_ttl, ssl, max_message_size, \
                     max_backoff, compression, connect_timeout, allow_reply_queues, {})",
                    rpc_core::TlsFiles::OPTION_NAMES
                )));
            }
        }
        Ok(())
    }

    /// Whether topic and server queues (and the topic exchange) are durable.
    pub fn durable_queues(&self) -> bool {
        self.durable || self.quorum
    }
}

fn decode(text: &str, what: &str) -> Result<String> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| Error::InvalidUrl(format!("AMQP URL: {what} is not valid UTF-8")))
}

fn parse_host(netloc: &str, default_port: u16) -> Result<Host> {
    let bad = |what: &str| Error::InvalidUrl(format!("AMQP URL: {what}"));
    // oslo splits user info on the last `@`, and the password on the first `:`.
    let (userinfo, hostport) = match netloc.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, netloc),
    };
    let (username, password) = match userinfo {
        None => ("guest".to_owned(), "guest".to_owned()),
        Some(info) => match info.split_once(':') {
            Some((user, pass)) => (decode(user, "user")?, decode(pass, "password")?),
            None => (decode(info, "user")?, String::new()),
        },
    };
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in an IPv6 host"))?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(bad("unexpected text after an IPv6 host")),
        };
        (host.to_owned(), port)
    } else {
        match hostport.split_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (hostport.to_owned(), None),
        }
    };
    let port = match port {
        None | Some("") => default_port,
        Some(port) => port.parse().map_err(|_| bad("the port is not a number"))?,
    };
    let host = if host.is_empty() {
        "localhost".to_owned()
    } else {
        decode(&host, "host")?
    };
    Ok(Host {
        host,
        port,
        username,
        password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> AmqpConfig {
        AmqpConfig::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn defaults_follow_oslo() {
        let c = parse("rabbit://");
        assert_eq!(c.hosts.len(), 1);
        assert_eq!(c.hosts[0].host, "localhost");
        assert_eq!(c.hosts[0].port, 5672);
        assert_eq!(
            (c.hosts[0].username.as_str(), c.hosts[0].password.as_str()),
            ("guest", "guest")
        );
        assert_eq!(c.vhost, "/");
        assert_eq!(c.exchange, "openstack");
        assert!(!c.tls);
    }

    #[test]
    fn virtual_host_rules() {
        assert_eq!(parse("amqp://h").vhost, "/");
        assert_eq!(parse("amqp://h/").vhost, "/");
        assert_eq!(parse("amqp://h//").vhost, "/");
        assert_eq!(parse("amqp://h/%2F").vhost, "/");
        assert_eq!(parse("amqp://h/nova").vhost, "nova");
        assert_eq!(parse("amqp://h/a%2Fb").vhost, "a/b");
    }

    #[test]
    fn several_hosts_with_their_own_credentials() {
        let c = parse("rabbit://u1:p%40ss@h1:5673,u2:p2@[::1]:5674,h3/vh?heartbeat=5");
        let hosts: Vec<String> = c.hosts.iter().map(ToString::to_string).collect();
        assert_eq!(hosts, ["h1:5673", "[::1]:5674", "h3:5672"]);
        assert_eq!(c.hosts[0].password, "p@ss");
        assert_eq!(c.hosts[1].username, "u2");
        assert_eq!(c.vhost, "vh");
        assert_eq!(c.heartbeat, 5);
    }

    #[test]
    fn user_may_contain_at_sign() {
        let c = parse("amqp://user@corp:secret@host");
        assert_eq!(c.hosts[0].username, "user@corp");
        assert_eq!(c.hosts[0].password, "secret");
    }

    #[test]
    fn options_and_tls() {
        let c = parse("amqps://h?exchange=nova&durable=true&quorum=1&prefetch=10&transient_ttl=0");
        assert!(c.tls);
        assert_eq!(c.hosts[0].port, 5671);
        assert_eq!(c.exchange, "nova");
        assert!(c.durable_queues());
        assert_eq!(c.prefetch, Some(10));
        assert_eq!(c.transient_ttl, None);
        assert!(parse("rabbit://h?ssl=true").tls);
        assert!(parse("rabbit://h?amqp_durable_queues=true").durable);
    }

    #[test]
    fn compression_takes_kombus_names() {
        assert_eq!(parse("amqp://h").compression, None);
        assert_eq!(
            parse("amqp://h?compression=gzip").compression,
            Some(Compression::Gzip)
        );
        for name in ["bzip2", "bz2", "BZIP2"] {
            let url = format!("amqp://h?kombu_compression={name}");
            assert_eq!(parse(&url).compression, Some(Compression::Bzip2), "{url}");
        }
        assert_eq!(parse("amqp://h?compression=none").compression, None);
        let err = AmqpConfig::parse("amqp://h?compression=lzma").expect_err("lzma");
        assert!(err.to_string().contains("gzip, bzip2"), "{err}");
    }

    #[test]
    fn connect_timeout_takes_seconds_with_decimals() {
        assert_eq!(parse("amqp://h").connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(
            parse("amqp://h?connect_timeout=1").connect_timeout,
            Duration::from_secs(1)
        );
        assert_eq!(
            parse("amqp://h?connect_timeout=0.25").connect_timeout,
            Duration::from_millis(250)
        );
        for bad in ["0", "-1", "x", "", "inf", "nan"] {
            let url = format!("amqp://u:s3cret@h?connect_timeout={bad}");
            let err = AmqpConfig::parse(&url).expect_err(&url);
            assert!(err.to_string().contains("connect_timeout"), "{err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn reply_queues_are_the_standard_shape_or_allowed() {
        let standard = format!("reply_{}", "0123456789abcdef".repeat(2));
        let default = ReplyQueues::default();
        assert!(default.allows(&standard));
        for refused in [
            "openstack".to_owned(),
            "reply_".to_owned(),
            format!("reply_{}", "0123456789ABCDEF".repeat(2)),
            format!("reply_{}0", "0123456789abcdef".repeat(2)),
            format!("{standard}\n"),
            format!("x{standard}"),
            "reply_host:123:1".to_owned(),
        ] {
            assert!(!default.allows(&refused), "{refused:?}");
        }
        let c = parse("amqp://h?allow_reply_queues=legacy_replies,reply_host%3A*");
        assert!(c.reply_queues.allows(&standard));
        assert!(c.reply_queues.allows("legacy_replies"));
        assert!(!c.reply_queues.allows("legacy_replies_2"));
        assert!(c.reply_queues.allows("reply_host:123:1"));
        assert!(!c.reply_queues.allows("reply_other:1:1"));
        let all = parse("amqp://h?allow_reply_queues=*");
        assert!(all.reply_queues.allows("anything at all"));
        // Repeated options add up; empty items are ignored.
        let c = parse("amqp://h?allow_reply_queues=a,,b&allow_reply_queues=c");
        assert_eq!(c.reply_queues.names, ["a", "b", "c"]);
        assert!(
            parse("amqp://h?allow_reply_queues=")
                .reply_queues
                .prefixes
                .is_empty()
        );
    }

    #[test]
    fn bad_urls_are_clear_errors_without_secrets() {
        for url in [
            "http://h",
            "amqp://u:s3cret@h:port",
            "amqp://u:s3cret@h?bogus=1",
            "amqp://u:s3cret@h?heartbeat=x",
            "amqp://u:s3cret@[::1",
            "amqp://u:s3cret@h?exchange=",
        ] {
            let err = AmqpConfig::parse(url).expect_err(url);
            assert!(matches!(err, Error::InvalidUrl(_)), "{url}: {err:?}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
        let debug = format!("{:?}", parse("amqp://u:s3cret@h"));
        assert!(!debug.contains("s3cret"), "{debug}");
    }
}
