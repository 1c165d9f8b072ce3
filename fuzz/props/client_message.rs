// The property the `client_message` fuzz target checks, shared with the corpus regression test
// (`core/tests/fuzz_corpus.rs`): any bytes a client can send are refused or accepted, never a panic,
// and what is accepted respects the limits it was decoded under.

use talon_core::codec::{self, ClientInput, CodecLimits, FlowData};

/// Panics if the property fails for `data`.
pub fn check(data: &[u8]) {
    let limits = CodecLimits::default();
    if let Ok(ClientInput::Flow {
        data: FlowData::Rows { rows, .. },
        ..
    }) = codec::decode(data, &limits)
    {
        assert!(rows.len() <= limits.rows_per_batch_max);
        assert!(rows.iter().all(|r| r.len() <= limits.row_bytes_max));
    }
}
