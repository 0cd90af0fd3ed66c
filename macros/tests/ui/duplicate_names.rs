use mqrpc::Context;

#[mqrpc::service]
trait Calc {
    async fn add(&self, ctx: &Context, a: i64, #[mqrpc(name = "a")] b: i64) -> i64;
    async fn sum(&self, ctx: &Context, a: i64) -> i64;
    #[mqrpc(name = "sum")]
    async fn plus(&self, ctx: &Context, a: i64) -> i64;
}

fn main() {}
