//! The streams of an exchange (the work queue holding its casts, the stream holding
//! its notifications): creating one, or bringing an existing one up to what mqrpc
//! owns (its subject, `max_age` when set, replicas raised, never lowered) without
//! touching the rest, and the JetStream API requests that do it.

use std::time::Duration;

use async_nats::jetstream;
use rpc_core::{Error, Result, TransportErrorKind};

use crate::config::{DEFAULT_MAX_AGE, NatsConfig};

/// What a stream of an exchange holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum StreamKind {
    /// Casts to its topics and servers: a work queue (a cast leaves once a server
    /// acked it).
    Casts,
    /// Notifications: kept for `max_age` whoever took them (limits retention), each
    /// consumer (the default group of a key, or a pool) taking its own copy.
    Notifications,
}

impl StreamKind {
    /// The stream's name.
    pub(crate) fn name(self, config: &NatsConfig, exchange: &str) -> String {
        match self {
            StreamKind::Casts => config.jetstream_stream(exchange),
            StreamKind::Notifications => config.notification_stream(exchange),
        }
    }

    /// The subject filter of the stream: every JetStream subject of the exchange's
    /// topics and servers (`<prefix>.js.<exchange>.>`, escaped), or of its
    /// notifications (`<prefix>.js._notify.<exchange>.>`).
    pub(crate) fn subject(self, config: &NatsConfig, exchange: &str) -> String {
        match self {
            StreamKind::Casts => config
                .jetstream_subject(&rpc_core::Address::Topic {
                    exchange: exchange.to_owned(),
                    topic: "x".to_owned(),
                })
                .and_then(|s| s.rsplit_once('.').map(|(base, _)| format!("{base}.>")))
                .unwrap_or_default(),
            StreamKind::Notifications => config.notification_stream_subject(exchange),
        }
    }

    fn retention(self) -> jetstream::stream::RetentionPolicy {
        match self {
            StreamKind::Casts => jetstream::stream::RetentionPolicy::WorkQueue,
            StreamKind::Notifications => jetstream::stream::RetentionPolicy::Limits,
        }
    }
}

/// The stream of `kind` of an exchange (its casts' work queue, or its
/// notifications' stream), made to match what mqrpc owns of it without touching
/// the rest.
///
/// - Missing: created with the exchange's subject, `max_age` ([`DEFAULT_MAX_AGE`]
///   unless set) and [`NatsConfig::replicas`] copies.
/// - Existing: its current configuration is read, and only what mqrpc owns changes on
///   top of it: its subject is listed (unless a subject it lists covers it), its
///   `max_age` is the configured one when [`NatsConfig::max_age`] is set, and its
///   replicas are raised to `replicas` when it has fewer, never lowered (an
///   operator's R3 stream stays R3 whatever a client asks). Nothing is sent when
///   nothing changes. An update the server refuses (more replicas than it has
///   nodes up, say) is logged, and the stream is used as it is.
///
/// Every request is bounded by the JetStream context's timeout
/// ([`JETSTREAM_API_TIMEOUT`]); a stream that exists but has no leader does not
/// answer, and that is said in the error.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    config: &NatsConfig,
    kind: StreamKind,
    exchange: &str,
) -> Result<jetstream::stream::Stream<()>> {
    let name = kind.name(config, exchange);
    let subject = kind.subject(config, exchange);
    let handle = || async {
        js.get_stream_no_info(&name).await.map_err(|e| {
            Error::transport(
                TransportErrorKind::Other,
                format!("JetStream stream {name}: {e}"),
                e,
            )
        })
    };
    let reading = "reading the JetStream stream";
    // Twice at most: a stream another process created between our look-up and our
    // create is then updated like any existing one.
    for _ in 0..2 {
        let info = api_request(
            js,
            &name,
            reading,
            format!("STREAM.INFO.{name}"),
            &serde_json::json!({}),
        )
        .await?;
        match api_error(&info) {
            None => {
                update_owned(js, &name, info, &subject, config).await;
                return handle().await;
            }
            Some(Ok(api)) if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {}
            Some(_) => {
                return Err(api_answer(&name, reading, &info).err().unwrap_or_else(|| {
                    Error::transport_msg(TransportErrorKind::Other, format!("{reading} {name}"))
                }));
            }
        }
        let created = js
            .create_stream(jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![subject.clone()],
                retention: kind.retention(),
                max_age: capped(config.max_age.unwrap_or(DEFAULT_MAX_AGE)),
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => {
                tracing::info!(stream = %name, replicas = config.replicas, "created the JetStream stream");
                return handle().await;
            }
            Err(err) if name_taken(&err) => continue,
            Err(err) => return Err(unanswered(&name, "creating the JetStream stream", err)),
        }
    }
    Err(Error::transport_msg(
        TransportErrorKind::Other,
        format!("JetStream stream {name} exists, but could not be read or created"),
    ))
}

