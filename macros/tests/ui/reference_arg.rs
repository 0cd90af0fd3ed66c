use mqrpc::Context;

#[mqrpc::service]
trait Greeter {
    async fn greet(&self, ctx: &Context, name: &str) -> String;
}

fn main() {}
