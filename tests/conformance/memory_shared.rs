//! The conformance suite on a memory bus shared between processes: one transport holds
//! the bus and shares it on a Unix socket, and every transport a case opens attaches
//! to it through that socket, as `mqrpc call` attaches to the bus of `mqrpc serve`.

use std::sync::Arc;

use mqrpc::shared_memory;
use mqrpc::{MemoryTransport, Transport};

use crate::suite::Backend;

/// A bus of its own name, shared on its socket: what a case's attached transports
/// reach.
struct Shared {
    /// The holder's own transport on the bus.
    bus: MemoryTransport,
    /// Sharing ends when this is dropped.
    sharing: shared_memory::SharedBus,
    name: String,
    path: std::path::PathBuf,
}

async fn shared() -> Shared {
    let name = format!("conformance-{}", mqrpc::wire::new_id());
    let path = shared_memory::socket_path(&name);
    let bus = MemoryTransport::named(&name);
    let sharing = bus.share(&path).await.expect("the bus is shared");
    Shared {
        bus,
        sharing,
        name,
        path,
    }
}

impl Shared {
    /// Puts `body` in the queue of `topic`, from the holder's side.
    async fn publish(&self, topic: &str, body: &'static [u8]) {
        use mqrpc::transport::{Address, Outgoing};

        let address = Address::Topic {
            exchange: mqrpc::DEFAULT_EXCHANGE.to_owned(),
            topic: topic.to_owned(),
        };
        let publisher = self.bus.publisher().await.expect("publisher");
        publisher
            .send(&address, Outgoing::new(body))
            .await
            .expect("sent");
    }
}

async fn backend() -> Option<Backend> {
    let Shared { sharing, path, .. } = shared().await;
    let sharing = Arc::new(sharing);
    Some(Backend::new("memory-shared", move || {
        let path = path.clone();
        let sharing = sharing.clone();
        async move {
            let _ = &sharing;
            let attached = shared_memory::attach(&path).await.expect("attached");
            Arc::new(attached) as Arc<dyn Transport>
        }
    }))
}

conformance_suite!(backend);

/// A server attached to a shared bus that goes away without settling what it took:
/// the holder puts the message back, and a server attached later handles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_taken_by_an_attached_process_that_went_away_is_delivered_again() {
    use mqrpc::transport::ListenOptions;

    let shared = shared().await;
    let target = mqrpc::Target::new("left").server("s1");
    shared.publish("left", b"only once").await;
    // The attached "process" is a runtime of its own on a thread: it takes the
    // message, and then it ends without settling it, which closes its socket as a
    // process's death would.
    let (path_there, target_there) = (shared.path.clone(), target.clone());
    let taken = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let first = shared_memory::attach(&path_there).await.expect("attached");
            let mut consumer = first
                .listen(&target_there, &ListenOptions::new(10))
                .await
                .expect("listening");
            let taken = consumer
                .recv()
                .await
                .expect("a delivery")
                .expect("no error");
            let body = taken.body().clone();
            std::mem::forget(taken);
            body
        })
    })
    .join()
    .expect("the attached process ran");
    assert_eq!(&taken[..], b"only once");

    let second = shared_memory::attach(&shared.path)
        .await
        .expect("attached again");
    let mut consumer = second
        .listen(&target, &ListenOptions::new(10))
        .await
        .expect("listening");
    let again = tokio::time::timeout(std::time::Duration::from_secs(5), consumer.recv())
        .await
        .expect("delivered again in time")
        .expect("a delivery")
        .expect("no error");
    assert_eq!(&again.body()[..], b"only once");
    again.ack().await.expect("acked");
}

/// When the holder stops sharing, an attached client's call fails at once with a
/// transport error that names the bus, instead of waiting out its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_client_learns_at_once_that_the_holder_went_away() {
    use std::time::{Duration, Instant};

    let Shared {
        sharing,
        name,
        path,
        ..
    } = shared().await;
    let attached: Arc<dyn Transport> =
        Arc::new(shared_memory::attach(&path).await.expect("attached"));
    let client =
        mqrpc::Client::new(attached, mqrpc::Target::new("gone")).timeout(Duration::from_secs(30));
    drop(sharing);
    assert!(!path.exists(), "the socket is removed");
    let started = Instant::now();
    let err = client
        .call::<_, serde_json::Value>(&mqrpc::Context::new(), "add", serde_json::json!({}))
        .await
        .expect_err("no holder");
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    assert!(err.to_string().contains(&name), "{err}");
    assert!(
        shared_memory::attach(&path).await.is_err(),
        "nothing to attach to"
    );
}

