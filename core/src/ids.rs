//! Identifiers: client, hunt and flow ids, with their validation and derivation.
//!
//! - A client id is `C.` + 16 lowercase hex digits: the first 8 bytes of SHA-256 of the client's
//!   public key. A client can only ever speak as the id derived from its own key (invariant 6 (docs/architecture.md)).
//! - A hunt id is `H.` + 1..=32 uppercase hex digits or digits.
//! - A flow id is `F.` + 1..=40 characters of `[0-9A-Za-z.]`. A hunt's flow on a client is derived
//!   from both ids, so scheduling the same pair twice names the same flow.

use sha2::{Digest, Sha256};
use std::fmt;

/// Longest id accepted anywhere (bytes).
pub const ID_BYTES_MAX: usize = 48;

/// Why a string is not a valid id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdError {
    /// The id does not start with the prefix its kind requires.
    WrongPrefix {
        /// Which kind of id.
        kind: &'static str,
        /// The prefix it needs.
        expected: &'static str,
    },
    /// The id has no characters after its prefix, or more than allowed.
    BadLength {
        /// Which kind of id.
        kind: &'static str,
        /// The length given.
        len: usize,
    },
    /// The id contains a character its kind does not allow.
    BadChar {
        /// Which kind of id.
        kind: &'static str,
        /// The first offending character.
        ch: char,
    },
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::WrongPrefix { kind, expected } => {
                write!(f, "{kind} id must start with {expected:?}")
            }
            IdError::BadLength { kind, len } => write!(f, "{kind} id has a bad length ({len})"),
            IdError::BadChar { kind, ch } => write!(f, "{kind} id contains {ch:?}"),
        }
    }
}

impl std::error::Error for IdError {}

fn check(
    kind: &'static str,
    prefix: &'static str,
    s: &str,
    body_len: std::ops::RangeInclusive<usize>,
    ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    let Some(body) = s.strip_prefix(prefix) else {
        return Err(IdError::WrongPrefix {
            kind,
            expected: prefix,
        });
    };
    if !body_len.contains(&body.len()) {
        return Err(IdError::BadLength { kind, len: s.len() });
    }
    match body.chars().find(|c| !ok(*c)) {
        Some(ch) => Err(IdError::BadChar { kind, ch }),
        None => Ok(()),
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// A client's identity: `C.` + 16 lowercase hex digits derived from its public key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(String);

impl ClientId {
    /// Derives the id from the client's public key (DER SubjectPublicKeyInfo or raw key bytes).
    pub fn from_public_key(public_key: &[u8]) -> ClientId {
        let digest = Sha256::digest(public_key);
        ClientId(format!("C.{}", hex_lower(&digest[..8])))
    }

    /// Parses and validates a client id.
    pub fn parse(s: &str) -> Result<ClientId, IdError> {
        check(
            "client",
            "C.",
            s,
            16..=16,
            |c| matches!(c, '0'..='9' | 'a'..='f'),
        )?;
        Ok(ClientId(s.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// Lets maps keyed by client id be range-scanned by a `&str` prefix; the orders agree (derived Ord).
impl std::borrow::Borrow<str> for ClientId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// SHA-256 of a public key: what the registry keeps to check that later contacts present the same key.
pub fn key_fingerprint(public_key: &[u8]) -> [u8; 32] {
    Sha256::digest(public_key).into()
}

/// A hunt's id: `H.` + uppercase hex.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HuntId(String);

impl HuntId {
    /// Parses and validates a hunt id.
    pub fn parse(s: &str) -> Result<HuntId, IdError> {
        check(
            "hunt",
            "H.",
            s,
            1..=32,
            |c| matches!(c, '0'..='9' | 'A'..='F'),
        )?;
        Ok(HuntId(s.to_owned()))
    }

    /// Makes a hunt id from a number the caller guarantees unique (e.g. seeded randomness).
    pub fn from_u64(n: u64) -> HuntId {
        HuntId(format!("H.{n:016X}"))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A flow's id: `F.` + `[0-9A-Za-z.]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId(String);

impl FlowId {
    /// Parses and validates a flow id.
    pub fn parse(s: &str) -> Result<FlowId, IdError> {
        check("flow", "F.", s, 1..=40, |c| {
            c.is_ascii_alphanumeric() || c == '.'
        })?;
        Ok(FlowId(s.to_owned()))
    }

    /// Makes a collection's flow id from a number the caller guarantees unique.
    pub fn from_u64(n: u64) -> FlowId {
        FlowId(format!("F.{n:016X}"))
    }

    /// The flow a hunt runs on a client: the same pair always names the same flow.
    pub fn for_hunt(hunt: &HuntId, client: &ClientId) -> FlowId {
        let mut h = Sha256::new();
        h.update(hunt.as_str().as_bytes());
        h.update([0u8]);
        h.update(client.as_str().as_bytes());
        let digest = h.finalize();
        FlowId(format!("F.{}.H", hex_lower(&digest[..8]).to_uppercase()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    )*};
}
display_as_str!(ClientId, HuntId, FlowId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_is_derived_from_key_and_round_trips() {
        let id = ClientId::from_public_key(b"some public key");
        assert_eq!(id.as_str().len(), 18);
        assert_eq!(ClientId::parse(id.as_str()), Ok(id.clone()));
        assert_ne!(id, ClientId::from_public_key(b"another key"));
    }

    #[test]
    fn bad_ids_name_what_is_wrong() {
        assert_eq!(
            ClientId::parse("X.0123456789abcdef"),
            Err(IdError::WrongPrefix {
                kind: "client",
                expected: "C."
            })
        );
        assert_eq!(
            ClientId::parse("C.0123"),
            Err(IdError::BadLength {
                kind: "client",
                len: 6
            })
        );
        assert_eq!(
            ClientId::parse("C.0123456789abcdeZ"),
            Err(IdError::BadChar {
                kind: "client",
                ch: 'Z'
            })
        );
        assert!(FlowId::parse("F.../..").is_err());
        assert!(HuntId::parse("H.").is_err());
    }

    #[test]
    fn hunt_flow_ids_are_stable_and_distinct() {
        let h = HuntId::from_u64(7);
        let a = ClientId::from_public_key(b"a");
        let b = ClientId::from_public_key(b"b");
        assert_eq!(FlowId::for_hunt(&h, &a), FlowId::for_hunt(&h, &a));
        assert_ne!(FlowId::for_hunt(&h, &a), FlowId::for_hunt(&h, &b));
        assert!(FlowId::parse(FlowId::for_hunt(&h, &a).as_str()).is_ok());
        assert!(HuntId::parse(h.as_str()).is_ok());
    }
}
