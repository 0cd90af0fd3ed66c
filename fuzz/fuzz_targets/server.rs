//! Any bytes published to a live server's topic on the in-process bus: the server
//! takes them as it takes a delivery (size check, decode, de-duplication, dispatch,
//! heartbeats the body asks for, replies to whatever address it names) and keeps
//! serving: a call made after each input is answered. A panic outside a handler
//! would end the server's receiving task, and that call would then time out.
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use rpc_core::transport::{Address, Outgoing, Publisher, Transport};
use rpc_core::{Client, Context, DEFAULT_EXCHANGE, Server, Target};
use serde_json::json;
use transport_memory::MemoryTransport;

const TOPIC: &str = "fuzz";

struct Harness {
    runtime: tokio::runtime::Runtime,
    publisher: Arc<dyn Publisher>,
    client: Client,
    _server: Server,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let (publisher, client, server) = runtime.block_on(async {
        let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
        let mut builder = Server::builder(transport.clone(), Target::new(TOPIC).server("s1"));
        for endpoint in rpc_core::fuzzing::endpoints() {
            builder = builder.endpoint(endpoint);
        }
        let server = builder.start().await.expect("a server");
        let client =
            Client::new(transport.clone(), Target::new(TOPIC)).timeout(Duration::from_secs(5));
        let publisher = transport.publisher().await.expect("a publisher");
        (publisher, client, server)
    });
    Harness {
        runtime,
        publisher,
        client,
        _server: server,
    }
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let harness = &*HARNESS;
    harness.runtime.block_on(async {
        let address = Address::Topic {
            exchange: DEFAULT_EXCHANGE.to_owned(),
            topic: TOPIC.to_owned(),
        };
        let body = bytes::Bytes::copy_from_slice(data);
        // Refused only for its size; whatever the body is, the server must go on.
        let _ = harness.publisher.send(&address, Outgoing::new(body)).await;
        let sum: i64 = harness
            .client
            .call(&Context::new(), "add", json!({"a": 1, "b": 2}))
            .await
            .expect("the server answers after any input");
        assert_eq!(sum, 3);
    });
});
