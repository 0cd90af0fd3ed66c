//! Every public item the macro generates is documented, and generated code raises no
//! warning: this crate denies both, and uses the service from outside its module.
#![deny(missing_docs, warnings)]

/// The service lives in a module; its `pub` client is used outside it.
pub mod api {
    use futures::Stream;
    use mqrpc::Context;

    /// Errors of the store.
    #[derive(Debug, serde::Serialize, serde::Deserialize, thiserror::Error)]
    pub enum StoreError {
        /// No such key.
        #[error("no such key")]
        Missing,
    }

    /// A key-value store.
    #[mqrpc::service(version = "2.3", namespace = "kv", client = "StoreApi")]
    pub trait Store {
        /// Reads a key.
        async fn get(&self, ctx: &Context, key: String) -> Result<String, StoreError>;
        /// Writes a key; nobody waits.
        #[mqrpc(cast, since = "2.1")]
        async fn put(&self, ctx: &Context, key: String, value: String);
        /// Every key.
        #[mqrpc(stream)]
        fn keys(&self, ctx: &Context) -> impl Stream<Item = String>;
        /// A method with a raw name and a renamed argument.
        #[mqrpc(since = "2.3")]
        async fn r#type(&self, ctx: &Context, #[mqrpc(name = "of")] key: String) -> String {
            let _ = ctx;
            key
        }
    }
}

/// Uses the client's whole API, so that nothing generated is dead code.
async fn use_client(client: api::StoreApi) -> mqrpc::Result<()> {
    let ctx = mqrpc::Context::new();
    let client = client
        .prepare()
        .server("s1")
        .fanout(false)
        .topic("kv")
        .exchange("openstack")
        .version(api::StoreApi::VERSION)
        .timeout(std::time::Duration::from_secs(1))
        .call_monitor(None)
        .retry(None);
    let _: String = client.get(&ctx, "k".to_owned()).await?;
    client.put(&ctx, "k".to_owned(), "v".to_owned()).await?;
    let _keys: mqrpc::ReplyStream<String> = client.keys(&ctx).await?;
    let _: String = client.r#type(&ctx, "k".to_owned()).await?;
    let _: &mqrpc::Client = client.client();
    let _ = api::StoreApi::from_client(client.client().clone());
    let _ = api::StoreApi::NAMESPACE;
    client.close().await;
    Ok(())
}

fn main() {
    let _ = use_client;
}
