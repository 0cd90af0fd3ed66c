//! Asking a topic who is there: [`Client::discover`] sends the control request
//! `status` to the topic's fanout (or to one server), as a call with a reply
//! address, and gathers the answers of every server under its one `_msg_id` until
//! none has come for a quiet interval, the deadline passes, or as many as expected
//! have come.

use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument;

use super::Client;
use super::args::EncodedArgs;
use super::call::{PendingCall, decode_result, failure_error};
use crate::context::Context;
use crate::control::{CONTROL_NAMESPACE, CONTROL_VERSION, STATUS_METHOD, ServerStatus};
use crate::error::{Error, Result};
use crate::timing::MAX_TIMEOUT;
use crate::trace::Operation;

/// How long [`Client::discover`] gathers answers by default.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);
/// How long a silence ends the gathering by default.
const DEFAULT_QUIET: Duration = Duration::from_secs(1);

/// How long [`Client::discover`] gathers answers: until none has come for the quiet
/// interval (counted from the request, then from each answer), the deadline passes,
/// or the expected number of answers came, whichever is first.
///
/// ```
/// use std::time::Duration;
/// use mqrpc::DiscoveryWait;
///
/// // At most 10 s; done after 2 s without a new answer, or at the third answer.
/// let wait = DiscoveryWait::new(Duration::from_secs(10))
///     .quiet(Duration::from_secs(2))
///     .expect(3);
/// assert_eq!(wait.deadline(), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoveryWait {
    deadline: Duration,
    quiet: Duration,
    expect: Option<usize>,
}

impl Default for DiscoveryWait {
    /// At most 5 s, done after 1 s without an answer.
    fn default() -> Self {
        DiscoveryWait::new(DEFAULT_DEADLINE)
    }
}

impl DiscoveryWait {
    /// Gathers for at most `deadline` (capped at [`MAX_TIMEOUT`]), and stops after
    /// 1 s without an answer (or at the deadline, if that is shorter).
    pub fn new(deadline: Duration) -> Self {
        let deadline = deadline.min(MAX_TIMEOUT);
        DiscoveryWait {
            deadline,
            quiet: DEFAULT_QUIET.min(deadline),
            expect: None,
        }
    }

    /// Stops after `quiet` without a new answer, counted from the request and then
    /// from each answer. Make it longer than a server takes to answer on a loaded
    /// broker: a server that answers later is missed.
    pub fn quiet(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    /// Stops as soon as `answers` answers came (a server's failure counts too).
    pub fn expect(mut self, answers: usize) -> Self {
        self.expect = Some(answers);
        self
    }

    /// The longest the gathering takes.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The silence that ends it.
    pub fn quiet_interval(&self) -> Duration {
        self.quiet
    }

    /// The number of answers that ends it, if any.
    pub fn expected(&self) -> Option<usize> {
        self.expect
    }
}

/// One server's answer to [`Client::discover`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Discovered {
    /// What the server says about itself.
    pub status: ServerStatus,
    /// From sending the request to receiving this answer.
    pub round_trip: Duration,
}

