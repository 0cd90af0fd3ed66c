//! [`Replier`]: encodes, signs and publishes a server's replies, with a bound on how
//! long one reply may wait for the transport.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::auth::MessageAuth;
use crate::error::{Error, RemoteError, Result, TransportErrorKind};
use crate::logs::Throttle;
use crate::transport::{Address, Outgoing, Publisher};
use crate::wire::{self, Answer};

/// How long one reply may wait for the transport before it is dropped, so a stuck
/// reply queue cannot hold a handler slot forever.
const REPLY_SEND_LIMIT: Duration = Duration::from_secs(30);

/// Encodes and publishes replies.
#[derive(Clone)]
pub(super) struct Replier {
    pub(super) publisher: Arc<dyn Publisher>,
    pub(super) max_message_size: Option<usize>,
    pub(super) auth: Option<MessageAuth>,
    /// Limits the warnings about replies that could not be sent.
    pub(super) dropped: Arc<Throttle>,
}

impl Replier {
    /// Sends `answer` to the call `msg_id`; `reply_to` is an [`Address::Reply`].
    pub(super) async fn send(
        &self,
        reply_to: &Address,
        msg_id: &str,
        answer: &Answer,
    ) -> Result<()> {
        let seal = |body: Vec<u8>| match &self.auth {
            Some(auth) => auth.seal(body),
            None => body,
        };
        // Sealed before the size check: the signature counts against the limit.
        let mut body = seal(wire::encode_answer(answer, msg_id)?);
        if let Some(limit) = self.max_message_size
            && body.len() > limit
        {
            // The caller learns why instead of waiting for its timeout.
            let failure = RemoteError::new(
                "MessageTooLarge",
                format!(
                    "reply of {} bytes exceeds the transport limit of {limit} bytes",
                    body.len()
                ),
            );
            body = seal(wire::encode_answer(&Answer::failure(failure), msg_id)?);
        }
        let outgoing = Outgoing {
            body: Bytes::from(body),
            time_to_live: None,
            mandatory: true,
            call: None,
        };
        let send = self.publisher.send(reply_to, outgoing);
        match tokio::time::timeout(REPLY_SEND_LIMIT, send).await {
            Ok(sent) => sent,
            Err(_) => Err(Error::transport_msg(
                TransportErrorKind::Timeout,
                format!("reply not accepted by the transport within {REPLY_SEND_LIMIT:?}"),
            )),
        }
    }
}
