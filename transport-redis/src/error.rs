//! What a redis-rs error means to mqrpc: the [`TransportErrorKind`] of each failure,
//! decided in one place, and the few errors the consumers react to by name.

use redis::{ErrorKind, RedisError, ServerErrorKind};
use rpc_core::{Error, TransportErrorKind};

use crate::connection::Connection;

/// How a redis-rs error counts: a refused TCP connection is `Connect`, an I/O
/// timeout `Timeout`, any other I/O failure (a reset, an EOF), a cluster in the
/// middle of a change (`CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`) and a cluster client
/// left without a connection to the node it needs `Disconnected`; a failed login, a
/// command the user's ACL forbids, and a command the cluster will not take however
/// often it is sent `Refused` (not retryable): `CROSSSLOT` (a bug), `MOVED` and `ASK`
/// (the cluster client follows them, so one that reaches mqrpc comes from a cluster
/// node used without cluster mode); the rest `Other`.
pub(crate) fn error_kind(err: &RedisError) -> TransportErrorKind {
    // Order matters: redis-rs counts a refusal as a dropped connection too.
    if err.is_connection_refusal() {
        TransportErrorKind::Connect
    } else if err.is_timeout() {
        TransportErrorKind::Timeout
    } else if err.is_connection_dropped()
        || err.is_io_error()
        || is_cluster_change(err)
        || err.kind() == ErrorKind::ClusterConnectionNotFound
    {
        TransportErrorKind::Disconnected
    } else if matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed
            | ErrorKind::Server(
                ServerErrorKind::NoPerm
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::CrossSlot
            )
    ) || matches!(err.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    {
        TransportErrorKind::Refused
    } else {
        TransportErrorKind::Other
    }
}

/// Whether Redis refused a command because its cluster is changing (a failover, a
/// slot moving): `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`. The command was not
/// applied, and may be sent again once the cluster has settled.
pub(crate) fn is_cluster_change(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Server(
            ServerErrorKind::ClusterDown | ServerErrorKind::TryAgain | ServerErrorKind::MasterDown
        )
    )
}

/// Whether `err` proves the command reached no Redis, so that sending it again
/// cannot apply it twice: a refused connection, a cluster refusing it while it
/// changes, or a cluster client that had no connection to send it on.
pub(crate) fn was_not_sent(err: &RedisError) -> bool {
    err.is_connection_refusal()
        || is_cluster_change(err)
        || err.kind() == ErrorKind::ClusterConnectionNotFound
}

/// A transport error saying `what` failed, of the kind [`error_kind`] gives, with
/// redis-rs's error kept as its source. The message names Redis's error code
/// (`… (Redis CLUSTERDOWN)`), and for the cluster's codes its detail too (`MOVED
/// 8561 10.0.0.2:7001`), since a caller may print the message without its source.
pub(crate) fn redis_error(what: &str, err: RedisError) -> Error {
    Error::transport(error_kind(&err), describe(what, &err, ""), err)
}

/// [`redis_error`] for a command run on `conn`: on one Redis (no cluster mode), a
/// `MOVED` or `ASK` means the URL names a cluster node, and the message says what
/// is missing. The cluster client follows redirections itself: no hint there.
pub(crate) fn command_error(conn: &Connection, what: &str, err: RedisError) -> Error {
    let hint = match (conn, err.kind()) {
        (
            Connection::Single(_),
            ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask),
        ) => "; a Redis Cluster needs cluster=true in the URL",
        _ => "",
    };
    Error::transport(error_kind(&err), describe(what, &err, hint), err)
}

/// `what`, and the Redis error code of `err` if it has one, followed by `hint`.
fn describe(what: &str, err: &RedisError, hint: &str) -> String {
    let Some(code) = err.code() else {
        return what.to_owned();
    };
    // Other errors' details may quote a command's arguments: only the code.
    let cluster = is_cluster_change(err)
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::CrossSlot | ServerErrorKind::Moved | ServerErrorKind::Ask
            )
        );
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
    Error::transport(kind, describe(&what, &err, ""), err)
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

/// Whether Redis refused a command for good: an ACL forbids it (`NOPERM`), or this
/// Redis does not know it (`ERR unknown command` or `unknown subcommand`).
pub(crate) fn is_forbidden_or_unknown(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
        || err.code() == Some("NOPERM")
        || (err.code() == Some("ERR")
            && err
                .detail()
                .is_some_and(|detail| detail.to_ascii_lowercase().contains("unknown")))
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
        // A cluster changing is worth retrying, and so is a cluster client without
        // a connection to the node; a cross-slot command is a bug, and a redirection
        // the cluster client did not follow comes back however often it is sent.
        for kind in [
            ServerErrorKind::ClusterDown,
            ServerErrorKind::TryAgain,
            ServerErrorKind::MasterDown,
        ] {
            let err: RedisError = (ErrorKind::Server(kind), "cluster").into();
            assert_eq!(error_kind(&err), TransportErrorKind::Disconnected, "{err}");
            assert!(is_connection_error(&err));
            assert!(was_not_sent(&err));
        }
        let lost: RedisError =
            (ErrorKind::ClusterConnectionNotFound, "No connections found").into();
        assert_eq!(error_kind(&lost), TransportErrorKind::Disconnected);
        assert!(was_not_sent(&lost));
        for kind in [
            ServerErrorKind::Moved,
            ServerErrorKind::Ask,
            ServerErrorKind::CrossSlot,
        ] {
            let err: RedisError = (ErrorKind::Server(kind), "x").into();
            assert_eq!(error_kind(&err), TransportErrorKind::Refused, "{err}");
            assert!(!was_not_sent(&err));
            assert!(!redis_error("x", err).is_retryable());
        }
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
        let moved: RedisError = (
            ErrorKind::Server(ServerErrorKind::Moved),
            "moved",
            "8561 127.0.0.1:17001".to_owned(),
        )
            .into();
        assert_eq!(
            redis_error("x", moved).to_string(),
            "transport error: x (Redis MOVED 8561 127.0.0.1:17001)"
        );
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
