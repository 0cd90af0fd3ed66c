//! What the command line's test files share: the skip helper and the broker check.

#[path = "../../src/skips.rs"]
pub mod skips;

/// Whether the broker of `url` accepts connections. When it does not: a failure, or
/// `false` after a recorded skip under `MQRPC_ALLOW_SKIP=1`.
pub fn broker_available(what: &str, url: &str) -> bool {
    let address = url
        .split_once("://")
        .map(|(_, rest)| rest.split(['?', '/']).next().unwrap_or(rest))
        .map(|authority| authority.rsplit('@').next().unwrap_or(authority).to_owned())
        .unwrap_or_default();
    match std::net::TcpStream::connect(&address) {
        Ok(_) => true,
        Err(err) => {
            skips::missing(what, &format!("broker unavailable at {address} ({err})"));
            false
        }
    }
}
