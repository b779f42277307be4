//! The classifier tested packet by packet.
//!
//! The embedded datapath is loaded with its maps pinned in the lab's private
//! bpffs (never a running daemon's) and configured by the code the daemon
//! uses: the config parser, the policy compiler and the `Maps` writers. Each
//! fixture then runs `mwan_lan_eth` (or `mwan_lan_l3` for the point-to-point
//! LAN) on crafted packets with `BPF_PROG_TEST_RUN`, inside the lab's router
//! namespace so that a packet arrives on a real LAN interface (the
//! `lan_interface` rule dimension is matched by ifindex), and checks what
//! every packet must do: the mark it leaves with, the pin it makes, moves or
//! counts in `FLOWS`, the host pin in `HOSTS`, and the exact `GLOBAL_STATS`
//! deltas (every other counter unchanged).
//!
//! `BPF_PROG_TEST_RUN` gives the program a linear skb, so the one case
//! without a fixture is headers in paged data (pulled, then parsed again).
//! What the kernel does before tc ingress and a crafted skb cannot show
//! (fragments arriving one by one, a VLAN tag moved into the skb) is tested
//! with traffic through the running daemon in [`traffic`].

mod cost;
mod fixtures;
mod fixtures6;
mod packet;
mod rig;
mod traffic;

use anyhow::{bail, Result};
use lab::Lab;

use fixtures::{fixtures, Step};
use rig::Rig;

#[test]
fn classifier_fixtures() -> Result<()> {
    let lab = Lab::builder()
        .lan_hosts(0)
        .second_lan(0)
        .isps(1)
        .tunnel_host()
        .build()?;
    let pin_dir = lab.pin_dir();
    let fixtures = fixtures();
    let (packets, failures) = lab.router().run(|| -> Result<(usize, Vec<String>)> {
        let mut rig = Rig::load(&pin_dir)?;
        let mut failures = Vec::new();
        for f in &fixtures {
            if let Err(e) = rig.run_fixture(f) {
                failures.push(format!("{}: {e:#}", f.name));
            }
        }
        let packets = fixtures
            .iter()
            .flat_map(|f| &f.steps)
            .filter(|s| matches!(s, Step::Send(..)))
            .count();
        Ok((packets, failures))
    })?;
    println!(
        "{} fixtures, {packets} packets, {} failed",
        fixtures.len(),
        failures.len()
    );
    if !failures.is_empty() {
        bail!(
            "{} fixture(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// What looking destinations up in `DOMAIN_DST` costs a new flow: the
/// classifier's time for a flow's first packet (kernel-measured average of
/// many `BPF_PROG_TEST_RUN`s) under rules without domains, and under rules
/// with domains whose map is empty, holds 200,000 addresses but not the
/// destination, or holds the destination. Printed, not asserted (speed is
/// for `cargo xtask bench`); the runs must each take the whole new-flow path.
#[test]
fn classifier_cost_of_learned_destinations() -> Result<()> {
    use fixtures::{config, DOMAINS, RULES, TIERED};
    use std::net::Ipv4Addr;
    let lab = Lab::builder()
        .lan_hosts(0)
        .second_lan(0)
        .isps(1)
        .tunnel_host()
        .build()?;
    let pin_dir = lab.pin_dir();
    // Every WAN down and nothing kept: no flow is pinned.
    let top = "all_down = \"unreachable\"";
    let (plain, domains) = (config(top, TIERED, RULES), config(top, TIERED, DOMAINS));
    let learned = Ipv4Addr::new(100, 96, 0, 7);
    let other = Ipv4Addr::new(198, 51, 100, 50);
    const REPEAT: u32 = 200_000;
    let rows = lab.router().run(|| -> Result<Vec<(&str, f64)>> {
        let mut rig = Rig::load(&pin_dir)?;
        Ok(vec![
            (
                "rules without domains",
                rig.time_new_flow(&plain, 0, other, REPEAT)?,
            ),
            (
                "domain rules, empty map",
                rig.time_new_flow(&domains, 0, other, REPEAT)?,
            ),
            (
                "domain rules, 200k learned, miss",
                rig.time_new_flow(&domains, 200_000, other, REPEAT)?,
            ),
            (
                "domain rules, 200k learned, hit",
                rig.time_new_flow(&domains, 200_000, learned, REPEAT)?,
            ),
        ])
    })?;
    for (what, ns) in rows {
        println!("new flow, {what}: {ns:.0} ns");
    }
    Ok(())
}

/// The classifier's time per packet of an established TCP flow (IPv4 and
/// IPv6), the per-packet path every packet but a flow's first takes; with
/// `MWAN_COST_BASE_OBJ` set to an object built from another revision, its
/// IPv4 time beside this one's. Printed, not asserted (speed is for
/// `cargo xtask bench`).
#[test]
fn classifier_cost_per_packet() -> Result<()> {
    let lab = Lab::builder().lan_hosts(0).second_lan(0).isps(1).build()?;
    let pin_dir = lab.pin_dir();
    let base = std::env::var_os("MWAN_COST_BASE_OBJ")
        .map(std::fs::read)
        .transpose()?;
    lab.router().run(|| -> Result<()> {
        // Alternate to spread any drift of the machine's load over both.
        for round in 0..6 {
            let (v4, v6) = cost::measure(mwan::datapath::object(), &pin_dir.join("cost"))?;
            println!(
                "round {round}: this datapath: IPv4 {v4:.1} ns, IPv6 {:.1} ns per established packet",
                v6.unwrap_or(f64::NAN)
            );
            if let Some(obj) = &base {
                let (b4, _) = cost::measure(obj, &pin_dir.join("cost-base"))?;
                println!("round {round}: base datapath: IPv4 {b4:.1} ns per established packet");
            }
        }
        Ok(())
    })
}
