//! Which queues a server may publish replies to: the default exchange reaches every
//! queue of the virtual host by name, so a reply goes only to a name shaped as a
//! reply queue or one the URL allows.

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
#[non_exhaustive]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AmqpConfig;

    fn parse(url: &str) -> AmqpConfig {
        AmqpConfig::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
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
}
