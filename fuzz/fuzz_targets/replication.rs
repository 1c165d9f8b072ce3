//! See `fuzz/props/replication.rs` for the property.
#![no_main]

#[path = "../props/replication.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check(data));
