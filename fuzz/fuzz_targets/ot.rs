//! Fuzz target `ot`: see `tutti::fuzz_harness::ot` and docs/SECURITY.md (Fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutti::fuzz_harness::ot(data));
