// The client has the trait's visibility: a private trait's client stays in its module.
mod api {
    use mqrpc::Context;

    #[mqrpc::service]
    trait Hidden {
        async fn ping(&self, ctx: &Context) -> u64;
    }
}

fn main() {
    let _ = api::HiddenClient::VERSION;
}
