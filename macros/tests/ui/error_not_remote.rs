use mqrpc::Context;

#[derive(Debug)]
struct Oops;

#[mqrpc::service]
trait Calc {
    async fn add(&self, ctx: &Context, a: i64, b: i64) -> Result<i64, Oops>;
}

fn main() {}
