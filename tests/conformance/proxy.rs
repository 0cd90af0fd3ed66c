//! A TCP fault proxy owned by a test, on loopback: how fault tests break a client's
//! link to the broker without touching the machine's shared broker. It passes traffic,
//! cuts every connection, black-holes (holds every byte, in both directions, until
//! released: a partition the peers cannot tell from a dead link), and adds latency.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the proxy does with the bytes passing through.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Conditions {
    black_hole: bool,
    latency: Duration,
}

pub struct TcpProxy {
    addr: SocketAddr,
    generation: Arc<Mutex<CancellationToken>>,
    conditions: watch::Sender<Conditions>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let (conditions, watching) = watch::channel(Conditions::default());
        let current = generation.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let cut = current.lock().expect("proxy lock").clone();
                let watching = watching.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = pump(in_read, out_write, watching.clone()) => {}
                        _ = pump(out_read, in_write, watching) => {}
                    }
                    // Every half drops here: each side sees its connection closed.
                });
            }
        });
        TcpProxy {
            addr,
            generation,
            conditions,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:<port>`, as the transports describe it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// Closes every connection open through the proxy; new ones are accepted.
    pub fn cut(&self) {
        let mut current = self.generation.lock().expect("proxy lock");
        current.cancel();
        *current = CancellationToken::new();
    }

    /// Holds every byte (new connections are accepted but hear nothing) until
    /// `black_hole(false)` lets the held bytes through again.
    pub fn black_hole(&self, on: bool) {
        self.conditions.send_modify(|c| c.black_hole = on);
    }

    /// Delays every chunk of data by `latency` (zero passes at once).
    pub fn latency(&self, latency: Duration) {
        self.conditions.send_modify(|c| c.latency = latency);
    }
}

/// Copies one direction, honouring the conditions before writing each chunk.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut conditions: watch::Receiver<Conditions>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let latency = match conditions.wait_for(|c| !c.black_hole).await {
            Ok(c) => c.latency,
            Err(_) => return,
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.generation.lock().expect("proxy lock").cancel();
    }
}
