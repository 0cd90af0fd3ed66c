//! Callers of the AMQP and Redis baselines waiting for their replies, by correlation
//! id: one reader task per client hands each reply to the call that waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{Result, anyhow};
use bytes::Bytes;
use tokio::sync::oneshot;

/// Callers waiting for their reply, by correlation id. `None` once the reply reader has
/// stopped: no reply can come any more.
#[derive(Default)]
pub(super) struct Waiters(Mutex<Option<HashMap<String, oneshot::Sender<Bytes>>>>);

impl Waiters {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Waiters(Mutex::new(Some(HashMap::new()))))
    }

    fn lock(&self) -> MutexGuard<'_, Option<HashMap<String, oneshot::Sender<Bytes>>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts waiting for the reply with correlation id `id`.
    pub(super) fn register(self: &Arc<Self>, id: &str) -> Result<Waiting> {
        let (tx, rx) = oneshot::channel();
        self.lock()
            .as_mut()
            .ok_or_else(|| anyhow!("the reply reader has stopped"))?
            .insert(id.to_owned(), tx);
        Ok(Waiting {
            waiters: self.clone(),
            id: id.to_owned(),
            rx,
            done: false,
        })
    }

    /// Hands `body` to whoever waits for `id` (replies nobody waits for are dropped).
    pub(super) fn resolve(&self, id: &str, body: Bytes) {
        let tx = self.lock().as_mut().and_then(|waiting| waiting.remove(id));
        if let Some(tx) = tx {
            let _ = tx.send(body);
        }
    }

    /// The reply reader stopped: fails every waiting call and every later one.
    fn close(&self) {
        self.lock().take();
    }
}

/// Closes the [`Waiters`] when the reader task holding it ends, however it ends.
pub(super) struct CloseOnDrop(pub(super) Arc<Waiters>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// One call waiting for its reply; stops waiting (forgets its id) when dropped.
pub(super) struct Waiting {
    waiters: Arc<Waiters>,
    id: String,
    rx: oneshot::Receiver<Bytes>,
    done: bool,
}

impl Waiting {
    pub(super) async fn reply(mut self) -> Result<Bytes> {
        let body = (&mut self.rx)
            .await
            .map_err(|_| anyhow!("the reply reader stopped before the reply came"))?;
        self.done = true;
        Ok(body)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(waiting) = self.waiters.lock().as_mut() {
            waiting.remove(&self.id);
        }
    }
}
