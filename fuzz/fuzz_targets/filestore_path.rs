//! Names and keys mapped into the filestore: one safe component each, never escaping the root.
#![no_main]

#[path = "../props/filestore_path.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check(data));