/// `max_age` as the server can read it: int64 nanoseconds at most.
fn capped(max_age: Duration) -> Duration {
    max_age.min(Duration::from_nanos(i64::MAX.unsigned_abs()))
}

/// A JetStream API request, answered with the JSON the server sent (which may carry
/// an API error: see [`api_error`]). No responders on `$JS.API` means the server
/// has no JetStream: that is `Refused`, and said so.
pub(crate) async fn api_request(
    js: &jetstream::Context,
    name: &str,
    what: &str,
    subject: String,
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    match js.request(subject, body).await {
        Ok(answer) => Ok(answer),
        Err(err) if err.kind() == jetstream::context::RequestErrorKind::NoResponders => {
            Err(not_enabled(err))
        }
        Err(err) => Err(unanswered(name, what, err)),
    }
}

/// The error of a JetStream API request that no server answered at all: every
/// server with JetStream answers `$JS.API`, so JetStream is off on the one the
/// client is connected to (or for its account).
pub(crate) fn not_enabled(err: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::transport(
        TransportErrorKind::Refused,
        format!(
            "{NOT_ENABLED} on this NATS server (or for this account): no responders on \
             $JS.API; start nats-server with -js, or connect without jetstream=true"
        ),
        err,
    )
}

/// How [`not_enabled`] begins.
pub(crate) const NOT_ENABLED: &str = "JetStream is not enabled";

/// Brings what mqrpc owns of an existing stream up to date (see [`ensure_stream`]),
/// from `info`, the server's answer to `STREAM.INFO`. An update that fails is logged
/// and the stream used as it is: it takes casts all the same.
async fn update_owned(
    js: &jetstream::Context,
    name: &str,
    info: serde_json::Value,
    subject: &str,
    config: &NatsConfig,
) {
    let raw = info.get("config").cloned().unwrap_or_default();
    let current: jetstream::stream::Config = match serde_json::from_value(raw.clone()) {
        Ok(current) => current,
        Err(err) => {
            tracing::warn!(stream = %name, error = %err, "could not read the JetStream stream's configuration; using it as it is");
            return;
        }
    };
    let Some(wanted) = owned_changes(&current, subject, config) else {
        return;
    };
    tracing::info!(
        stream = %name,
        replicas = wanted.num_replicas,
        was = current.num_replicas,
        max_age = ?wanted.max_age,
        "updating the JetStream stream"
    );
    let Some(patched) = patched(raw, &wanted) else {
        tracing::warn!(stream = %name, "the JetStream stream's configuration is not an object; using it as it is");
        return;
    };
    let updating = "updating the JetStream stream";
    let answer = api_request(
        js,
        name,
        updating,
        format!("STREAM.UPDATE.{name}"),
        &patched,
    )
    .await;
    if let Err(err) = answer.and_then(|answer| api_answer(name, updating, &answer)) {
        tracing::warn!(
            stream = %name,
            error = %err,
            replicas = current.num_replicas,
            "could not update the JetStream stream; using it as it is"
        );
    }
}

/// The stream's configuration as the server sent it (`raw`) with only the fields
/// mqrpc owns replaced (`subjects`, `max_age`, `num_replicas`) by those of `wanted`:
/// a setting that async-nats does not know (one of a newer server) is kept as it is
/// instead of being dropped. `None` when `raw` is not a JSON object.
pub(crate) fn patched(
    mut raw: serde_json::Value,
    wanted: &jetstream::stream::Config,
) -> Option<serde_json::Value> {
    let fields = raw.as_object_mut()?;
    fields.insert("subjects".to_owned(), serde_json::json!(wanted.subjects));
    let max_age = i64::try_from(wanted.max_age.as_nanos()).unwrap_or(i64::MAX);
    fields.insert("max_age".to_owned(), serde_json::json!(max_age));
    fields.insert(
        "num_replicas".to_owned(),
        serde_json::json!(wanted.num_replicas),
    );
    Some(raw)
}

