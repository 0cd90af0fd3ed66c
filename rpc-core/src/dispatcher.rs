//! `Dispatcher`: picks the endpoint and method for a request by oslo.messaging's rules.
//!
//! Endpoints are tried in order; the first whose namespace matches and whose version
//! serves the requested one runs the method. A compatible endpoint without the method
//! gives `NoSuchMethod`, no compatible endpoint gives `UnsupportedVersion`, and names
//! starting with `_` are never dispatched (oslo's default access policy).

// A `RemoteError` here is the failure document itself, built once per failed
// request and sent as it is; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use serde_json::{Map, Value};

use crate::context::Context;
use crate::dispatch_failure::DispatchFailure;
use crate::endpoint::{Endpoint, Invocation};
use crate::target::Version;

/// Chooses and starts the method a request names.
#[derive(Debug, Clone, Default)]
pub(crate) struct Dispatcher {
    endpoints: Vec<Endpoint>,
}

impl Dispatcher {
    pub(crate) fn new(endpoints: Vec<Endpoint>) -> Self {
        Dispatcher { endpoints }
    }

    /// Starts `method`; an [`Invocation::NotServed`] or [`Invocation::Failed`] says
    /// why it cannot run.
    pub(crate) fn dispatch(
        &self,
        namespace: Option<&str>,
        version: Option<&str>,
        method: &str,
        ctx: Context,
        args: Map<String, Value>,
    ) -> Invocation {
        let requested = match version {
            None => Version::DEFAULT,
            Some(text) => match text.parse::<Version>() {
                Ok(version) => version,
                Err(_) => return Invocation::NotServed(unsupported_version(text, method)),
            },
        };
        let mut compatible = false;
        for endpoint in &self.endpoints {
            if endpoint.namespace.as_deref() != namespace || !endpoint.version.serves(&requested) {
                continue;
            }
            if !method.starts_with('_')
                && let Some(handler) = endpoint.methods.get(method)
            {
                return handler(ctx, args);
            }
            compatible = true;
        }
        Invocation::NotServed(if compatible {
            no_such_method(method)
        } else {
            unsupported_version(version.unwrap_or(&Version::DEFAULT.to_string()), method)
        })
    }
}

/// A method the endpoint does not have.
fn no_such_method(method: &str) -> DispatchFailure {
    DispatchFailure::NoSuchMethod {
        method: method.to_owned(),
    }
}

/// No endpoint serves the version.
fn unsupported_version(version: &str, method: &str) -> DispatchFailure {
    DispatchFailure::UnsupportedVersion {
        version: version.to_owned(),
        method: method.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::NoArgs;
    use crate::error::RemoteError;

    fn endpoint(version: Version, namespace: Option<&str>, methods: &[&'static str]) -> Endpoint {
        let mut endpoint = Endpoint::new().version(version);
        if let Some(ns) = namespace {
            endpoint = endpoint.namespace(ns);
        }
        for &name in methods {
            endpoint = endpoint.method(name, move |_ctx: Context, _args: NoArgs| async move {
                Ok::<_, RemoteError>(name)
            });
        }
        endpoint
    }

    async fn outcome(
        d: &Dispatcher,
        ns: Option<&str>,
        v: Option<&str>,
        m: &str,
    ) -> Result<Value, RemoteError> {
        match d.dispatch(ns, v, m, Context::new(), Map::new()) {
            Invocation::Unary(future) => future.await,
            Invocation::Failed(failure) => Err(failure),
            Invocation::NotServed(failure) => Err(failure.to_remote()),
            Invocation::Stream(_) => panic!("unexpected stream"),
        }
    }

    #[tokio::test]
    async fn first_compatible_endpoint_wins() {
        let d = Dispatcher::new(vec![
            endpoint(Version::new(1, 0), None, &["a"]),
            endpoint(Version::new(1, 3), None, &["a", "b"]),
            endpoint(Version::new(2, 0), Some("ns"), &["a"]),
        ]);
        assert_eq!(outcome(&d, None, None, "a").await, Ok(Value::from("a")));
        assert_eq!(
            outcome(&d, None, Some("1.2"), "b").await,
            Ok(Value::from("b"))
        );
        assert_eq!(
            outcome(&d, Some("ns"), Some("2.0"), "a").await,
            Ok(Value::from("a"))
        );
    }

    #[tokio::test]
    async fn no_such_method_versus_unsupported_version() {
        let d = Dispatcher::new(vec![endpoint(Version::new(1, 3), None, &["a", "_hidden"])]);
        let missing = outcome(&d, None, Some("1.1"), "zzz")
            .await
            .expect_err("missing");
        assert_eq!(missing.class, "NoSuchMethod");
        assert_eq!(missing.message, "Endpoint does not support RPC method zzz");
        let private = outcome(&d, None, None, "_hidden")
            .await
            .expect_err("private");
        assert_eq!(private.class, "NoSuchMethod");
        for version in ["1.4", "2.0", "junk"] {
            let err = outcome(&d, None, Some(version), "a")
                .await
                .expect_err("version");
            assert_eq!(err.class, "UnsupportedVersion", "{version}");
        }
        let wrong_ns = outcome(&d, Some("other"), None, "a")
            .await
            .expect_err("namespace");
        assert_eq!(wrong_ns.class, "UnsupportedVersion");
        assert_eq!(
            wrong_ns.message,
            "Endpoint does not support RPC version 1.0. Attempted method: a"
        );
    }
}
