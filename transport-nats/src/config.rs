//! The configuration of a NATS transport: parsed from a URL (`nats://`, `tls://`,
//! several comma-separated servers, user/password, token, credentials file, options)
//! or built with setters. Where it puts each subject is in `subjects.rs`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use rpc_core::options::{DEFAULT_CONNECT_TIMEOUT, UrlOption};
use rpc_core::{Error, Result, TlsFiles};

use crate::subjects::protocol_safe;

/// How a client authenticates.
#[derive(Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// User and password.
    UserPassword(String, String),
    /// A token.
    Token(String),
    /// A `.creds` file (JWT and NKey seed).
    CredentialsFile(PathBuf),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::UserPassword(user, _) => write!(f, "UserPassword({user:?}, <redacted>)"),
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
            Auth::CredentialsFile(path) => write!(f, "CredentialsFile({path:?})"),
        }
    }
}

/// Everything a NATS URL configures: parsed from one with [`NatsConfig::parse`], or
/// built from [`NatsConfig::default`] (a server at `nats://127.0.0.1:4222`, the
/// defaults a URL without options gets) with the setters named after the fields.
///
/// ```
/// use std::time::Duration;
/// use mqrpc::NatsConfig;
///
/// let config = NatsConfig::default()
///     .servers(["nats://10.0.0.7:4222"])
///     .jetstream(true)
///     .ack_wait(Duration::from_secs(30));
/// let parsed = NatsConfig::parse("nats://10.0.0.7?jetstream=true&ack_wait=30s")?;
/// assert_eq!(config, parsed);
/// # Ok::<(), mqrpc::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Servers as `nats://host:port` or `tls://host:port` (default
    /// `nats://127.0.0.1:4222`).
    pub servers: Vec<String>,
    /// Credentials.
    pub auth: Auth,
    /// TLS required (`tls://`, or `tls=true`).
    pub tls: bool,
    /// First token(s) of every subject (`prefix`, default `mqrpc`).
    pub prefix: String,
    /// The control exchange (`exchange`, default `openstack`), part of each topic's
    /// subjects.
    pub exchange: String,
    /// Casts to a topic or server go through JetStream (kept while no server runs,
    /// acked by the server) instead of core NATS (`jetstream`, default off).
    pub jetstream: bool,
    /// How long JetStream waits for a server's ack before delivering a cast again
    /// (`ack_wait`, default 30 s).
    pub ack_wait: Duration,
    /// How long JetStream keeps casts nobody took (`max_age`). `None` (the default):
    /// a stream mqrpc creates keeps them [`DEFAULT_MAX_AGE`] (24 h), and an existing
    /// stream keeps its own `max_age`. Set (URL option or [`NatsConfig::max_age`]):
    /// mqrpc also sets it on an existing stream, overriding an operator's retention.
    pub max_age: Option<Duration>,
    /// How many copies of the casts stream a JetStream cluster keeps (`replicas`,
    /// 1 to 5, default 1; the stream's consumers follow it). Used when mqrpc creates
    /// the stream; an existing stream with fewer is raised to this many, one with
    /// more is left as it is (mqrpc never lowers it).
    pub replicas: usize,
    /// How long one attempt to connect to a server may take (`connect_timeout`,
    /// default [`DEFAULT_CONNECT_TIMEOUT`], 10 s): the TCP connect, TLS and the NATS
    /// handshake. It bounds the first connect (at most this long per server listed)
    /// and every reconnect attempt.
    pub connect_timeout: Duration,
    /// Messages a subscription buffers before the client counts a slow consumer
    /// (`subscription_capacity`, default 65 536).
    pub subscription_capacity: usize,
    /// The largest message sent or accepted, in bytes (`max_message_size`); never
    /// more than the server's own `max_payload`, which applies when this is unset.
    pub max_message_size: Option<usize>,
    /// CA and client certificate files (`tls_ca_file`, `tls_cert_file`,
    /// `tls_key_file`); naming any requires TLS.
    pub tls_files: TlsFiles,
}