/// The API error a JetStream answer carries, if any (`Err` inside when it cannot be
/// read as one).
fn api_error(answer: &serde_json::Value) -> Option<std::result::Result<jetstream::Error, ()>> {
    let error = answer.get("error")?;
    Some(serde_json::from_value::<jetstream::Error>(error.clone()).map_err(|_| ()))
}

/// The error a JetStream API answer carries, if any.
pub(crate) fn api_answer(name: &str, what: &str, answer: &serde_json::Value) -> Result<()> {
    let Some(error) = api_error(answer) else {
        return Ok(());
    };
    Err(match error {
        Ok(api) => {
            let kind = crate::error::kind_of(&api);
            Error::transport(kind, format!("{what} {name}: {api}"), api)
        }
        Err(()) => Error::transport_msg(
            TransportErrorKind::Other,
            format!("{what} {name}: {}", answer["error"]),
        ),
    })
}

/// The configuration `current` should have: the same, but with `subject` listed
/// (unless one of its subjects covers it), the configured `max_age` when one is set,
/// and at least the configured replicas. `None` when it has them already.
pub(crate) fn owned_changes(
    current: &jetstream::stream::Config,
    subject: &str,
    config: &NatsConfig,
) -> Option<jetstream::stream::Config> {
    let mut wanted = current.clone();
    if !wanted.subjects.iter().any(|s| covers(s, subject)) {
        wanted.subjects.push(subject.to_owned());
    }
    if let Some(max_age) = config.max_age {
        wanted.max_age = capped(max_age);
    }
    // Raised only (0, as some servers report a single copy, counts as 1).
    if config.replicas > current.num_replicas.max(1) {
        wanted.num_replicas = config.replicas;
    }
    (wanted != *current).then_some(wanted)
}

/// Whether every subject `subject` matches (itself possibly ending in `>`) also
/// matches `filter`, by NATS wildcard rules: `*` one token, `>` one or more.
pub(crate) fn covers(filter: &str, subject: &str) -> bool {
    let mut filter = filter.split('.');
    let mut subject = subject.split('.');
    loop {
        match (filter.next(), subject.next()) {
            (None, None) => return true,
            // `>` only ends a filter.
            (Some(">"), Some(_)) => return filter.next().is_none(),
            (Some("*"), Some(token)) if token != ">" => {}
            (Some(f), Some(s)) if f == s => {}
            _ => return false,
        }
    }
}

/// Whether a create failed because another process created the stream meanwhile.
fn name_taken(err: &async_nats::jetstream::context::CreateStreamError) -> bool {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    matches!(err.kind(), CreateStreamErrorKind::JetStream(api)
        if api.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST)
}

/// An error about stream `name` that says its cause in its message (the CLI prints
/// only that), and that a request nobody answered in time most likely means the
/// stream (or the JetStream meta group) has no leader.
pub(crate) fn unanswered(
    name: &str,
    what: &str,
    err: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    let kind = crate::error::kind_of(&err);
    let why = if kind == TransportErrorKind::Timeout {
        "no answer in time: the stream or the JetStream cluster has no leader (a node \
         down, or an election under way)"
            .to_owned()
    } else {
        err.to_string()
    };
    Error::transport(kind, format!("{what} {name}: {why}"), err)
}

