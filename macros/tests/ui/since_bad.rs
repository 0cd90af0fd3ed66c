use mqrpc::Context;

#[mqrpc::service(version = "1.3")]
trait Calc {
    #[mqrpc(since = "2.0")]
    async fn other_major(&self, ctx: &Context) -> i64;
    #[mqrpc(since = "1.4")]
    async fn from_the_future(&self, ctx: &Context) -> i64;
    #[mqrpc(since = "1.3")]
    async fn fine(&self, ctx: &Context) -> i64;
}

fn main() {}
