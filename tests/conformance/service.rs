//! The test service every conformance case talks to, and the recorder that lets a
//! case see which server handled what, waiting on events instead of sleeping.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqrpc::{Context, Endpoint, RemoteError, Version};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, watch};

/// The version every test server implements.
pub const SERVICE_VERSION: Version = Version::new(1, 3);

/// What the servers of one test saw.
pub struct Recorder {
    records: Mutex<Vec<(String, u64)>>,
    count: watch::Sender<usize>,
    /// Signalled each time a `sleep` or `delayed_echo` handler starts.
    pub started: Notify,
    /// Set if `_private` ever ran.
    pub private_called: AtomicBool,
    in_flight: AtomicUsize,
    /// Most handlers of `sleep` seen running at once.
    pub max_in_flight: AtomicUsize,
    /// Items the `endless` streams produced so far.
    pub streamed: AtomicUsize,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder {
            records: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
            started: Notify::new(),
            private_called: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            streamed: AtomicUsize::new(0),
        })
    }

    fn record(&self, server: &str, id: u64) {
        self.records
            .lock()
            .expect("recorder lock")
            .push((server.to_owned(), id));
        self.count.send_modify(|n| *n += 1);
    }

    /// Waits until at least `n` records exist; panics after `limit`.
    pub async fn wait_for(&self, n: usize, limit: Duration) {
        let mut rx = self.count.subscribe();
        let reached = tokio::time::timeout(limit, rx.wait_for(|count| *count >= n))
            .await
            .is_ok();
        assert!(
            reached,
            "only {} of {n} expected records after {limit:?}",
            *rx.borrow()
        );
    }

    /// Waits `settle` so that duplicates would have time to show, then returns the
    /// records.
    pub async fn settled(&self, settle: Duration) -> Vec<(String, u64)> {
        tokio::time::sleep(settle).await;
        self.records.lock().expect("recorder lock").clone()
    }

    /// The ids recorded, in order, after waiting `settle` (see [`Recorder::settled`]).
    pub async fn settled_ids(&self, settle: Duration) -> Vec<u64> {
        self.settled(settle)
            .await
            .into_iter()
            .map(|(_, id)| id)
            .collect()
    }

    /// How many times each id was recorded.
    pub fn per_id(records: &[(String, u64)]) -> HashMap<u64, usize> {
        let mut counts = HashMap::new();
        for (_, id) in records {
            *counts.entry(*id).or_default() += 1;
        }
        counts
    }
}

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

#[derive(Deserialize)]
struct EchoArgs {
    payload: Value,
}

#[derive(Deserialize)]
struct SleepArgs {
    seconds: f64,
}

#[derive(Deserialize)]
struct DelayedEchoArgs {
    seconds: f64,
    payload: Value,
}

#[derive(Deserialize)]
struct RecordArgs {
    id: u64,
}

#[derive(Deserialize)]
struct SlowRecordArgs {
    id: u64,
    seconds: f64,
}

#[derive(Deserialize)]
struct CountArgs {
    n: u64,
}

#[derive(Deserialize)]
struct EndlessArgs {
    interval_ms: u64,
}

/// Arguments whose `Deserialize` panics (a `deserialize_with` that unwraps).
#[derive(Deserialize)]
struct PanickyArgs {
    #[serde(deserialize_with = "panicking")]
    #[allow(dead_code)]
    value: u64,
}

fn panicking<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let text = String::deserialize(deserializer)?;
    Ok(text
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {text}")))
}

#[derive(Deserialize)]
struct FailArgs {
    kind: String,
}

/// A typed error, to check it comes back as the same type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServiceError {
    /// A unit variant.
    Refused,
    /// A struct variant with data.
    OutOfRange { value: i64, max: i64 },
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceError::Refused => f.write_str("refused"),
            ServiceError::OutOfRange { value, max } => write!(f, "{value} is above {max}"),
        }
    }
}

