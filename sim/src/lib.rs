//! Talon's deterministic simulator.
//!
//! Everything random in a simulated run comes from one seed through [`rng::SimRng`], split into
//! named sub-streams so that adding a draw in one component does not shift every other component's
//! draws. This crate holds the simulated world ([`world`]: turmoil sockets, virtual clock, seeded
//! entropy, crashable local disks, the 40–60 ms shared volume) and the cluster harness
//! ([`cluster`]) that runs the production shell's master, minions and agents in it.

pub mod cluster;
pub mod disk;
pub mod latency;
pub mod rng;
pub mod world;
