//! The dispatcher's two failures, `NoSuchMethod` and `UnsupportedVersion`, as
//! oslo.messaging puts them on the wire: written by our dispatcher, read back by our
//! client. Python servers send only the English message, so its templates live here
//! once, for the writer and the reader alike.

use serde_json::Value;

use crate::error::{Error, RemoteError};

/// Module of the dispatcher failures, as oslo.messaging names it on the wire.
const DISPATCHER_MODULE: &str = "oslo_messaging.rpc.dispatcher";
const NO_SUCH_METHOD_CLASS: &str = "NoSuchMethod";
const UNSUPPORTED_VERSION_CLASS: &str = "UnsupportedVersion";

// oslo.messaging's messages (`oslo_messaging/rpc/dispatcher.py`):
// "Endpoint does not support RPC method %(method)s" and
// "Endpoint does not support RPC version %(version)s. Attempted method: %(method)s".
const NO_SUCH_METHOD_PREFIX: &str = "Endpoint does not support RPC method ";
const UNSUPPORTED_VERSION_PREFIX: &str = "Endpoint does not support RPC version ";
const ATTEMPTED_METHOD: &str = ". Attempted method: ";

/// Why the dispatcher could not run a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DispatchFailure {
    /// An endpoint serves the namespace and version, but none has the method.
    NoSuchMethod {
        /// The method asked for.
        method: String,
    },
    /// No endpoint serves the namespace and version.
    UnsupportedVersion {
        /// The version asked for.
        version: String,
        /// The method asked for.
        method: String,
    },
}

impl DispatchFailure {
    /// The failure document oslo.messaging sends, with the names as the positional
    /// arguments Python's exceptions take.
    pub(crate) fn to_remote(&self) -> RemoteError {
        let (class, message, args) = match self {
            DispatchFailure::NoSuchMethod { method } => (
                NO_SUCH_METHOD_CLASS,
                format!("{NO_SUCH_METHOD_PREFIX}{method}"),
                vec![Value::from(method.as_str())],
            ),
            DispatchFailure::UnsupportedVersion { version, method } => (
                UNSUPPORTED_VERSION_CLASS,
                format!("{UNSUPPORTED_VERSION_PREFIX}{version}{ATTEMPTED_METHOD}{method}"),
                vec![Value::from(version.as_str()), Value::from(method.as_str())],
            ),
        };
        let mut failure = RemoteError::new(class, message).with_module(DISPATCHER_MODULE);
        failure.args = args;
        failure
    }

    /// Reads a dispatcher failure back; `None` for any other failure.
    ///
    /// A Rust server sends the method (and version) as the positional arguments; a
    /// Python server sends only the message text (as its one argument, or none), so
    /// the names are read from the text then.
    pub(crate) fn from_remote(failure: &RemoteError) -> Option<Self> {
        if failure.base_module() != DISPATCHER_MODULE {
            return None;
        }
        match failure.base_class() {
            NO_SUCH_METHOD_CLASS => {
                let raw = positional(failure, 0, 1).unwrap_or(&failure.message);
                let method = raw.strip_prefix(NO_SUCH_METHOD_PREFIX).unwrap_or(raw);
                Some(DispatchFailure::NoSuchMethod {
                    method: method.to_owned(),
                })
            }
            UNSUPPORTED_VERSION_CLASS => {
                let (version, method) = match (positional(failure, 0, 2), positional(failure, 1, 2))
                {
                    (Some(version), Some(method)) => (version, method),
                    _ => parse_unsupported_version(&failure.message),
                };
                Some(DispatchFailure::UnsupportedVersion {
                    version: version.to_owned(),
                    method: method.to_owned(),
                })
            }
            _ => None,
        }
    }
}

impl From<DispatchFailure> for Error {
    fn from(failure: DispatchFailure) -> Self {
        match failure {
            DispatchFailure::NoSuchMethod { method } => Error::NoSuchMethod { method },
            DispatchFailure::UnsupportedVersion { version, method } => {
                Error::UnsupportedVersion { version, method }
            }
        }
    }
}

/// Positional argument `i` when the failure has exactly `count` string arguments.
fn positional(failure: &RemoteError, i: usize, count: usize) -> Option<&str> {
    if failure.args.len() != count {
        return None;
    }
    failure.args.get(i).and_then(Value::as_str)
}

/// Reads "Endpoint does not support RPC version V. Attempted method: M" into (V, M);
/// empty names when the text has another shape.
fn parse_unsupported_version(message: &str) -> (&str, &str) {
    let rest = message
        .strip_prefix(UNSUPPORTED_VERSION_PREFIX)
        .unwrap_or(message);
    match rest.split_once(ATTEMPTED_METHOD) {
        Some((version, method)) => (version, method.trim()),
        None => ("", ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatcher_failure(class: &str, message: &str, args: &[&str]) -> RemoteError {
        let mut failure = RemoteError::new(class, message).with_module(DISPATCHER_MODULE);
        failure.args = args.iter().map(|a| Value::from(*a)).collect();
        failure
    }

    fn error_of(failure: &RemoteError) -> Option<Error> {
        DispatchFailure::from_remote(failure).map(Error::from)
    }

    #[test]
    fn the_writer_sends_oslo_messages_and_positional_names() {
        let missing = DispatchFailure::NoSuchMethod { method: "m".into() }.to_remote();
        assert_eq!(
            (missing.class.as_str(), missing.module.as_str()),
            ("NoSuchMethod", "oslo_messaging.rpc.dispatcher")
        );
        assert_eq!(missing.message, "Endpoint does not support RPC method m");
        assert_eq!(missing.args, [Value::from("m")]);
        let version = DispatchFailure::UnsupportedVersion {
            version: "2.0".into(),
            method: "add".into(),
        }
        .to_remote();
        assert_eq!(version.class, "UnsupportedVersion");
        assert_eq!(
            version.message,
            "Endpoint does not support RPC version 2.0. Attempted method: add"
        );
        assert_eq!(version.args, [Value::from("2.0"), Value::from("add")]);
        for written in [missing, version] {
            let read = DispatchFailure::from_remote(&written).expect("read back");
            assert_eq!(read.to_remote(), written);
        }
    }

    #[test]
    fn dispatcher_failures_from_rust_and_python_servers() {
        let rust = dispatcher_failure(
            "NoSuchMethod",
            "Endpoint does not support RPC method m",
            &["m"],
        );
        assert!(matches!(error_of(&rust), Some(Error::NoSuchMethod { method }) if method == "m"));
        let text = "Endpoint does not support RPC method m";
        let python = dispatcher_failure("NoSuchMethod", text, &[text]);
        assert!(matches!(error_of(&python), Some(Error::NoSuchMethod { method }) if method == "m"));
        let text = "Endpoint does not support RPC version 2.0. Attempted method: add";
        let python = dispatcher_failure("UnsupportedVersion", text, &[text]);
        assert!(matches!(error_of(&python),
            Some(Error::UnsupportedVersion { version, method }) if version == "2.0" && method == "add"));
        let mut remote = dispatcher_failure("NoSuchMethod", text, &[]);
        remote.class = "NoSuchMethod_Remote".into();
        remote.module = format!("{DISPATCHER_MODULE}_Remote");
        assert!(matches!(
            error_of(&remote),
            Some(Error::NoSuchMethod { .. })
        ));
        let other = RemoteError::new("ValueError", "x");
        assert!(error_of(&other).is_none());
        let elsewhere = RemoteError::new("NoSuchMethod", "x").with_module("mymodule");
        assert!(error_of(&elsewhere).is_none());
    }
}
