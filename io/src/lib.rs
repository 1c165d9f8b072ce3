//! Talon's production shell: the `talon` command line (and, as it grows, the frontend, master and
//! minion services, storage backends and client agent that drive `talon-core`).

pub mod agent;
pub mod api_client;
pub mod artifacts;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod datastore;
pub mod demo;
pub mod env;
pub mod filestore;
pub mod fsutil;
pub mod net;
pub mod node;
pub mod pki;
pub mod records;
pub mod server;
pub mod storage;
pub mod text;
pub mod tls;
pub mod uploads;
