//! One memory bus for several processes of one machine: the process that holds a bus
//! shares it on a Unix socket ([`MemoryTransport::share`]) and others [`attach`] to it,
//! so `mqrpc serve --url memory://demo` and `mqrpc call --url memory://demo` can run
//! as separate commands.
//!
//! The attached side is a whole [`Transport`]: its client encodes requests and its
//! server decodes them exactly as over a broker, and the socket carries the encoded
//! bytes and the settling of each delivery. The bus semantics stay the holder's: a
//! delivery an attached server took and had not settled when its process went away
//! goes back to its queue, as a dropped delivery does in one process.
//!
//! The socket lives in a directory only its user can enter (`$MQRPC_RUNTIME_DIR`, else
//! `$XDG_RUNTIME_DIR/mqrpc`, else `mqrpc-<uid>` in the temporary directory), and is
//! itself readable and writable by its user only.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use transport_memory::{MemoryTransport, shared};
//! let path = shared::socket_path("demo");
//! // In the process that holds the bus:
//! let bus = MemoryTransport::named("demo");
//! let _sharing = bus.share(&path).await?;
//! // In any other process of the same user:
//! let attached = shared::attach(&path).await?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rpc_core::{
    Acker, Address, CallHint, Capabilities, Consumer, Delivery, Error, ListenOptions, NoAck,
    Outgoing, Publisher, ReplyQueue, Result, Target, Transport,
};
use serde::{Deserialize, Serialize};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::MemoryTransport;

/// Room in a frame for its header, beyond the largest message the bus carries.
const HEADER_ROOM: usize = 64 * 1024;
/// How long [`attach`] waits for the holder to introduce itself.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket where the bus called `name` is shared by the `mqrpc` command line (the
/// unnamed bus of `memory://` is `default`): `memory-NAME.sock` in the runtime
/// directory described in the [module documentation](self).
pub fn socket_path(name: &str) -> PathBuf {
    // Bytes outside a small safe set are written as `%XX`, so no name leaves the
    // directory or collides with another.
    const KEPT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');
    let name = if name.is_empty() { "default" } else { name };
    runtime_dir().join(format!("memory-{}.sock", utf8_percent_encode(name, KEPT)))
}

fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MQRPC_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    // A runtime directory named but missing (a session that ended) is passed over.
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| Path::new(d).is_dir()) {
        return Path::new(&dir).join("mqrpc");
    }
    std::env::temp_dir().join(format!("mqrpc-{}", user_id()))
}

/// The user this process runs as.
fn user_id() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Creates the socket's directory for this user only, or checks that an existing one
/// belongs to this user: a directory another user owns could hand our clients a
/// socket of theirs.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != user_id() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory of this user (a link, or another user's)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Refuses a peer on the socket that runs as another user: only the user's own
/// processes share a bus, whatever the socket's directory allowed.
fn check_peer(stream: &UnixStream) -> io::Result<()> {
    let peer = stream.peer_cred()?.uid();
    if peer != user_id() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the process at the other end of the socket runs as user {peer}"),
        ));
    }
    Ok(())
}

fn codec(max_message_size: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_message_size.saturating_add(HEADER_ROOM))
        .new_codec()
}

// ---------------------------------------------------------------------------------
// The frames. Each is a JSON header, a newline, then the message body if any (JSON
// escapes newlines inside strings, so the first newline ends the header).

/// An error as the socket carries it: the kinds a caller acts on keep their variant,
/// the rest travel as their message.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum WireError {
    Undeliverable { address: String },
    NoResponders { address: String },
    MessageTooLarge { size: usize, limit: usize },
    InvalidTarget { message: String },
    Closed,
    Other { message: String },
}

impl From<Error> for WireError {
    fn from(err: Error) -> Self {
        match err {
            Error::Undeliverable { address } => WireError::Undeliverable { address },
            Error::NoResponders { address } => WireError::NoResponders { address },
            Error::MessageTooLarge { size, limit } => WireError::MessageTooLarge { size, limit },
            Error::InvalidTarget(message) => WireError::InvalidTarget { message },
            Error::Closed => WireError::Closed,
            other => WireError::Other {
                message: other.to_string(),
            },
        }
    }
}

