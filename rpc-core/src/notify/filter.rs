//! `NotificationFilter`: which notifications an endpoint wants, as oslo.messaging's
//! filter of the same name: regular expressions matched at the start of the value
//! (Python's `re.match`), on the event type, the publisher id, and per key on the
//! context, the metadata and the payload.

use regex::Regex;
use serde_json::Value;

use super::Notification;
use crate::error::{Error, Result};

/// A filter: a notification passes when every rule given matches. A rule on a key
/// of the context, metadata or payload fails when the key is absent or its value is
/// not a string.
///
/// ```
/// use mqrpc::notify::NotificationFilter;
/// let filter = NotificationFilter::new()
///     .event_type(r"compute\.instance\..*")?
///     .publisher_id("^compute")?
///     .payload("state", "active|error")?;
/// # Ok::<(), mqrpc::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct NotificationFilter {
    event_type: Option<Regex>,
    publisher_id: Option<Regex>,
    context: Vec<(String, Regex)>,
    metadata: Vec<(String, Regex)>,
    payload: Vec<(String, Regex)>,
}

/// `pattern` anchored at the start, as `re.match` reads it.
fn compile(what: &str, pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})")).map_err(|e| {
        Error::InvalidArguments(format!("notification filter on {what}: bad pattern: {e}"))
    })
}

fn matches_str(rule: &Regex, value: Option<&Value>) -> bool {
    value
        .and_then(Value::as_str)
        .is_some_and(|text| rule.is_match(text))
}

impl NotificationFilter {
    /// A filter that lets every notification through.
    pub fn new() -> Self {
        NotificationFilter::default()
    }

    /// The event type must match `pattern`.
    pub fn event_type(mut self, pattern: &str) -> Result<Self> {
        self.event_type = Some(compile("event_type", pattern)?);
        Ok(self)
    }

    /// The publisher id must match `pattern`.
    pub fn publisher_id(mut self, pattern: &str) -> Result<Self> {
        self.publisher_id = Some(compile("publisher_id", pattern)?);
        Ok(self)
    }

    /// The context's `key` must be a string matching `pattern`.
    pub fn context(mut self, key: &str, pattern: &str) -> Result<Self> {
        let rule = compile(&format!("context {key:?}"), pattern)?;
        self.context.push((key.to_owned(), rule));
        Ok(self)
    }

    /// The metadata's `key` (`message_id`, `timestamp`) must match `pattern`.
    pub fn metadata(mut self, key: &str, pattern: &str) -> Result<Self> {
        let rule = compile(&format!("metadata {key:?}"), pattern)?;
        self.metadata.push((key.to_owned(), rule));
        Ok(self)
    }

    /// The payload must be an object whose `key` is a string matching `pattern`.
    pub fn payload(mut self, key: &str, pattern: &str) -> Result<Self> {
        let rule = compile(&format!("payload {key:?}"), pattern)?;
        self.payload.push((key.to_owned(), rule));
        Ok(self)
    }

    /// Whether `notification` passes.
    pub fn matches(&self, notification: &Notification) -> bool {
        let text =
            |rule: &Option<Regex>, value: &str| rule.as_ref().is_none_or(|r| r.is_match(value));
        if !text(&self.event_type, &notification.event_type)
            || !text(&self.publisher_id, &notification.publisher_id)
        {
            return false;
        }
        let metadata = |key: &str| match key {
            "message_id" => Some(notification.metadata.message_id.as_str()),
            "timestamp" => Some(notification.metadata.timestamp.as_str()),
            _ => None,
        };
        self.context
            .iter()
            .all(|(key, rule)| matches_str(rule, notification.context.get(key)))
            && self
                .metadata
                .iter()
                .all(|(key, rule)| metadata(key).is_some_and(|value| rule.is_match(value)))
            && self
                .payload
                .iter()
                .all(|(key, rule)| matches_str(rule, notification.payload.get(key)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::context::Context;
    use crate::notify::{Metadata, Priority};

    fn notification() -> Notification {
        Notification {
            context: Context::new().with("project_id", "p1").with("n", 1),
            publisher_id: "compute.host1".into(),
            event_type: "compute.instance.create.end".into(),
            priority: Priority::Info,
            payload: json!({"state": "active", "size": 3}),
            metadata: Metadata {
                message_id: "6c3a0b5e-0000-4000-8000-000000000001".into(),
                timestamp: "2026-12-06 16:41:45.766957".into(),
            },
        }
    }

    #[test]
    fn rules_match_at_the_start_as_python_re_match() -> Result<()> {
        let n = notification();
        assert!(NotificationFilter::new().matches(&n));
        assert!(NotificationFilter::new().event_type("compute")?.matches(&n));
        assert!(
            !NotificationFilter::new()
                .event_type("instance")?
                .matches(&n)
        );
        assert!(
            NotificationFilter::new()
                .event_type(r".*\.end$")?
                .matches(&n)
        );
        assert!(
            NotificationFilter::new()
                .publisher_id("compute|network")?
                .matches(&n)
        );
        assert!(
            !NotificationFilter::new()
                .publisher_id("network")?
                .matches(&n)
        );
        Ok(())
    }

    #[test]
    fn keyed_rules_need_a_string_value() -> Result<()> {
        let n = notification();
        assert!(
            NotificationFilter::new()
                .context("project_id", "p")?
                .matches(&n)
        );
        assert!(!NotificationFilter::new().context("n", "1")?.matches(&n));
        assert!(
            !NotificationFilter::new()
                .context("absent", ".*")?
                .matches(&n)
        );
        assert!(
            NotificationFilter::new()
                .payload("state", "active")?
                .matches(&n)
        );
        assert!(!NotificationFilter::new().payload("size", "3")?.matches(&n));
        assert!(
            NotificationFilter::new()
                .metadata("timestamp", "2026-")?
                .matches(&n)
        );
        assert!(
            !NotificationFilter::new()
                .metadata("other", ".*")?
                .matches(&n)
        );
        let all = NotificationFilter::new()
            .event_type("compute")?
            .payload("state", "error")?;
        assert!(!all.matches(&n), "every rule must match");
        Ok(())
    }

    #[test]
    fn a_bad_pattern_is_a_clear_error() {
        let err = NotificationFilter::new()
            .event_type("(")
            .expect_err("bad pattern");
        assert!(err.to_string().contains("event_type"), "{err}");
    }
}
