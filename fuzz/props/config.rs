// The property the `config` fuzz target checks, shared with the corpus regression test
// (`io/tests/fuzz_corpus.rs`): any text given as a server config is refused with a message or
// accepted; what is accepted passes validation and reads back identically after being written out
// (what `talon config generate` and `config add-frontends` do).

use talon_io::deploy::config::{ServerConfig, to_yaml};

/// Panics if the property fails for `data`.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // The loader reads UTF-8 text; other bytes fail before parsing.
    };
    match ServerConfig::parse(text) {
        Err(e) => assert!(!e.trim().is_empty(), "an error without a message"),
        Ok(c) => {
            assert_eq!(c.validate(), Ok(()));
            let again = to_yaml(&c).expect("an accepted config encodes");
            assert_eq!(ServerConfig::parse(&again), Ok(c), "{again}");
        }
    }
}
