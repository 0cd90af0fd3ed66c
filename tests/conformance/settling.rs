//! A transport decorator for the confirm-or-reply rule: its publisher hands every
//! call request to the real transport, then holds back the outcome of the publish
//! (as a slow or lost publisher confirm would), or sends the request late (as a
//! publish retried across a reconnection would), so a case can check that a call
//! proceeds on its reply, that a publish failure arriving first still fails it, and
//! that the call monitor counts from the publish.
//! Delivery itself is the backend's own; nothing of the broker is imitated.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mqrpc::transport::{
    Address, Capabilities, Consumer, ListenOptions, Outgoing, Publisher, ReplyQueue,
};
use mqrpc::{Error, Result, Target, Transport};

/// What happens to a call request's publish once the real transport sent it.
#[derive(Clone, Copy, Debug)]
pub enum Settle {
    /// The publish never settles (a confirm that never comes).
    Never,
    /// The publish fails after this long (a nack or a lost connection).
    FailAfter(Duration),
    /// The request leaves only after this long (a publish retried across a
    /// reconnection), then the publish succeeds.
    SendAfter(Duration),
}

/// Wraps a transport; only call requests are affected.
#[derive(Debug)]
pub struct Unsettled {
    inner: Arc<dyn Transport>,
    settle: Settle,
}

impl Unsettled {
    pub fn wrap(inner: Arc<dyn Transport>, settle: Settle) -> Arc<dyn Transport> {
        Arc::new(Unsettled { inner, settle })
    }
}

struct UnsettledPublisher {
    inner: Arc<dyn Publisher>,
    settle: Settle,
}

/// The error a failing publish returns.
pub const REFUSED: &str = "the broker refused the request (test)";

#[async_trait]
impl Publisher for UnsettledPublisher {
    async fn send(&self, address: &Address, message: Outgoing) -> Result<()> {
        let call = message.call.is_some();
        if let (true, Settle::SendAfter(wait)) = (call, self.settle) {
            tokio::time::sleep(wait).await;
        }
        self.inner.send(address, message).await?;
        if !call {
            return Ok(());
        }
        match self.settle {
            Settle::Never => std::future::pending().await,
            Settle::FailAfter(wait) => {
                tokio::time::sleep(wait).await;
                Err(Error::transport_msg(
                    mqrpc::TransportErrorKind::Other,
                    REFUSED,
                ))
            }
            Settle::SendAfter(_) => Ok(()),
        }
    }
}

#[async_trait]
impl Transport for Unsettled {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn default_exchange(&self) -> &str {
        self.inner.default_exchange()
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(UnsettledPublisher {
            inner: self.inner.publisher().await?,
            settle: self.settle,
        }))
    }

    async fn listen(&self, target: &Target, options: &ListenOptions) -> Result<Box<dyn Consumer>> {
        self.inner.listen(target, options).await
    }

    async fn reply_queue(&self) -> Result<ReplyQueue> {
        self.inner.reply_queue().await
    }

    async fn monitor(&self, target: &Target) -> Result<Box<dyn Consumer>> {
        self.inner.monitor(target).await
    }
}
