//! Credentials never appear in `Debug` or `Display` of URLs' parsed configurations,
//! of transports, of errors, or in anything logged (issue #8). Every URL carries
//! one recognisable secret; the test parses it, connects with it (to a broker that
//! refuses it, or to a port where nothing listens), uses what connects, and searches
//! every rendering and the whole log, captured at `trace` level, for the secret.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqrpc::{Client, Context, Target};
use serde_json::json;

const SECRET: &str = "s3cr3t-Pa55w0rd";

/// A log sink the test reads back.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// An error and all its sources, as `Display` and `Debug`.
fn renderings(err: &mqrpc::Error) -> String {
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text += &format!(" {cause} {cause:?}");
        source = cause.source();
    }
    text
}

fn urls() -> Vec<String> {
    let mut urls = vec![format!("memory://bus?x={SECRET}")];
    if cfg!(feature = "amqp") {
        urls.extend([
            // The shared RabbitMQ refuses the password.
            format!("amqp://guest:{SECRET}@127.0.0.1:5672/"),
            format!("rabbit://u1:{SECRET}@127.0.0.1:1,u2:{SECRET}@127.0.0.1:2/vh"),
        ]);
    }
    if cfg!(feature = "redis") {
        urls.extend([
            // The shared Redis has no such user, and no password for the default one.
            format!("redis://mqrpc-nobody:{SECRET}@127.0.0.1:6379/0"),
            format!("redis://:{SECRET}@127.0.0.1:6379/0"),
            format!("rediss://:{SECRET}@127.0.0.1:1/"),
        ]);
    }
    if cfg!(feature = "nats") {
        urls.extend([
            format!("nats://user:{SECRET}@127.0.0.1:1"),
            // The shared NATS has no authorization: this one connects, and its call
            // (nobody listens) fails, all of it logged at trace level.
            format!("nats://user:{SECRET}@127.0.0.1:4222"),
            format!("tls://user:{SECRET}@127.0.0.1:1?tls_ca_file=/nonexistent/ca.pem"),
            format!("nats://{SECRET}@127.0.0.1:1"),
            format!("nats://127.0.0.1:1?token={SECRET}"),
        ]);
    }
    urls
}

/// Config `Debug` renderings of `url`, for the backends that parse it.
fn config_renderings(url: &str) -> String {
    let mut text = String::new();
    #[cfg(feature = "amqp")]
    if let Ok(config) = mqrpc::AmqpConfig::parse(url) {
        text += &format!("{config:?}");
    }
    #[cfg(feature = "redis")]
    if let Ok(config) = mqrpc::RedisConfig::parse(url) {
        text += &format!("{config:?}");
    }
    #[cfg(feature = "nats")]
    if let Ok(config) = mqrpc::NatsConfig::parse(url) {
        text += &format!("{config:?}");
    }
    text
}

#[tokio::test(flavor = "current_thread")]
async fn credentials_never_appear_in_debug_display_errors_or_logs() {
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    // The test runs on one thread, so everything it spawns logs here too.
    let _guard = tracing::subscriber::set_default(subscriber);
    let mut seen = String::new();
    for url in urls() {
        seen += &config_renderings(&url);
        match tokio::time::timeout(Duration::from_secs(30), mqrpc::connect(&url)).await {
            Ok(Err(err)) => seen += &renderings(&err),
            Ok(Ok(transport)) => {
                seen += &format!("{} {transport:?}", transport.describe());
                let client = Client::new(transport, Target::new("redaction"))
                    .timeout(Duration::from_millis(300));
                if let Err(err) = client
                    .call::<_, i64>(&Context::new(), "add", json!({"a": 1}))
                    .await
                {
                    seen += &renderings(&err);
                }
                seen += &format!("{client:?}");
            }
            Err(_) => panic!("connecting with {url:?} neither failed nor succeeded in 30 s"),
        }
        assert!(
            !seen.contains(SECRET),
            "the secret of {url:?} leaked into: {seen}"
        );
    }
    let logged = log.text();
    assert!(!logged.is_empty(), "the failures were logged");
    assert!(
        !logged.contains(SECRET),
        "the secret was logged: {}",
        logged
            .lines()
            .filter(|l| l.contains(SECRET))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "redaction: {} URLs, {} bytes of renderings and {} bytes of trace logs without the secret",
        urls().len(),
        seen.len(),
        logged.len()
    );
}
