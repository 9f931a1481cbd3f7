//! Fuzz target `ot_json`: see `tutti::fuzz_harness::ot_json` and docs/SECURITY.md (Fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tutti::fuzz_harness::ot_json(data));
