//! The subject layout: where each topic, server, fanout, inbox and JetStream cast
//! lives, with every name escaped so that a `.`, `*`, `>` or white space in a topic
//! or server cannot alias another subject, and JetStream names that always fit.

use std::fmt;

use rpc_core::{Error, Result};

use crate::config::NatsConfig;

impl NatsConfig {
    fn base(&self, exchange: &str, topic: &str) -> String {
        let mut exchange = token(exchange);
        if exchange == JETSTREAM_TOKEN {
            // The exchange token sits where JetStream subjects have their fixed `js`
            // token: escape its first letter so the two subject spaces stay apart.
            // No other name escapes to this (a literal `%` becomes `%25`).
            exchange = "%6As".to_owned();
        }
        format!("{}.{}.{}", self.prefix, exchange, token(topic))
    }

    /// The subject all servers of a topic share (a queue group).
    pub fn topic_subject(&self, exchange: &str, topic: &str) -> String {
        self.base(exchange, topic)
    }

    /// The subject of one named server.
    pub fn server_subject(&self, exchange: &str, topic: &str, server: &str) -> String {
        format!("{}.s.{}", self.base(exchange, topic), token(server))
    }

    /// The fanout subject of a topic.
    pub fn fanout_subject(&self, exchange: &str, topic: &str) -> String {
        format!("{}.fanout", self.base(exchange, topic))
    }

    /// Prefix of every client inbox. The `%` token cannot come out of escaping a
    /// name (every escaped `%` is followed by two hex digits), so no exchange aliases it.
    pub fn reply_prefix(&self) -> String {
        format!("{}.%reply.", self.prefix)
    }

    /// A subject nobody subscribes to, for round trips to the server.
    pub(crate) fn ping_subject(&self) -> String {
        format!("{}.%ping.{}", self.prefix, rpc_core::wire::new_id())
    }

    /// The JetStream subject of a cast to a topic or server (`None` for fanout and
    /// replies, which always use core NATS).
    ///
    /// A name whose escaped token is longer than [`MAX_JETSTREAM_NAME`] characters
    /// goes in as a readable head, `__` and 16 hex digits of the SHA-256 of the token:
    /// subjects stay far below nats-server's protocol line limit. Shorter names keep
    /// the token they always had, so casts stored by earlier versions are still found.
    pub fn jetstream_subject(&self, address: &rpc_core::Address) -> Option<String> {
        match address {
            // JetStream refuses consumer filters with `%` (nats-server 2.9), so these
            // subjects escape names with `name_safe` instead of `token`.
            rpc_core::Address::Topic { exchange, topic } => Some(format!(
                "{}.{JETSTREAM_TOKEN}.{}.{}",
                self.prefix,
                jetstream_token(exchange),
                jetstream_token(topic)
            )),
            rpc_core::Address::Server {
                exchange,
                topic,
                server,
            } => Some(format!(
                "{}.{JETSTREAM_TOKEN}.{}.{}.s.{}",
                self.prefix,
                jetstream_token(exchange),
                jetstream_token(topic),
                jetstream_token(server)
            )),
            _ => None,
        }
    }

    /// The JetStream stream holding casts of an exchange.
    pub fn jetstream_stream(&self, exchange: &str) -> String {
        fit_name(format!(
            "{}_{}_casts",
            name_safe(&self.prefix),
            name_safe(exchange)
        ))
    }

