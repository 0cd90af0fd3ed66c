//! What `#[mqrpc::service]` generates, exercised over the in-process bus: the wire
//! names of raw, renamed and argument-less methods, default method bodies, a `pub`
//! service in a module used from outside it, and the `client = "..."` option.

use std::collections::BTreeMap;
use std::sync::Arc;

use mqrpc::{Context, Error, Server, Target, Transport};

/// A `pub` service in a module, with its client renamed: the client must be usable
/// outside the module.
mod api {
    use mqrpc::Context;

    /// Words, with names that are Rust keywords.
    #[mqrpc::service(version = "1.1", namespace = "words", client = "WordsApi")]
    pub trait Words {
        /// A raw method name and a raw argument name; both go on the wire without `r#`.
        async fn r#match(&self, ctx: &Context, r#type: String, word: String) -> bool;
        /// The method is `join` on the wire, its first argument `left`.
        #[mqrpc(name = "join")]
        async fn concat(
            &self,
            ctx: &Context,
            #[mqrpc(name = "left")] first: String,
            right: String,
        ) -> String;
        /// No arguments at all.
        async fn ping(&self, ctx: &Context) -> String;
        /// A default body, run when the implementation does not override it.
        async fn greeting(&self, ctx: &Context, name: String) -> String {
            let _ = ctx;
            format!("hello, {name}")
        }
        /// A cast with a default (empty) body.
        #[mqrpc(cast, since = "1.1")]
        async fn forget(&self, ctx: &Context, word: String) {
            let _ = (ctx, word);
        }
    }
}

use api::{Words, WordsApi};

/// Implements only what has no default.
struct Impl;

impl Words for Impl {
    async fn r#match(&self, _ctx: &Context, r#type: String, word: String) -> bool {
        r#type == word
    }
    async fn concat(&self, _ctx: &Context, first: String, right: String) -> String {
        format!("{first}{right}")
    }
    async fn ping(&self, _ctx: &Context) -> String {
        "pong".to_owned()
    }
}

/// Keyword arguments for the untyped client.
fn kwargs<const N: usize>(
    pairs: [(&'static str, &'static str); N],
) -> BTreeMap<&'static str, &'static str> {
    pairs.into_iter().collect()
}

async fn serve() -> (Arc<dyn Transport>, Server) {
    let transport = mqrpc::connect("memory://").await.expect("memory transport");
    let server = Server::builder(transport.clone(), Target::new("words").server("s1"))
        .endpoint(Words::endpoint(Arc::new(Impl)))
        .start()
        .await
        .expect("server starts");
    (transport, server)
}

#[tokio::test]
async fn typed_client_calls_every_kind_of_method() {
    let (transport, server) = serve().await;
    let client = WordsApi::new(transport, Target::new("words"));
    let ctx = Context::new();
    assert!(
        client
            .r#match(&ctx, "a".into(), "a".into())
            .await
            .expect("match")
    );
    assert!(
        !client
            .r#match(&ctx, "a".into(), "b".into())
            .await
            .expect("match")
    );
    assert_eq!(
        client
            .concat(&ctx, "ab".into(), "cd".into())
            .await
            .expect("join"),
        "abcd"
    );
    assert_eq!(client.ping(&ctx).await.expect("ping"), "pong");
    assert_eq!(
        client.greeting(&ctx, "bob".into()).await.expect("greeting"),
        "hello, bob"
    );
    client.forget(&ctx, "x".into()).await.expect("cast");
    assert_eq!(WordsApi::NAMESPACE, Some("words"));
    assert_eq!(WordsApi::VERSION, mqrpc::Version::new(1, 1));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn wire_names_drop_raw_prefixes_and_follow_renames() {
    let (transport, server) = serve().await;
    let typed = WordsApi::new(transport, Target::new("words"));
    // The same service through the untyped client, in the typed client's namespace.
    let client = typed.client();
    let ctx = Context::new();

    let same: bool = client
        .call(&ctx, "match", kwargs([("type", "x"), ("word", "x")]))
        .await
        .expect("`match` with `type`");
    assert!(same);
    let joined: String = client
        .call(&ctx, "join", kwargs([("left", "l"), ("right", "r")]))
        .await
        .expect("`join` with `left`");
    assert_eq!(joined, "lr");
    let pong: String = client
        .call(&ctx, "ping", kwargs([]))
        .await
        .expect("`ping` without arguments");
    assert_eq!(pong, "pong");

    // The Rust names are not on the wire.
    let err = client
        .call::<_, String>(&ctx, "concat", kwargs([("left", "l"), ("right", "r")]))
        .await
        .expect_err("`concat` is not a wire name");
    assert!(matches!(err, Error::NoSuchMethod { .. }), "{err:?}");
    let err = client
        .call::<_, bool>(&ctx, "r#match", kwargs([("type", "x"), ("word", "x")]))
        .await
        .expect_err("`r#match` is not a wire name");
    assert!(matches!(err, Error::NoSuchMethod { .. }), "{err:?}");
    // Nor is the Rust name of a renamed argument.
    let err = client
        .call::<_, String>(&ctx, "join", kwargs([("first", "l"), ("right", "r")]))
        .await
        .expect_err("`first` is not a keyword");
    match &err {
        Error::Remote(remote) => {
            assert_eq!(remote.class, "TypeError");
            assert!(remote.message.contains("left"), "{remote:?}");
        }
        other => panic!("expected a TypeError, got {other:?}"),
    }
    server.shutdown().await.expect("shutdown");
}
