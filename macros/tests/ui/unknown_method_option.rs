use mqrpc::Context;

#[mqrpc::service]
trait Calc {
    #[mqrpc(fanout)]
    async fn add(&self, ctx: &Context, a: i64, b: i64) -> i64;
    async fn sub(&self, ctx: &Context, #[mqrpc(default = "0")] a: i64) -> i64;
}

fn main() {}
