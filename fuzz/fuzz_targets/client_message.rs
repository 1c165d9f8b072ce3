//! Any bytes a client can send: the decoder must refuse or accept, never panic, and what it accepts
//! must respect the limits it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talon_core::codec::{self, ClientInput, CodecLimits, FlowData};

fuzz_target!(|data: &[u8]| {
    let limits = CodecLimits::default();
    if let Ok(ClientInput::Flow { data: FlowData::Rows { rows, .. }, .. }) = codec::decode(data, &limits) {
        assert!(rows.len() <= limits.rows_per_batch_max);
        assert!(rows.iter().all(|r| r.len() <= limits.row_bytes_max));
    }
});
