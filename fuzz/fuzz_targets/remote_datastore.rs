//! See `fuzz/props/remote_datastore.rs` for the property.
#![no_main]

#[path = "../props/remote_datastore.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check(data));
