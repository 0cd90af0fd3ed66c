//! `mqrpc notify` (send one notification) and `mqrpc listen --notifications` (print
//! the notifications of a topic, one JSON line each, as a member of a pool or of
//! the default group).

use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use mqrpc::notify::{
    NotificationEndpoint, NotificationListener, NotificationResult, Notifier, Priority,
};
use mqrpc::{Context, Target};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::{IN_PROCESS, connect_within, in_process, parse_duration, parse_object, stopped};

/// What to send.
#[derive(Args, Debug)]
pub(crate) struct NotifyArgs {
    /// Broker URL (not memory://, a bus inside one process that no listener of
    /// another command can reach).
    #[arg(long, env = "MQRPC_URL")]
    url: String,
    /// Topic to send to (repeatable; default `notifications`).
    #[arg(long = "topic", default_value = mqrpc::notify::DEFAULT_NOTIFICATION_TOPIC)]
    topics: Vec<String>,
    /// Exchange (default: the transport's).
    #[arg(long)]
    exchange: Option<String>,
    /// Who the notification says it comes from.
    #[arg(long, default_value = "mqrpc")]
    publisher_id: String,
    /// Priority: audit, debug, info, warn, error, critical or sample.
    #[arg(long, default_value = "info")]
    priority: Priority,
    /// Context as a JSON object.
    #[arg(long, default_value = "{}")]
    context: String,
    /// How long sending may take: seconds or with a unit (`30s`, `500ms`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// What happened (`compute.instance.create.end`).
    event_type: String,
    /// The payload, any JSON value.
    #[arg(default_value = "{}")]
    payload: String,
}

/// `mqrpc notify`: sends one notification; prints nothing on success.
pub(crate) async fn notify(args: NotifyArgs) -> Result<()> {
    anyhow::ensure!(!in_process(&args.url), "{IN_PROCESS}");
    let payload: Value = serde_json::from_str(&args.payload).context("PAYLOAD is not JSON")?;
    let ctx = Context::from(parse_object(&args.context, "--context")?);
    let transport = connect_within(&args.url, args.timeout).await?;
    let mut notifier = Notifier::new(transport, args.publisher_id)
        .topics(args.topics)
        .timeout(args.timeout);
    if let Some(exchange) = args.exchange {
        notifier = notifier.exchange(exchange);
    }
    notifier
        .notify(&ctx, args.priority, &args.event_type, payload)
        .await
        .context("sending the notification")?;
    Ok(())
}

/// What `listen --notifications` takes.
#[derive(Args, Debug, Default)]
pub(crate) struct NotificationArgs {
    /// Print the notifications of the topic (default topic `notifications`) instead
    /// of watching its RPC traffic: they are taken (acknowledged) as a listener takes
    /// them.
    #[arg(long)]
    pub(crate) notifications: bool,
    /// With --notifications: listen as a member of this pool (default: the default
    /// group, which shares the notifications with the topic's other listeners that
    /// have no pool).
    #[arg(long, requires = "notifications")]
    pool: Option<String>,
    /// With --notifications: only these priorities (repeatable; default all).
    #[arg(long = "priority", requires = "notifications")]
    priorities: Vec<Priority>,
    /// With --notifications: the exchange (default: the transport's).
    #[arg(long, requires = "notifications")]
    exchange: Option<String>,
}

/// `mqrpc listen --notifications`: prints each notification as one JSON line until
/// stopped (or `count` were printed).
pub(crate) async fn listen(
    url: &str,
    topic: Option<&str>,
    count: Option<u64>,
    args: NotificationArgs,
) -> Result<()> {
    let topic = topic.unwrap_or(mqrpc::notify::DEFAULT_NOTIFICATION_TOPIC);
    if in_process(url) {
        eprintln!("mqrpc: warning: {IN_PROCESS}; no notification can reach this listener");
    }
    let stop = stopped();
    tokio::pin!(stop);
    let transport = tokio::select! {
        () = &mut stop => return Ok(()),
        transport = mqrpc::connect(url) => transport.context("connecting")?,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let print = move |n: mqrpc::notify::Notification| {
        let line = serde_json::json!({
            "priority": n.priority.as_str(),
            "event_type": n.event_type,
            "publisher_id": n.publisher_id,
            "payload": n.payload,
            "context": n.context,
            "message_id": n.metadata.message_id,
            "timestamp": n.metadata.timestamp,
        });
        // Taken only once printed: one that comes after the last line wanted, or
        // while stopping, goes back to the broker for the next listener.
        let (printed, done) = oneshot::channel();
        let queued = tx.send((line, printed)).is_ok();
        async move {
            match (queued, done.await) {
                (true, Ok(())) => NotificationResult::Handled,
                _ => NotificationResult::Requeue,
            }
        }
    };
    let endpoint = if args.priorities.is_empty() {
        NotificationEndpoint::new().on_every(print)
    } else {
        let print = std::sync::Arc::new(print);
        args.priorities
            .iter()
            .fold(NotificationEndpoint::new(), |endpoint, priority| {
                let print = print.clone();
                endpoint.on(*priority, move |n| print(n))
            })
    };
    let mut target = Target::new(topic);
    target.exchange = args.exchange;
    let mut builder = NotificationListener::builder(transport, [target])
        .endpoint(endpoint)
        // One at a time, so the lines come out in the order the notifications do.
        .concurrency(1)
        .allow_requeue(true);
    if let Some(pool) = &args.pool {
        builder = builder.pool(pool);
    }
    let listener = tokio::select! {
        () = &mut stop => return Ok(()),
        listener = builder.start() => listener.context("listening to notifications")?,
    };
    match &args.pool {
        Some(pool) => eprintln!(
            "mqrpc: listening to the notifications of {topic} in pool {pool} (Ctrl-C stops)"
        ),
        None => eprintln!("mqrpc: listening to the notifications of {topic} (Ctrl-C stops)"),
    }
    let mut seen = 0u64;
    loop {
        let line = tokio::select! {
            () = &mut stop => break,
            line = rx.recv() => line,
        };
        let Some((line, printed)) = line else { break };
        println!("{line}");
        let _ = printed.send(());
        seen += 1;
        if count.is_some_and(|limit| seen >= limit) {
            break;
        }
    }
    listener.shutdown().await.context("stopping the listener")?;
    Ok(())
}