impl From<WireError> for Error {
    fn from(err: WireError) -> Self {
        match err {
            WireError::Undeliverable { address } => Error::Undeliverable { address },
            WireError::NoResponders { address } => Error::NoResponders { address },
            WireError::MessageTooLarge { size, limit } => Error::MessageTooLarge { size, limit },
            WireError::InvalidTarget { message } => Error::InvalidTarget(message),
            WireError::Closed => Error::Closed,
            WireError::Other { message } => Error::transport_msg(
                rpc_core::TransportErrorKind::Other,
                format!("shared memory bus: {message}"),
            ),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Frame {
    // From the holder.
    /// The first frame on a connection.
    Hello {
        bus: String,
        max_message_size: usize,
        pid: u32,
    },
    /// Request `id` succeeded; a stream it opened, the address of a reply queue.
    Done {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
    },
    Failed {
        id: u64,
        error: WireError,
    },
    /// A delivery on a stream (the body follows); `delivery` names it for settling,
    /// absent when there is nothing to settle.
    Delivery {
        stream: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delivery: Option<u64>,
    },
    StreamError {
        stream: u64,
        error: WireError,
    },
    End {
        stream: u64,
    },

    // From an attached process.
    Send {
        id: u64,
        address: Address,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
        mandatory: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        msg_id: Option<String>,
    },
    Listen {
        id: u64,
        exchange: Option<String>,
        topic: String,
        server: String,
        prefetch: usize,
        settle_on_receipt: bool,
    },
    Monitor {
        id: u64,
        exchange: Option<String>,
        topic: String,
    },
    ReplyQueue {
        id: u64,
    },
    /// The attached consumer wants its next delivery.
    Pull {
        stream: u64,
    },
    Stop {
        id: u64,
        stream: u64,
    },
    Close {
        id: u64,
        stream: u64,
    },
    /// The attached consumer is gone.
    Drop {
        stream: u64,
    },
    Ack {
        id: u64,
        delivery: u64,
    },
    Reject {
        id: u64,
        delivery: u64,
        requeue: bool,
    },
    /// A delivery was dropped unsettled: the holder drops it too, which requeues it.
    Forget {
        delivery: u64,
    },
}

fn encode(frame: &Frame, body: &[u8]) -> Bytes {
    let header = serde_json::to_vec(frame).unwrap_or_default();
    let mut buf = BytesMut::with_capacity(header.len() + 1 + body.len());
    buf.put_slice(&header);
    buf.put_u8(b'\n');
    buf.put_slice(body);
    buf.freeze()
}

fn decode(mut frame: Bytes) -> io::Result<(Frame, Bytes)> {
    let end = frame
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a frame without a header"))?;
    let body = frame.split_off(end + 1);
    let header = serde_json::from_slice(&frame[..end])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((header, body))
}

/// The sending half of a connection: frames queue here and one task writes them.
#[derive(Clone)]
struct Outbox(mpsc::UnboundedSender<Bytes>);

impl Outbox {
    /// Queues a frame; false once the connection is gone.
    fn put(&self, frame: &Frame, body: &[u8]) -> bool {
        self.0.send(encode(frame, body)).is_ok()
    }

    fn reply(&self, id: u64, result: Result<()>) {
        let frame = match result {
            Ok(()) => Frame::Done {
                id,
                stream: None,
                address: None,
            },
            Err(err) => Frame::Failed {
                id,
                error: err.into(),
            },
        };
        self.put(&frame, &[]);
    }

    /// Starts the task that writes the queued frames to `write`, flushing whenever the
    /// queue runs dry.
    fn start(write: OwnedWriteHalf, max_message_size: usize) -> (Outbox, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let task = tokio::spawn(async move {
            let mut sink = FramedWrite::new(write, codec(max_message_size));
            while let Some(frame) = rx.recv().await {
                if sink.feed(frame).await.is_err() {
                    return;
                }
                while let Ok(frame) = rx.try_recv() {
                    if sink.feed(frame).await.is_err() {
                        return;
                    }
                }
                if SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
                    return;
                }
            }
        });
        (Outbox(tx), task)
    }
}

// ---------------------------------------------------------------------------------
// The holder's side.

/// A bus shared on a Unix socket; dropping it stops sharing, ends the connections of
/// attached processes and removes the socket.
#[derive(Debug)]
pub struct SharedBus {
    path: PathBuf,
    accept: JoinHandle<()>,
    /// Held while sharing; see [`MemoryTransport::share`].
    _lock: std::fs::File,
    /// How many processes are attached.
    attached: watch::Receiver<usize>,
}

impl SharedBus {
    /// The socket attached processes connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many connections of attached processes are open.
    pub fn attached(&self) -> usize {
        *self.attached.borrow()
    }

    /// Resolves once no process has been attached for `period` in a row: a holder
    /// that shares a bus only for others (a keeper) can stop then.
    pub async fn idle_for(&self, period: Duration) {
        let mut attached = self.attached.clone();
        loop {
            if attached.wait_for(|n| *n == 0).await.is_err() {
                return;
            }
            match tokio::time::timeout(period, attached.wait_for(|n| *n > 0)).await {
                Err(_) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
            }
        }
    }
}

impl Drop for SharedBus {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MemoryTransport {
    /// Shares this bus with other processes of the same user on the Unix socket at
    /// `path` (see [`socket_path`]); they reach it with [`attach`]. Fails with
    /// `AddrInUse` when a live process already shares a bus there (it holds a lock on
    /// `<path>.lock`, beside the socket); a socket left by a process that died is
    /// replaced. Only processes of the same user may attach. Must be called inside a
    /// tokio runtime.
    pub async fn share(&self, path: impl AsRef<Path>) -> io::Result<SharedBus> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            prepare_dir(dir)?;
        }
        // The holder keeps a lock beside the socket for as long as it shares: the
        // kernel drops it when the process dies, so a socket left behind is told from
        // a live one without a race between two processes that find it at once.
        let lock = take_lock(&lock_path(&path))?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another process already shares a bus at {}", path.display()),
            )
        })?;
        match std::fs::remove_file(&path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let bus = self.clone();
        let (count, attached) = watch::channel(0usize);
        let accept = tokio::spawn(async move {
            // Connections end with the accept task: dropping the set aborts them.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => match check_peer(&stream) {
                            Ok(()) => {
                                count.send_modify(|n| *n += 1);
                                let bus = bus.clone();
                                let count = count.clone();
                                connections.spawn(async move {
                                    serve_connection(bus, stream).await;
                                    count.send_modify(|n| *n -= 1);
                                });
                            }
                            Err(err) => tracing::warn!(%err, "shared memory bus: peer refused"),
                        },
                        Err(err) => {
                            tracing::warn!(%err, "shared memory bus: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    Some(_) = connections.join_next() => {}
                }
            }
        });
        Ok(SharedBus {
            path,
            accept,
            _lock: lock,
            attached,
        })
    }
}

