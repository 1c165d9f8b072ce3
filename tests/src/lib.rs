//! Talon's cross-crate integration tests live in `tests/tests/`. This library is empty on purpose:
//! the crate exists so that tests spanning `talon-core`, `talon-proto` and `talon-sim` (and later the
//! real `talon` processes on loopback) have one home.
