//! A TCP proxy owned by a test, on loopback, that can cut every connection passing
//! through it: how fault tests break a client's link to the broker without touching
//! the machine's shared broker.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TcpProxy {
    addr: SocketAddr,
    generation: Arc<Mutex<CancellationToken>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let current = generation.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let cut = current.lock().expect("proxy lock").clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                    // Both sockets drop here: each side sees its connection closed.
                });
            }
        });
        TcpProxy {
            addr,
            generation,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes every connection open through the proxy; new ones are accepted.
    pub fn cut(&self) {
        let mut current = self.generation.lock().expect("proxy lock");
        current.cancel();
        *current = CancellationToken::new();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.generation.lock().expect("proxy lock").cancel();
    }
}