/// The lock file of the socket at `path`: `<path>.lock`. The holder locks it while
/// sharing; it stays after the holder exits, so its presence says a bus was shared
/// there before.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    name.into()
}

/// Takes the lock at `path`, or `None` when another process holds it. A lock file
/// that was removed or replaced while it was being locked (a cleaner of temporary
/// files) is opened again, so two processes never hold locks on different files.
fn take_lock(path: &Path) -> io::Result<Option<std::fs::File>> {
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(err)) => return Err(err),
        }
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == file.metadata()?.ino() => return Ok(Some(file)),
            Ok(_) => continue,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        }
    }
}

/// What the reader of a connection tells one of its streams.
enum StreamCommand {
    Pull,
    Stop(u64),
    Close(u64),
}

/// Settlers of the deliveries handed to one attached process, by delivery id.
#[derive(Default)]
struct Held {
    next: u64,
    ackers: HashMap<u64, Box<dyn Acker>>,
}

type Ackers = Arc<Mutex<Held>>;

impl Held {
    /// Keeps `acker` until the attached process settles its delivery; gives the
    /// delivery's id.
    fn hold(&mut self, acker: Box<dyn Acker>) -> u64 {
        self.next += 1;
        self.ackers.insert(self.next, acker);
        self.next
    }

    /// The settler of delivery `delivery`, no longer held: the attached process
    /// settles it (or forgets it, which requeues it).
    fn take(&mut self, delivery: u64) -> Result<Box<dyn Acker>> {
        self.ackers.remove(&delivery).ok_or_else(|| {
            Error::transport_msg(
                rpc_core::TransportErrorKind::Other,
                format!("delivery {delivery} is not held by this connection"),
            )
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves one attached process until it goes away. Everything it held (consumers,
/// reply queues, unsettled deliveries) is dropped then, with the bus's usual effect:
/// unsettled deliveries go back to their queues.
async fn serve_connection(bus: MemoryTransport, stream: UnixStream) {
    let max = bus.bus.max_message_size;
    let (read, write) = stream.into_split();
    let (out, writer) = Outbox::start(write, max);
    out.put(
        &Frame::Hello {
            bus: bus.bus.name.clone(),
            max_message_size: max,
            pid: std::process::id(),
        },
        &[],
    );
    let publisher = match bus.publisher().await {
        Ok(publisher) => publisher,
        Err(_) => return,
    };
    // Sends are made in the order they came, one at a time, as one connection to a
    // broker makes them; the reader meanwhile goes on with acks and pulls.
    let (sends, mut queued) = mpsc::unbounded_channel::<(u64, Address, Outgoing)>();
    let sender = {
        let out = out.clone();
        tokio::spawn(async move {
            while let Some((id, address, message)) = queued.recv().await {
                // A full queue holds a send no longer than the message is worth, as the
                // caller's own deadline does on the bus in one process.
                let result = match message.time_to_live {
                    Some(ttl) => tokio::time::timeout(ttl, publisher.send(&address, message))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Error::transport_msg(
                                rpc_core::TransportErrorKind::Other,
                                format!("{address} stayed full for the message's time to live"),
                            ))
                        }),
                    None => publisher.send(&address, message).await,
                };
                out.reply(id, result);
            }
        })
    };
    let ackers: Ackers = Arc::default();
    let mut streams: HashMap<u64, mpsc::UnboundedSender<StreamCommand>> = HashMap::new();
    let mut next_stream = 1u64;
    let mut frames = FramedRead::new(read, codec(max));
    while let Some(Ok(frame)) = frames.next().await {
        let Ok((frame, body)) = decode(frame.freeze()) else {
            tracing::warn!("shared memory bus: a malformed frame; connection closed");
            break;
        };
        // Lends a consumer to the attached process as a new stream and answers request
        // `id` with it (and a reply queue's `address`).
        let mut open = |consumer: Result<Box<dyn Consumer>>,
                        settles: bool,
                        id: u64,
                        address: Option<String>| {
            let consumer = match consumer {
                Ok(consumer) => consumer,
                Err(err) => return out.reply(id, Err(err)),
            };
            let stream = next_stream;
            next_stream += 1;
            let (tx, rx) = mpsc::unbounded_channel();
            streams.insert(stream, tx);
            tokio::spawn(pump(Pump {
                stream,
                consumer,
                ackers: settles.then(|| ackers.clone()),
                out: out.clone(),
                commands: rx,
            }));
            out.put(
                &Frame::Done {
                    id,
                    stream: Some(stream),
                    address,
                },
                &[],
            );
        };
        match frame {
            Frame::Send {
                id,
                address,
                ttl_ms,
                mandatory,
                reply_to,
                msg_id,
            } => {
                let message = Outgoing {
                    body,
                    time_to_live: ttl_ms.map(Duration::from_millis),
                    mandatory,
                    call: reply_to.zip(msg_id).map(|(reply_to, msg_id)| CallHint {
                        reply_to: reply_to.into(),
                        msg_id: msg_id.into(),
                    }),
                };
                let _ = sends.send((id, address, message));
            }
            Frame::Listen {
                id,
                exchange,
                topic,
                server,
                prefetch,
                settle_on_receipt,
            } => {
                let mut target = Target::new(topic).server(server);
                target.exchange = exchange;
                let options = ListenOptions::new(prefetch).settle_on_receipt(settle_on_receipt);
                open(bus.listen(&target, &options).await, true, id, None);
            }
            Frame::Monitor {
                id,
                exchange,
                topic,
            } => {
                let mut target = Target::new(topic);
                target.exchange = exchange;
                open(bus.monitor(&target).await, false, id, None);
            }
            Frame::ReplyQueue { id } => {
                let (address, consumer) = bus.open_reply_queue();
                open(Ok(Box::new(consumer)), false, id, Some(address))
            }
            Frame::Pull { stream } => tell(&streams, &out, stream, StreamCommand::Pull),
            Frame::Stop { id, stream } => tell(&streams, &out, stream, StreamCommand::Stop(id)),
            Frame::Close { id, stream } => tell(&streams, &out, stream, StreamCommand::Close(id)),
            Frame::Drop { stream } => {
                streams.remove(&stream);
            }
            Frame::Ack { id, delivery } => {
                let taken = lock(&ackers).take(delivery);
                out.reply(id, async { taken?.ack().await }.await);
            }
            Frame::Reject {
                id,
                delivery,
                requeue,
            } => {
                let taken = lock(&ackers).take(delivery);
                out.reply(id, async { taken?.reject(requeue).await }.await);
            }
            Frame::Forget { delivery } => {
                let _ = lock(&ackers).take(delivery);
            }
            other => {
                tracing::warn!(
                    ?other,
                    "shared memory bus: unexpected frame; connection closed"
                );
                break;
            }
        }
    }
    // Unsettled deliveries go back first; a send waiting on a full queue is given
    // up (the attached side is gone, and a dropped send "may or may not have sent").
    lock(&ackers).ackers.clear();
    drop(streams);
    sender.abort();
    drop(out);
    let _ = writer.await;
}

/// Hands `command` to the pump of stream `stream`, which answers a stop's or a
/// close's request. A stream already gone has nothing to stop or close: its
/// request is answered here.
fn tell(
    streams: &HashMap<u64, mpsc::UnboundedSender<StreamCommand>>,
    out: &Outbox,
    stream: u64,
    command: StreamCommand,
) {
    match (streams.get(&stream), command) {
        (Some(commands), command) => {
            let _ = commands.send(command);
        }
        (None, StreamCommand::Stop(id) | StreamCommand::Close(id)) => out.reply(id, Ok(())),
        (None, StreamCommand::Pull) => {}
    }
}

/// One consumer of the bus, lent to an attached process.
struct Pump {
    stream: u64,
    consumer: Box<dyn Consumer>,
    /// Where settlers of its deliveries wait for the attached side's verdict; `None`
    /// for reply queues and watchers, whose deliveries need none.
    ackers: Option<Ackers>,
    out: Outbox,
    commands: mpsc::UnboundedReceiver<StreamCommand>,
}

/// Hands out a delivery per pull: the attached consumer takes messages from the
/// bus's queues only when it asks, as a consumer in this process would.
async fn pump(mut pump: Pump) {
    let stream = pump.stream;
    let mut wanted = 0usize;
    let mut ended = false;
    loop {
        tokio::select! {
            biased;
            command = pump.commands.recv() => match command {
                None => break,
                Some(StreamCommand::Pull) if ended => {
                    pump.out.put(&Frame::End { stream }, &[]);
                }
                Some(StreamCommand::Pull) => wanted += 1,
                Some(StreamCommand::Stop(id)) => pump.out.reply(id, pump.consumer.stop().await),
                Some(StreamCommand::Close(id)) => pump.out.reply(id, pump.consumer.close().await),
            },
            next = pump.consumer.recv(), if wanted > 0 && !ended => {
                wanted -= 1;
                match next {
                    None => {
                        ended = true;
                        pump.out.put(&Frame::End { stream }, &[]);
                    }
                    Some(Err(err)) => {
                        pump.out.put(&Frame::StreamError { stream, error: err.into() }, &[]);
                    }
                    Some(Ok(delivery)) => {
                        let (body, acker) = delivery.into_parts();
                        let delivery = pump.ackers.as_ref().map(|ackers| lock(ackers).hold(acker));
                        pump.out.put(&Frame::Delivery { stream, delivery }, &body);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// The attached side.

/// What the reader of an attached connection hands a stream.
enum Event {
    Delivery(Option<u64>, Bytes),
    Error(Error),
    End,
    /// The holder went away.
    Lost,
}

/// State the reader task and the handles share.
#[derive(Default)]
struct Routes {
    /// `None` once the connection is gone.
    pending: Option<HashMap<u64, oneshot::Sender<Result<Frame>>>>,
    streams: HashMap<u64, mpsc::UnboundedSender<Event>>,
}

struct Link {
    out: Outbox,
    routes: Arc<Mutex<Routes>>,
    next_id: AtomicU64,
    bus: String,
    path: PathBuf,
    holder: u32,
    max_message_size: usize,
    /// Cancelled when the connection to the holder ends.
    lost: CancellationToken,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Link {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Link {
    fn lost(&self) -> Error {
        Error::transport_msg(
            rpc_core::TransportErrorKind::Other,
            format!(
                "the process sharing memory bus {:?} (pid {}, {}) went away",
                self.bus,
                self.holder,
                self.path.display()
            ),
        )
    }

    /// Sends a request made with a fresh id and waits for its answer.
    async fn request(&self, frame: impl FnOnce(u64) -> Frame, body: &[u8]) -> Result<Frame> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match lock(&self.routes).pending.as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(self.lost()),
        };
        if !self.out.put(&frame(id), body) {
            return Err(self.lost());
        }
        rx.await.unwrap_or_else(|_| Err(self.lost()))
    }

    /// Opens a stream with `frame` and gives its consumer.
    async fn open(self: &Arc<Self>, frame: impl FnOnce(u64) -> Frame) -> Result<RemoteConsumer> {
        let (tx, events) = mpsc::unbounded_channel();
        let Frame::Done {
            stream: Some(stream),
            address,
            ..
        } = self.request(frame, &[]).await?
        else {
            return Err(Error::transport_msg(
                rpc_core::TransportErrorKind::Other,
                "shared memory bus: the holder opened no stream",
            ));
        };
        {
            // A stream opened as the connection ends would never hear that it ended.
            let mut routes = lock(&self.routes);
            if routes.pending.is_none() {
                return Err(self.lost());
            }
            routes.streams.insert(stream, tx);
        }
        Ok(RemoteConsumer {
            link: self.clone(),
            stream,
            events,
            pulled: false,
            done: false,
            address,
        })
    }
}

/// Reads the holder's frames and routes them to waiting requests and streams.
async fn read_frames(
    mut frames: FramedRead<tokio::net::unix::OwnedReadHalf, LengthDelimitedCodec>,
    routes: Arc<Mutex<Routes>>,
    out: Outbox,
    lost: CancellationToken,
) {
    let _lost = lost.drop_guard();
    while let Some(Ok(frame)) = frames.next().await {
        let Ok((frame, body)) = decode(frame.freeze()) else {
            break;
        };
        let mut routes = lock(&routes);
        match frame {
            Frame::Done { id, .. } | Frame::Failed { id, .. } => {
                let result = match frame {
                    Frame::Failed { error, .. } => Err(error.into()),
                    done => Ok(done),
                };
                if let Some(waiter) = routes.pending.as_mut().and_then(|p| p.remove(&id))
                    && let Err(Ok(Frame::Done {
                        stream: Some(stream),
                        ..
                    })) = waiter.send(result)
                {
                    // Opened for a caller that gave up: nobody will consume it.
                    out.put(&Frame::Drop { stream }, &[]);
                }
            }
            Frame::Delivery { stream, delivery } => {
                let event = Event::Delivery(delivery, body);
                let unwanted = match routes.streams.get(&stream) {
                    Some(tx) => tx.send(event).err().map(|e| e.0),
                    None => Some(event),
                };
                // For a consumer dropped meanwhile: back to its queue.
                if let Some(Event::Delivery(Some(delivery), _)) = unwanted {
                    out.put(&Frame::Forget { delivery }, &[]);
                }
            }
            Frame::StreamError { stream, error } => {
                if let Some(tx) = routes.streams.get(&stream) {
                    let _ = tx.send(Event::Error(error.into()));
                }
            }
            Frame::End { stream } => {
                if let Some(tx) = routes.streams.get(&stream) {
                    let _ = tx.send(Event::End);
                }
            }
            _ => break,
        }
    }
    let mut routes = lock(&routes);
    // Dropping the waiters fails their requests with the "went away" error.
    routes.pending = None;
    for tx in routes.streams.values() {
        let _ = tx.send(Event::Lost);
    }
}

/// Whether an error of [`attach`] means that no process shares a bus there (no
/// socket, a socket left by a holder that died, or a holder dying as it answered),
/// rather than a socket that cannot be used.
pub fn nobody_shares(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// Attaches to the bus a process shares on the Unix socket at `path`. See
/// [`nobody_shares`] for the errors that mean no process shares a bus there.
pub async fn attach(path: impl AsRef<Path>) -> io::Result<AttachedBus> {
    let path = path.as_ref().to_path_buf();
    let stream = UnixStream::connect(&path).await?;
    check_peer(&stream)?;
    let (read, write) = stream.into_split();
    // The hello is small; the real frame limit follows from it.
    let mut frames = FramedRead::new(read, codec(crate::DEFAULT_MAX_MESSAGE_SIZE));
    let hello = tokio::time::timeout(HELLO_TIMEOUT, frames.next())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the holder did not say hello"))?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the holder hung up"))??;
    let Frame::Hello {
        bus,
        max_message_size,
        pid,
    } = decode(hello.freeze())?.0
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the holder did not say hello",
        ));
    };
    frames
        .decoder_mut()
        .set_max_frame_length(max_message_size.saturating_add(HEADER_ROOM));
    let (out, writer) = Outbox::start(write, max_message_size);
    let routes = Arc::new(Mutex::new(Routes {
        pending: Some(HashMap::new()),
        streams: HashMap::new(),
    }));
    let lost = CancellationToken::new();
    let reader = tokio::spawn(read_frames(
        frames,
        routes.clone(),
        out.clone(),
        lost.clone(),
    ));
    Ok(AttachedBus {
        link: Arc::new(Link {
            out,
            routes,
            next_id: AtomicU64::new(1),
            bus,
            path,
            holder: pid,
            max_message_size,
            lost,
            tasks: [reader, writer],
        }),
    })
}

/// A transport on a memory bus another process shares (see [`attach`]). It behaves
/// as the holder's bus does; if the holder goes away, pending operations and
/// consumers fail with a transport error.
#[derive(Clone)]
pub struct AttachedBus {
    link: Arc<Link>,
}

impl std::fmt::Debug for AttachedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedBus")
            .field("bus", &self.link.bus)
            .field("path", &self.link.path)
            .field("holder", &self.link.holder)
            .finish()
    }
}

impl AttachedBus {
    /// Resolves once the connection to the holder has ended (the holder stopped
    /// sharing or went away); from then on every operation fails.
    pub async fn closed(&self) {
        self.link.lost.cancelled().await;
    }

    /// Whether the connection to the holder has ended (see [`AttachedBus::closed`]).
    pub fn is_closed(&self) -> bool {
        self.link.lost.is_cancelled()
    }
}

#[async_trait]
impl Transport for AttachedBus {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn describe(&self) -> String {
        let name = if self.link.bus.is_empty() {
            "(unnamed)"
        } else {
            &self.link.bus
        };
        format!(
            "memory://{name} shared by pid {} at {}",
            self.link.holder,
            self.link.path.display()
        )
    }

    fn capabilities(&self) -> Capabilities {
        crate::capabilities(self.link.max_message_size)
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(AttachedPublisher {
            link: self.link.clone(),
        }))
    }

    async fn listen(&self, target: &Target, options: &ListenOptions) -> Result<Box<dyn Consumer>> {
        target.validate_for_listen()?;
        let consumer = self
            .link
            .open(|id| Frame::Listen {
                id,
                exchange: target.exchange.clone(),
                topic: target.topic.clone(),
                server: target.server.clone().unwrap_or_default(),
                prefetch: options.prefetch,
                settle_on_receipt: options.settle_on_receipt,
            })
            .await?;
        Ok(Box::new(consumer))
    }

    async fn monitor(&self, target: &Target) -> Result<Box<dyn Consumer>> {
        let consumer = self
            .link
            .open(|id| Frame::Monitor {
                id,
                exchange: target.exchange.clone(),
                topic: target.topic.clone(),
            })
            .await?;
        Ok(Box::new(consumer))
    }

    async fn reply_queue(&self) -> Result<ReplyQueue> {
        let mut consumer = self.link.open(|id| Frame::ReplyQueue { id }).await?;
        let address = consumer.address.take().ok_or_else(|| {
            Error::transport_msg(
                rpc_core::TransportErrorKind::Other,
                "shared memory bus: the holder gave no reply address",
            )
        })?;
        Ok(ReplyQueue::new(address, consumer))
    }
}

struct AttachedPublisher {
    link: Arc<Link>,
}

#[async_trait]
impl Publisher for AttachedPublisher {
    async fn send(&self, address: &Address, message: Outgoing) -> Result<()> {
        Error::check_size(message.body.len(), self.link.max_message_size)?;
        let (reply_to, msg_id) = message
            .call
            .map(|hint| (hint.reply_to.to_string(), hint.msg_id.to_string()))
            .unzip();
        self.link
            .request(
                |id| Frame::Send {
                    id,
                    address: address.clone(),
                    ttl_ms: message
                        .time_to_live
                        .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                    mandatory: message.mandatory,
                    reply_to,
                    msg_id,
                },
                &message.body,
            )
            .await
            .map(drop)
    }
}

/// A consumer of the holder's bus: each `recv` pulls one delivery.
struct RemoteConsumer {
    link: Arc<Link>,
    stream: u64,
    events: mpsc::UnboundedReceiver<Event>,
    /// A pull is on its way and its delivery not yet taken.
    pulled: bool,
    done: bool,
    /// The address of a reply queue, until `reply_queue` takes it.
    address: Option<String>,
}

impl Drop for RemoteConsumer {
    fn drop(&mut self) {
        lock(&self.link.routes).streams.remove(&self.stream);
        self.link.out.put(
            &Frame::Drop {
                stream: self.stream,
            },
            &[],
        );
        // The reader gives back any that arrive from now on.
        self.forget_unread();
    }
}

impl RemoteConsumer {
    /// Gives the deliveries that arrived but were never taken back to their queues.
    fn forget_unread(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Delivery(delivery, _) => {
                    self.pulled = false;
                    if let Some(delivery) = delivery {
                        self.link.out.put(&Frame::Forget { delivery }, &[]);
                    }
                }
                Event::End | Event::Lost => self.done = true,
                Event::Error(_) => self.pulled = false,
            }
        }
    }
}

