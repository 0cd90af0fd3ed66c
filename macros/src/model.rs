//! The service as the macro reads it: the trait's options, and per method its kind,
//! wire name, version, arguments and result types. Every rule a trait must follow is
//! checked here, each failure spanned at the offending tokens.

use proc_macro2::Span;
use syn::parse::Parser;
use syn::{
    Attribute, FnArg, GenericArgument, Ident, ItemTrait, LitStr, Pat, Path, PathArguments,
    ReturnType, TraitItem, TraitItemFn, Type, TypeParamBound, Visibility,
};

/// A version `major.minor[.revision]` as written in an attribute.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub revision: Option<u32>,
}

impl Version {
    fn parse(lit: &LitStr) -> syn::Result<Self> {
        let text = lit.value();
        let parts: Option<Vec<u32>> = text.split('.').map(|part| part.parse().ok()).collect();
        match parts.as_deref() {
            Some(&[major, minor]) => Ok(Version {
                major,
                minor,
                revision: None,
            }),
            Some(&[major, minor, revision]) => Ok(Version {
                major,
                minor,
                revision: Some(revision),
            }),
            _ => Err(syn::Error::new(
                lit.span(),
                format!(
                    "invalid version {text:?}: expected \"major.minor\" or \"major.minor.revision\""
                ),
            )),
        }
    }

    fn key(self) -> (u32, u32, u32) {
        (self.major, self.minor, self.revision.unwrap_or(0))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if let Some(revision) = self.revision {
            write!(f, ".{revision}")?;
        }
        Ok(())
    }
}

/// The options of `#[service(...)]`.
pub struct Options {
    pub version: Version,
    pub namespace: Option<LitStr>,
    pub client: Option<Ident>,
    pub krate: Path,
}

impl Options {
    pub fn parse(tokens: proc_macro2::TokenStream) -> syn::Result<Self> {
        let mut options = Options {
            version: Version {
                major: 1,
                minor: 0,
                revision: None,
            },
            namespace: None,
            client: None,
            krate: syn::parse_quote!(::mqrpc),
        };
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("version") {
                options.version = Version::parse(&meta.value()?.parse()?)?;
            } else if meta.path.is_ident("namespace") {
                options.namespace = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("client") {
                let name: LitStr = meta.value()?.parse()?;
                options.client = Some(name.parse()?);
            } else if meta.path.is_ident("crate") {
                let path: LitStr = meta.value()?.parse()?;
                options.krate = path.parse()?;
            } else {
                return Err(meta.error(
                    "unknown service option: expected `version`, `namespace`, `client` or `crate`",
                ));
            }
            Ok(())
        });
        parser.parse2(tokens)?;
        Ok(options)
    }
}

/// How a method is called.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `call`: one result.
    Call,
    /// `cast`: no result; the client returns once the broker took the message.
    Cast,
    /// `multicall`: a stream of results.
    Stream,
}

/// One keyword argument.
pub struct Arg {
    pub ident: Ident,
    /// The keyword on the wire.
    pub wire: String,
    pub ty: Type,
}

/// One method of the service.
pub struct Method {
    pub ident: Ident,
    /// The method name on the wire.
    pub wire: String,
    pub kind: Kind,
    /// The version that added the method: what its client asks for.
    pub since: Version,
    pub args: Vec<Arg>,
    /// The result (a call's, or each streamed item's); `()` for a cast.
    pub ok: Type,
    /// The error type when the method returns `Result<T, E>`.
    pub error: Option<Type>,
    /// The method's doc comments, repeated on its client method.
    pub docs: Vec<Attribute>,
}

/// The whole service.
pub struct Service {
    pub vis: Visibility,
    pub ident: Ident,
    pub client: Ident,
    pub options: Options,
    pub methods: Vec<Method>,
}

