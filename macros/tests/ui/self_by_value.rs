use mqrpc::Context;

#[mqrpc::service]
trait Counter {
    async fn take(self, ctx: &Context) -> u64;
}

fn main() {}
