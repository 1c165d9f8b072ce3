//! Talon's wire protocol, generated from `proto/*.proto` (see `docs/protocol.md`).
//!
//! - [`comms`]: client <-> frontend.
//! - [`cluster`]: minion <-> master (replication stream, broadcasts, remote datastore).
//! - [`api`]: the analyst's API behind the CLI and GUI.
//!
//! Enable the `grpc` feature for the tonic client and server stubs.
#![allow(missing_docs)] // generated code

/// Client <-> frontend messages and the `Comms` service.
pub mod comms {
    include!(concat!(env!("OUT_DIR"), "/talon.comms.rs"));
}

/// Minion <-> master messages and the `Replication` and `RemoteDatastore` services.
pub mod cluster {
    include!(concat!(env!("OUT_DIR"), "/talon.cluster.rs"));
}

/// Analyst API messages and the `Api` service.
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/talon.api.rs"));
}