/// How long a JetStream API request (stream and consumer set-up) or a cast's store
/// acknowledgement may take. async-nats would wait 10 s for API requests, longer than
/// a caller's usual deadline for a cast, and then the cause would be lost in the
/// caller's own timeout.
pub(crate) const JETSTREAM_API_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_nats::jetstream::stream::Config;

    use super::owned_changes;
    use crate::NatsConfig;

    fn stream(replicas: usize, subjects: &[&str], max_age: Duration) -> Config {
        Config {
            name: "s".to_owned(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            num_replicas: replicas,
            max_age,
            // A setting mqrpc does not own.
            max_messages: 77,
            ..Default::default()
        }
    }

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn a_stream_that_has_what_mqrpc_owns_is_not_updated() {
        let config = NatsConfig::default();
        assert_eq!(
            owned_changes(&stream(1, &["a.>"], DAY), "a.>", &config),
            None
        );
        // More replicas than asked for: left as they are.
        assert_eq!(
            owned_changes(&stream(3, &["a.>"], DAY), "a.>", &config),
            None
        );
        // Some servers say 0 for a single copy.
        assert_eq!(
            owned_changes(&stream(0, &["a.>"], DAY), "a.>", &config),
            None
        );
    }

    #[test]
    fn replicas_are_raised_never_lowered() {
        let three = NatsConfig::default().replicas(3);
        let raised = owned_changes(&stream(1, &["a.>"], DAY), "a.>", &three).expect("raised");
        assert_eq!(raised.num_replicas, 3);
        assert_eq!(raised.max_messages, 77, "the rest is kept");
        let five = stream(5, &["a.>"], DAY);
        assert_eq!(owned_changes(&five, "a.>", &three), None);
    }

    #[test]
    fn the_subject_and_max_age_are_brought_up_to_date() {
        let config = NatsConfig::default().max_age(Duration::from_secs(60));
        let changed =
            owned_changes(&stream(3, &["other.>"], DAY), "a.>", &config).expect("changed");
        assert_eq!(changed.subjects, ["other.>", "a.>"]);
        assert_eq!(changed.max_age, Duration::from_secs(60));
        assert_eq!(changed.num_replicas, 3);
        assert_eq!(changed.max_messages, 77);
    }

    #[test]
    fn max_age_is_left_alone_unless_set() {
        let config = NatsConfig::default();
        // An operator's 1 h retention stays when the client sets none.
        assert_eq!(
            owned_changes(
                &stream(1, &["a.>"], Duration::from_secs(3600)),
                "a.>",
                &config
            ),
            None
        );
        let huge = NatsConfig::default().max_age(Duration::MAX);
        let changed = owned_changes(&stream(1, &["a.>"], DAY), "a.>", &huge).expect("changed");
        assert_eq!(
            changed.max_age.as_nanos(),
            i64::MAX as u128,
            "int64 nanoseconds"
        );
    }

    #[test]
    fn a_subject_covered_by_a_wildcard_is_not_added() {
        use super::covers;
        let config = NatsConfig::default();
        for filter in [
            "mqrpc.js.>",
            ">",
            "mqrpc.*.openstack.>",
            "mqrpc.js.openstack.>",
        ] {
            assert!(covers(filter, "mqrpc.js.openstack.>"), "{filter}");
            assert_eq!(
                owned_changes(&stream(1, &[filter], DAY), "mqrpc.js.openstack.>", &config),
                None,
                "{filter}"
            );
        }
        for filter in [
            "mqrpc.js.openstack.*",
            "mqrpc.js.openstack",
            "mqrpc.js.other.>",
            "mqrpc.js.openstack.>.x",
            "*.>.x",
        ] {
            assert!(!covers(filter, "mqrpc.js.openstack.>"), "{filter}");
        }
        assert!(covers("a.*.c", "a.b.c"));
        assert!(!covers("a.*", "a.>"));
    }

    #[test]
    fn the_patch_keeps_settings_async_nats_does_not_know() {
        let raw = serde_json::json!({
            "name": "s",
            "subjects": ["other.>"],
            "num_replicas": 1,
            "max_age": 5,
            "max_msgs": 77,
            "retention": "workqueue",
            "discard": "old",
            "storage": "file",
            "some_future_setting": {"x": [1, 2]},
        });
        let current: Config = serde_json::from_value(raw.clone()).expect("typed");
        let wanted =
            owned_changes(&current, "a.>", &NatsConfig::default().replicas(3)).expect("changed");
        let patched = super::patched(raw, &wanted).expect("an object");
        assert_eq!(
            patched["some_future_setting"],
            serde_json::json!({"x": [1, 2]})
        );
        assert_eq!(patched["subjects"], serde_json::json!(["other.>", "a.>"]));
        assert_eq!(patched["num_replicas"], 3);
        assert_eq!(
            patched["max_age"], 5,
            "unset max_age: the stream's own is kept"
        );
        assert_eq!(patched["max_msgs"], 77);
        assert_eq!(super::patched(serde_json::json!(null), &wanted), None);
    }
}
