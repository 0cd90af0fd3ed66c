//! Any bytes decoded as a request and dispatched to a server's endpoints, the
//! method run to its end and its replies encoded: no panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rpc_core::fuzzing::dispatch(data);
});
