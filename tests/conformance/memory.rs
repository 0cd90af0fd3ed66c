//! The conformance suite on the in-process bus. Each test gets a bus of its own name,
//! reached through `mqrpc::connect` like any backend.

use std::sync::Arc;

use mqrpc::Transport;

use crate::suite::Backend;

async fn backend() -> Option<Backend> {
    let url = format!("memory://conformance-{}", mqrpc::wire::new_id());
    // Keep one transport alive so the named bus lives as long as the test.
    let anchor = mqrpc::connect(&url).await.expect("memory bus");
    Some(Backend::new("memory", move || {
        let url = url.clone();
        let anchor: Arc<dyn Transport> = anchor.clone();
        async move {
            let _ = &anchor;
            mqrpc::connect(&url).await.expect("memory bus")
        }
    }))
}

conformance_suite!(backend);
