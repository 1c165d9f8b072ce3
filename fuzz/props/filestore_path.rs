// The property the `filestore_path` fuzz target checks, shared with the corpus regression test
// (`core/tests/fuzz_corpus.rs`), which runs it on stable over `fuzz/corpus/filestore_path/`.
//
// Any client-supplied name (an upload path, an artifact name) becomes one safe component that keeps
// a key inside the storage root; and any key `validate_key` accepts cannot escape it.

use talon_core::paths::{COMPONENT_BYTES_MAX, safe_component, validate_key};

/// Panics if the property fails for `data`.
pub fn check(data: &[u8]) {
    let name = String::from_utf8_lossy(data);
    let c = safe_component(&name);
    assert!(!c.is_empty() && c.len() <= COMPONENT_BYTES_MAX, "{c:?}");
    assert!(
        c != "." && c != ".." && !c.contains('/') && !c.contains('\0'),
        "{c:?}"
    );
    let key = format!("clients/C.0000000000000000/flows/F.1/uploads/00001-{c}");
    assert_eq!(validate_key(&key), Ok(()), "{key:?}");
    // A key accepted as is never climbs out of the root, whatever it was made of.
    if validate_key(&name).is_ok() {
        for part in name.split('/') {
            assert!(!part.is_empty() && part != "." && part != "..", "{name:?}");
            assert!(!part.contains('\0') && !part.contains('\\'), "{name:?}");
        }
        assert!(!name.starts_with('/'), "{name:?}");
    }
}
