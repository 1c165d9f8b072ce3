//! Talon's production shell: everything that does I/O around `talon-core`'s machines, laid out by
//! role (docs/architecture.md, "Production shell"):
//!
//! - [`node`]: a frontend node (master or minion) driving the core machines, its gRPC services,
//!   and starting one ([`node::server`]);
//! - [`cluster`]: minion ↔ master — the replication link and the remote datastore;
//! - [`storage`]: the local disk and journal, the shared volume, the datastore, the filestore, the
//!   records kept there, upload reassembly;
//! - [`net`]: listeners and connections ([`net::tls`]: rustls, endpoint identities);
//! - [`deploy`]: configs and certificates;
//! - [`agent`]: the endpoint agent and the artifacts it runs;
//! - [`query`]: SQL over the endpoint tables (the agent runs queries, the master checks them);
//! - [`cli`]: the `talon` command line, the analyst's API client, the demo and the benchmarks;
//! - [`clock`], [`env`](mod@env), [`fsutil`], [`text`]: the injected world and small shared helpers.

pub mod agent;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod definitions;
pub mod deploy;
pub mod env;
pub mod fsutil;
pub mod gui;
pub mod metrics;
pub mod net;
pub mod node;
pub mod query;
pub mod storage;
pub mod text;
