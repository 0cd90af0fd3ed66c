//! Publishing. Calls carry a NATS reply subject under the caller's inbox so "no
//! responders" reaches the caller at once; casts end with a round trip so `cast` returns once
//! the server has the message (or, in JetStream mode, once the stream stored it);
//! replies are published plainly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_trait::async_trait;
use futures::StreamExt;
use rpc_core::{Address, Error, Outgoing, Publisher, Result, TransportErrorKind};

use crate::batch::Requests;
use crate::config::NatsConfig;
use crate::nats_error;
use crate::stream::StreamKind;

/// Suffix of a client's reply address under its inbox.
pub(crate) const REPLY_TOKEN: &str = "r";
/// Token under the inbox where "no responders" answers for a call arrive.
pub(crate) const NO_RESPONDERS_TOKEN: &str = "nr";

pub(crate) struct NatsPublisher {
    client: async_nats::Client,
    config: NatsConfig,
    jetstream: Option<jetstream::Context>,
    /// The JetStream context notifications go through (in both modes).
    notify_js: jetstream::Context,
    /// What this publisher knows of the casts stream of its configured exchange
    /// (most casts go there: no lock, no hash for them) ...
    home_stream: Arc<StreamState>,
    /// ... and of other streams (other exchanges', notifications').
    other_streams: Mutex<HashMap<(StreamKind, String), Arc<StreamState>>>,
    reply_prefix: String,
    /// The subject of the last address published to: a client mostly sends to one
    /// target, and working a subject out formats several strings.
    last_subject: Mutex<Option<(Address, async_nats::Subject)>>,
    /// The inboxes replied to lately, checked once: a server answers the same
    /// clients again and again, and async-nats copies a subject given as a string
    /// twice per publish, where a kept `Subject` is shared.
    routes: Arc<Mutex<Routes>>,
    /// Where "no responders" answers to replies arrive (see `Routes`), subscribed on
    /// the first reply; `None` inside when that failed.
    gone_watch: tokio::sync::OnceCell<Option<GoneWatch>>,
    /// Call requests waiting to be handed to async-nats together (see `batch.rs`).
    requests: Arc<Requests>,
}

/// How long a cast that no stream took waits for the JetStream API to say whether
/// its stream exists: short, so the cause reaches the caller before its deadline.
const STREAM_LOOKUP_LIMIT: Duration = Duration::from_secs(2);
/// How long such a cast may then take to create the stream (or bring it up to
/// date), all requests included.
const ENSURE_LIMIT: Duration = Duration::from_millis(2500);

/// How often a cast whose stream was just created or found is published again while
/// the stream does not take it yet.
const AFTER_SETUP_TRIES: u32 = 5;
/// The pause before the first of those retries, growing by as much each time (1.5 s
/// in all at most).
const AFTER_SETUP_PAUSE: Duration = Duration::from_millis(100);

/// What a publisher knows of one exchange's JetStream stream.
#[derive(Default)]
struct StreamState {
    /// A cast was stored since the last "no responders": the stream exists, so the
    /// next "no responders" means it has no leader.
    stored: AtomicBool,
    /// Held by the cast looking the stream up (or creating it); the casts that
    /// need it meanwhile wait, then publish again.
    setup: tokio::sync::Mutex<()>,
    /// Look-ups done: a cast that waited sees it changed.
    setups: AtomicU64,
}

/// Why a cast's look-up or creation of its stream failed.
enum SetupError {
    /// A request failed: its error.
    Failed(Error),
    /// The JetStream API did not answer in time: what that means.
    Timeout(String),
}

impl SetupError {
    /// The cast's error: `not_stored`, then why; `err` (the "no responders" to the
    /// cast) kept as its source when the set-up's own error has none to give.
    fn with_cause_of(self, not_stored: &str, err: jetstream::context::PublishError) -> Error {
        match self {
            SetupError::Failed(e) => match e {
                Error::Transport {
                    kind,
                    message,
                    source,
                } => Error::Transport {
                    kind,
                    message: format!("{not_stored}: no responders, and {message}"),
                    source,
                },
                other => other,
            },
            SetupError::Timeout(why) => Error::transport(
                TransportErrorKind::Timeout,
                format!("{not_stored}: {why}"),
                err,
            ),
        }
    }
}

