//! JetStream mode: the work-queue stream holding an exchange's casts, the pull loop
//! through which a server takes casts no faster than its byte budget allows, and the
//! acker that settles each cast.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures::StreamExt;
use rpc_core::backoff::{Backoff, Jitter};
use rpc_core::transport::Merged;
use rpc_core::{Acker, ByteBudget, Delivery, Error, Result, Target, TransportErrorKind};

use crate::config::{DEFAULT_MAX_AGE, NatsConfig};
use crate::error::boxed_nats_error;
use crate::{Deliveries, nats_error};

/// The subject filter of an exchange's stream: every JetStream subject of its topics
/// and servers (`<prefix>.js.<exchange>.>`, escaped).
pub(crate) fn stream_subject(config: &NatsConfig, exchange: &str) -> String {
    config
        .jetstream_subject(&rpc_core::Address::Topic {
            exchange: exchange.to_owned(),
            topic: "x".to_owned(),
        })
        .and_then(|s| s.rsplit_once('.').map(|(base, _)| format!("{base}.>")))
        .unwrap_or_default()
}

/// The work-queue stream holding an exchange's casts, made to match what mqrpc owns
/// of it without touching the rest.
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
    exchange: &str,
) -> Result<jetstream::stream::Stream<()>> {
    let name = config.jetstream_stream(exchange);
    let subject = stream_subject(config, exchange);
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
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
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
        "JetStream is not enabled on this NATS server (or for this account): no responders \
         on $JS.API; start nats-server with -js, or connect without jetstream=true",
        err,
    )
}

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

/// The casts a server of `target` takes: one pull loop for the topic's JetStream
/// subject and one for its server's, each on a durable consumer shared by every
/// server of that subject, pulled no faster than `budget` has room.
pub(crate) async fn pulls(
    js: &jetstream::Context,
    config: &NatsConfig,
    exchange: &str,
    target: &Target,
    prefetch: usize,
    budget: &ByteBudget,
) -> Result<Merged<Deliveries>> {
    let client = js.client();
    let server = target.server.clone().unwrap_or_default();
    let mut pulls = Merged::new();
    let stream = ensure_stream(js, config, exchange).await?;
    for address in [
        rpc_core::Address::Topic {
            exchange: exchange.to_owned(),
            topic: target.topic.clone(),
        },
        rpc_core::Address::Server {
            exchange: exchange.to_owned(),
            topic: target.topic.clone(),
            server: server.clone(),
        },
    ] {
        let Some(subject) = config.jetstream_subject(&address) else {
            continue;
        };
        NatsConfig::check_subject(&subject, target)?;
        let durable = config.jetstream_durable(&subject);
        let inbox = async_nats::Subject::from(client.new_inbox());
        let subscriber = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| nats_error("subscribing", e))?;
        let mut source = PullSource {
            js: js.clone(),
            nats: config.clone(),
            exchange: exchange.to_owned(),
            failures: 0,
            stream: stream.clone(),
            config: jetstream::consumer::pull::Config {
                durable_name: Some(durable),
                filter_subject: subject,
                ack_wait: config.ack_wait,
                // The consumer is shared by every server of the subject and
                // removed once none has pulled for a while.
                inactive_threshold: config
                    .max_age
                    .unwrap_or(DEFAULT_MAX_AGE)
                    .max(Duration::from_secs(3600)),
                ..Default::default()
            },
            // Small batches: a busy server must not sit on casts other servers
            // could take (they would be redelivered after ack_wait).
            batch: prefetch.clamp(1, 4),
            budget: budget.clone(),
            consumer: None,
            inbox,
            subscriber,
            pending: None,
            need: 0,
        };
        source.consumer = Some(source.consumer().await?);
        pulls.push(pulled(source));
    }
    Ok(pulls)
}

/// How long one pull request waits on the server. Short, so a request the server
/// dropped (its inbox lost interest during a disconnect) is replaced soon.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// Idle heartbeat asked of the server while a pull request waits; two missed
/// heartbeats mean the request is gone and a new one is sent.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// Pauses between attempts to create a deleted consumer again: 0.5 s doubling up to
/// 10 s. Without jitter: the servers sharing a consumer recreate it idempotently.
const PULL_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(500), Duration::from_secs(10)).jitter(Jitter::None);
/// Pause before pulling again after a pull failed to start or the server refused it.
const PULL_RETRY: Duration = PULL_BACKOFF.first();
/// The least room in the budget worth a pull (or the whole budget, when smaller).
const PULL_MIN_ROOM: usize = 4096;

