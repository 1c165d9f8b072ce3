//! Any bytes a client can send: the decoder must refuse or accept, never panic, and what it accepts
//! must respect the limits it was given.
#![no_main]

#[path = "../props/client_message.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check(data));
