//! What an async-nats error means to mqrpc: the [`TransportErrorKind`] of each failure,
//! decided in one place from the kinds async-nats documents, with the async-nats error
//! kept as the source.

use std::error::Error as StdError;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::{BatchRequestError, BatchRequestErrorKind};
use async_nats::jetstream::context::{
    CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind,
    PublishError as JsPublishError, PublishErrorKind as JsPublishErrorKind,
    RequestError as JsRequestError, RequestErrorKind as JsRequestErrorKind,
};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use rpc_core::{Error, TransportErrorKind};

/// A transport error saying `what` failed, of the kind [`kind_of`] gives, with
/// async-nats's error kept as its source.
pub(crate) fn nats_error(what: &str, err: impl StdError + Send + Sync + 'static) -> Error {
    Error::transport(kind_of(&err), what.to_owned(), err)
}

/// [`nats_error`] for the boxed errors async-nats returns where it has no error type
/// of its own (acknowledgements); `what` says what failed.
pub(crate) fn boxed_nats_error(what: String, err: async_nats::Error) -> Error {
    Error::transport(kind_of(&*err), what, err)
}

/// How an async-nats error counts: the first error of its source chain whose kind
/// async-nats documents decides (a JetStream error often wraps the core one that
/// failed); `Other` when none does.
///
/// - connecting: a failed login or an authorization violation is `Refused`, anything
///   else (DNS, TCP, TLS, a handshake that took too long) `Connect`;
/// - a closed client: async-nats reports a publish, subscribe, request or flush on a
///   client whose connection task has ended as a failed send (`Disconnected`);
/// - a request or JetStream acknowledgement that got no answer in time: `Timeout`;
/// - a JetStream resource that exists with other settings, JetStream not enabled
///   for the account, more replicas than the cluster has (or has up): `Refused`;
/// - the rest (an invalid subject, a parse failure, ...): `Other`.
pub(crate) fn kind_of(err: &(dyn StdError + 'static)) -> TransportErrorKind {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(kind) = known(err) {
            return kind;
        }
        next = err.source();
    }
    TransportErrorKind::Other
}