/// How many reply subjects a publisher keeps before it starts afresh.
const REPLY_SUBJECTS: usize = 1024;

/// How long a "no responders" answer to a reply makes the next reply to the same
/// inbox fail. Short: a client cut off for a moment comes back with the same inbox.
const GONE_FOR: Duration = Duration::from_secs(1);

/// Where replies go, and what nats-server said about them.
///
/// Each reply is published with a NATS reply subject of its own under the
/// publisher's watch inbox (`<watch>.<token>`, one random token per client inbox).
/// When no one listens on the client's inbox any more (its process is gone),
/// nats-server answers that subject "no responders" at once, and the next reply to
/// the inbox fails with `Error::Undeliverable`: a server streaming to a caller that
/// has gone stops the stream, as AMQP's unroutable replies stop it. The token is
/// random, so a caller cannot forge the answer for another client's inbox.
#[derive(Default)]
struct Routes {
    by_inbox: HashMap<String, Route, foldhash::fast::RandomState>,
    /// The inbox of each token.
    by_token: HashMap<String, String, foldhash::fast::RandomState>,
}

struct Route {
    subject: async_nats::Subject,
    /// The NATS reply subject replies to this inbox carry (`None` without a watch).
    watch: Option<async_nats::Subject>,
    /// Set by a "no responders" answer: the next reply until then fails.
    gone_until: Option<Instant>,
}

/// The subscription that hears "no responders" answers to replies.
struct GoneWatch {
    /// `<reply prefix><id>.`: a token appended makes a route's watch subject.
    base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GoneWatch {
    fn drop(&mut self) {
        // The subscription would keep the connection open.
        self.task.abort();
    }
}

impl NatsPublisher {
    pub(crate) fn new(
        client: async_nats::Client,
        config: NatsConfig,
        jetstream: Option<jetstream::Context>,
        notify_js: jetstream::Context,
    ) -> Self {
        NatsPublisher {
            reply_prefix: config.reply_prefix(),
            requests: Requests::new(client.clone()),
            client,
            config,
            jetstream,
            notify_js,
            home_stream: Arc::default(),
            other_streams: Mutex::default(),
            last_subject: Mutex::new(None),
            routes: Arc::default(),
            gone_watch: tokio::sync::OnceCell::new(),
        }
    }

