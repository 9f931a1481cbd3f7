//! Fuzz target `services`: see `tutti::fuzz_harness::services` and docs/security/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutti::fuzz_harness::services(data));