#[async_trait]
impl Consumer for RemoteConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        if self.done {
            return None;
        }
        if !self.pulled {
            self.link.out.put(
                &Frame::Pull {
                    stream: self.stream,
                },
                &[],
            );
            self.pulled = true;
        }
        // Cancel-safe: an answer to a pull whose `recv` was dropped waits in `events`
        // for the next `recv`, which sends no second pull.
        let event = self.events.recv().await;
        self.pulled = false;
        match event {
            Some(Event::Delivery(delivery, body)) => {
                let acker: Box<dyn Acker> = match delivery {
                    Some(delivery) => Box::new(RemoteAcker {
                        link: self.link.clone(),
                        delivery,
                        settled: false,
                    }),
                    None => Box::new(NoAck),
                };
                Some(Ok(Delivery::new(body, acker)))
            }
            Some(Event::Error(err)) => Some(Err(err)),
            Some(Event::Lost) => {
                self.done = true;
                Some(Err(self.link.lost()))
            }
            Some(Event::End) | None => {
                self.done = true;
                None
            }
        }
    }

    async fn stop(&mut self) -> Result<()> {
        let stream = self.stream;
        self.link
            .request(|id| Frame::Stop { id, stream }, &[])
            .await?;
        // The holder answered every pull it served before it answered the stop: a
        // delivery that came for a `recv` given up goes back to the bus now, for
        // other servers, and not when this consumer is dropped.
        self.forget_unread();
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        let stream = self.stream;
        self.link
            .request(|id| Frame::Close { id, stream }, &[])
            .await
            .map(drop)
    }
}