impl Client {
    /// Asks who serves this client's topic: sends the control request `status`
    /// ([`crate::CONTROL_NAMESPACE`]) to the topic's fanout, or to the target's
    /// server only when it names one, and streams each server's answer as it comes,
    /// until `wait` says to stop. The request is sent before this returns.
    ///
    /// Every mqrpc server answers unless built with
    /// [`crate::ServerBuilder::discoverable`]`(false)`. An item is an error when an
    /// answer is one: a peer that does not know the control namespace (an
    /// oslo.messaging server answers `UnsupportedVersion`), a server that refused
    /// the request's signature, or a reply this client refused; the stream goes on
    /// after it. With [`Client::message_auth`] the request is signed and only
    /// answers that verify are accepted. Nothing listening on the fanout (NATS "no
    /// responders") ends the stream at once, without items.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mqrpc::Result<()> {
    /// use std::time::Duration;
    /// use futures::StreamExt;
    /// use mqrpc::{Client, DiscoveryWait, Endpoint, Server, Target};
    ///
    /// let transport = mqrpc::connect("memory://").await?;
    /// let mut servers = Vec::new();
    /// for name in ["host-1", "host-2"] {
    ///     let target = Target::new("compute").server(name);
    ///     servers.push(Server::builder(transport.clone(), target).endpoint(Endpoint::new()).start().await?);
    /// }
    /// let client = Client::new(transport, Target::new("compute"));
    /// let wait = DiscoveryWait::new(Duration::from_secs(5)).expect(2);
    /// let mut names: Vec<String> = client
    ///     .discover(wait)
    ///     .await?
    ///     .map(|answer| answer.map(|found| found.status.server))
    ///     .collect::<Vec<_>>()
    ///     .await
    ///     .into_iter()
    ///     .collect::<mqrpc::Result<_>>()?;
    /// names.sort();
    /// assert_eq!(names, ["host-1", "host-2"]);
    /// # for server in servers { server.shutdown().await?; }
    /// # Ok(()) }
    /// ```
    pub async fn discover(&self, wait: DiscoveryWait) -> Result<DiscoveryStream> {
        self.target.require_topic()?;
        let mut asking = self
            .prepare()
            .namespace(CONTROL_NAMESPACE)
            .version(CONTROL_VERSION)
            .call_monitor(None)
            .timeout(wait.deadline);
        if asking.target.server.is_none() {
            asking = asking.fanout(true);
        }
        let span = asking.span(Operation::Discover, STATUS_METHOD);
        let (pending, sent) = async {
            let ctx = Context::new();
            let args = EncodedArgs(b"{}".to_vec());
            let (pending, outgoing) = asking
                .prepare_call(&ctx, STATUS_METHOD, None, &args)
                .await?;
            let sent = Instant::now();
            let address = &asking.address;
            tracing::debug!(size = outgoing.body.len(), %address, "asking who is there");
            asking
                .publish(address, outgoing, Some(pending.deadline), &pending.msg_id)
                .await?;
            Ok::<_, Error>((pending, sent))
        }
        .instrument(span)
        .await?;
        Ok(DiscoveryStream::new(Gathering {
            pending,
            sent,
            last_heard: sent,
            wait,
            answers: 0,
        }))
    }
}

/// The state of one discovery.
struct Gathering {
    pending: PendingCall,
    sent: Instant,
    last_heard: Instant,
    wait: DiscoveryWait,
    answers: usize,
}

impl Gathering {
    /// The next answer, or `None` when the gathering is over.
    async fn next(&mut self) -> Option<Result<Discovered>> {
        loop {
            if self.wait.expect.is_some_and(|n| self.answers >= n) {
                return None;
            }
            let wake = (self.last_heard + self.wait.quiet).min(self.pending.deadline);
            let reply = match timeout_at(wake, self.pending.recv_reply()).await {
                // Quiet, or the deadline.
                Err(_) => return None,
                // Nothing listens on the fanout: nobody is there.
                Ok(Err(Error::NoResponders { .. })) => return None,
                Ok(Err(Error::Closed)) => return Some(Err(Error::Closed)),
                Ok(Err(err)) => {
                    self.heard();
                    return Some(Err(err));
                }
                Ok(Ok(reply)) => reply,
            };
            // An end marker without a result is no answer of this protocol.
            if reply.failure.is_none() && reply.result.is_null() {
                continue;
            }
            self.heard();
            if let Some(failure) = reply.failure {
                return Some(Err(failure_error(failure)));
            }
            let round_trip = self.last_heard.saturating_duration_since(self.sent);
            return Some(
                decode_result::<ServerStatus>(reply.result)
                    .map(|status| Discovered { status, round_trip }),
            );
        }
    }

    fn heard(&mut self) {
        self.answers += 1;
        self.last_heard = Instant::now();
    }
}

type BoxedStream = Pin<Box<dyn Stream<Item = Result<Discovered>> + Send>>;

/// The answers of a [`Client::discover`], as they come. It ends when the
/// [`DiscoveryWait`] says; an error item does not end it.
pub struct DiscoveryStream {
    inner: BoxedStream,
}

impl DiscoveryStream {
    fn new(gathering: Gathering) -> Self {
        let stream = futures::stream::unfold(Some(gathering), |state| async move {
            let mut gathering = state?;
            let item = gathering.next().await?;
            // A closed reply queue ends it after saying so.
            let more = !matches!(item, Err(Error::Closed));
            Some((item, more.then_some(gathering)))
        });
        DiscoveryStream {
            inner: Box::pin(stream),
        }
    }
}

impl Stream for DiscoveryStream {
    type Item = Result<Discovered>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for DiscoveryStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryStream").finish_non_exhaustive()
    }
}
