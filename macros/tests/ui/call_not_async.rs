use mqrpc::Context;

#[mqrpc::service]
trait Calc {
    fn add(&self, ctx: &Context, a: i64, b: i64) -> i64;
}

fn main() {}
