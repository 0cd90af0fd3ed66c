//! `mqrpc serve --health-addr`: the server's health over HTTP, for orchestrators'
//! probes. `GET /health` (or `/`) answers `200 OK` while the server is consuming and
//! `503 Service Unavailable` while it is starting, reconnecting, stopping or stopped,
//! with a small JSON body either way:
//!
//! ```text
//! {"state":"consuming","since_last_delivery_ms":1520,"in_state_ms":60210,
//!  "reconnections":0,"topic":"compute","server":"host-1"}
//! ```
//!
//! A minimal HTTP/1.1 responder on tokio, not a web framework: one request per
//! connection (`Connection: close`), a request head of at most [`MAX_HEAD`] bytes
//! read within [`IO_LIMIT`], at most [`MAX_CONNECTIONS`] connections at once (more
//! are closed unanswered). Anything else gets a plain status: 400 for a malformed
//! request, 404 for another path, 405 for another method, 431 for a head too large.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, Result};
use mqrpc::{Health, HealthProbe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The largest request head read (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// How long a connection may take to send its request head, and to take the answer.
const IO_LIMIT: Duration = Duration::from_secs(5);
/// The most bytes read and dropped after the answer, before closing.
const MAX_DRAIN: usize = 64 * 1024;
/// Connections served at once; a probe needs one.
const MAX_CONNECTIONS: usize = 32;

/// The health endpoint: listening from [`HealthEndpoint::bind`], answering "starting"
/// until [`HealthEndpoint::serve`] gives it the server's probe.
pub(crate) struct HealthEndpoint {
    addr: SocketAddr,
    probe: Arc<OnceLock<HealthProbe>>,
}

/// What the body names besides the health.
struct Labels {
    topic: String,
    server: String,
}

impl HealthEndpoint {
    /// Listens on `addr` (port 0: a free one) and answers from now on, until the
    /// process ends.
    pub(crate) async fn bind(addr: SocketAddr, topic: &str, server: &str) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-addr: cannot listen on {addr}"))?;
        let addr = listener.local_addr().context("--health-addr")?;
        let probe = Arc::new(OnceLock::new());
        let labels = Arc::new(Labels {
            topic: topic.to_owned(),
            server: server.to_owned(),
        });
        tokio::spawn(accept(listener, probe.clone(), labels));
        Ok(HealthEndpoint { addr, probe })
    }

    /// The address it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reports the health of the server `probe` belongs to from now on.
    pub(crate) fn serve(&self, probe: HealthProbe) {
        let _ = self.probe.set(probe);
    }
}

async fn accept(listener: TcpListener, probe: Arc<OnceLock<HealthProbe>>, labels: Arc<Labels>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, say: the next accept may work.
                tracing::warn!(error = %err, "health endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Closed at once when every slot is taken: a flood of idle connections
        // costs no more than MAX_CONNECTIONS tasks.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (probe, labels) = (probe.clone(), labels.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let health = || probe.get().map(HealthProbe::health);
            if let Err(err) = answer(stream, health, &labels).await {
                tracing::debug!(error = %err, "health endpoint: request not answered");
            }
        });
    }
}

/// Reads one request and answers it.
async fn answer(
    mut stream: TcpStream,
    health: impl Fn() -> Option<Health>,
    labels: &Labels,
) -> std::io::Result<()> {
    let response = match tokio::time::timeout(IO_LIMIT, read_head(&mut stream)).await {
        Ok(Ok(head)) => respond(&head, health, labels),
        Ok(Err(err)) => return Err(err),
        Err(_) => return Ok(()), // too slow: closed unanswered
    };
    tokio::time::timeout(IO_LIMIT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await?;
        // What the client still sends (the rest of a head too large) is read and
        // dropped until it closes: closing with unread bytes would reset the
        // connection, and the client could lose the answer.
        let mut sink = [0u8; 1024];
        let mut left = MAX_DRAIN;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok(())
    })
    .await
    .unwrap_or(Ok(()))
}

/// The request head as read: complete, or cut at [`MAX_HEAD`] bytes.
enum Head {
    Complete(Vec<u8>),
    TooLarge,
}

