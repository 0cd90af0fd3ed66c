use futures::Stream;
use mqrpc::Context;

#[mqrpc::service]
trait Counter {
    #[mqrpc(stream)]
    async fn count(&self, ctx: &Context, n: u32) -> impl Stream<Item = u32>;
}

fn main() {}
