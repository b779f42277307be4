//! `mwan-bench`: mwan against plain routing, a multipath route and an
//! nftables ct-mark balancer, side by side in one namespace lab (and IPv6
//! forwarding against plain IPv6 routing with NAT66). Run with
//! `cargo xtask bench` (see BENCHMARKS.md for what it measures and how).

pub mod bpf;
pub mod busy;
pub mod busy_report;
pub mod cost_table;
pub mod dns;
pub mod domains;
pub mod failover;
pub mod footprint;
pub mod forwarding;
pub mod forwarding6;
pub mod goals;
pub mod ha;
pub mod held;
pub mod loaded_table;
pub mod passive;
pub mod profile;
pub mod report;
pub mod scale;
pub mod sig;
pub mod stats;
pub mod sysinfo;
pub mod traffic;
pub mod update;
pub mod variants;
