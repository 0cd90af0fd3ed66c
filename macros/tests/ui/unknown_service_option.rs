#[mqrpc::service(version = "1.0", timeout = "30s")]
trait Calc {}

fn main() {}
