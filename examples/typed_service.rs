//! A service with two methods, its server and a client calling both, in 38 lines
//! (`wc -l`, this comment included), on any backend: `cargo run --example typed_service
//! -- URL` or `MQRPC_URL=URL` (default `memory://`; a broker URL needs `--features full`).
use std::sync::Arc;

use mqrpc::{Context, Server, Target};

#[mqrpc::service(version = "1.0")]
trait Greeter {
    async fn greet(&self, ctx: &Context, name: String) -> String;
    async fn add(&self, ctx: &Context, a: i64, b: i64) -> i64;
}

struct Greetings;

impl Greeter for Greetings {
    async fn greet(&self, _ctx: &Context, name: String) -> String {
        format!("hello, {name}")
    }
    async fn add(&self, _ctx: &Context, a: i64, b: i64) -> i64 {
        a + b
    }
}

#[tokio::main]
async fn main() -> mqrpc::Result<()> {
    let url = std::env::args().nth(1).or(std::env::var("MQRPC_URL").ok());
    let transport = mqrpc::connect(url.as_deref().unwrap_or("memory://")).await?;
    let server = Server::builder(transport.clone(), Target::new("greeter").server("s1"))
        .endpoint(Greeter::endpoint(Arc::new(Greetings)))
        .start()
        .await?;
    let client = GreeterClient::new(transport, Target::new("greeter"));
    let ctx = Context::new();
    println!("{}", client.greet(&ctx, "world".to_owned()).await?);
    println!("2 + 3 = {}", client.add(&ctx, 2, 3).await?);
    server.shutdown().await
}
