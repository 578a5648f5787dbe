//! Trust layer (spec §15): see `veil_protocol::fuzzing::revocation_list`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_protocol::fuzzing::revocation_list(data));
