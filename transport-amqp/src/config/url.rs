//! Reading an AMQP URL: `amqp://`, `amqps://` and oslo.messaging's `rabbit://`, with
//! several comma-separated hosts, oslo's virtual-host rules, and query options read
//! with rpc-core's option reader (oslo's option names are aliases).

use std::time::Duration;

use percent_encoding::percent_decode_str;
use rpc_core::options::{Unit, UrlOption, parse_duration};
use rpc_core::{Error, Result, TlsFiles};

use super::{AmqpConfig, Host};
use crate::compression::Compression;
use crate::reply_queues::ReplyQueues;

/// The URL options, for the error about an unknown one (the TLS files' are added).
const KNOWN_OPTIONS: &str = "exchange, durable, quorum, heartbeat, prefetch, transient_ttl, \
    topic_ttl, ssl, max_message_size, max_backoff, compression, connect_timeout, \
    allow_reply_queues, shuffle_hosts, transient_quorum, resubscribe_timeout";

impl AmqpConfig {
    /// Parses an AMQP URL.
    ///
    /// `SCHEME://[user[:password]@]host[:port][,[user[:password]@]host[:port]...][/vhost][?options]`
    /// where SCHEME is `amqp`, `amqps` or `rabbit`. The virtual host follows
    /// oslo.messaging: none or empty means `/`, `//` and `/%2F` mean `/`. Options
    /// (oslo's option names are accepted too): `exchange` (`control_exchange`),
    /// `durable` (`amqp_durable_queues`), `quorum` (`rabbit_quorum_queue`),
    /// `transient_quorum` (`rabbit_transient_quorum_queue`: quorum reply and fanout
    /// queues), `shuffle_hosts` (default true: each transport tries the hosts in an
    /// order drawn at random, as oslo.messaging; false keeps the URL's order),
    /// `resubscribe_timeout` (default 10 s: how long each declare, bind or consume of
    /// a re-subscription may wait before it is logged as stuck and retried), `heartbeat`
    /// (`heartbeat_timeout_threshold`; rounded up to whole seconds, 0 disables),
    /// `prefetch` (`rabbit_qos_prefetch_count`), `transient_ttl`
    /// (`rabbit_transient_queues_ttl`, 0 = none), `topic_ttl` (`x-expires` on topic,
    /// server and notification queues; not set by default), `ssl` (`tls`), `max_message_size`,
    /// `max_backoff`, `compression` (`kombu_compression`: `gzip` or `bzip2`, for what
    /// this transport sends), `connect_timeout` (default 10 s: one connection
    /// attempt's TCP, TLS and AMQP handshake), `allow_reply_queues` (reply-queue names
    /// a server answers besides `reply_<32 hex digits>`, see [`ReplyQueues`]), and the
    /// TLS files `tls_ca_file`, `tls_cert_file`, `tls_key_file` (`ssl_ca_file`,
    /// `ssl_cert_file`, `ssl_key_file`), which turn TLS on. Durations take `500ms`,
    /// `2s`, `1m`, `1h` or plain seconds, fractions allowed (`1.5`); flags take
    /// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`. An unknown option is an error
    /// that lists the known ones.
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
            ..AmqpConfig::default()
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value, key)?;
            config.set_option(UrlOption::new("AMQP", key, &value), &mut tls)?;
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

    fn set_option(&mut self, option: UrlOption<'_>, tls: &mut bool) -> Result<()> {
        if self
            .tls_files
            .set_option(option.key(), option.value())
            .is_some()
        {
            return Ok(());
        }
        match option.key() {
            "exchange" | "control_exchange" => self.exchange = option.text()?.to_owned(),
            "durable" | "amqp_durable_queues" => self.durable = option.flag()?,
            "quorum" | "rabbit_quorum_queue" => self.quorum = option.flag()?,
            "transient_quorum" | "rabbit_transient_quorum_queue" => {
                self.transient_quorum = option.flag()?;
            }
            "shuffle_hosts" => self.shuffle_hosts = option.flag()?,
            "resubscribe_timeout" => self.resubscribe_timeout = option.duration()?,
            "ssl" | "tls" => *tls = option.flag()?,
            "heartbeat" | "heartbeat_timeout_threshold" => {
                self.heartbeat = heartbeat_seconds(&option)?;
            }
            "prefetch" | "rabbit_qos_prefetch_count" => {
                let n: u16 = option.number()?;
                self.prefetch = (n > 0).then_some(n);
            }
            "transient_ttl" | "rabbit_transient_queues_ttl" => {
                self.transient_ttl = time_to_live(&option)?;
            }
            "topic_ttl" => self.topic_ttl = time_to_live(&option)?,
            "max_message_size" => self.max_message_size = option.positive()?,
            "max_backoff" => self.max_backoff = option.duration()?,
            "connect_timeout" => self.connect_timeout = option.duration()?,
            "allow_reply_queues" => {
                let allowed = ReplyQueues::parse(option.value());
                self.reply_queues.names.extend(allowed.names);
                self.reply_queues.prefixes.extend(allowed.prefixes);
            }
            "compression" | "kombu_compression" => {
                let value = option.value();
                self.compression = match value.to_ascii_lowercase().as_str() {
                    "" | "none" => None,
                    "gzip" => Some(Compression::Gzip),
                    // oslo's help names `bz2`; kombu itself knows only `bzip2`.
                    "bzip2" | "bz2" => Some(Compression::Bzip2),
                    _ => {
                        return Err(option.invalid(format_args!(
                            "{value:?} is not supported (gzip, bzip2 or none)"
                        )));
                    }
                };
            }
            _ => {
                return Err(option.unknown(&format!("{KNOWN_OPTIONS}, {}", TlsFiles::OPTION_NAMES)));
            }
        }
        Ok(())
    }
}

