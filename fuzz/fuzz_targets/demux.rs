//! The end-to-end demultiplexer (spec §16.6): see `veil_protocol::fuzzing::demux`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_protocol::fuzzing::demux(data));
