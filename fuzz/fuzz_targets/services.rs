//! Fuzz target `services`: see `tutti::fuzz_harness::services` and docs/SECURITY.md (Fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutti::fuzz_harness::services(data));
