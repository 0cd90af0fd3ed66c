//! What the macro writes: the trait with `Send` futures and an `endpoint` function,
//! a typed client, and compile-time checks of every argument and result type.

use proc_macro2::{Group, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, Ident, ItemTrait, LitStr, ReturnType, TraitItem, Type, TypeParamBound};

use crate::model::{Kind, Method, Service, Version, is_ours};

pub fn expand(service: &Service, mut item: ItemTrait) -> TokenStream {
    rewrite_trait(service, &mut item);
    let client = client(service);
    let checks = checks(service);
    // The checks come first: their errors, which say what an argument, result or
    // error type must implement, are then reported before those the same type raises
    // in the generated code.
    quote! {
        #checks
        #item
        #client
    }
}

fn version_tokens(krate: &syn::Path, version: Version) -> TokenStream {
    let Version {
        major,
        minor,
        revision,
    } = version;
    match revision {
        Some(revision) => quote!(#krate::Version::with_revision(#major, #minor, #revision)),
        None => quote!(#krate::Version::new(#major, #minor)),
    }
}

/// The trait as users implement it: `async fn` becomes a function returning a `Send`
/// future (so a server can run it on any thread), streams become `Send`, the macro's
/// attributes go, `Send + Sync + 'static` is required, and `endpoint` is added.
fn rewrite_trait(service: &Service, item: &mut ItemTrait) {
    item.supertraits
        .push(syn::parse_quote!(::core::marker::Send));
    item.supertraits
        .push(syn::parse_quote!(::core::marker::Sync));
    item.supertraits.push(syn::parse_quote!('static));
    for trait_item in &mut item.items {
        let TraitItem::Fn(function) = trait_item else {
            continue;
        };
        function.attrs.retain(|a| !is_ours(a));
        for input in &mut function.sig.inputs {
            if let FnArg::Typed(typed) = input {
                typed.attrs.retain(|a| !is_ours(a));
            }
        }
        let sig = &mut function.sig;
        if let Some(token) = sig.asyncness.take() {
            let output = match &sig.output {
                ReturnType::Default => quote!(()),
                ReturnType::Type(_, ty) => quote!(#ty),
            };
            let span = token.span;
            sig.output = syn::parse_quote_spanned! {span=>
                -> impl ::core::future::Future<Output = #output> + ::core::marker::Send
            };
            if let Some(body) = &function.default {
                function.default = Some(syn::parse_quote!({ async move #body }));
            }
        } else if let ReturnType::Type(_, ty) = &mut sig.output
            && let Type::ImplTrait(bounds) = &mut **ty
            && !bounds.bounds.iter().any(is_send)
        {
            bounds.bounds.push(syn::parse_quote!(::core::marker::Send));
        }
    }
    let endpoint = endpoint_fn(service);
    item.items.push(syn::parse_quote!(#endpoint));
}

fn is_send(bound: &TypeParamBound) -> bool {
    matches!(bound, TypeParamBound::Trait(t) if t.path.segments.last().is_some_and(|s| s.ident == "Send"))
}

/// `fn endpoint(this: Arc<Self>) -> Endpoint`: every method registered under its
/// wire name, with the service's namespace and version.
fn endpoint_fn(service: &Service) -> TokenStream {
    let krate = &service.options.krate;
    let private = quote!(#krate::__private);
    let serde_path = serde_path(krate);
    let trait_ident = &service.ident;
    let version = version_tokens(krate, service.options.version);
    let namespace = service
        .options
        .namespace
        .as_ref()
        .map(|ns| quote!(let endpoint = endpoint.namespace(#ns);));
    let methods = service.methods.iter().map(|method| {
        let ident = &method.ident;
        let wire = &method.wire;
        // `.method(..)` requires the result to serialize and the error to become a
        // remote failure: a type that does not points at the method.
        let register_fn = |name: &str| Ident::new(name, ident.span());
        let (method_fn, stream_fn) = (register_fn("method"), register_fn("stream_method"));
        let derive = respan(
            quote!(#[derive(#private::serde::Deserialize)] #[serde(crate = #serde_path)]),
            ident.span(),
        );
        let fields = method.args.iter().map(|arg| {
            let (ident, ty, wire) = (&arg.ident, &arg.ty, &arg.wire);
            quote_spanned!(ty.span()=> #[serde(rename = #wire)] #ident: #ty)
        });
        let args_struct = quote_spanned!(ident.span()=> struct Args { #(#fields),* });
        let values = method.args.iter().map(|arg| {
            let ident = &arg.ident;
            quote!(args.#ident)
        });
        let invoke = quote!(<Self as #trait_ident>::#ident(&*this, &ctx, #(#values),*));
        let register = match (method.kind, &method.error) {
            (Kind::Stream, error) => {
                let item = if error.is_some() {
                    quote!(item)
                } else {
                    quote!(::core::result::Result::<_, #krate::RemoteError>::Ok(item))
                };
                quote! {
                    endpoint.#stream_fn(#wire, move |ctx: #krate::Context, args: Args| {
                        let this = ::std::sync::Arc::clone(&this);
                        #private::async_stream::stream! {
                            let items = #invoke;
                            let mut items = ::core::pin::pin!(items);
                            while let ::core::option::Option::Some(item) =
                                #private::StreamExt::next(&mut items).await
                            {
                                yield #item;
                            }
                        }
                    })
                }
            }
            (_, Some(_)) => quote! {
                endpoint.#method_fn(#wire, move |ctx: #krate::Context, args: Args| {
                    let this = ::std::sync::Arc::clone(&this);
                    async move { #invoke.await }
                })
            },
            (_, None) => quote! {
                endpoint.#method_fn(#wire, move |ctx: #krate::Context, args: Args| {
                    let this = ::std::sync::Arc::clone(&this);
                    async move {
                        ::core::result::Result::<_, #krate::RemoteError>::Ok(#invoke.await)
                    }
                })
            },
        };
        quote! {
            let endpoint = {
                #derive
                #args_struct
                let this = ::std::sync::Arc::clone(&this);
                #register
            };
        }
    });
    let doc = format!(
        "The methods of [`{trait_ident}`] served by `this`, as an [`Endpoint`]({}::Endpoint) \
         for `Server::builder(..).endpoint(..)`: the service's namespace and version, each \
         method under its wire name, its arguments decoded from the keyword arguments.",
        path_text(krate)
    );
    quote! {
        #[doc = #doc]
        fn endpoint(this: ::std::sync::Arc<Self>) -> #krate::Endpoint
        where
            Self: ::core::marker::Sized,
        {
            let endpoint = #krate::Endpoint::new().version(#version);
            #namespace
            #(#methods)*
            endpoint
        }
    }
}

fn path_text(path: &syn::Path) -> String {
    quote!(#path).to_string().replace(' ', "")
}

fn serde_path(krate: &syn::Path) -> LitStr {
    LitStr::new(
        &format!("{}::__private::serde", path_text(krate)),
        proc_macro2::Span::call_site(),
    )
}

/// The typed client: one async method per trait method, and the per-call settings of
/// `mqrpc::Client`, each returning the typed client.
fn client(service: &Service) -> TokenStream {
    let krate = &service.options.krate;
    let vis = &service.vis;
    let name = &service.client;
    let trait_ident = &service.ident;
    let version = version_tokens(krate, service.options.version);
    let (namespace_const, apply_namespace) = match &service.options.namespace {
        Some(ns) => (
            quote!(::core::option::Option::Some(#ns)),
            quote!(client.namespace(#ns)),
        ),
        None => (quote!(::core::option::Option::None), quote!(client)),
    };
    let serde_path = serde_path(krate);
    let private = quote!(#krate::__private);
    let methods = service
        .methods
        .iter()
        .map(|method| client_method(service, method, &serde_path, &private));
    let doc = format!(
        "A typed client of the [`{trait_ident}`] service: one async method per service \
         method, and `prepare()`-style settings (`server`, `fanout`, `timeout`, \
         `call_monitor`, `version`, `retry`) that return the typed client. Cloning is \
         cheap; clones share the connection and the reply queue."
    );
    let setter = |fn_name: &str, arg: TokenStream, doc: &str| {
        let fn_ident = format_ident!("{}", fn_name);
        let arg_name = format_ident!("value");
        quote! {
            #[doc = #doc]
            #[must_use]
            pub fn #fn_ident(self, #arg_name: #arg) -> Self {
                #name { client: self.client.#fn_ident(#arg_name) }
            }
        }
    };
    let text = quote!(impl ::core::convert::Into<::std::string::String>);
    let duration = quote!(::core::option::Option<::core::time::Duration>);
    let setters = [
        ("server", text.clone(), "Sends to one named server of the topic (`Client::server`)."),
        ("fanout", quote!(bool), "Sends casts to every server of the topic (`Client::fanout`); calls refuse a fanout target."),
        ("topic", text.clone(), "Sets the topic (`Client::topic`)."),
        ("exchange", text, "Sets the exchange (`Client::exchange`)."),
        ("version", quote!(#krate::Version), "Asks for this version in every request, instead of the version that added each method (`Client::version`)."),
        ("version_cap", quote!(::core::option::Option<#krate::Version>), "Refuses, before sending, requests for versions above this cap with `Error::VersionCap` (`Client::version_cap`, oslo's `version_cap`): a method added after the cap fails without reaching a server."),
        ("timeout", quote!(::core::time::Duration), "Sets the overall deadline of a call, and of a cast's publish (`Client::timeout`)."),
        ("call_monitor", duration, "Asks the server for heartbeats (`Client::call_monitor`)."),
        ("retry", quote!(::core::option::Option<#krate::RetryPolicy>), "Retries calls after a timeout or a transport error (`Client::retry`); for idempotent methods only."),
    ]
    .map(|(fn_name, arg, doc)| setter(fn_name, arg, doc));
    quote! {
        #[doc = #doc]
        #[derive(::core::clone::Clone, ::core::fmt::Debug)]
        #vis struct #name {
            client: #krate::Client,
        }

        impl #name {
            /// The namespace the service's endpoint serves, if any.
            pub const NAMESPACE: ::core::option::Option<&'static str> = #namespace_const;

            /// The version the service's endpoint implements.
            pub const VERSION: #krate::Version = #version;

            /// A client of `target` over `transport`, in the service's namespace.
            pub fn new(
                transport: ::std::sync::Arc<dyn #krate::Transport>,
                target: #krate::Target,
            ) -> Self {
                Self::from_client(#krate::Client::new(transport, target))
            }

            /// Wraps an untyped client (sharing its connection, reply queue and
            /// settings), in the service's namespace.
            pub fn from_client(client: #krate::Client) -> Self {
                #name { client: #apply_namespace }
            }

            /// The untyped client underneath.
            pub fn client(&self) -> &#krate::Client {
                &self.client
            }

            /// A copy to change per-call settings on (oslo's `prepare()`).
            #[must_use]
            pub fn prepare(&self) -> Self {
                ::core::clone::Clone::clone(self)
            }

            #(#setters)*

            /// Whether a request for `version` passes the version cap
            /// (`Client::can_send_version`).
            pub fn can_send_version(&self, version: #krate::Version) -> bool {
                self.client.can_send_version(version)
            }

            /// Releases the client's reply queue (`Client::close`).
            pub async fn close(&self) {
                self.client.close().await
            }

            #(#methods)*
        }
    }
}

fn client_method(
    service: &Service,
    method: &Method,
    serde_path: &LitStr,
    private: &TokenStream,
) -> TokenStream {
    let krate = &service.options.krate;
    let ident = &method.ident;
    let wire = &method.wire;
    let docs = &method.docs;
    let since = version_tokens(krate, method.since);
    let params = method.args.iter().map(|arg| {
        let (ident, ty) = (&arg.ident, &arg.ty);
        quote!(#ident: #ty)
    });
    let fields = method.args.iter().map(|arg| {
        let (ident, ty, wire) = (&arg.ident, &arg.ty, &arg.wire);
        quote_spanned!(ty.span()=> #[serde(rename = #wire)] #ident: #ty)
    });
    let names = method.args.iter().map(|arg| &arg.ident);
    let ok = &method.ok;
    let derive = respan(
        quote!(#[derive(#private::serde::Serialize)] #[serde(crate = #serde_path)]),
        ident.span(),
    );
    let args_struct = quote_spanned!(ident.span()=> struct Args { #(#fields),* });
    // `call_at` and `multicall_at` require the result to deserialize: a type that
    // does not points at the result type.
    let ok_span = ok.span();
    let call_at = Ident::new("call_at", ok_span);
    let multicall_at = Ident::new("multicall_at", ok_span);
    let args = quote! {
        #derive
        #args_struct
        let args = Args { #(#names),* };
    };
    let version = quote!(::core::option::Option::Some(#since));
    match method.kind {
        Kind::Call => quote! {
            #(#docs)*
            pub async fn #ident(&self, ctx: &#krate::Context, #(#params),*) -> #krate::Result<#ok> {
                #args
                self.client.#call_at(ctx, #wire, #version, args).await
            }
        },
        Kind::Cast => quote! {
            #(#docs)*
            pub async fn #ident(&self, ctx: &#krate::Context, #(#params),*) -> #krate::Result<()> {
                #args
                self.client.cast_at(ctx, #wire, #version, args).await
            }
        },
        Kind::Stream => quote! {
            #(#docs)*
            pub async fn #ident(
                &self,
                ctx: &#krate::Context,
                #(#params),*
            ) -> #krate::Result<#krate::ReplyStream<#ok>> {
                #args
                self.client.#multicall_at(ctx, #wire, #version, args).await
            }
        },
    }
}

/// Compile-time checks, each spanned at the type it checks so the error points at
/// the offending line: arguments and results travel as JSON, errors become remote
/// failures.
fn checks(service: &Service) -> TokenStream {
    let krate = &service.options.krate;
    let private = quote!(#krate::__private);
    let mut checks = Vec::new();
    for method in &service.methods {
        for arg in &method.args {
            let ty = &arg.ty;
            checks.push(quote_spanned!(ty.span()=> #private::argument::<#ty>();));
        }
        if method.kind != Kind::Cast || !is_unit(&method.ok) {
            let ok = &method.ok;
            checks.push(quote_spanned!(ok.span()=> #private::result::<#ok>();));
        }
        if let Some(error) = &method.error {
            checks.push(quote_spanned!(error.span()=> #private::error::<#error>();));
        }
    }
    quote! {
        const _: fn() = || {
            #(#checks)*
        };
    }
}

/// `tokens` with every span set to `span`. The code serde's derives and mqrpc's
/// generic functions generate for a method is spanned at the method's own tokens, so
/// that a type error they raise points at the offending method, not at the
/// `#[mqrpc::service]` line.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tree| {
            if let TokenTree::Group(group) = &tree {
                let mut respanned = Group::new(group.delimiter(), respan(group.stream(), span));
                respanned.set_span(span);
                tree = TokenTree::Group(respanned);
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}

fn is_unit(ty: &Type) -> bool {
    matches!(ty, Type::Tuple(tuple) if tuple.elems.is_empty())
}