/// A pull request the server may still be answering.
struct PendingPull {
    /// Messages it may still deliver.
    left: usize,
    /// Bytes it may still deliver (0: any).
    bytes_left: usize,
    /// When the server was last heard from about it (a message or a heartbeat).
    heard: tokio::time::Instant,
}

/// Where a server pulls casts from: a durable consumer of the exchange's stream,
/// pulled through an inbox of its own, never for more bytes than the server's budget
/// has room for.
struct PullSource {
    js: jetstream::Context,
    nats: NatsConfig,
    exchange: String,
    stream: jetstream::stream::Stream<()>,
    config: jetstream::consumer::pull::Config,
    batch: usize,
    /// Failed attempts to create the consumer again since it last worked
    /// ([`PULL_BACKOFF`]).
    failures: u32,
    budget: ByteBudget,
    /// The consumer; `None` when it must be created (again).
    consumer: Option<jetstream::consumer::PullConsumer>,
    /// Where the server delivers what is pulled.
    inbox: async_nats::Subject,
    subscriber: async_nats::Subscriber,
    pending: Option<PendingPull>,
    /// Room the next pull waits for: the size of a cast that did not fit, or twice the
    /// room of a pull the server refused because its next cast is bigger.
    need: usize,
}

impl PullSource {
    /// The durable consumer, created when missing (first use, or deleted since); the
    /// exchange's stream too, when it is gone.
    async fn consumer(&mut self) -> Result<jetstream::consumer::PullConsumer> {
        let durable = self.config.durable_name.clone().unwrap_or_default();
        let created = self
            .stream
            .get_or_create_consumer(&durable, self.config.clone())
            .await;
        let consumer = match created {
            Ok(consumer) => consumer,
            Err(_) => {
                self.stream = ensure_stream(&self.js, &self.nats, &self.exchange).await?;
                self.stream
                    .get_or_create_consumer(&durable, self.config.clone())
                    .await
                    .map_err(|e| {
                        nats_error(&format!("creating the JetStream consumer {durable}"), e)
                    })?
            }
        };
        self.failures = 0;
        Ok(consumer)
    }

    /// Asks the server for casts: at most `batch` of them and, unless the budget is
    /// empty and the next cast is known to be bigger than it, no more bytes than the
    /// budget has room for.
    async fn request(&mut self, consumer: &jetstream::consumer::PullConsumer) -> Result<()> {
        let limit = self.budget.limit();
        let room = self.budget.available();
        let (batch, max_bytes) = if self.need >= limit && room >= limit {
            // Bigger than the whole budget: alone, as `try_charge` lets it through.
            (1, 0)
        } else {
            (self.batch, room)
        };
        let request = jetstream::consumer::pull::BatchConfig {
            batch,
            expires: Some(PULL_EXPIRES),
            max_bytes,
            idle_heartbeat: PULL_HEARTBEAT,
            ..Default::default()
        };
        consumer
            .request_batch(request, self.inbox.clone())
            .await
            .map_err(|e| nats_error("sending a JetStream pull request", e))?;
        self.pending = Some(PendingPull {
            left: batch,
            bytes_left: max_bytes,
            heard: tokio::time::Instant::now(),
        });
        Ok(())
    }