    /// A cast in JetStream mode, or a notification: published to the exchange's
    /// stream of `kind`, and done once the stream stored it.
    ///
    /// Nothing is asked of JetStream before: when no stream takes the subject ("no
    /// responders"), the meta leader is asked whether the exchange's stream exists,
    /// once for all the casts to that exchange waiting at that moment. If it does
    /// not, it is created ([`crate::stream::ensure_stream`]); either way the cast
    /// is published again a few times over a second or so (a stream just created
    /// subscribes its subject once it has a leader). A stream that still takes
    /// nothing has no leader (its nodes are down, or it is electing one) and the
    /// cast fails saying so; right after casts were stored, it fails so at once,
    /// and the next cast asks again. So `connect` never waits on a stream, and a
    /// cast fails soon, with its cause, while its stream is offline.
    async fn store(
        &self,
        js: &jetstream::Context,
        js_subject: String,
        address: &Address,
        kind: StreamKind,
        body: bytes::Bytes,
    ) -> Result<()> {
        NatsConfig::check_subject(&js_subject, address)?;
        let (Address::Topic { exchange, .. }
        | Address::Server { exchange, .. }
        | Address::Notification { exchange, .. }) = address
        else {
            return Err(Error::InvalidTarget(format!(
                "{address}: only casts to a topic or server and notifications go through \
                 JetStream"
            )));
        };
        let subject = async_nats::Subject::from(js_subject);
        let what = match kind {
            StreamKind::Casts => "cast",
            StreamKind::Notifications => "notification",
        };
        let not_stored = || format!("JetStream did not store the {what} to {address}");
        let state = self.stream_state(kind, exchange);
        // Publishes since the stream was looked up or created.
        let mut since_setup: Option<u32> = None;
        // Whether the look-up found it (rather than created it).
        let mut found = false;
        loop {
            let ack = js
                .publish(subject.clone(), body.clone())
                .await
                .map_err(|e| nats_error(&format!("publishing to JetStream for {address}"), e))?;
            let err = match ack.await {
                Ok(_) => {
                    if !state.stored.load(Ordering::Relaxed) {
                        state.stored.store(true, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(err) => err,
            };
            let no_stream = err.kind() == jetstream::context::PublishErrorKind::StreamNotFound;
            if !no_stream {
                return Err(because(&not_stored(), err));
            }
            let name = kind.name(&self.config, exchange);
            let no_leader = |err| {
                Error::transport(
                    TransportErrorKind::Other,
                    format!(
                        "{}: stream {name} has no leader (its nodes are down, or it is \
                         electing one): no responders on {subject}",
                        not_stored()
                    ),
                    err,
                )
            };
            if let Some(tries) = since_setup.as_mut() {
                // A stream just created (or found) may take a moment to subscribe its
                // subject (a replicated one elects its leader first): a few short
                // pauses.
                if *tries >= AFTER_SETUP_TRIES {
                    return Err(if found {
                        no_leader(err)
                    } else {
                        because(&not_stored(), err)
                    });
                }
                *tries += 1;
                tokio::time::sleep(AFTER_SETUP_PAUSE * *tries).await;
                continue;
            }
            // It took casts a moment ago: it exists, without a leader for now. Said at
            // once, and only once: the next cast looks it up again (an operator may
            // have deleted it).
            if state.stored.swap(false, Ordering::Relaxed) {
                return Err(no_leader(err));
            }
            // One look-up (and create) at a time per exchange: casts that waited for
            // another's just publish again.
            let seen = state.setups.load(Ordering::Acquire);
            let _setup = state.setup.lock().await;
            if state.setups.load(Ordering::Acquire) == seen {
                let looked_up = (self.look_up_or_create(js, kind, exchange, &name, &subject)).await;
                state.setups.fetch_add(1, Ordering::Release);
                found = looked_up.map_err(|e| e.with_cause_of(&not_stored(), err))?;
            } else {
                found = true;
            }
            since_setup = Some(0);
        }
    }

    /// Whether stream `name` of `exchange` (or another stream taking its subjects)
    /// exists; created when it does not (`false`). Bounded well inside a cast's
    /// deadline: the meta leader may itself be electing.
    async fn look_up_or_create(
        &self,
        js: &jetstream::Context,
        kind: StreamKind,
        exchange: &str,
        name: &str,
        subject: &async_nats::Subject,
    ) -> std::result::Result<bool, SetupError> {
        let filter = kind.subject(&self.config, exchange);
        let looking = "looking up the stream";
        let question = serde_json::json!({ "subject": filter });
        let lookup =
            crate::stream::api_request(js, name, looking, "STREAM.NAMES".to_owned(), &question);
        let answer = match tokio::time::timeout(STREAM_LOOKUP_LIMIT, lookup).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(SetupError::Failed(e)),
            Err(_) => {
                return Err(SetupError::Timeout(format!(
                    "no stream answered on {subject}, and the JetStream API did not answer \
                     within {STREAM_LOOKUP_LIMIT:?} whether stream {name} exists: the cluster \
                     has no leader for it or for JetStream (nodes down, or an election under \
                     way)"
                )));
            }
        };
        crate::stream::api_answer(name, looking, &answer).map_err(SetupError::Failed)?;
        let exists = answer
            .get("streams")
            .and_then(|s| s.as_array())
            .is_some_and(|s| !s.is_empty());
        if exists {
            return Ok(true);
        }
        let ensure = crate::stream::ensure_stream(js, &self.config, kind, exchange);
        match tokio::time::timeout(ENSURE_LIMIT, ensure).await {
            Ok(Ok(_)) => Ok(false),
            Ok(Err(e)) => Err(SetupError::Failed(e)),
            Err(_) => Err(SetupError::Timeout(format!(
                "no stream answered on {subject}, and creating stream {name} took longer than \
                 {ENSURE_LIMIT:?}: the cluster has no leader for JetStream (nodes down, or an \
                 election under way)"
            ))),
        }
    }

    /// What this publisher knows of `exchange`'s stream of `kind`.
    fn stream_state(&self, kind: StreamKind, exchange: &str) -> Arc<StreamState> {
        if kind == StreamKind::Casts && exchange == self.config.exchange {
            return self.home_stream.clone();
        }
        let mut others = self.other_streams.lock().unwrap_or_else(|e| e.into_inner());
        let key = (kind, exchange.to_owned());
        if let Some(state) = others.get(&key) {
            return state.clone();
        }
        let state = Arc::<StreamState>::default();
        others.insert(key, state.clone());
        state
    }

    /// A plain cast: published, and done once a round trip shows the server has it.
    async fn cast(
        &self,
        subject: async_nats::Subject,
        address: &Address,
        body: bytes::Bytes,
        limit: usize,
    ) -> Result<()> {
        let size = body.len();
        self.client
            .publish(subject, body)
            .await
            .map_err(|e| publish_error(address, e, size, limit))?;
        // When the round trip returns, the server has the cast.
        crate::round_trip(&self.client, &self.config).await
    }

    /// Subscribes to the "no responders" answers to replies (see `Routes`).
    async fn start_gone_watch(&self) -> Option<GoneWatch> {
        let base = format!("{}{}.", self.reply_prefix, rpc_core::wire::new_id());
        let mut subscriber = match self.client.subscribe(format!("{base}>")).await {
            Ok(subscriber) => subscriber,
            Err(err) => {
                tracing::debug!(error = %err, "no watch for replies nobody hears");
                return None;
            }
        };
        let routes = self.routes.clone();
        let prefix = base.clone();
        let task = tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                if message.status != Some(async_nats::StatusCode::NO_RESPONDERS) {
                    continue;
                }
                let Some(token) = message.subject.as_str().strip_prefix(&prefix) else {
                    continue;
                };
                let mut routes = routes.lock().unwrap_or_else(|e| e.into_inner());
                let Routes { by_inbox, by_token } = &mut *routes;
                if let Some(route) = by_token
                    .get(token)
                    .and_then(|inbox| by_inbox.get_mut(inbox))
                {
                    route.gone_until = Some(Instant::now() + GONE_FOR);
                }
            }
        });
        Some(GoneWatch { base, task })
    }