/// Collects errors, so one expansion reports every misuse at once.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, span: Span, message: impl std::fmt::Display) {
        self.add(syn::Error::new(span, message));
    }

    /// An error underlining all of `tokens`, not just their first token: without
    /// nightly, a proc macro's `Span::join` gives only the first token's span.
    pub fn push_spanned(&mut self, tokens: impl quote::ToTokens, message: impl std::fmt::Display) {
        self.add(syn::Error::new_spanned(tokens, message));
    }

    pub fn add(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

impl Service {
    /// Reads and checks the trait. The trait's own tokens are left to the caller to
    /// rewrite.
    pub fn read(options: Options, item: &ItemTrait) -> syn::Result<Self> {
        let mut errors = Errors::default();
        if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
            errors.push_spanned(
                &item.generics,
                "a service trait cannot be generic: its client and endpoint need concrete types",
            );
        }
        if item.unsafety.is_some() || item.auto_token.is_some() {
            errors.push(
                item.ident.span(),
                "a service trait cannot be `unsafe` or `auto`",
            );
        }
        let mut methods = Vec::new();
        for trait_item in &item.items {
            match trait_item {
                TraitItem::Fn(function) => {
                    if let Some(method) = read_method(function, &options, &mut errors) {
                        methods.push(method);
                    }
                }
                other => errors.push_spanned(
                    other,
                    "a service trait holds methods only (each one an RPC method)",
                ),
            }
        }
        for (i, method) in methods.iter().enumerate() {
            if methods[..i].iter().any(|m| m.wire == method.wire) {
                errors.push(
                    method.ident.span(),
                    format!("two methods are called {:?} on the wire", method.wire),
                );
            }
        }
        errors.finish()?;
        let client = options
            .client
            .clone()
            .unwrap_or_else(|| Ident::new(&format!("{}Client", item.ident), item.ident.span()));
        Ok(Service {
            vis: item.vis.clone(),
            ident: item.ident.clone(),
            client,
            options,
            methods,
        })
    }
}

/// Names the generated client or trait already use for themselves.
const RESERVED: &[&str] = &[
    "new",
    "from_client",
    "client",
    "prepare",
    "server",
    "fanout",
    "topic",
    "exchange",
    "version",
    "version_cap",
    "can_send_version",
    "timeout",
    "call_monitor",
    "retry",
    "close",
    "endpoint",
];

/// What `#[mqrpc(...)]` on a method says.
#[derive(Default)]
struct MethodOptions {
    cast: bool,
    stream: bool,
    since: Option<(Version, Span)>,
    name: Option<String>,
}

/// Whether an attribute is the macro's own `#[mqrpc(...)]`.
pub fn is_ours(attr: &Attribute) -> bool {
    attr.path().is_ident("mqrpc")
}

fn method_options(attrs: &[Attribute], errors: &mut Errors) -> MethodOptions {
    let mut options = MethodOptions::default();
    for attr in attrs.iter().filter(|a| is_ours(a)) {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("cast") {
                options.cast = true;
            } else if meta.path.is_ident("stream") {
                options.stream = true;
            } else if meta.path.is_ident("since") {
                let lit: LitStr = meta.value()?.parse()?;
                options.since = Some((Version::parse(&lit)?, lit.span()));
            } else if meta.path.is_ident("name") || meta.path.is_ident("rename") {
                let lit: LitStr = meta.value()?.parse()?;
                options.name = Some(lit.value());
            } else {
                return Err(meta.error(
                    "unknown method option: expected `cast`, `stream`, `since = \"X.Y\"` or `name = \"...\"`",
                ));
            }
            Ok(())
        });
        if let Err(err) = parsed {
            errors.add(err);
        }
    }
    if options.cast && options.stream {
        let ours = attrs.iter().filter(|a| is_ours(a));
        errors.push_spanned(
            quote::quote!(#(#ours)*),
            "a method is either `cast` or `stream`, not both",
        );
    }
    options
}

/// The wire name an argument's `#[mqrpc(name = "...")]` gives it.
fn arg_name(attrs: &[Attribute], errors: &mut Errors) -> Option<String> {
    let mut name = None;
    for attr in attrs.iter().filter(|a| is_ours(a)) {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") || meta.path.is_ident("rename") {
                let lit: LitStr = meta.value()?.parse()?;
                name = Some(lit.value());
                Ok(())
            } else {
                Err(meta.error("unknown argument option: expected `name = \"...\"`"))
            }
        });
        if let Err(err) = parsed {
            errors.add(err);
        }
    }
    name
}

