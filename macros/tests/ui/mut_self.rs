use mqrpc::Context;

#[mqrpc::service]
trait Counter {
    async fn bump(&mut self, ctx: &Context, by: u64) -> u64;
}

fn main() {}
