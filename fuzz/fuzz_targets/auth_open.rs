//! Any bytes given to message authentication: refused without a panic; a signed body
//! is accepted once, then refused as a replay or once altered.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rpc_core::fuzzing::auth(data);
});