/// Settles a delivery at the holder; one dropped unsettled goes back to its queue.
struct RemoteAcker {
    link: Arc<Link>,
    delivery: u64,
    settled: bool,
}

impl Drop for RemoteAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.link.out.put(
                &Frame::Forget {
                    delivery: self.delivery,
                },
                &[],
            );
        }
    }
}

#[async_trait]
impl Acker for RemoteAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settled = true;
        let delivery = self.delivery;
        self.link
            .request(|id| Frame::Ack { id, delivery }, &[])
            .await
            .map(drop)
    }

    async fn reject(mut self: Box<Self>, requeue: bool) -> Result<()> {
        self.settled = true;
        let delivery = self.delivery;
        self.link
            .request(
                |id| Frame::Reject {
                    id,
                    delivery,
                    requeue,
                },
                &[],
            )
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_stay_in_their_directory() {
        let path = socket_path("../x/y z");
        assert_eq!(
            path.file_name().and_then(|f| f.to_str()),
            Some("memory-..%2Fx%2Fy%20z.sock")
        );
        assert_eq!(path.parent(), Some(runtime_dir().as_path()));
        assert!(socket_path("").ends_with("memory-default.sock"));
    }

    #[test]
    fn frames_keep_header_and_body_apart() {
        let body = b"{\"a\":\"line\\nbreak\"}\n\x00binary";
        let frame = encode(
            &Frame::Delivery {
                stream: 3,
                delivery: Some(9),
            },
            body,
        );
        let (header, decoded) = decode(frame).expect("decodes");
        assert!(matches!(
            header,
            Frame::Delivery {
                stream: 3,
                delivery: Some(9)
            }
        ));
        assert_eq!(&decoded[..], &body[..]);
        assert!(decode(Bytes::from_static(b"no header")).is_err());
    }
}
