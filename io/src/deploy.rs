//! Deployment: the YAML configs ([`config`]) and the certificates and keys ([`pki`]).

pub mod config;
pub mod pki;
