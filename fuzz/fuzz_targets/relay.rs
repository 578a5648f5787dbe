//! The relay's forwarding core (spec §16.4): see `veil_protocol::fuzzing::relay`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_protocol::fuzzing::relay(data));
