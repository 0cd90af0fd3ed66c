//! The conformance suite: one generic body (`suite`) that every backend runs, with a
//! module per backend. A backend module only says how to open its transport.
//!
//! Run one backend with `cargo test --test conformance memory::`.

#[macro_use]
mod suite;
#[cfg(any(feature = "amqp", feature = "redis", feature = "nats"))]
mod faults;
mod proxy;
mod redaction;
mod service;
mod settling;
#[cfg(any(feature = "amqp", feature = "redis", feature = "nats"))]
mod tls;

mod memory;
#[cfg(unix)]
mod memory_shared;

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "amqp")]
mod interop_amqp;

#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "nats")]
mod nats;
