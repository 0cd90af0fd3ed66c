use mqrpc::Context;

struct Point {
    x: i64,
    y: i64,
}

#[mqrpc::service]
trait Geometry {
    async fn origin(&self, ctx: &Context) -> Point;
}

fn main() {}