/// Reads up to the blank line that ends the request head.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // The peer closed before the head ended: answer what came (a bare
            // request line from `printf 'GET / HTTP/1.0\n' | nc` still works).
            return Ok(Head::Complete(head));
        }
        head.extend_from_slice(&chunk[..n]);
        if head_end(&head).is_some() {
            return Ok(Head::Complete(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the blank line ending a request head is, if it came.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    crlf.into_iter().chain(lf).min()
}

/// The whole response to a request head.
fn respond(head: &Head, health: impl Fn() -> Option<Health>, labels: &Labels) -> Vec<u8> {
    let head = match head {
        Head::Complete(head) => head,
        Head::TooLarge => return plain(431, "Request Header Fields Too Large", true),
    };
    let Some((method, path)) = request_line(head) else {
        return plain(400, "Bad Request", true);
    };
    let with_body = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return plain(405, "Method Not Allowed", with_body);
    }
    if !matches!(path, "/" | "/health") {
        return plain(404, "Not Found", with_body);
    }
    let health = health();
    let (status, reason) = match &health {
        Some(health) if health.state.is_consuming() => (200, "OK"),
        _ => (503, "Service Unavailable"),
    };
    let body = body(health.as_ref(), labels);
    response(status, reason, "application/json", &body, with_body)
}

/// The method and the path (without a query) of a well-formed HTTP/1.x request
/// line.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !matches!(version, "HTTP/1.0" | "HTTP/1.1")
    {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some((method, path))
}

/// The JSON body: the health, or `starting` before the server has started.
fn body(health: Option<&Health>, labels: &Labels) -> String {
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut body = match health {
        Some(health) => serde_json::json!({
            "state": health.state.as_str(),
            "since_last_delivery_ms": health.since_last_delivery.map(millis),
            "in_state_ms": millis(health.in_state_for),
            "reconnections": health.reconnections,
        }),
        None => serde_json::json!({"state": "starting"}),
    };
    body["topic"] = labels.topic.as_str().into();
    body["server"] = labels.server.as_str().into();
    body.to_string()
}

/// A response with a one-line text body naming the status.
fn plain(status: u16, reason: &str, with_body: bool) -> Vec<u8> {
    let body = format!("{status} {reason}\n");
    response(
        status,
        reason,
        "text/plain; charset=utf-8",
        &body,
        with_body,
    )
}

fn response(status: u16, reason: &str, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqrpc::{HealthState, Server, Target};

    fn labels() -> Labels {
        Labels {
            topic: "t".to_owned(),
            server: "s1".to_owned(),
        }
    }

    /// Sends `request` raw to the endpoint and reads the whole answer.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("send");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("answer");
        String::from_utf8(answer).expect("text")
    }

    fn status_of(answer: &str) -> &str {
        answer.split(' ').nth(1).unwrap_or("")
    }

    #[test]
    fn request_lines_are_parsed_strictly() {
        fn line(text: &str) -> Option<(&str, &str)> {
            request_line(text.as_bytes())
        }
        assert_eq!(
            line("GET /health HTTP/1.1\r\n\r\n"),
            Some(("GET", "/health"))
        );
        assert_eq!(line("HEAD /?x=1 HTTP/1.0\n\n"), Some(("HEAD", "/")));
        for bad in [
            "",
            "GET\r\n\r\n",
            "GET /health\r\n\r\n",
            "GET  /health HTTP/1.1\r\n\r\n",
            "GET /health HTTP/2\r\n\r\n",
            "GET health HTTP/1.1\r\n\r\n",
            "get /health HTTP/1.1\r\n\r\n",
            "GET /health HTTP/1.1 extra\r\n\r\n",
            "\u{0}\u{1}\u{2}",
        ] {
            assert_eq!(line(bad), None, "{bad:?}");
        }
        assert_eq!(request_line(&[0xff, 0xfe, b'\n']), None);
    }

    #[test]
    fn before_the_server_starts_the_endpoint_says_starting() {
        let answer = |health: Option<Health>| {
            let head = Head::Complete(b"GET /health HTTP/1.1\r\n\r\n".to_vec());
            String::from_utf8(respond(&head, || health.clone(), &labels())).expect("text")
        };
        let starting = answer(None);
        assert!(starting.starts_with("HTTP/1.1 503 "), "{starting}");
        assert!(starting.contains(r#""state":"starting""#), "{starting}");
        assert!(starting.contains(r#""server":"s1""#), "{starting}");
    }

    #[tokio::test]
    async fn a_live_endpoint_answers_health_and_refuses_bad_requests() {
        let endpoint = HealthEndpoint::bind("127.0.0.1:0".parse().expect("addr"), "t", "s1")
            .await
            .expect("bind");
        let addr = endpoint.addr();
        let before = exchange(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status_of(&before), "503", "{before}");

        let transport = mqrpc::connect("memory://").await.expect("memory bus");
        let server = Server::builder(transport, Target::new("t").server("s1"))
            .start()
            .await
            .expect("server");
        endpoint.serve(server.health_probe());
        let consuming = exchange(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status_of(&consuming), "200", "{consuming}");
        let body = consuming.split("\r\n\r\n").nth(1).expect("a body");
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(json["state"], "consuming");
        assert_eq!(json["since_last_delivery_ms"], serde_json::Value::Null);
        assert_eq!(json["reconnections"], 0);
        assert_eq!(json["topic"], "t");
        let head = exchange(addr, b"HEAD / HTTP/1.0\r\n\r\n").await;
        assert_eq!(status_of(&head), "200", "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body for HEAD: {head}");

        let requests: [(&[u8], &str); 4] = [
            (b"POST /health HTTP/1.1\r\n\r\n", "405"),
            (b"GET /metrics HTTP/1.1\r\n\r\n", "404"),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                "400",
            ),
            (b"GET /health\r\n\r\n", "400"),
        ];
        for (request, status) in requests {
            let answer = exchange(addr, request).await;
            assert_eq!(status_of(&answer), status, "{request:?}: {answer}");
        }
        let mut huge = b"GET /health HTTP/1.1\r\nX: ".to_vec();
        huge.resize(20_000, b'a');
        let answer = exchange(addr, &huge).await;
        assert_eq!(status_of(&answer), "431", "{answer}");

        let probe = server.health_probe();
        server.shutdown().await.expect("shutdown");
        assert_eq!(probe.health().state, HealthState::Stopped);
        let stopped = exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(status_of(&stopped), "503", "{stopped}");
        assert!(stopped.contains(r#""state":"stopped""#), "{stopped}");
    }
}
