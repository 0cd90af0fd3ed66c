//! Misuses of `#[mqrpc::service]`: each must fail to compile with an error that
//! points at the offending line of the trait (the expected output is in
//! `tests/ui/*.stderr`; `TRYBUILD=overwrite` rewrites it after a deliberate change).
//! Also a few services that must compile, under `#![deny(missing_docs)]` and
//! `#![deny(warnings)]` (`tests/ui/pass/*.rs`).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
