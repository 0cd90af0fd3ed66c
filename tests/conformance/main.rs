//! The conformance suite: one generic body (`suite`) that every backend runs, with a
//! module per backend. A backend module only says how to open its transport.
//!
//! Run one backend with `cargo test --test conformance memory::`. A test whose
//! broker or Python peer is missing fails unless `MQRPC_ALLOW_SKIP=1` (module
//! `skips`); `bash scripts/test.sh` runs everything and sums up what was skipped.

#[macro_use]
mod suite;
#[cfg(any(feature = "amqp", feature = "redis", feature = "nats"))]
mod clusters;
#[cfg(any(feature = "amqp", feature = "redis", feature = "nats"))]
mod faults;
mod logs;
mod proxy;
mod redaction;
mod service;
mod settling;
mod skipping;
#[cfg(any(feature = "amqp", feature = "nats"))]
mod spy;
// The command line's skip helper; one file for both packages.
#[path = "../../cli/src/skips.rs"]
mod skips;
#[cfg(any(feature = "amqp", feature = "redis", feature = "nats"))]
mod tls;

mod memory;

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "amqp")]
mod interop_amqp;
#[cfg(feature = "amqp")]
mod interop_discovery;
#[cfg(feature = "amqp")]
mod interop_notifications;
#[cfg(all(feature = "amqp", feature = "otel"))]
mod interop_tracing;
#[cfg(feature = "amqp")]
mod interop_typed;

#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "nats")]
mod nats;
