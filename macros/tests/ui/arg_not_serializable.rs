use mqrpc::Context;

struct Point {
    x: i64,
    y: i64,
}

#[mqrpc::service]
trait Geometry {
    async fn norm(&self, ctx: &Context, point: Point) -> i64;
}

fn main() {}
