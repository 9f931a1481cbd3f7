//! Fuzz target `analytics_query`: see `tutti::fuzz_harness::analytics_query` and docs/SECURITY.md (Fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutti::fuzz_harness::analytics_query(data));
