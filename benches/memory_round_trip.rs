//! Micro-benchmark of one call round trip on the in-process bus: client, encoding,
//! bus, server dispatch and reply, with no broker in the way.

#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use mqrpc::{Client, Context, Endpoint, RemoteError, Server, Target};
use serde_json::{Value, json};

fn round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let (client, server) = runtime.block_on(async {
        let transport = mqrpc::connect("memory://criterion")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let server = Server::builder(transport.clone(), Target::new("bench").server("s1"))
            .endpoint(
                Endpoint::new().method("echo", |_ctx: Context, args: Value| async move {
                    Ok::<_, RemoteError>(args)
                }),
            )
            .start()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (Client::new(transport, Target::new("bench")), server)
    });
    let args = json!({"payload": "x".repeat(100)});
    c.bench_function("memory call round trip (100 B)", |b| {
        b.to_async(&runtime).iter(|| async {
            let back: Value = client
                .call(&Context::new(), "echo", &args)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            back
        })
    });
    runtime.block_on(async { server.shutdown().await.unwrap_or_else(|e| panic!("{e}")) });
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
