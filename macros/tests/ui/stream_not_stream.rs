use mqrpc::Context;

#[mqrpc::service]
trait Counter {
    #[mqrpc(stream)]
    fn count(&self, ctx: &Context, n: u32) -> Vec<u32>;
}

fn main() {}
