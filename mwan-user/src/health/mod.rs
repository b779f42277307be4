//! Health checking: per-WAN probers and the state machine that judges them.
//!
//! A [`Prober`] sends probing rounds through one WAN (socket mark and
//! `SO_BINDTODEVICE`, so a probe never leaves through another link) and
//! reports each round as a [`RoundReport`]. The daemon feeds the reports, and
//! the WAN's link events, into the WAN's [`Machine`], a pure state machine
//! (no I/O, time passed in) that says when the WAN is up, degraded or down
//! and why.

mod dns;
mod icmp;
pub mod machine;
mod outcome;
pub mod passive;
pub mod probe;
pub mod stats;
mod tcp;

#[cfg(test)]
mod netns_tests;

pub use machine::{Machine, Measurements, State, Transition};
pub use probe::{ProbeSpec, Prober, RoundReport, TargetResult};
pub use stats::{HealthStats, TargetStats};