/// The kind of one async-nats error; `None` when async-nats does not say (a wrapper
/// whose source tells, or an error it does not document).
fn known(err: &(dyn StdError + 'static)) -> Option<TransportErrorKind> {
    use TransportErrorKind::{Connect, Disconnected, Other, Refused, Timeout};
    if let Some(err) = err.downcast_ref::<async_nats::ConnectError>() {
        use async_nats::ConnectErrorKind as K;
        return Some(match err.kind() {
            K::Authentication | K::AuthorizationViolation => Refused,
            _ => Connect,
        });
    }
    if let Some(err) = err.downcast_ref::<async_nats::PublishError>() {
        use async_nats::client::PublishErrorKind as K;
        return Some(match err.kind() {
            K::Send => Disconnected,
            _ => Other,
        });
    }
    if let Some(err) = err.downcast_ref::<async_nats::RequestError>() {
        use async_nats::client::RequestErrorKind as K;
        return Some(match err.kind() {
            K::TimedOut => Timeout,
            // A failed send, or the answer's channel closed: the client is gone.
            K::Other => Disconnected,
            _ => Other,
        });
    }
    if let Some(err) = err.downcast_ref::<async_nats::SubscribeError>() {
        use async_nats::client::SubscribeErrorKind as K;
        return Some(match err.kind() {
            K::Other => Disconnected,
            _ => Other,
        });
    }
    if err
        .downcast_ref::<async_nats::client::FlushError>()
        .is_some()
    {
        // Either kind means the client could not reach its connection task or server.
        return Some(Disconnected);
    }
    if let Some(err) = err.downcast_ref::<JsPublishError>() {
        return match err.kind() {
            JsPublishErrorKind::TimedOut => Some(Timeout),
            JsPublishErrorKind::BrokenPipe => Some(Disconnected),
            JsPublishErrorKind::Other => None,
            _ => Some(Other),
        };
    }
    if let Some(err) = err.downcast_ref::<JsRequestError>() {
        return match err.kind() {
            JsRequestErrorKind::TimedOut => Some(Timeout),
            JsRequestErrorKind::Other => None,
            _ => Some(Other),
        };
    }
    if let Some(err) = err.downcast_ref::<CreateStreamError>() {
        return match err.kind() {
            CreateStreamErrorKind::TimedOut => Some(Timeout),
            CreateStreamErrorKind::JetStream(api) => Some(api_kind(&api)),
            CreateStreamErrorKind::EmptyStreamName
            | CreateStreamErrorKind::InvalidStreamName
            | CreateStreamErrorKind::DomainAndExternalSet => Some(Refused),
            CreateStreamErrorKind::Response => None,
            _ => Some(Other),
        };
    }
    if let Some(err) = err.downcast_ref::<GetStreamError>() {
        return match err.kind() {
            GetStreamErrorKind::JetStream(api) => Some(api_kind(&api)),
            GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => Some(Refused),
            GetStreamErrorKind::Request => None,
        };
    }
    if let Some(err) = err.downcast_ref::<ConsumerError>() {
        return match err.kind() {
            ConsumerErrorKind::TimedOut => Some(Timeout),
            ConsumerErrorKind::JetStream(api) => Some(api_kind(&api)),
            ConsumerErrorKind::InvalidConsumerType | ConsumerErrorKind::InvalidName => {
                Some(Refused)
            }
            ConsumerErrorKind::Request | ConsumerErrorKind::Other => None,
        };
    }
    if let Some(err) = err.downcast_ref::<BatchRequestError>() {
        return match err.kind() {
            BatchRequestErrorKind::Serialize => Some(Other),
            // The failed publish or flush it wraps tells.
            _ => None,
        };
    }
    if let Some(api) = err.downcast_ref::<jetstream::Error>() {
        return Some(api_kind(api));
    }
    None
}

/// The kind of an error the JetStream API answered: a stream or consumer that exists
/// with other settings, or JetStream not enabled, is `Refused` (asking again gets the
/// same answer); anything else `Other`.
fn api_kind(err: &jetstream::Error) -> TransportErrorKind {
    use jetstream::ErrorCode as C;
    match err.error_code() {
        C::STREAM_NAME_EXIST
        | C::STREAM_SUBJECT_OVERLAP
        | C::STREAM_MISMATCH
        | C::CONSUMER_NAME_EXIST
        | C::CONSUMER_ALREADY_EXISTS
        | C::CONSUMER_CREATE_FILTER_SUBJECT_MISMATCH
        | C::CONSUMER_CREATE_DURABLE_AND_NAME_MISMATCH
        | C::JETSTREAM_NOT_ENABLED
        | C::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        // More replicas than the cluster has nodes (up): asking again will not help.
        | C::STREAM_REPLICAS_NOT_SUPPORTED
        | C::INSUFFICIENT_RESOURCES => TransportErrorKind::Refused,
        _ => TransportErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_failures_are_connect_unless_refused() {
        use async_nats::ConnectErrorKind as K;
        for (kind, expected) in [
            (K::Authentication, TransportErrorKind::Refused),
            (K::AuthorizationViolation, TransportErrorKind::Refused),
            (K::TimedOut, TransportErrorKind::Connect),
            (K::Io, TransportErrorKind::Connect),
            (K::Dns, TransportErrorKind::Connect),
            (K::Tls, TransportErrorKind::Connect),
            (K::ServerParse, TransportErrorKind::Connect),
        ] {
            let err = nats_error("connecting", async_nats::ConnectError::new(kind));
            assert_eq!(
                err.kind(),
                rpc_core::ErrorKind::Transport(expected),
                "{kind:?}"
            );
            assert!(err.source().is_some(), "the async-nats error is kept");
        }
    }

    #[test]
    fn a_closed_client_is_disconnected_and_a_slow_answer_a_timeout() {
        use async_nats::client::{PublishErrorKind, RequestErrorKind};
        let closed = async_nats::PublishError::new(PublishErrorKind::Send);
        assert_eq!(kind_of(&closed), TransportErrorKind::Disconnected);
        let too_big = async_nats::PublishError::new(PublishErrorKind::MaxPayloadExceeded);
        assert_eq!(kind_of(&too_big), TransportErrorKind::Other);
        let late = async_nats::RequestError::new(RequestErrorKind::TimedOut);
        assert_eq!(kind_of(&late), TransportErrorKind::Timeout);
        let broken = async_nats::RequestError::with_source(RequestErrorKind::Other, "broken pipe");
        assert_eq!(kind_of(&broken), TransportErrorKind::Disconnected);
        let flush =
            async_nats::client::FlushError::new(async_nats::client::FlushErrorKind::FlushError);
        assert_eq!(kind_of(&flush), TransportErrorKind::Disconnected);
    }

    #[test]
    fn a_jetstream_wrapper_counts_as_the_error_it_wraps() {
        // A pull request whose publish failed on a closed client.
        let batch = BatchRequestError::with_source(
            BatchRequestErrorKind::Publish,
            async_nats::PublishError::new(async_nats::client::PublishErrorKind::Send),
        );
        assert_eq!(kind_of(&batch), TransportErrorKind::Disconnected);
        let consumer = ConsumerError::with_source(
            ConsumerErrorKind::Request,
            JsRequestError::new(JsRequestErrorKind::TimedOut),
        );
        assert_eq!(kind_of(&consumer), TransportErrorKind::Timeout);
        let unknown = ConsumerError::new(ConsumerErrorKind::Other);
        assert_eq!(kind_of(&unknown), TransportErrorKind::Other);
        let late_ack = JsPublishError::new(JsPublishErrorKind::TimedOut);
        assert_eq!(kind_of(&late_ack), TransportErrorKind::Timeout);
    }

    #[test]
    fn a_stream_that_exists_with_other_settings_is_refused() {
        let api = |code: u64| -> jetstream::Error {
            serde_json::from_value(serde_json::json!({
                "code": 400, "err_code": code, "description": "from the server"
            }))
            .expect("an API error")
        };
        let exists = CreateStreamError::new(CreateStreamErrorKind::JetStream(api(10058)));
        assert_eq!(kind_of(&exists), TransportErrorKind::Refused);
        let published = JsPublishError::with_source(JsPublishErrorKind::Other, api(10039));
        assert_eq!(kind_of(&published), TransportErrorKind::Refused);
        let busy = ConsumerError::new(ConsumerErrorKind::JetStream(api(10008)));
        assert_eq!(kind_of(&busy), TransportErrorKind::Other);
    }
}
