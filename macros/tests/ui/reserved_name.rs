use mqrpc::Context;

#[mqrpc::service]
trait Calc {
    // `server` is the typed client's own setting: the Rust name must differ.
    async fn server(&self, ctx: &Context) -> String;
}

fn main() {}