/// Bytes that are not frames of the protocol end the connection that sent them; the
/// holder goes on serving the processes attached to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_garbage_is_dropped_and_the_bus_serves_on() {
    use std::time::Duration;

    use mqrpc::{Client, Context, Endpoint, RemoteError, Server, Target};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let shared = shared().await;
    let path = &shared.path;
    let bus: Arc<dyn Transport> = Arc::new(shared.bus.clone());
    let endpoint = Endpoint::new().method("echo", |_ctx, args: serde_json::Value| async move {
        Ok::<_, RemoteError>(args)
    });
    let server = Server::builder(bus, Target::new("garbage").server("s1"))
        .endpoint(endpoint)
        .start()
        .await
        .expect("a server");

    // A frame without a header, a header that is no frame, and a frame longer than
    // the bus allows, each on a connection of its own.
    let too_long = u32::MAX.to_be_bytes();
    for bytes in [
        &b"\x00\x00\x00\x03abc"[..],
        &b"\x00\x00\x00\x0c{\"op\":\"x\"}\n."[..],
        &too_long[..],
    ] {
        let mut raw = tokio::net::UnixStream::connect(path)
            .await
            .expect("connects");
        raw.write_all(bytes).await.expect("written");
        let mut rest = Vec::new();
        // The holder said hello, then hung up (a reset is a hang-up too).
        let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest))
            .await
            .expect("the holder hangs up");
        assert!(
            String::from_utf8_lossy(&rest).contains("\"hello\""),
            "{rest:?}"
        );
    }

    let attached: Arc<dyn Transport> =
        Arc::new(shared_memory::attach(&path).await.expect("attached"));
    let client = Client::new(attached, Target::new("garbage")).timeout(Duration::from_secs(5));
    let answer: serde_json::Value = client
        .call(
            &Context::new(),
            "echo",
            serde_json::json!({"still": "here"}),
        )
        .await
        .expect("answered");
    assert_eq!(answer, serde_json::json!({"still": "here"}));
    server.shutdown().await.expect("stopped");
}

/// A delivery that reached an attached consumer after its `recv` was given up, and
/// was never taken before the consumer was dropped (or stopped), goes back to its
/// queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_an_attached_consumer_never_took_goes_back_to_its_queue() {
    untaken_delivery_goes_back(false).await;
}

/// As above, at `stop` already: other servers need not wait for the drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_a_stopped_attached_consumer_never_took_goes_back_at_once() {
    untaken_delivery_goes_back(true).await;
}

async fn untaken_delivery_goes_back(stop: bool) {
    use std::time::Duration;

    use mqrpc::transport::ListenOptions;

    let shared = shared().await;
    let (bus, path) = (&shared.bus, &shared.path);
    let target = mqrpc::Target::new("untaken").server("s1");
    let attached = shared_memory::attach(&path).await.expect("attached");
    let mut consumer = attached
        .listen(&target, &ListenOptions::new(10))
        .await
        .expect("listening");
    // The pull goes out; its answer comes after the caller stopped waiting.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), consumer.recv())
            .await
            .is_err(),
        "nothing was sent yet"
    );
    shared.publish("untaken", b"untaken").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bus.queued(mqrpc::DEFAULT_EXCHANGE, "untaken"), 0, "pulled");
    // Kept alive until the end when only stopped.
    let _kept = if stop {
        consumer.stop().await.expect("stopped");
        Some(consumer)
    } else {
        drop(consumer);
        None
    };

    let mut local = bus
        .listen(&target, &ListenOptions::new(10))
        .await
        .expect("listening here");
    let again = tokio::time::timeout(Duration::from_secs(5), local.recv())
        .await
        .expect("back in its queue")
        .expect("a delivery")
        .expect("no error");
    assert_eq!(&again.body()[..], b"untaken");
}

/// `SharedBus::idle_for` waits while a process is attached, and resolves once none
/// has been for the period (what lets a keeper of the bus exit on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_bus_is_idle_only_when_nobody_has_been_attached_for_the_period() {
    use std::time::Duration;

    let Shared { sharing, path, .. } = shared().await;
    let period = Duration::from_millis(200);
    let attached = shared_memory::attach(&path).await.expect("attached");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(sharing.attached(), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(600), sharing.idle_for(period))
            .await
            .is_err(),
        "not idle while a process is attached"
    );
    drop(attached);
    tokio::time::timeout(Duration::from_secs(5), sharing.idle_for(period))
        .await
        .expect("idle once nobody is attached");
    assert_eq!(sharing.attached(), 0);
}
