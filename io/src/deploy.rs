//! Deployment: the YAML configs ([`config`]), the certificates and keys ([`pki`]), and the Debian
//! packages of a deployment's nodes ([`package`]).

pub mod config;
pub mod package;
pub mod pki;
