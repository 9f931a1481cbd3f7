//! Fuzz target `analytics_query`: see `tutti::fuzz_harness::analytics_query` and docs/security/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutti::fuzz_harness::analytics_query(data));
