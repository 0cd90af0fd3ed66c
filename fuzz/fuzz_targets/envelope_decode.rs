//! Any bytes given to the envelope decoder: no panic, and whatever decodes survives
//! an encode/decode round trip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rpc_core::fuzzing::decode(data);
});