/// The endpoint of a test server called `server`.
pub fn endpoint(server: &str, recorder: &Arc<Recorder>) -> Endpoint {
    let name = server.to_owned();
    let rec = recorder.clone();
    let rec_sleep = recorder.clone();
    let rec_delay = recorder.clone();
    let rec_private = recorder.clone();
    let rec_slow = recorder.clone();
    let rec_stream = recorder.clone();
    let slow_name = server.to_owned();
    Endpoint::new()
        .version(SERVICE_VERSION)
        .method("add", |_ctx: Context, args: AddArgs| async move {
            Ok::<_, RemoteError>(args.a + args.b)
        })
        .method("echo", |_ctx: Context, args: EchoArgs| async move {
            Ok::<_, RemoteError>(args.payload)
        })
        .method("context", |ctx: Context, _args: mqrpc::NoArgs| async move {
            Ok::<_, RemoteError>(ctx)
        })
        .method("whoami", {
            let name = name.clone();
            move |_ctx: Context, _args: mqrpc::NoArgs| {
                let name = name.clone();
                async move { Ok::<_, RemoteError>(name) }
            }
        })
        .method("record", move |_ctx: Context, args: RecordArgs| {
            rec.record(&name, args.id);
            async move { Ok::<_, RemoteError>(()) }
        })
        .method("sleep", move |_ctx: Context, args: SleepArgs| {
            let rec = rec_sleep.clone();
            async move {
                let now = rec.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                rec.max_in_flight.fetch_max(now, Ordering::SeqCst);
                rec.started.notify_one();
                tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
                rec.in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, RemoteError>(args.seconds)
            }
        })
        .method(
            "delayed_echo",
            move |_ctx: Context, args: DelayedEchoArgs| {
                let rec = rec_delay.clone();
                async move {
                    rec.started.notify_one();
                    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
                    Ok::<_, RemoteError>(args.payload)
                }
            },
        )
        .method("fail", |_ctx: Context, args: FailArgs| async move {
            let error = match args.kind.as_str() {
                "refused" => ServiceError::Refused,
                _ => ServiceError::OutOfRange { value: 11, max: 10 },
            };
            Err::<(), _>(error)
        })
        .method(
            "value_error",
            |_ctx: Context, _args: mqrpc::NoArgs| async move {
                Err::<(), _>(RemoteError::new("ValueError", "bad value"))
            },
        )
        .method("panic", |_ctx: Context, _args: mqrpc::NoArgs| async move {
            if true {
                panic!("deliberate test panic");
            }
            Ok::<(), RemoteError>(())
        })
        .method("slow_record", move |_ctx: Context, args: SlowRecordArgs| {
            rec_slow.record(&slow_name, args.id);
            async move {
                tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
                Ok::<_, RemoteError>(args.id)
            }
        })
        .method("_private", move |_ctx: Context, _args: mqrpc::NoArgs| {
            rec_private.private_called.store(true, Ordering::SeqCst);
            async move { Ok::<_, RemoteError>("private") }
        })
        .method(
            "decode_panic",
            |_ctx: Context, _args: PanickyArgs| async move { Ok::<_, RemoteError>(()) },
        )
        .stream_method("endless", move |_ctx: Context, args: EndlessArgs| {
            let rec = rec_stream.clone();
            let interval = Duration::from_millis(args.interval_ms);
            futures::stream::unfold(0u64, move |i| {
                let rec = rec.clone();
                async move {
                    tokio::time::sleep(interval).await;
                    rec.streamed.fetch_add(1, Ordering::SeqCst);
                    Some((Ok::<u64, RemoteError>(i), i + 1))
                }
            })
        })
        .stream_method("count", |_ctx: Context, args: CountArgs| {
            futures::stream::iter((0..args.n).map(Ok::<u64, RemoteError>))
        })
        .stream_method("count_then_fail", |_ctx: Context, args: CountArgs| {
            futures::stream::iter((0..=args.n).map(move |i| {
                if i < args.n {
                    Ok(i)
                } else {
                    Err(ServiceError::Refused)
                }
            }))
        })
}