fn read_method(function: &TraitItemFn, service: &Options, errors: &mut Errors) -> Option<Method> {
    let sig = &function.sig;
    let mut errors_here = Errors::default();
    let options = method_options(&function.attrs, &mut errors_here);
    // `cast` and `stream` together are already an error: checking the signature
    // against either kind would only add a misleading second one.
    let kinds_conflict = options.cast && options.stream;
    let kind = if options.cast {
        Kind::Cast
    } else if options.stream {
        Kind::Stream
    } else {
        Kind::Call
    };

    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors_here.push_spanned(
            &sig.generics,
            "a service method cannot be generic: its arguments and result travel as JSON, \
             so each needs one concrete type",
        );
    }
    if let Some(token) = &sig.constness {
        errors_here.push(token.span, "a service method cannot be `const`");
    }
    if let Some(token) = &sig.unsafety {
        errors_here.push(token.span, "a service method cannot be `unsafe`");
    }
    if let Some(abi) = &sig.abi {
        errors_here.push_spanned(abi, "a service method cannot name an ABI");
    }
    if let Some(variadic) = &sig.variadic {
        errors_here.push_spanned(variadic, "a service method cannot be variadic");
    }

    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(receiver)) => {
            if receiver.reference.is_none() || receiver.colon_token.is_some() {
                errors_here.push_spanned(
                    receiver,
                    "a service method takes `&self`: calls run concurrently on one shared service",
                );
            } else if receiver.mutability.is_some() {
                errors_here.push_spanned(
                    receiver,
                    "a service method takes `&self`, not `&mut self`: calls run concurrently, \
                     so state they change needs interior mutability (a Mutex, an atomic)",
                );
            }
        }
        Some(first) => errors_here.push_spanned(
            first,
            "a service method takes `&self` first, then `ctx: &Context`",
        ),
        None => errors_here.push(
            sig.paren_token.span.join(),
            "a service method takes `&self` first, then `ctx: &Context`",
        ),
    }
    match inputs.next() {
        Some(FnArg::Typed(ctx)) if is_context_ref(&ctx.ty) => {}
        Some(other) => errors_here.push_spanned(
            other,
            "a service method takes the request context after `&self`: `ctx: &Context` \
             (its own arguments follow)",
        ),
        None => errors_here.push(
            sig.paren_token.span.join(),
            "a service method takes the request context after `&self`: `ctx: &Context`",
        ),
    }
    let mut args: Vec<Arg> = Vec::new();
    for input in inputs {
        let FnArg::Typed(typed) = input else { continue };
        let wire_name = arg_name(&typed.attrs, &mut errors_here);
        let ident = match &*typed.pat {
            Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => pat.ident.clone(),
            other => {
                errors_here.push_spanned(
                    other,
                    "an argument needs a plain name: it is the keyword argument on the wire",
                );
                continue;
            }
        };
        match &*typed.ty {
            Type::Reference(reference) => errors_here.push_spanned(
                reference,
                "an argument is an owned value decoded from the request: \
                 use `String` for `&str`, `Vec<T>` for `&[T]`",
            ),
            Type::ImplTrait(bound) => errors_here.push_spanned(
                bound,
                "a service method cannot be generic: its arguments travel as JSON, \
                 so each needs one concrete type",
            ),
            _ => {}
        }
        let wire = wire_name.unwrap_or_else(|| unraw(&ident));
        if args.iter().any(|a| a.wire == wire) {
            errors_here.push(
                ident.span(),
                format!("two arguments are called {wire:?} on the wire"),
            );
        }
        args.push(Arg {
            ident,
            wire,
            ty: (*typed.ty).clone(),
        });
    }

    let output = match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    let (ok, error) = match kind {
        Kind::Call | Kind::Cast => {
            if sig.asyncness.is_none() && !kinds_conflict {
                errors_here.push(
                    sig.fn_token.span,
                    if kind == Kind::Cast {
                        "a cast method is an `async fn`"
                    } else {
                        "a call method is an `async fn` (a method returning a stream of \
                         results is marked `#[mqrpc(stream)]`)"
                    },
                );
            }
            split_result(&output)
        }
        Kind::Stream => {
            if let Some(token) = &sig.asyncness {
                errors_here.push(
                    token.span,
                    "a `#[mqrpc(stream)]` method is a plain `fn` returning \
                     `impl Stream<Item = Result<T, E>>`",
                );
            }
            match stream_item(&output) {
                Some(item) => split_result(&item),
                None => {
                    errors_here.push_spanned(
                        &output,
                        "a `#[mqrpc(stream)]` method returns `impl Stream<Item = Result<T, E>>` \
                         (or `impl Stream<Item = T>`)",
                    );
                    (output.clone(), None)
                }
            }
        }
    };

    let rust_name = unraw(&sig.ident);
    if RESERVED.contains(&rust_name.as_str()) {
        errors_here.push(
            sig.ident.span(),
            format!(
                "`{rust_name}` is taken by the generated client or endpoint: give the Rust \
                 method another name and keep `{rust_name}` on the wire with \
                 `#[mqrpc(name = \"{rust_name}\")]`"
            ),
        );
    }
    let wire = options.name.unwrap_or(rust_name);
    if wire.starts_with('_') {
        errors_here.push(
            sig.ident.span(),
            "a method whose wire name starts with `_` is private and never dispatched: \
             name it with `#[mqrpc(name = \"...\")]`",
        );
    }
    let base = Version {
        major: service.version.major,
        minor: 0,
        revision: None,
    };
    let since = match options.since {
        Some((since, span)) => {
            if since.major != service.version.major || since.key() > service.version.key() {
                errors_here.push(
                    span,
                    format!(
                        "`since = \"{since}\"` is not a version of this service: it must have the \
                         service's major version and be at most its version {}",
                        service.version
                    ),
                );
            }
            since
        }
        None => base,
    };

    if let Some(found) = errors_here.0 {
        // The other methods are still read, so every misuse is reported at once.
        errors.add(found);
        return None;
    }
    Some(Method {
        ident: sig.ident.clone(),
        wire,
        kind,
        since,
        args,
        ok,
        error,
        docs: function
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("doc"))
            .cloned()
            .collect(),
    })
}

