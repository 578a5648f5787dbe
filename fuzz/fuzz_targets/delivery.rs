//! The delivery layer (spec §17): see `veil_protocol::fuzzing::delivery`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_protocol::fuzzing::delivery(data));
