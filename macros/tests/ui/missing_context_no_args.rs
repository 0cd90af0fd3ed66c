#[mqrpc::service]
trait Calc {
    async fn ping(&self) -> u64;
}

fn main() {}