/// The name without `r#`: what serde writes for a raw identifier too.
fn unraw(ident: &Ident) -> String {
    let text = ident.to_string();
    text.strip_prefix("r#")
        .map_or_else(|| text.clone(), str::to_owned)
}

/// Whether `ty` is `&Context` (any path ending in `Context`).
fn is_context_ref(ty: &Type) -> bool {
    let Type::Reference(reference) = ty else {
        return false;
    };
    if reference.mutability.is_some() {
        return false;
    }
    let Type::Path(path) = &*reference.elem else {
        return false;
    };
    path.qself.is_none()
        && path
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "Context" && s.arguments.is_none())
}

/// `Result<T, E>` as `(T, Some(E))`; any other type `T` as `(T, None)`.
fn split_result(ty: &Type) -> (Type, Option<Type>) {
    if let Type::Path(path) = ty
        && path.qself.is_none()
        && let Some(last) = path.path.segments.last()
        && last.ident == "Result"
        && let PathArguments::AngleBracketed(generics) = &last.arguments
    {
        let types: Vec<&Type> = generics
            .args
            .iter()
            .filter_map(|arg| match arg {
                GenericArgument::Type(ty) => Some(ty),
                _ => None,
            })
            .collect();
        if let [ok, error] = types[..] {
            return (ok.clone(), Some(error.clone()));
        }
    }
    (ty.clone(), None)
}

/// The `Item` of `impl Stream<Item = X>`.
fn stream_item(ty: &Type) -> Option<Type> {
    let Type::ImplTrait(bounds) = ty else {
        return None;
    };
    bounds.bounds.iter().find_map(|bound| {
        let TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let last = bound.path.segments.last()?;
        if last.ident != "Stream" {
            return None;
        }
        let PathArguments::AngleBracketed(generics) = &last.arguments else {
            return None;
        };
        generics.args.iter().find_map(|arg| match arg {
            GenericArgument::AssocType(assoc) if assoc.ident == "Item" => Some(assoc.ty.clone()),
            _ => None,
        })
    })
}
