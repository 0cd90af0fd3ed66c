//! The end of the grace period: the callers of handlers it cut off are told the
//! server shut down, so that none waits out its timeout.

use std::sync::Mutex;
use std::time::Duration;

use super::Serving;
use crate::error::RemoteError;
use crate::transport::Address;
use crate::wire::Answer;

/// How long the failures sent to the callers of handlers cut off by the end of the
/// grace period may take, all together.
const SHUTDOWN_REPLY_LIMIT: Duration = Duration::from_secs(5);

/// The class of the failure a caller receives when the server shut down before its
/// handler finished (the grace period ended).
pub const SERVER_SHUTDOWN_CLASS: &str = "ServerShutdown";
/// The module of that failure on the wire (callers may match on it).
pub const SERVER_SHUTDOWN_MODULE: &str = "mqrpc.transport";

/// Sends a failure to every caller whose handler the end of the grace period cut
/// off, so that none waits out its timeout for a reply that cannot come.
pub(super) async fn tell_abandoned_callers(serving: &Serving) {
    let abandoned = std::mem::take(
        &mut *serving
            .abandoned
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()),
    );
    if abandoned.is_empty() {
        return;
    }
    let failure = RemoteError::new(
        SERVER_SHUTDOWN_CLASS,
        "server shut down before the handler finished",
    )
    .with_module(SERVER_SHUTDOWN_MODULE);
    let answer = Answer::failure(failure);
    let sends = abandoned.iter().map(|(msg_id, reply_to)| {
        let answer = &answer;
        async move {
            if let Err(err) = serving.replier.send(reply_to, msg_id, answer).await {
                tracing::debug!(error = %err, "could not tell a caller the server shut down");
            }
        }
    });
    let told = tokio::time::timeout(SHUTDOWN_REPLY_LIMIT, futures::future::join_all(sends)).await;
    tracing::info!(
        calls = abandoned.len(),
        all_sent = told.is_ok(),
        "told the callers of unfinished handlers that the server shut down"
    );
}

/// Records a call as abandoned if its work is dropped before it answered (the end
/// of the grace period drops running handlers), so its caller can be told.
pub(super) struct Unfinished<'a> {
    pub(super) abandoned: &'a Mutex<Vec<(String, Address)>>,
    pub(super) msg_id: &'a str,
    pub(super) reply_to: &'a Address,
    pub(super) armed: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            (self.abandoned.lock())
                .unwrap_or_else(|poison| poison.into_inner())
                .push((self.msg_id.to_owned(), self.reply_to.clone()));
        }
    }
}
