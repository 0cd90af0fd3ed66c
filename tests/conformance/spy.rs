//! A transport wrapper that lets a test read the byte budget its server was given,
//! to sample what the server holds while big messages arrive.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use mqrpc::transport::{ByteBudget, Capabilities, Consumer, ListenOptions, Publisher, ReplyQueue};
use mqrpc::{Target, Transport};

/// Passes everything to `inner` and keeps the budget of the last `listen`.
#[derive(Debug)]
pub struct BudgetSpy<T: ?Sized> {
    pub inner: Arc<T>,
    budget: Mutex<Option<ByteBudget>>,
}

impl<T: ?Sized> BudgetSpy<T> {
    pub fn new(inner: Arc<T>) -> Arc<Self> {
        Arc::new(BudgetSpy {
            inner,
            budget: Mutex::new(None),
        })
    }

    /// The budget the server handed to `listen`; panics if nothing listened yet.
    pub fn budget(&self) -> ByteBudget {
        let budget = self.budget.lock().expect("lock").clone();
        budget.expect("the server listened")
    }
}

#[async_trait]
impl<T: Transport + ?Sized> Transport for BudgetSpy<T> {
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

    async fn publisher(&self) -> mqrpc::Result<Arc<dyn Publisher>> {
        self.inner.publisher().await
    }

    async fn listen(
        &self,
        target: &Target,
        options: &ListenOptions,
    ) -> mqrpc::Result<Box<dyn Consumer>> {
        *self.budget.lock().expect("lock") = Some(options.budget.clone());
        self.inner.listen(target, options).await
    }

    async fn reply_queue(&self) -> mqrpc::Result<ReplyQueue> {
        self.inner.reply_queue().await
    }
}
