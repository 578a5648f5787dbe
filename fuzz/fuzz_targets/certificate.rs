//! Trust layer (spec §15): see `veil_protocol::fuzzing::certificate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_protocol::fuzzing::certificate(data));