    /// The durable consumer that takes the casts of a JetStream subject (one of
    /// [`NatsConfig::jetstream_subject`]): the subject escaped with `name_safe`, or,
    /// when that is longer than [`MAX_JETSTREAM_NAME`], a readable head of the subject
    /// and a hash of it. Stable across restarts and versions (a name that fits is the
    /// one earlier versions used), and distinct for distinct subjects.
    pub fn jetstream_durable(&self, subject: &str) -> String {
        let name = name_safe(subject);
        if name.len() <= MAX_JETSTREAM_NAME {
            return name;
        }
        // Readable: the subject's own safe characters, its dots as `-`.
        let head: String = subject
            .chars()
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => c,
                '.' => '-',
                _ => '_',
            })
            .collect();
        hashed(&head, subject)
    }

    /// The JetStream subject of the notifications of routing key `key`
    /// (`<topic>.<priority>`) in `exchange`:
    /// `<prefix>.js._notify.<exchange>.<topic>.<priority>`, each name escaped as in
    /// [`NatsConfig::jetstream_subject`] (a key without a `.` is one token).
    /// `_notify` is no escaped name (`name_safe` writes `_` only before two
    /// uppercase hex digits), so these subjects never meet those of casts, and the
    /// `js` token keeps them apart from core NATS subjects.
    pub fn notification_subject(&self, exchange: &str, key: &str) -> String {
        let key = match key.rsplit_once('.') {
            Some((topic, priority)) => {
                format!("{}.{}", notify_token(topic), notify_token(priority))
            }
            None => notify_token(key),
        };
        format!(
            "{}.{JETSTREAM_TOKEN}.{NOTIFY_TOKEN}.{}.{key}",
            self.prefix,
            notify_token(exchange)
        )
    }

    /// The subjects of the stream holding an exchange's notifications
    /// (`<prefix>.js._notify.<exchange>.>`).
    pub fn notification_stream_subject(&self, exchange: &str) -> String {
        format!(
            "{}.{JETSTREAM_TOKEN}.{NOTIFY_TOKEN}.{}.>",
            self.prefix,
            notify_token(exchange)
        )
    }

    /// The JetStream stream holding notifications of an exchange.
    pub fn notification_stream(&self, exchange: &str) -> String {
        fit_name(format!(
            "{}_{}_notifications",
            name_safe(&self.prefix),
            name_safe(exchange)
        ))
    }

    /// The durable consumer through which the default group (`pool` `None`) or a
    /// pool takes the notifications of a subject (one of
    /// [`NatsConfig::notification_subject`]). Shared by every listener of that group
    /// or pool, in any process; distinct for distinct subjects and pools, and from
    /// the consumers of casts; at most [`MAX_JETSTREAM_NAME`] characters.
    pub fn notification_durable(&self, subject: &str, pool: Option<&str>) -> String {
        match pool {
            None => self.jetstream_durable(subject),
            // `_pool` is no escaped name either: this is not the subject of any key.
            Some(pool) => self.jetstream_durable(&format!("{subject}._pool.{}", name_safe(pool))),
        }
    }

    /// Checks that a subject mqrpc is about to subscribe or publish to fits in a
    /// NATS protocol line: nats-server closes the connection of a client whose line
    /// is longer than its `max_control_line` (4096 bytes by default), which would
    /// cut every call sharing the connection.
    pub fn check_subject(subject: &str, target: &dyn fmt::Display) -> Result<()> {
        if subject.len() > MAX_SUBJECT_BYTES {
            return Err(Error::InvalidTarget(format!(
                "{target}: its NATS subject would be {} bytes, above the {MAX_SUBJECT_BYTES} \
                 bytes mqrpc allows (nats-server refuses protocol lines over 4096 bytes); \
                 use a shorter topic, server or exchange name",
                subject.len()
            )));
        }
        Ok(())
    }
}

/// The longest subject mqrpc subscribes or publishes to, in bytes: nats-server's
/// default `max_control_line` (4096) less room for the reply subject, the queue
/// group and the size on the same protocol line.
pub const MAX_SUBJECT_BYTES: usize = 3072;

/// The longest name nats-server accepts for a JetStream stream or consumer.
pub const MAX_JETSTREAM_NAME: usize = 255;

/// A name's JetStream subject token: `name_safe`, fitted by [`fit_name`].
fn jetstream_token(name: &str) -> String {
    fit_name(name_safe(name))
}

/// `name` when it has at most [`MAX_JETSTREAM_NAME`] characters; otherwise its head
/// and `__` and 16 hex digits of the SHA-256 of the whole of it, [`MAX_JETSTREAM_NAME`]
/// characters in all. `name` is made of `name_safe` output, which never holds `__`
/// (every `_` it writes is followed by two hex digits) nor ends in 16 lowercase hex
/// digits after `__`: a fitted name never equals a name that fits as it is.
pub(crate) fn fit_name(name: String) -> String {
    if name.len() <= MAX_JETSTREAM_NAME {
        return name;
    }
    hashed(&name, &name)
}

