//! See `fuzz/props/config.rs` for the property.
#![no_main]

#[path = "../props/config.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check(data));
