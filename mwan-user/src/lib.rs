//! mwan: multi-WAN load balancing and failover with an eBPF datapath.
//!
//! See docs/ARCHITECTURE.md for how the pieces fit.
pub mod checksum;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conntrack;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod family;
pub mod health;
pub mod hooks;
pub mod logfield;
pub mod netlink;
pub mod nft;
pub mod nudge;
pub mod output;
pub mod policy;
pub mod routing;
pub mod schedule;
pub mod sysctl;
pub mod usage;
pub mod web;

/// Routing protocol number mwan tags its routes and rules with
/// (`ip route show proto 109`).
pub const RTPROT_MWAN: u8 = 0x6d;
