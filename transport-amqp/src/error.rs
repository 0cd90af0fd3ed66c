//! How lapin's errors become mqrpc's: one place decides which
//! [`TransportErrorKind`] a failure of the broker or the connection is, so callers can
//! tell a refusal (retrying will not help) from a lost connection (it may).

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use rpc_core::{Error, TransportErrorKind};

/// The kind of a lapin error, wherever it happened. A connect maps its failures with
/// [`connect_kind`] instead.
pub(crate) fn kind_of(err: &lapin::Error) -> TransportErrorKind {
    use lapin::ErrorKind;
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            // Permissions, a queue or exchange that exists with other arguments, a
            // body over the broker's limit: the same request fails the same way.
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::PRECONDITIONFAILED
                | AMQPSoftError::CONTENTTOOLARGE,
            ) => TransportErrorKind::Refused,
            // NOT_ALLOWED is RabbitMQ's answer for a virtual host the user may not
            // open (or that does not exist); INVALID_PATH the AMQP spec's.
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH) => {
                TransportErrorKind::Refused
            }
            // An operator closed the connection or the broker is shutting down.
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED) => {
                TransportErrorKind::Disconnected
            }
            _ => TransportErrorKind::Other,
        },
        ErrorKind::AuthProviderError(_) | ErrorKind::InvalidProtocolVersion(_) => {
            TransportErrorKind::Refused
        }
        // The socket failed, the broker stopped answering heartbeats, or an operation
        // found its channel or connection already closed.
        ErrorKind::IOError(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_) => TransportErrorKind::Disconnected,
        _ => TransportErrorKind::Other,
    }
}

/// The kind of a failed connection attempt: a refusal stays one (bad credentials, a
/// virtual host the user may not open), anything else is [`TransportErrorKind::Connect`].
pub(crate) fn connect_kind(err: &lapin::Error) -> TransportErrorKind {
    match kind_of(err) {
        TransportErrorKind::Refused => TransportErrorKind::Refused,
        _ => TransportErrorKind::Connect,
    }
}

/// A transport error saying what failed, of the kind lapin's error is, with it as the
/// source.
pub(crate) fn lapin_error(what: &str, err: lapin::Error) -> Error {
    Error::transport(kind_of(&err), what.to_owned(), err)
}

#[cfg(test)]
mod tests {
    use lapin::protocol::AMQPError;
    use lapin::{ChannelState, ConnectionState};

    use super::*;

    fn amqp(kind: AMQPErrorKind) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(kind, "text".into())).into()
    }

    #[test]
    fn refusals_disconnections_and_the_rest() {
        use TransportErrorKind::*;
        let io = |kind| lapin::Error::from(std::io::Error::from(kind));
        let cases: [(lapin::Error, TransportErrorKind); 10] = [
            (
                amqp(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)),
                Refused,
            ),
            (
                amqp(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)),
                Refused,
            ),
            (
                amqp(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)),
                Refused,
            ),
            (
                amqp(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)),
                Disconnected,
            ),
            (amqp(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)), Other),
            (
                lapin::ErrorKind::AuthProviderError("no".into()).into(),
                Refused,
            ),
            (io(std::io::ErrorKind::ConnectionReset), Disconnected),
            (lapin::ErrorKind::MissingHeartbeatError.into(), Disconnected),
            (
                lapin::ErrorKind::InvalidChannelState(ChannelState::Closed, "basic.publish").into(),
                Disconnected,
            ),
            (
                lapin::ErrorKind::InvalidConnectionState(ConnectionState::Closed).into(),
                Disconnected,
            ),
        ];
        for (err, kind) in cases {
            assert_eq!(kind_of(&err), kind, "{err}");
        }
        let refused = io(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(connect_kind(&refused), Connect);
        let denied = amqp(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED));
        assert_eq!(connect_kind(&denied), Refused);
        let error = lapin_error("declaring queue q", denied);
        assert!(!error.is_retryable(), "{error}");
        assert!(std::error::Error::source(&error).is_some(), "{error}");
    }
}
