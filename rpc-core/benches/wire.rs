//! Micro-benchmarks of the wire format: encoding and decoding requests and replies as
//! oslo.messaging's envelope 2.0, at the payload sizes the benchmark tool uses.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rpc_core::Context;
use rpc_core::wire::{Reply, Request, decode_reply, decode_request, encode_reply, encode_request};
use serde_json::{Value, json};

fn request(size: usize) -> Request {
    Request {
        method: "echo".into(),
        args: json!({ "payload": "x".repeat(size) })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        version: Some("1.3".into()),
        context: Context::new()
            .with("user", "bench")
            .with("request_id", "req-1"),
        msg_id: Some(rpc_core::wire::new_id()),
        reply_to: Some(format!("reply_{}", rpc_core::wire::new_id())),
        unique_id: Some(rpc_core::wire::new_id()),
        ..Request::default()
    }
}

fn wire(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    for size in [100usize, 10 * 1024, 1024 * 1024] {
        let req = request(size);
        let body = encode_request(&req).unwrap_or_default();
        let reply = Reply::result("m", Value::String("x".repeat(size)));
        let reply_body = encode_reply(&reply).unwrap_or_default();
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode_request", size), &req, |b, req| {
            b.iter(|| encode_request(black_box(req)))
        });
        group.bench_with_input(
            BenchmarkId::new("decode_request", size),
            &body,
            |b, body| b.iter(|| decode_request(black_box(body))),
        );
        group.bench_with_input(
            BenchmarkId::new("encode_reply", size),
            &reply,
            |b, reply| b.iter(|| encode_reply(black_box(reply))),
        );
        group.bench_with_input(
            BenchmarkId::new("decode_reply", size),
            &reply_body,
            |b, body| b.iter(|| decode_reply(black_box(body))),
        );
    }
    group.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
