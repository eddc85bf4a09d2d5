//! libFuzzer entry for `checks::intake`: the properties live in checks.rs so
//! that `shared/tests/fuzz_corpus.rs` replays the same ones on every test run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| plugin_delivery_fuzz::intake(data));
