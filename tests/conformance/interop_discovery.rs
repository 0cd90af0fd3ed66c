//! "Who is there" with Python oslo.messaging on one RabbitMQ: a Python client pings
//! an mqrpc server with oslo's `oslo_rpc_server_ping` and gets what a Python server
//! with `rpc_ping_enabled` answers, and an mqrpc discovery on a topic that a Python
//! server shares hears that server's refusal beside the mqrpc server's status.

use std::time::Duration;

use futures::StreamExt;
use mqrpc::wire::OSLO_PING_METHOD;
use mqrpc::{Client, DiscoveryWait, Error, Server, Target};
use serde_json::{Value, json};

use crate::interop_amqp::{Peer, oslo_url, python, python_server_with};
use crate::service::{self, Recorder};

/// How long the Python side waits for one answer.
const ANSWER: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_interop_python_client_pings_mqrpc_server() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = python() else { return };
    let topic = format!("interop_ping_{}", &mqrpc::wire::new_id()[..12]);
    let transport = mqrpc::connect(&crate::amqp::url()).await.expect("RabbitMQ");
    let recorder = Recorder::new();
    // The test service (version 1.3, null namespace) and oslo's ping, like the Python
    // server beside it: its own endpoint at 1.3 and rpc_ping_enabled.
    let server = Server::builder(transport.clone(), Target::new(&topic).server("rs1"))
        .endpoint(service::endpoint("rs1", &recorder))
        .oslo_ping(true)
        .start()
        .await
        .expect("server");
    let py_server = python_server_with(&python, &topic, "py1", &["--rpc-ping"]).await;
    let url = oslo_url();
    let mut client = Peer::spawn(&python, &["client", "--url", &url, "--topic", &topic]);

    let mut asked = 0;
    let requests = [
        json!({}),
        json!({"args": {"who": "python", "n": 1}}),
        json!({"namespace": "ns1"}),
        json!({"version": "1.1"}),
    ];
    let mut by_server = Vec::new();
    for server in ["rs1", "py1"] {
        let mut outcomes = Vec::new();
        for request in &requests {
            let mut request = request.clone();
            request["server"] = json!(server);
            outcomes.push(ping(&mut client, &mut asked, request).await);
        }
        by_server.push(outcomes);
    }
    let expected = [
        json!("pong"),
        json!("pong"),
        json!({"error": "RemoteError", "class": "UnsupportedVersion"}),
        json!({"error": "RemoteError", "class": "NoSuchMethod"}),
    ];
    assert_eq!(by_server[0], expected, "the mqrpc server");
    assert_eq!(by_server[1], expected, "the Python server, for comparison");
    // To the topic: either server answers.
    let to_topic = ping(&mut client, &mut asked, json!({})).await;
    assert_eq!(to_topic, json!("pong"));
    client.finish().await;

    // A discovery reaches both through the fanout: the mqrpc server's status, and
    // the Python server's refusal of a namespace it does not serve.
    let asker = Client::new(transport, Target::new(&topic));
    let wait = DiscoveryWait::new(ANSWER).quiet(ANSWER).expect(2);
    let answers: Vec<_> = asker
        .discover(wait)
        .await
        .expect("the request is sent")
        .collect()
        .await;
    let statuses: Vec<_> = (answers.iter().filter_map(|a| a.as_ref().ok()))
        .map(|d| (d.status.server.as_str(), d.status.oslo_ping))
        .collect();
    assert_eq!(statuses, [("rs1", true)], "{answers:?}");
    let refusals: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        matches!(refusals[..], [Error::UnsupportedVersion { .. }]),
        "{answers:?}"
    );
    asker.close().await;
    server.shutdown().await.expect("stops");
    py_server.finish().await;
}

/// Has the Python client call `oslo_rpc_server_ping` as `request` says (its
/// server, namespace, version, arguments); returns the result, or the error it
/// raised as `{"error": its class, "class": the remote class}` (oslo rebuilds the
/// dispatcher's errors as a `RemoteError` unless told to allow their module).
async fn ping(client: &mut Peer, asked: &mut u64, mut request: Value) -> Value {
    *asked += 1;
    request["id"] = json!(*asked);
    request["method"] = json!(OSLO_PING_METHOD);
    request["timeout"] = json!(20);
    client.send(&request).await;
    let answer = client.next(ANSWER).await;
    assert_eq!(answer["id"], json!(*asked), "{answer}");
    match answer.get("ok") {
        Some(ok) => ok.clone(),
        None => json!({"error": answer["error"]["type"], "class": answer["error"]["exc_type"]}),
    }
}
