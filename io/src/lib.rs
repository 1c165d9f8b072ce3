//! Talon's production shell: the `talon` command line (and, as it grows, the frontend, master and
//! minion services, storage backends and client agent that drive `talon-core`).

pub mod artifacts;
pub mod cli;
pub mod clock;
pub mod config;
pub mod datastore;
pub mod fsutil;
pub mod pki;
pub mod storage;
pub mod tls;