/// The most replicas a JetStream stream can have (nats-server's limit).
pub(crate) const MAX_REPLICAS: usize = 5;

/// How long a stream mqrpc creates keeps casts nobody took, unless
/// [`NatsConfig::max_age`] says otherwise: 24 h.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The server of a URL without one, and of [`NatsConfig::default`].
const DEFAULT_SERVER: &str = "127.0.0.1:4222";

/// The options a NATS URL takes, for the error about an unknown one.
const KNOWN_OPTIONS: &str = "prefix, exchange, token, creds, tls, jetstream, ack_wait, max_age, \
     replicas, connect_timeout, subscription_capacity, max_message_size";

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: vec![format!("nats://{DEFAULT_SERVER}")],
            auth: Auth::None,
            tls: false,
            prefix: "mqrpc".to_owned(),
            exchange: rpc_core::DEFAULT_EXCHANGE.to_owned(),
            jetstream: false,
            ack_wait: Duration::from_secs(30),
            max_age: None,
            replicas: 1,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            subscription_capacity: 65_536,
            max_message_size: None,
            tls_files: TlsFiles::default(),
        }
    }
}

impl NatsConfig {
    /// Parses `nats://[user:password@|token@]host[:port][,host[:port]...][?options]`
    /// or the same with `tls://`.
    ///
    /// Options: `prefix`, `exchange`, `token`, `creds` (path of a credentials file),
    /// `tls`, `jetstream` (casts through JetStream), `ack_wait`, `max_age` and
    /// `replicas` (JetStream mode), `connect_timeout`, `subscription_capacity`,
    /// `max_message_size` (bytes), and the TLS files (`tls_ca_file`, `tls_cert_file`,
    /// `tls_key_file`). Durations take `500ms`, `2s`, `1m` or plain seconds
    /// (`1.5`).
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |what: String| Error::InvalidUrl(format!("NATS URL: {what}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected nats:// or tls://".to_owned()))?;
        let mut tls = match scheme.to_ascii_lowercase().as_str() {
            "nats" => false,
            "tls" => true,
            other => return Err(bad(format!("unsupported scheme {other:?}"))),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, query),
            None => (rest, ""),
        };
        let netlocs = rest.trim_end_matches('/');
        let mut config = NatsConfig {
            servers: Vec::new(),
            tls,
            ..NatsConfig::default()
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value)?;
            if config.tls_files.set_option(key, &value).is_some() {
                continue;
            }
            let option = UrlOption::new("NATS", key, &value);
            match key {
                "prefix" | "exchange" => {
                    check_subject_prefix(&option)?;
                    if key == "prefix" {
                        config.prefix = value;
                    } else {
                        config.exchange = value;
                    }
                }
                "token" => config.auth = Auth::Token(value),
                "creds" => config.auth = Auth::CredentialsFile(PathBuf::from(value)),
                "tls" => tls = option.flag()?,
                "jetstream" => config.jetstream = option.flag()?,
                "ack_wait" => config.ack_wait = option.duration()?,
                "max_age" => config.max_age = Some(option.duration()?),
                "replicas" => {
                    config.replicas = option.positive()?;
                    if config.replicas > MAX_REPLICAS {
                        return Err(option.invalid(format!("must be 1 to {MAX_REPLICAS}")));
                    }
                }
                "connect_timeout" => config.connect_timeout = option.duration()?,
                "subscription_capacity" => config.subscription_capacity = option.positive()?,
                "max_message_size" => config.max_message_size = Some(option.positive()?),
                other if other.contains('@') => {
                    // An unencoded `?` in a password split the URL early: what looks like
                    // an option holds part of the password, so it is not echoed.
                    return Err(bad(
                        "an option name holds '@': percent-encode '?' in credentials".to_owned(),
                    ));
                }
                _ => {
                    return Err(
                        option.unknown(&format!("{KNOWN_OPTIONS}, {}", TlsFiles::OPTION_NAMES))
                    );
                }
            }
        }
        config.tls_files.validate()?;
        let tls = tls || config.tls_files.any();
        config.tls = tls;
        let scheme = if tls { "tls" } else { "nats" };
        for netloc in netlocs.split(',') {
            let (userinfo, hostport) = match netloc.rsplit_once('@') {
                Some((userinfo, hostport)) => (Some(userinfo), hostport),
                None => (None, netloc),
            };
            if let Some(info) = userinfo {
                let auth = match info.split_once(':') {
                    Some((user, pass)) => Auth::UserPassword(decode(user)?, decode(pass)?),
                    None => Auth::Token(decode(info)?),
                };
                if config.auth == Auth::None {
                    config.auth = auth;
                }
            }
            let hostport = if hostport.is_empty() {
                DEFAULT_SERVER
            } else {
                hostport
            };
            let with_port = match hostport.rsplit_once(':') {
                Some((_, port)) if port.parse::<u16>().is_ok() => hostport.to_owned(),
                None => format!("{hostport}:4222"),
                Some(_) if hostport.ends_with(']') => format!("{hostport}:4222"),
                // Not a port: most likely a password with an unencoded `,` split the
                // URL, so the text is not echoed.
                Some(_) => {
                    return Err(bad(
                        "a server's port is not a number (percent-encode ',' in credentials)"
                            .to_owned(),
                    ));
                }
            };
            if with_port.contains(['/', '@', ' ']) {
                return Err(bad("a server address is malformed".to_owned()));
            }
            config.servers.push(format!("{scheme}://{with_port}"));
        }
        Ok(config)
    }

    /// Checks what the setters cannot: there is a server, the prefix and exchange
    /// make valid subject tokens (subjects are not checked again on publish), counts
    /// and durations are positive, and a client certificate comes with its key. [`crate::NatsTransport::with_config`]
    /// calls it; a parsed configuration always passes.
    pub fn validate(&self) -> Result<()> {
        if self.servers.is_empty() {
            return Err(Error::InvalidConfig(
                "NATS: no server to connect to".to_owned(),
            ));
        }
        let invalid = |what: &str| Err(Error::InvalidConfig(format!("NATS: {what}")));
        // The same rule as the URL's, said as a configuration error: there may be no URL.
        for (name, value) in [("prefix", &self.prefix), ("exchange", &self.exchange)] {
            if check_subject_prefix(&UrlOption::new("NATS", name, value)).is_err() {
                return invalid(&format!("{name} {value:?} is not a valid subject prefix"));
            }
        }
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return invalid(&format!("replicas must be 1 to {MAX_REPLICAS}"));
        }
        if self.subscription_capacity == 0 || self.max_message_size == Some(0) {
            return invalid("subscription_capacity and max_message_size must be positive");
        }
        for (name, duration) in [
            ("ack_wait", self.ack_wait),
            ("max_age", self.max_age.unwrap_or(DEFAULT_MAX_AGE)),
            ("connect_timeout", self.connect_timeout),
        ] {
            if duration.is_zero() {
                return invalid(&format!("{name} must be a positive duration"));
            }
        }
        self.tls_files.validate()
    }

    /// Sets [`NatsConfig::servers`]: `nats://host:port` or `tls://host:port` each.
    pub fn servers(mut self, servers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.servers = servers.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`NatsConfig::auth`].
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Sets [`NatsConfig::tls`].
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Sets [`NatsConfig::prefix`].
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`NatsConfig::exchange`].
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Sets [`NatsConfig::jetstream`].
    pub fn jetstream(mut self, jetstream: bool) -> Self {
        self.jetstream = jetstream;
        self
    }

    /// Sets [`NatsConfig::ack_wait`].
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Sets [`NatsConfig::max_age`]: the stream's `max_age`, on creation and on an
    /// existing stream alike.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    /// Sets [`NatsConfig::replicas`] (1 to 5, checked by [`NatsConfig::validate`]).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Sets [`NatsConfig::connect_timeout`].
    pub fn connect_timeout(mut self, connect_timeout: Duration) -> Self {
        self.connect_timeout = connect_timeout;
        self
    }

    /// Sets [`NatsConfig::subscription_capacity`].
    pub fn subscription_capacity(mut self, subscription_capacity: usize) -> Self {
        self.subscription_capacity = subscription_capacity;
        self
    }

    /// Sets [`NatsConfig::max_message_size`] (`None`: the server's `max_payload`).
    pub fn max_message_size(mut self, max_message_size: impl Into<Option<usize>>) -> Self {
        self.max_message_size = max_message_size.into();
        self
    }

    /// Sets [`NatsConfig::tls_files`].
    pub fn tls_files(mut self, tls_files: TlsFiles) -> Self {
        self.tls_files = tls_files;
        self
    }
}

