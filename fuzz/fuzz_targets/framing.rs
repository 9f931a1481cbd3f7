//! Fuzz target `framing`: see `tutti::fuzz_harness::framing` and docs/SECURITY.md (Fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutti::fuzz_harness::framing(data));