    /// What the server sent to the pull inbox: a cast taken into the budget, or
    /// `None` for status messages and casts given back.
    async fn received(&mut self, message: async_nats::Message) -> Option<Result<Delivery>> {
        if let Some(pending) = &mut self.pending {
            pending.heard = tokio::time::Instant::now();
        }
        let status = message.status.unwrap_or(async_nats::StatusCode::OK);
        match status {
            async_nats::StatusCode::OK => {}
            async_nats::StatusCode::IDLE_HEARTBEAT => return None,
            // The pull expired, or found nothing.
            async_nats::StatusCode::TIMEOUT | async_nats::StatusCode::NOT_FOUND => {
                self.pending = None;
                return None;
            }
            async_nats::StatusCode::REQUEST_TERMINATED => {
                let pending = self.pending.take();
                let description = message.description.unwrap_or_default();
                if description.contains("Message Size Exceeds MaxBytes") {
                    // The next cast is bigger than what the pull had left: the next pull
                    // waits for twice that room (up to the whole budget, when it is
                    // taken alone).
                    let left = pending.map_or(0, |p| p.bytes_left);
                    self.need = left.saturating_mul(2).max(PULL_MIN_ROOM);
                    return None;
                }
                if description.contains("Consumer Deleted") {
                    self.consumer = None;
                    return Some(Err(Error::transport_msg(
                        TransportErrorKind::Other,
                        "JetStream consumer deleted; creating it again",
                    )));
                }
                // Leadership change, too many waiting pulls and the like: pull again
                // after a pause.
                tracing::debug!(description, "JetStream pull ended by the server");
                tokio::time::sleep(PULL_RETRY).await;
                return None;
            }
            async_nats::StatusCode::NO_RESPONDERS => {
                // No consumer (or no JetStream) answers the pull request.
                self.pending = None;
                self.consumer = None;
                return Some(Err(Error::transport_msg(
                    TransportErrorKind::Other,
                    "JetStream pull: no responders (creating the consumer again)",
                )));
            }
            other => {
                self.pending = None;
                tokio::time::sleep(PULL_RETRY).await;
                return Some(Err(Error::transport_msg(
                    TransportErrorKind::Other,
                    format!("JetStream pull: unexpected status {other}"),
                )));
            }
        }
        let size = message.payload.len();
        if let Some(pending) = &mut self.pending {
            pending.left = pending.left.saturating_sub(1);
            pending.bytes_left = pending.bytes_left.saturating_sub(size);
            if pending.left == 0 {
                self.pending = None;
            }
        }
        let message = jetstream::Message {
            message,
            context: self.js.clone(),
        };
        match self.budget.try_charge(size) {
            Some(charge) => {
                self.need = 0;
                let payload = message.payload.clone();
                let acker = Box::new(JetStreamAcker { message });
                Some(Ok(Delivery::new(payload, acker).with_charge(charge)))
            }
            None => {
                // Came in while the budget filled up: back to the broker at once, for
                // any server with room. The next pull waits for room for it.
                self.need = size;
                if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                    tracing::debug!(error = %err, "JetStream nak failed; redelivered after ack_wait");
                }
                None
            }
        }
    }
}

/// The casts of one JetStream consumer.
///
/// A pull request is sent only while the server asks for deliveries and its budget
/// has room, for at most that room in bytes, so casts beyond the budget wait in the
/// stream. A request the server lost (two missed heartbeats, as after a quick
/// disconnect and reconnect) is replaced, and the consumer is created again if it was
/// deleted. Messages delivered to an abandoned pull and not yet acked are redelivered
/// after `ack_wait`.
fn pulled(source: PullSource) -> Deliveries {
    futures::stream::unfold(source, |mut source| async move {
        loop {
            let Some(consumer) = source.consumer.clone() else {
                tokio::time::sleep(PULL_BACKOFF.delay(source.failures)).await;
                match source.consumer().await {
                    Ok(fresh) => {
                        source.consumer = Some(fresh);
                        source.pending = None;
                    }
                    Err(err) => {
                        source.failures = source.failures.saturating_add(1);
                        return Some((Err(err), source));
                    }
                }
                continue;
            };
            let room = source.need.max(PULL_MIN_ROOM);
            let deadline = source
                .pending
                .as_ref()
                .map(|pending| pending.heard + PULL_HEARTBEAT * 2 + PULL_HEARTBEAT / 2);
            let budget = source.budget.clone();
            tokio::select! {
                biased;
                message = source.subscriber.next() => {
                    // The inbox subscription ends only with the client.
                    let message = message?;
                    if let Some(item) = source.received(message).await {
                        return Some((item, source));
                    }
                }
                () = budget.until_available(room), if deadline.is_none() => {
                    if let Err(err) = source.request(&consumer).await {
                        tokio::time::sleep(PULL_RETRY).await;
                        return Some((Err(err), source));
                    }
                }
                () = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await },
                    if deadline.is_some() =>
                {
                    tracing::debug!("JetStream pull missed its heartbeats; pulling afresh");
                    source.pending = None;
                }
            }
        }
    })
    .boxed()
}

/// Settles a JetStream cast.
struct JetStreamAcker {
    message: jetstream::Message,
}

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        (self.message.ack().await)
            .map_err(|e| boxed_nats_error(format!("JetStream ack failed: {e}"), e))
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        let kind = if requeue {
            AckKind::Nak(None)
        } else {
            AckKind::Term
        };
        (self.message.ack_with(kind).await)
            .map_err(|e| boxed_nats_error(format!("JetStream reject failed: {e}"), e))
    }
}

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
