use mqrpc::Context;

#[mqrpc::service]
trait Calc {
    async fn _private(&self, ctx: &Context) -> i64;
}

fn main() {}
