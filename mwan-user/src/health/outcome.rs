//! What every kind of probe (ICMP, TCP, DNS) reports, and the little they
//! share; below `probe`, which runs them.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The error of a probe that got no answer in time.
pub(super) const NO_ANSWER: &str = "no answer in time";

/// A probe's outcome: the RTT, or why it failed.
pub(super) type Outcome = Result<Duration, String>;

/// A random number for echo ids and DNS ids (not cryptographic).
pub(super) fn random_u16() -> u16 {
    RandomState::new().build_hasher().finish() as u16
}