    /// Where a reply to `inbox` goes: its subject and NATS reply subject, or an error
    /// when `inbox` is not one of this transport's inboxes, cannot go into a `PUB`
    /// line, or was just found to have no listener.
    async fn reply_route(
        &self,
        address: &Address,
        inbox: &str,
    ) -> Result<(async_nats::Subject, Option<async_nats::Subject>)> {
        let undeliverable = || Error::Undeliverable {
            address: address.to_string(),
        };
        {
            let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(route) = routes.by_inbox.get_mut(inbox) {
                if let Some(until) = route.gone_until.take()
                    && Instant::now() < until
                {
                    return Err(undeliverable());
                }
                return Ok((route.subject.clone(), route.watch.clone()));
            }
        }
        if !inbox.starts_with(&self.reply_prefix) || !valid_inbox(inbox) {
            return Err(undeliverable());
        }
        let watch = self
            .gone_watch
            .get_or_init(|| self.start_gone_watch())
            .await
            .as_ref()
            .map(|watch| watch.base.clone());
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.by_inbox.len() >= REPLY_SUBJECTS {
            routes.by_inbox.clear();
            routes.by_token.clear();
        }
        let token = rpc_core::wire::new_id();
        let route = Route {
            subject: async_nats::Subject::from(inbox),
            watch: watch.map(|base| async_nats::Subject::from(format!("{base}{token}"))),
            gone_until: None,
        };
        let found = (route.subject.clone(), route.watch.clone());
        routes.by_token.insert(token, inbox.to_owned());
        routes.by_inbox.insert(inbox.to_owned(), route);
        Ok(found)
    }

    /// The subject of a topic, server or fanout address (`None` for a reply or a
    /// notification), or an error when it is too long for NATS.
    fn subject(&self, address: &Address) -> Result<Option<async_nats::Subject>> {
        // Replies (a server's every publish) have no subject: no lock for them.
        if matches!(address, Address::Reply(_)) {
            return Ok(None);
        }
        let c = &self.config;
        let mut last = self.last_subject.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((known, subject)) = last.as_ref()
            && known == address
        {
            return Ok(Some(subject.clone()));
        }
        let subject = match address {
            Address::Topic { exchange, topic } => c.topic_subject(exchange, topic),
            Address::Server {
                exchange,
                topic,
                server,
            } => c.server_subject(exchange, topic, server),
            Address::Fanout { exchange, topic } => c.fanout_subject(exchange, topic),
            Address::Reply(_) | Address::Notification { .. } => return Ok(None),
        };
        NatsConfig::check_subject(&subject, address)?;
        let subject = async_nats::Subject::from(subject);
        *last = Some((address.clone(), subject.clone()));
        Ok(Some(subject))
    }
}

