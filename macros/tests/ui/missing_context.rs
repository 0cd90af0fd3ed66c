use mqrpc::Context;

#[mqrpc::service]
trait Calc {
    async fn add(&self, a: i64, b: i64) -> i64;
    async fn ok(&self, ctx: &Context) -> i64;
}

fn main() {}
