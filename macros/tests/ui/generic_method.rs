use mqrpc::Context;

#[mqrpc::service]
trait Store {
    async fn put<T: serde::Serialize>(&self, ctx: &Context, value: T) -> bool;
}

fn main() {}