/// Refuses a prefix or exchange that would not make valid subject tokens: empty, a
/// wildcard, a leading or trailing `.`, or a character that would split the
/// protocol line (subjects are not checked again on publish, see `NatsTransport`).
fn check_subject_prefix(option: &UrlOption<'_>) -> Result<()> {
    let value = option.value();
    if value.is_empty()
        || value.contains(['*', '>'])
        || !protocol_safe(value)
        || value.starts_with('.')
        || value.ends_with('.')
    {
        return Err(option.invalid("is not a valid subject prefix"));
    }
    Ok(())
}

fn decode(text: &str) -> Result<String> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| Error::InvalidUrl("NATS URL: a value is not valid UTF-8".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_and_credentials() {
        let c = NatsConfig::parse("nats://u:p%40ss@h1:4223,h2?prefix=t").expect("parse");
        assert_eq!(c.servers, ["nats://h1:4223", "nats://h2:4222"]);
        assert_eq!(c.auth, Auth::UserPassword("u".into(), "p@ss".into()));
        assert_eq!(c.prefix, "t");
        let c = NatsConfig::parse("tls://s3cret@h").expect("parse");
        assert!(c.tls);
        assert_eq!(c.servers, ["tls://h:4222"]);
        assert_eq!(c.auth, Auth::Token("s3cret".into()));
        assert!(!format!("{c:?}").contains("s3cret"));
        let c = NatsConfig::parse("nats://h?creds=/etc/x.creds&jetstream=true").expect("parse");
        assert_eq!(c.auth, Auth::CredentialsFile("/etc/x.creds".into()));
        assert!(c.jetstream);
        assert_eq!(c.max_message_size, None);
        let c = NatsConfig::parse("nats://[::1]:4223,[::1]?max_message_size=4096").expect("parse");
        assert_eq!(c.servers, ["nats://[::1]:4223", "nats://[::1]:4222"]);
        assert_eq!(c.max_message_size, Some(4096));
    }

    #[test]
    fn connect_timeout_is_seconds_with_a_default_of_ten() {
        let c = NatsConfig::parse("nats://h").expect("parse");
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        let c = NatsConfig::parse("nats://h?connect_timeout=2.5").expect("parse");
        assert_eq!(c.connect_timeout, Duration::from_millis(2500));
        for bad in ["0", "-1", "x", "", "0ms", "2 weeks"] {
            let url = format!("nats://h?connect_timeout={bad}");
            let err = NatsConfig::parse(&url).expect_err(&url);
            assert!(err.to_string().contains("connect_timeout"), "{err}");
        }
    }

    #[test]
    fn durations_take_units_and_plain_seconds() {
        let c = NatsConfig::parse("nats://h?ack_wait=500ms&max_age=2h&connect_timeout=1.5s")
            .expect("parse");
        assert_eq!(c.ack_wait, Duration::from_millis(500));
        assert_eq!(c.max_age, Some(Duration::from_secs(7200)));
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        let c = NatsConfig::parse("nats://h?ack_wait=45&max_age=0.5").expect("parse");
        assert_eq!(c.ack_wait, Duration::from_secs(45));
        assert_eq!(c.max_age, Some(Duration::from_millis(500)));
        assert_eq!(
            NatsConfig::default().max_age,
            None,
            "unset: the stream's own is kept"
        );
    }

    #[test]
    fn unknown_options_are_errors_that_list_the_known_ones() {
        let err = NatsConfig::parse("nats://h?ackwait=3").expect_err("unknown option");
        let text = err.to_string();
        assert!(text.contains("unknown option \"ackwait\""), "{text}");
        assert!(
            text.contains("ack_wait") && text.contains("tls_ca_file"),
            "{text}"
        );
    }

    #[test]
    fn the_default_is_a_url_without_options_and_setters_match_options() {
        assert_eq!(
            NatsConfig::default(),
            NatsConfig::parse("nats://").expect("parse")
        );
        assert_eq!(NatsConfig::default().servers, ["nats://127.0.0.1:4222"]);
        let built = NatsConfig::default()
            .servers(["tls://h1:4223", "tls://h2:4222"])
            .auth(Auth::Token("t0ken".into()))
            .tls(true)
            .prefix("p")
            .exchange("e")
            .jetstream(true)
            .ack_wait(Duration::from_secs(5))
            .max_age(Duration::from_secs(60))
            .replicas(3)
            .connect_timeout(Duration::from_millis(2500))
            .subscription_capacity(128)
            .max_message_size(4096);
        let parsed = NatsConfig::parse(
            "tls://t0ken@h1:4223,h2?prefix=p&exchange=e&jetstream=1&ack_wait=5s&max_age=1m\
             &replicas=3&connect_timeout=2500ms&subscription_capacity=128&max_message_size=4096",
        )
        .expect("parse");
        assert_eq!(built, parsed);
        built.validate().expect("valid");
        assert_eq!(built.max_message_size(None).max_message_size, None);
    }

    #[test]
    fn replicas_are_one_to_five() {
        assert_eq!(NatsConfig::parse("nats://h").expect("parse").replicas, 1);
        let c = NatsConfig::parse("nats://h?replicas=3").expect("parse");
        assert_eq!(c.replicas, 3);
        for bad in ["0", "6", "-1", "x", ""] {
            let url = format!("nats://h?replicas={bad}");
            let err = NatsConfig::parse(&url).expect_err(&url);
            assert!(matches!(err, Error::InvalidUrl(_)), "{err:?}");
            assert!(err.to_string().contains("replicas"), "{err}");
        }
        for bad in [0, 6] {
            let err = NatsConfig::default().replicas(bad).validate();
            assert!(matches!(err, Err(Error::InvalidConfig(_))), "{err:?}");
        }
        NatsConfig::default().replicas(5).validate().expect("valid");
    }

    #[test]
    fn a_built_config_with_a_prefix_that_breaks_subjects_is_refused() {
        for prefix in ["", "a.*", "a b", "a\r\nPUB x", ".a"] {
            let err = NatsConfig::default()
                .prefix(prefix)
                .validate()
                .expect_err(prefix);
            assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
        }
        let err = NatsConfig::default().exchange("x>").validate();
        assert!(err.is_err());
        let none: [&str; 0] = [];
        let err = NatsConfig::default().servers(none).validate();
        assert!(matches!(err, Err(Error::InvalidConfig(_))), "{err:?}");
    }

    /// Defect 8 of issue #22: a 35-character Cyrillic topic escaped twice made a
    /// consumer name of over 255 characters, which JetStream refuses.
    #[test]
    fn bad_urls_are_clear_errors_without_secrets() {
        for url in [
            "http://h",
            "nats://u:s3cret@h?bogus=1",
            "nats://u:s3cret@h?prefix=a.*",
            "nats://u:s3cret@h?prefix=a%0D%0APUB",
            "nats://u:s3cret@h?prefix=a%09b",
            "nats://u:s3cret@h?exchange=a%20b",
            "nats://u:s3cret@h?ack_wait=x",
            "nats://u:s3cret@h?max_message_size=0",
            "nats://u:s3c,ret@h",
            "nats://u:s3c?ret@h",
        ] {
            let err = NatsConfig::parse(url).expect_err(url);
            assert!(matches!(err, Error::InvalidUrl(_)), "{err:?}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
            assert!(!err.to_string().contains("ret"), "{err}");
        }
    }
}
