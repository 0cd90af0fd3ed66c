//! What a server and a client write to the log about what peers send: text from the
//! network is escaped (a line break in a method name cannot forge a second line),
//! and a flood of refused messages writes one warning per interval with a count,
//! on a server and on a client's reply queue.

use std::time::Duration;

use mqrpc::transport::ListenOptions;
use mqrpc::transport::{Address, Outgoing};
use mqrpc::{Client, Context, Endpoint, RemoteError, Server, Target};
use serde_json::json;

use crate::redaction::Captured;

const FORGED: &str = "2026-12-06T00:00:00.000000Z ERROR mqrpc: forged";

/// Runs `body` on a current-thread runtime with every log line of it captured.
fn captured(body: impl std::future::Future<Output = ()>) -> String {
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(log.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(body);
    drop(runtime);
    log.text()
}

fn assert_no_forged_line(log: &str) {
    for line in log.lines() {
        assert!(
            !line.starts_with(FORGED),
            "a forged line in the log:\n{log}"
        );
    }
}

#[test]
fn peer_text_is_escaped_and_refusals_are_throttled_on_a_server() {
    let log = captured(async {
        let url = format!("memory://logs-{}", mqrpc::wire::new_id());
        let transport = mqrpc::connect(&url).await.expect("memory bus");
        let topic = format!("logs_{}", &mqrpc::wire::new_id()[..8]);
        let endpoint = Endpoint::new()
            .method("add", |_ctx: Context, args: (i64, i64)| async move {
                Ok::<_, RemoteError>(args.0 + args.1)
            });
        let server = Server::builder(transport.clone(), Target::new(&topic).server("s1"))
            .endpoint(endpoint)
            .start()
            .await
            .expect("server");
        let client =
            Client::new(transport.clone(), Target::new(&topic)).timeout(Duration::from_secs(10));
        // A method name and an argument carrying a line break and a forged line.
        let method = format!("nope\n{FORGED}");
        client
            .cast(
                &Context::new(),
                &method,
                json!({"x": format!("\n{FORGED}")}),
            )
            .await
            .expect("cast");
        let err = client
            .call::<_, ()>(&Context::new(), &method, json!({}))
            .await
            .expect_err("no such method");
        assert!(err.to_string().contains("nope"), "{err}");
        // A flood of malformed messages.
        let publisher = transport.publisher().await.expect("publisher");
        let address = Address::Topic {
            exchange: transport.default_exchange().to_owned(),
            topic: topic.clone(),
        };
        for i in 0..50 {
            let body = format!("not json {i}\n{FORGED}");
            publisher
                .send(&address, Outgoing::new(body.into_bytes()))
                .await
                .expect("send");
        }
        // The server still answers, after every malformed message was taken.
        let err = client
            .call::<_, ()>(&Context::new(), "still_there", json!({}))
            .await
            .expect_err("no such method");
        assert!(err.to_string().contains("still_there"), "{err}");
        server.shutdown().await.expect("shutdown");
    });
    assert_no_forged_line(&log);
    // The method is in the log, escaped.
    assert!(log.contains(&format!("nope\\n{FORGED}")), "{log}");
    let warnings = log.matches("rejecting malformed message").count();
    assert_eq!(warnings, 1, "one warning for the flood, not 50:\n{log}");
}

#[test]
fn refused_replies_are_throttled_on_a_clients_reply_queue() {
    let log = captured(async {
        let url = format!("memory://logs-{}", mqrpc::wire::new_id());
        let transport = mqrpc::connect(&url).await.expect("memory bus");
        let topic = format!("logs_{}", &mqrpc::wire::new_id()[..8]);
        // A hand-made server: it reads the request and floods the caller's reply
        // queue before answering properly.
        let mut consumer = transport
            .listen(&Target::new(&topic).server("s1"), &ListenOptions::new(4))
            .await
            .expect("listen");
        let client =
            Client::new(transport.clone(), Target::new(&topic)).timeout(Duration::from_secs(10));
        let call = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .call::<_, i64>(&Context::new(), "add", json!({}))
                    .await
            }
        });
        let delivery = consumer.recv().await.expect("a request").expect("delivery");
        let request = mqrpc::wire::decode_request(delivery.body()).expect("request");
        let reply_to = Address::Reply(request.reply_to.clone().expect("reply address"));
        let msg_id = request.msg_id.clone().expect("msg id");
        let publisher = transport.publisher().await.expect("publisher");
        for i in 0..30 {
            let body = format!("garbage {i}\n{FORGED}");
            publisher
                .send(&reply_to, Outgoing::new(body.into_bytes()))
                .await
                .expect("send");
        }
        let reply = mqrpc::wire::encode_reply(&mqrpc::wire::Reply::result(&msg_id, json!(7)))
            .expect("reply");
        publisher
            .send(&reply_to, Outgoing::new(reply))
            .await
            .expect("send");
        assert_eq!(call.await.expect("task").expect("answered"), 7);
    });
    assert_no_forged_line(&log);
    let warnings = log.matches("dropping malformed reply").count();
    assert_eq!(warnings, 1, "one warning for the flood, not 30:\n{log}");
}
