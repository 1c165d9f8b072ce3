//! Talon's deterministic simulator.
//!
//! Everything random in a simulated run comes from one seed through [`rng::SimRng`], split into
//! named sub-streams so that adding a draw in one component does not shift every other component's
//! draws. This crate holds the simulated world's parts: seeded randomness, the shared volume's
//! latency model, and local disks with crash semantics ([`disk::SimDisk`]). The cluster harness
//! (turmoil hosts running the production shell) builds on them.

pub mod disk;
pub mod latency;
pub mod rng;
