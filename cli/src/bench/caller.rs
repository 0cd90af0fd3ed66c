//! What the benchmark drives: one request/reply round trip, by mqrpc or by a broker's
//! bare client, so both are measured by the same loop.

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use bytes::Bytes;

/// Sends `payload` to an echo server and waits for it to come back.
#[async_trait]
pub(crate) trait Caller: Send + Sync {
    /// One round trip; returns the echoed payload.
    async fn call(&self, payload: Bytes) -> Result<Bytes>;
}

/// A caller with whatever must stay alive for it to work (its echo server, tasks).
pub(crate) struct Pair {
    pub(crate) caller: Arc<dyn Caller>,
    /// Dropped when the measurement ends: stops the server side.
    pub(crate) _keep: Box<dyn Send + Sync>,
}