/// A readable `head` of ASCII name characters, cut so that the whole is at most
/// [`MAX_JETSTREAM_NAME`] long, then `__` and 16 hex digits of the SHA-256 of `full`.
fn hashed(head: &str, full: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(full.as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let room = MAX_JETSTREAM_NAME - 2 - hash.len();
    let mut head = &head[..head.len().min(room)];
    // Not in the middle of a `_XX` escape: cut at its `_` instead.
    if let Some(at) = head
        .len()
        .checked_sub(2)
        .and_then(|from| head[from..].rfind('_'))
    {
        head = &head[..head.len() - 2 + at];
    }
    format!("{head}__{hash}")
}

/// A name's token in a notification subject: its [`jetstream_token`], or `_` for an
/// empty name (a subject cannot have an empty token; `name_safe` never writes a
/// lone `_`).
fn notify_token(name: &str) -> String {
    if name.is_empty() {
        return "_".to_owned();
    }
    jetstream_token(name)
}

/// The token after [`JETSTREAM_TOKEN`] that marks notification subjects.
const NOTIFY_TOKEN: &str = "_notify";

/// The token after the prefix that marks the subjects of JetStream casts.
const JETSTREAM_TOKEN: &str = "js";

/// A character that would split or end a NATS protocol line: white space or a
/// control character.
fn breaks_protocol(c: char) -> bool {
    c.is_whitespace() || c.is_control()
}

/// Whether `text` can go into a subject as it is: no character of it
/// [`breaks_protocol`]. Printable ASCII, what mqrpc's own subjects are made of, is
/// found without branching per byte; other text is looked at a character at a time.
pub(crate) fn protocol_safe(text: &str) -> bool {
    let printable = (text.bytes()).fold(true, |ok, b| ok & (b.wrapping_sub(0x21) < 0x5e));
    printable || !text.contains(breaks_protocol)
}

/// One subject token: `%`, `.`, `*`, `>` and white space are percent-escaped.
pub(crate) fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' | '.' | '*' | '>' => out.push_str(&format!("%{:02X}", c as u32)),
            c if breaks_protocol(c) => {
                let mut buf = [0u8; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// A JetStream stream or consumer name: letters, digits, `_` and `-` only; anything
/// else becomes `_XX` (its bytes in hex), so different names stay different.
pub(crate) fn name_safe(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => out.push(byte as char),
            _ => out.push_str(&format!("_{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jetstream_names_always_fit_and_stay_distinct() {
        let c = NatsConfig::parse("nats://h?prefix=mqrpc-test-js").expect("parse");
        let cyrillic = "обработка_заказов_высокий_приоритет";
        assert_eq!(cyrillic.chars().count(), 35);
        let long = "t".repeat(200);
        let mut durables = std::collections::HashSet::new();
        for topic in [cyrillic, &long, "calc", "calc2", &"я".repeat(400)] {
            for server in [None, Some("host-1"), Some(&*"s".repeat(300))] {
                let address = match server {
                    None => rpc_core::Address::Topic {
                        exchange: "openstack".into(),
                        topic: topic.to_owned(),
                    },
                    Some(server) => rpc_core::Address::Server {
                        exchange: "openstack".into(),
                        topic: topic.to_owned(),
                        server: server.to_owned(),
                    },
                };
                let subject = c.jetstream_subject(&address).expect("a subject");
                NatsConfig::check_subject(&subject, &address).expect("a subject that fits");
                assert!(!subject.contains('%'), "{subject}");
                let durable = c.jetstream_durable(&subject);
                assert!(durable.len() <= MAX_JETSTREAM_NAME, "{durable}");
                assert!(
                    durable
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                    "{durable}"
                );
                // The same name every time (a restart finds its consumer).
                assert_eq!(durable, c.jetstream_durable(&subject));
                assert!(durables.insert(durable), "two addresses share a durable");
            }
        }
        // Names that fitted before keep the name they had.
        assert_eq!(
            c.jetstream_durable("mqrpc-test-js.js.openstack.calc"),
            "mqrpc-test-js_2Ejs_2Eopenstack_2Ecalc"
        );
        let hashed = c.jetstream_durable(
            &c.jetstream_subject(&rpc_core::Address::Topic {
                exchange: "openstack".into(),
                topic: cyrillic.to_owned(),
            })
            .expect("a subject"),
        );
        assert!(
            hashed.starts_with("mqrpc-test-js-js-openstack-"),
            "{hashed}"
        );
        assert!(hashed.contains("__"), "{hashed}");
        // A long exchange: the stream name fits too.
        let stream = c.jetstream_stream(&"e".repeat(300));
        assert!(stream.len() <= MAX_JETSTREAM_NAME, "{stream}");
        assert_ne!(stream, c.jetstream_stream(&"e".repeat(301)));
        assert_eq!(
            c.jetstream_stream("openstack"),
            "mqrpc-test-js_openstack_casts"
        );
    }

    #[test]
    fn notification_names_fit_and_stay_apart() {
        let c = NatsConfig::parse("nats://h?prefix=p").expect("parse");
        assert_eq!(
            c.notification_subject("openstack", "notifications.info"),
            "p.js._notify.openstack.notifications.info"
        );
        assert_eq!(
            c.notification_subject("x", "a.b.c*"),
            "p.js._notify.x.a_2Eb.c_2A"
        );
        assert_eq!(c.notification_subject("x", "bare"), "p.js._notify.x.bare");
        assert_eq!(c.notification_subject("", ".info"), "p.js._notify._._.info");
        assert_eq!(
            c.notification_stream_subject("openstack"),
            "p.js._notify.openstack.>"
        );
        assert_eq!(
            c.notification_stream("openstack"),
            "p_openstack_notifications"
        );
        // No casts stream takes notifications, whatever the exchange.
        for exchange in ["_notify", "_5Fnotify", "notify", "js"] {
            let casts = super::super::stream::StreamKind::Casts.subject(&c, exchange);
            assert!(
                !crate::stream::covers(&casts, &c.notification_subject("x", "t.info")),
                "{casts}"
            );
        }
        let subject = c.notification_subject("openstack", "t.info");
        let mut names = std::collections::HashSet::new();
        let long = "p".repeat(400);
        for pool in [None, Some("a"), Some("b"), Some(long.as_str())] {
            let name = c.notification_durable(&subject, pool);
            assert!(name.len() <= MAX_JETSTREAM_NAME, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{name}"
            );
            assert!(names.insert(name), "two pools share a durable");
        }
        let other = c.notification_subject("openstack", "t.error");
        assert!(names.insert(c.notification_durable(&other, None)));
        assert!(names.insert(c.notification_durable(&other, Some("a"))));
        let long_topic = format!("{}.info", "t".repeat(600));
        let subject = c.notification_subject("openstack", &long_topic);
        NatsConfig::check_subject(&subject, &"t").expect("fits");
        assert!(c.notification_durable(&subject, Some("a")).len() <= MAX_JETSTREAM_NAME);
    }

    #[test]
    fn subjects_too_long_for_a_protocol_line_are_refused() {
        let c = NatsConfig::parse("nats://h").expect("parse");
        let fits = c.topic_subject("openstack", &"a".repeat(3000));
        NatsConfig::check_subject(&fits, &"t").expect("3000 bytes fit");
        let long = c.topic_subject("openstack", &"a".repeat(4000));
        let err = NatsConfig::check_subject(&long, &"openstack/aaa").expect_err("too long");
        assert!(matches!(err, Error::InvalidTarget(_)), "{err:?}");
        assert!(err.to_string().contains("3072"), "{err}");
    }

    #[test]
    fn names_cannot_alias_other_subjects() {
        let c = NatsConfig::parse("nats://h").expect("parse");
        assert_eq!(c.topic_subject("openstack", "calc"), "mqrpc.openstack.calc");
        assert_eq!(
            c.server_subject("openstack", "calc", "h1"),
            "mqrpc.openstack.calc.s.h1"
        );
        assert_eq!(
            c.fanout_subject("openstack", "calc"),
            "mqrpc.openstack.calc.fanout"
        );
        assert_eq!(c.topic_subject("x", "a.b"), "mqrpc.x.a%2Eb");
        assert_eq!(c.topic_subject("x", "a b>*"), "mqrpc.x.a%20b%3E%2A");
        assert_ne!(
            c.server_subject("x", "a", "b.c"),
            c.server_subject("x", "a.b", "c")
        );
        assert_ne!(
            c.fanout_subject("x", "t"),
            c.server_subject("x", "t", "fanout")
        );
        assert_eq!(name_safe("a_b.x"), "a_5Fb_2Ex");
        assert_eq!(c.jetstream_stream("openstack"), "mqrpc_openstack_casts");
        let server = rpc_core::Address::Server {
            exchange: "x".into(),
            topic: "a.b%c".into(),
            server: "h 1".into(),
        };
        let js = c.jetstream_subject(&server).expect("a JetStream subject");
        assert_eq!(js, "mqrpc.js.x.a_2Eb_25c.s.h_201");
        assert!(!js.contains('%'), "JetStream filters cannot hold %");
        // An exchange named `js` does not reach into the JetStream subjects.
        assert_eq!(c.fanout_subject("js", "x"), "mqrpc.%6As.x.fanout");
        assert_ne!(c.topic_subject("js", "x"), c.topic_subject("%6As", "x"));
        let topic = rpc_core::Address::Topic {
            exchange: "x".into(),
            topic: "fanout".into(),
        };
        assert_ne!(
            c.jetstream_subject(&topic).expect("a JetStream subject"),
            c.fanout_subject("js", "x")
        );
    }
}
