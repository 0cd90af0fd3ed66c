//! The `#[service]` attribute of mqrpc: declare an RPC interface once as a Rust trait
//! and get a typed client and a server endpoint for it. Use it through the facade,
//! as `#[mqrpc::service]`; the generated code names the facade's items.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod expand;
mod model;

use proc_macro::TokenStream;

/// Turns a trait into an RPC service: the trait itself (for the server to implement),
/// `<Trait>::endpoint` (the implementation as an [`Endpoint`]) and a typed client,
/// `<Trait>Client`.
///
/// [`Endpoint`]: https://docs.rs/mqrpc/latest/mqrpc/struct.Endpoint.html
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// use futures::{Stream, StreamExt};
/// use mqrpc::{Context, Error, Server, Target, Version};
///
/// #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, thiserror::Error)]
/// enum CalcError {
///     #[error("result does not fit in an i64")]
///     Overflow,
/// }
///
/// #[mqrpc::service(version = "1.3", namespace = "calc")]
/// trait Calc {
///     /// Adds two numbers.
///     async fn add(&self, ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError>;
///     /// Adds `by` to the counter; nobody waits for it.
///     #[mqrpc(cast)]
///     async fn bump(&self, ctx: &Context, by: u64);
///     /// The counter.
///     async fn total(&self, ctx: &Context) -> u64;
///     /// Counts from 0 to `n - 1`, one reply each.
///     #[mqrpc(stream)]
///     fn count(&self, ctx: &Context, n: u32) -> impl Stream<Item = Result<u32, CalcError>>;
///     /// Multiplies; added in version 1.2, so the client asks servers for 1.2.
///     #[mqrpc(since = "1.2")]
///     async fn mul(&self, ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError>;
/// }
///
/// /// The server's state lives in `&self`.
/// #[derive(Default)]
/// struct MyCalc {
///     total: AtomicU64,
/// }
///
/// impl Calc for MyCalc {
///     async fn add(&self, _ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError> {
///         a.checked_add(b).ok_or(CalcError::Overflow)
///     }
///     async fn bump(&self, _ctx: &Context, by: u64) {
///         self.total.fetch_add(by, Ordering::SeqCst);
///     }
///     async fn total(&self, _ctx: &Context) -> u64 {
///         self.total.load(Ordering::SeqCst)
///     }
///     fn count(&self, _ctx: &Context, n: u32) -> impl Stream<Item = Result<u32, CalcError>> {
///         futures::stream::iter((0..n).map(Ok))
///     }
///     async fn mul(&self, _ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError> {
///         a.checked_mul(b).ok_or(CalcError::Overflow)
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> mqrpc::Result<()> {
/// let transport = mqrpc::connect("memory://").await?;
/// let server = Server::builder(transport.clone(), Target::new("calc").server("s1"))
///     .endpoint(Calc::endpoint(Arc::new(MyCalc::default())))
///     .start()
///     .await?;
///
/// let client = CalcClient::new(transport, Target::new("calc"));
/// let ctx = Context::new();
/// assert_eq!(client.add(&ctx, 2, 3).await?, 5);
/// assert_eq!(client.mul(&ctx, 4, 5).await?, 20);
///
/// // A typed error comes back as the same type.
/// let err = client.add(&ctx, i64::MAX, 1).await.unwrap_err();
/// assert_eq!(err.decode_remote::<CalcError>(), Some(CalcError::Overflow));
///
/// // A stream of replies.
/// let items: Vec<u32> = client.count(&ctx, 3).await?.map(|i| i.unwrap()).collect().await;
/// assert_eq!(items, [0, 1, 2]);
///
/// // A cast returns once the broker has it; a directed call asks server `s1` itself.
/// client.bump(&ctx, 7).await?;
/// # for _ in 0..100 { if client.total(&ctx).await? == 7 { break } tokio::task::yield_now().await }
/// assert_eq!(client.prepare().server("s1").total(&ctx).await?, 7);
///
/// // `version` overrides what each request asks for: no 1.x server serves 2.0.
/// let err = client.prepare().version(Version::new(2, 0)).add(&ctx, 1, 1).await.unwrap_err();
/// assert!(matches!(err, Error::UnsupportedVersion { .. }));
/// server.shutdown().await
/// # }
/// ```
///
/// # The trait
/// - Each method takes `&self`, then `ctx: &Context`, then its arguments. The
///   arguments are the request's keyword arguments, named after the parameters
///   (`#[mqrpc(name = "...")]` on a parameter renames one); they must be owned types
///   that implement serde's `Serialize` and `Deserialize`.
/// - A call method is an `async fn`. When it returns `Result<T, E>` (written as
///   `Result<..>`), an `Err` is sent as a remote failure (`E: Serialize + Display`, or
///   `mqrpc::RemoteError` itself) and the caller decodes it back with
///   `Error::decode_remote::<E>()`; any other return type is the result itself.
/// - `#[mqrpc(cast)]`: the client's method returns once the broker has the message;
///   the server runs the method and sends nothing back.
/// - `#[mqrpc(stream)]`: a plain `fn` returning `impl Stream<Item = Result<T, E>>`
///   (or `Item = T`); the client's method returns a `ReplyStream<T>`.
/// - `#[mqrpc(since = "1.2")]`: the method was added in version 1.2. The client asks
///   for that version in its requests, so a server implementing only 1.1 refuses with
///   `Error::UnsupportedVersion`, as oslo.messaging does. Methods without it ask for
///   `major.0`.
/// - `#[mqrpc(name = "...")]` on a method sets its name on the wire.
///
/// The macro makes each `async fn` return a `Send` future (implementations still
/// write `async fn`) and requires `Send + Sync + 'static` of the service, since calls
/// run concurrently on a multi-threaded runtime.
///
/// # Options
/// `#[mqrpc::service(version = "1.3", namespace = "calc", client = "CalcApi")]`:
/// the version the endpoint implements (default `1.0`), its namespace (default none),
/// and the client type's name (default `<Trait>Client`). `crate = "path"` names the
/// facade crate when it is renamed.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = syn::parse_macro_input!(item as syn::ItemTrait);
    let service =
        model::Options::parse(attr.into()).and_then(|options| model::Service::read(options, &item));
    match service {
        Ok(service) => expand::expand(&service, item).into(),
        Err(err) => {
            // The trait is still emitted (without the macro's attributes), so its
            // other uses do not add errors of their own.
            let mut item = item;
            strip(&mut item);
            let err = err.to_compile_error();
            quote::quote!(#item #err).into()
        }
    }
}

/// Removes the macro's attributes from a trait that failed its checks.
fn strip(item: &mut syn::ItemTrait) {
    for trait_item in &mut item.items {
        if let syn::TraitItem::Fn(function) = trait_item {
            function.attrs.retain(|a| !model::is_ours(a));
            for input in &mut function.sig.inputs {
                if let syn::FnArg::Typed(typed) = input {
                    typed.attrs.retain(|a| !model::is_ours(a));
                }
            }
        }
    }
}