/// The AMQP heartbeat: a duration in whole seconds (the protocol's unit), rounded up
/// so that `500ms` asks for 1 s rather than none; `0` disables it.
fn heartbeat_seconds(option: &UrlOption<'_>) -> Result<u16> {
    parse_duration(option.value(), Unit::Seconds)
        .and_then(|d| u16::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).ok())
        .ok_or_else(|| {
            option.invalid(
                "must be a duration of at most 65535 s such as 30, 30s or 1m (a plain \
                 number is seconds; 0 disables heartbeats)",
            )
        })
}

/// A queue's `x-expires`: a duration, or `0` for none.
fn time_to_live(option: &UrlOption<'_>) -> Result<Option<Duration>> {
    let ttl = parse_duration(option.value(), Unit::Seconds).ok_or_else(|| {
        option.invalid(
            "must be a duration such as 1800, 30m or 2h (a plain number is seconds; 0 for \
             none)",
        )
    })?;
    Ok((!ttl.is_zero()).then_some(ttl))
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
    use rpc_core::options::DEFAULT_CONNECT_TIMEOUT;

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
        // Clusters: oslo's names, hosts shuffled unless told otherwise.
        let c = parse("rabbit://h1,h2?rabbit_transient_quorum_queue=true&resubscribe_timeout=2.5");
        assert!(c.transient_quorum && c.shuffle_hosts);
        assert_eq!(c.resubscribe_timeout, Duration::from_millis(2500));
        assert!(!parse("rabbit://h1,h2?shuffle_hosts=false").shuffle_hosts);
        assert!(AmqpConfig::parse("amqp://h?resubscribe_timeout=0").is_err());
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
    fn durations_take_units_or_plain_seconds_on_every_option() {
        let c = parse(
            "amqp://h?connect_timeout=500ms&max_backoff=2s&transient_ttl=30m&topic_ttl=1.5\
             &heartbeat=1m",
        );
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.max_backoff, Duration::from_secs(2));
        assert_eq!(c.transient_ttl, Some(Duration::from_secs(1800)));
        assert_eq!(c.topic_ttl, Some(Duration::from_millis(1500)));
        assert_eq!(c.heartbeat, 60);
        // The heartbeat is whole seconds on the wire: rounded up, 0 still disables it.
        assert_eq!(parse("amqp://h?heartbeat=500ms").heartbeat, 1);
        assert_eq!(
            parse("amqp://h?heartbeat_timeout_threshold=2.5").heartbeat,
            3
        );
        assert_eq!(parse("amqp://h?heartbeat=0").heartbeat, 0);
        // 0 still means no x-expires.
        let c = parse("amqp://h?rabbit_transient_queues_ttl=0&topic_ttl=0s");
        assert_eq!((c.transient_ttl, c.topic_ttl), (None, None));
        for bad in [
            "heartbeat=70000",
            "heartbeat=-1",
            "transient_ttl=soon",
            "topic_ttl=3d",
            "max_backoff=0",
            "max_backoff=0ms",
        ] {
            let url = format!("amqp://h?{bad}");
            let err = AmqpConfig::parse(&url).expect_err(&url);
            let option = bad.split('=').next().unwrap_or_default();
            assert!(
                err.to_string().contains(&format!("option {option}")),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_options_list_the_known_ones() {
        let err = AmqpConfig::parse("amqp://h?prefetch_count=5").expect_err("unknown");
        let text = err.to_string();
        assert!(text.contains("unknown option \"prefetch_count\""), "{text}");
        assert!(text.contains("prefetch, transient_ttl"), "{text}");
        assert!(text.contains("tls_ca_file"), "{text}");
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
