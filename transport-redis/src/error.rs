//! What a redis-rs error means to mqrpc: the [`TransportErrorKind`] of each failure,
//! decided in one place, and the few errors the consumers react to by name.

use redis::{ErrorKind, RedisError, ServerErrorKind};
use rpc_core::{Error, TransportErrorKind};

/// How a redis-rs error counts: a refused TCP connection is `Connect`, an I/O
/// timeout `Timeout`, any other I/O failure (a reset, an EOF) and a cluster in
/// the middle of a change (`CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, and `MOVED` or
/// `ASK` left over after redis-rs's retries) `Disconnected`, a failed login or a
/// command the user's ACL forbids `Refused`, the rest `Other`.
pub(crate) fn error_kind(err: &RedisError) -> TransportErrorKind {
    // Order matters: redis-rs counts a refusal as a dropped connection too.
    if err.is_connection_refusal() {
        TransportErrorKind::Connect
    } else if err.is_timeout() {
        TransportErrorKind::Timeout
    } else if err.is_connection_dropped() || err.is_io_error() || is_cluster_change(err) {
        TransportErrorKind::Disconnected
    } else if matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm)
    ) || matches!(err.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    {
        TransportErrorKind::Refused
    } else {
        TransportErrorKind::Other
    }
}

/// Whether Redis refused a command because its cluster is changing (a failover, a
/// slot moving): `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, `MOVED`, `ASK`. The command
/// was not applied, and may be sent again once the cluster has settled.
pub(crate) fn is_cluster_change(err: &RedisError) -> bool {
    err.is_cluster_error() || err.kind() == ErrorKind::Server(ServerErrorKind::MasterDown)
}

/// A transport error saying `what` failed, of the kind [`error_kind`] gives, with
/// redis-rs's error kept as its source. The message names Redis's error code
/// (`… (Redis CLUSTERDOWN)`), and for the cluster's codes its detail too (`MOVED
/// 8561 10.0.0.2:7001`), since a caller may print the message without its source.
pub(crate) fn redis_error(what: &str, err: RedisError) -> Error {
    Error::transport(error_kind(&err), describe(what, &err), err)
}

/// `what`, and the Redis error code of `err` if it has one.
fn describe(what: &str, err: &RedisError) -> String {
    let Some(code) = err.code() else {
        return what.to_owned();
    };
    // Other errors' details may quote a command's arguments: only the code.
    let cluster =
        is_cluster_change(err) || err.kind() == ErrorKind::Server(ServerErrorKind::CrossSlot);
    // The cluster client follows redirections: one that reaches the caller most
    // likely comes from a cluster node reached without cluster mode.
    let hint = if matches!(code, "MOVED" | "ASK") {
        "; a Redis Cluster needs cluster=true in the URL"
    } else {
        ""
    };
    match err.detail() {
        Some(detail) if cluster && !detail.is_empty() => {
            format!("{what} (Redis {code} {detail}{hint})")
        }
        _ => format!("{what} (Redis {code}{hint})"),
    }
}

/// A failure to connect: `Connect`, unless Redis refused the login (`Refused`,
/// since connecting again with the same credentials will not help).
pub(crate) fn connect_error(what: String, err: RedisError) -> Error {
    let kind = match error_kind(&err) {
        TransportErrorKind::Refused => TransportErrorKind::Refused,
        _ => TransportErrorKind::Connect,
    };
    Error::transport(kind, describe(&what, &err), err)
}

/// Whether an error means the connection is gone (worth retrying after reconnecting)
/// rather than Redis refusing the command.
pub(crate) fn is_connection_error(err: &RedisError) -> bool {
    matches!(
        error_kind(err),
        TransportErrorKind::Connect
            | TransportErrorKind::Disconnected
            | TransportErrorKind::Timeout
    )
}

/// Whether Redis answered that a consumer group (or its stream) does not exist.
pub(crate) fn is_missing_group(err: &RedisError) -> bool {
    err.code() == Some("NOGROUP")
}

/// The error without its detail, which can quote the URL (and its password).
pub(crate) fn kind_description(err: &RedisError) -> String {
    format!("{:?}", err.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> RedisError {
        std::io::Error::new(kind, "test").into()
    }

    #[test]
    fn failures_are_classified_by_what_happened() {
        use std::io::ErrorKind as Io;
        assert_eq!(
            error_kind(&io(Io::ConnectionRefused)),
            TransportErrorKind::Connect
        );
        assert_eq!(error_kind(&io(Io::TimedOut)), TransportErrorKind::Timeout);
        for kind in [Io::ConnectionReset, Io::UnexpectedEof, Io::BrokenPipe] {
            assert_eq!(error_kind(&io(kind)), TransportErrorKind::Disconnected);
        }
        let login: RedisError = (ErrorKind::AuthenticationFailed, "no").into();
        assert_eq!(error_kind(&login), TransportErrorKind::Refused);
        let noperm: RedisError = (ErrorKind::Server(ServerErrorKind::NoPerm), "acl").into();
        assert_eq!(error_kind(&noperm), TransportErrorKind::Refused);
        let other: RedisError = (ErrorKind::Server(ServerErrorKind::ResponseError), "x").into();
        assert_eq!(error_kind(&other), TransportErrorKind::Other);
        assert!(is_connection_error(&io(Io::ConnectionReset)));
        assert!(!is_connection_error(&noperm));
        // A cluster changing is worth retrying; a cross-slot command is a bug.
        for kind in [
            ServerErrorKind::ClusterDown,
            ServerErrorKind::TryAgain,
            ServerErrorKind::MasterDown,
            ServerErrorKind::Moved,
        ] {
            let err: RedisError = (ErrorKind::Server(kind), "cluster").into();
            assert_eq!(error_kind(&err), TransportErrorKind::Disconnected, "{err}");
            assert!(is_connection_error(&err));
        }
        let cross: RedisError = (ErrorKind::Server(ServerErrorKind::CrossSlot), "x").into();
        assert_eq!(error_kind(&cross), TransportErrorKind::Other);
    }

    #[test]
    fn messages_name_the_redis_error_code() {
        let down: RedisError = (
            ErrorKind::Server(ServerErrorKind::ClusterDown),
            "down",
            "The cluster is down".to_owned(),
        )
            .into();
        let err = redis_error("publishing to openstack/demo", down);
        assert_eq!(
            err.to_string(),
            "transport error: publishing to openstack/demo (Redis CLUSTERDOWN The cluster is down)"
        );
        assert!(err.is_retryable());
        let cross: RedisError = (
            ErrorKind::Server(ServerErrorKind::CrossSlot),
            "Received crossed slots in pipeline",
        )
            .into();
        assert!(
            redis_error("x", cross)
                .to_string()
                .ends_with("x (Redis CROSSSLOT)")
        );
        let plain = redis_error("x", io(std::io::ErrorKind::ConnectionReset));
        assert_eq!(plain.to_string(), "transport error: x");
    }

    #[test]
    fn connecting_fails_as_connect_unless_the_login_is_refused() {
        let reset = connect_error("c".into(), io(std::io::ErrorKind::ConnectionReset));
        assert_eq!(
            reset.kind(),
            rpc_core::ErrorKind::Transport(TransportErrorKind::Connect)
        );
        let login = connect_error("c".into(), (ErrorKind::AuthenticationFailed, "no").into());
        assert!(!login.is_retryable());
        assert!(std::error::Error::source(&login).is_some());
    }
}