/// Whether a reply inbox named by a request can go into a `PUB` line as it is: no
/// white space or control character (which would split or end the protocol line),
/// and not empty. async-nats does not check published subjects here (see
/// `NatsTransport`), and the inbox comes from the network.
fn valid_inbox(inbox: &str) -> bool {
    !inbox.is_empty() && crate::subjects::protocol_safe(inbox)
}

/// A transport error whose message says `what` failed and why (the CLI prints only
/// the message), with async-nats's error kept as its source.
fn because(what: &str, err: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::transport(crate::error::kind_of(&err), format!("{what}: {err}"), err)
}

fn publish_error(
    address: &Address,
    err: async_nats::PublishError,
    size: usize,
    limit: usize,
) -> Error {
    if err.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded {
        return Error::MessageTooLarge { size, limit };
    }
    nats_error(&format!("publishing to {address}"), err)
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn send(&self, address: &Address, message: Outgoing) -> Result<()> {
        let limit = crate::message_limit(&self.client, &self.config);
        let size = message.body.len();
        Error::check_size(size, limit)?;
        let Some(subject) = self.subject(address)? else {
            if let Address::Notification { exchange, key } = address {
                // Always through JetStream, which keeps them for listeners to come.
                let js_subject = self.config.notification_subject(exchange, key);
                let kind = StreamKind::Notifications;
                let stored = self.store(&self.notify_js, js_subject, address, kind, message.body);
                return Box::pin(stored)
                    .await
                    .map_err(crate::jetstream::needs_jetstream);
            }
            // A reply. Requests may name any reply address; only inboxes are written.
            let Address::Reply(inbox) = address else {
                return Ok(());
            };
            let (inbox, watch) = self.reply_route(address, inbox).await?;
            let published = match watch {
                Some(watch) => {
                    (self.client)
                        .publish_with_reply(inbox, watch, message.body)
                        .await
                }
                None => self.client.publish(inbox, message.body).await,
            };
            return published.map_err(|e| publish_error(address, e, size, limit));
        };
        if let Some(call) = &message.call {
            // The NATS reply subject exists only for "no responders"; servers answer
            // the `_reply_q` inside the message.
            let base = (call.reply_to.strip_suffix(REPLY_TOKEN))
                .and_then(|base| base.strip_suffix('.'))
                .unwrap_or(&call.reply_to);
            let no_responders = [base, NO_RESPONDERS_TOKEN, &call.msg_id].join(".");
            return self
                .requests
                .send((subject, no_responders.into(), message.body))
                .await
                .map_err(|e| publish_error(address, e, size, limit));
        }
        // The rarer paths are boxed: every send's future is moved into a box (the
        // trait is object-safe), and their state made it several times larger.
        Box::pin(self.requests.flush()).await;
        if let Some(js) = &self.jetstream
            && let Some(js_subject) = self.config.jetstream_subject(address)
        {
            let kind = StreamKind::Casts;
            return Box::pin(self.store(js, js_subject, address, kind, message.body)).await;
        }
        Box::pin(self.cast(subject, address, message.body, limit)).await
    }
}

#[cfg(test)]
mod tests {
    use super::valid_inbox;

    #[test]
    fn inboxes_with_white_space_or_control_characters_are_refused() {
        for good in ["mqrpc.%reply.0a1b.r", "p.%reply.ünï.r", "x"] {
            assert!(valid_inbox(good), "{good:?}");
        }
        for bad in [
            "",
            "mqrpc.%reply.a\r\nPUB evil 4\r\nboom",
            "mqrpc.%reply.a b",
            "mqrpc.%reply.a\tb",
            "mqrpc.%reply.a\u{7f}",
            "mqrpc.%reply.ü\u{a0}x",
            "mqrpc.%reply.ü\u{85}x",
        ] {
            assert!(!valid_inbox(bad), "{bad:?}");
        }
    }
}
