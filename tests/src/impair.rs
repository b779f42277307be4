//! Impairments: per-ISP carrier, blackhole, loss, delay and rate, and
//! dead targets in the internet namespace. Each is switchable at runtime.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Result};

use crate::isp::{Isp, IspNode, IspState};
use crate::lock;
use crate::relay::DelayRelay;
use crate::sys;
use crate::topology::Lab;

/// Name of the tun device of the delay relay in an ISP namespace.
const DELAY_DEV: &str = "dly";
/// Routing table (in the ISP namespace) whose default route is the tun.
const DELAY_TABLE: u32 = 100;
/// Priorities of the two `iif … lookup DELAY_TABLE` rules.
const DELAY_RULE_PREF: u32 = 100;

impl Isp<'_> {
    /// Carrier of the router's `wanI`: `false` sets the ISP's end (`down`,
    /// or both bridge ports of an HA pair) administratively down, so `wanI`
    /// shows NO-CARRIER (on both routers of a pair).
    pub fn set_carrier(&self, up: bool) -> Result<()> {
        let _st = self.node.state();
        let state = if up { "up" } else { "down" };
        let cmds: Vec<String> = self
            .node
            .router_ports()
            .iter()
            .map(|p| format!("link set dev {p} {state}"))
            .collect();
        self.node.ns.ip(&cmds.join("\n"))
    }

    /// Silent blackhole upstream of the gateway: the ISP drops everything it
    /// would forward, while the gateway itself still answers ARP and ping.
    pub fn set_blackhole(&self, on: bool) -> Result<()> {
        let mut st = self.node.state();
        st.blackhole = on;
        apply_filter(self.node, &st)
    }

    /// Drops `pct`% of the packets the ISP forwards towards the router (the
    /// downstream direction only, so a ping loses about `pct`%). 0 removes
    /// the loss.
    pub fn set_loss(&self, pct: u32) -> Result<()> {
        ensure!(pct <= 100, "loss {pct}% > 100%");
        let mut st = self.node.state();
        st.loss_pct = pct;
        apply_filter(self.node, &st)
    }

    /// Adds `delay` one way in each direction to traffic the ISP forwards
    /// (so a round trip through it grows by 2 × `delay`); zero removes it.
    /// Traffic to the gateway itself is not delayed.
    ///
    /// Without netem: rules send packets arriving from `down` or `up` to a
    /// table routing everything into a tun device; a relay thread holds
    /// each packet for `delay` and writes the same bytes back, and the
    /// kernel routes them on from the tun device.
    pub fn set_delay(&self, delay: Duration) -> Result<()> {
        let mut st = self.node.state();
        let ns = &self.node.ns;
        if !delay.is_zero() && st.relay.is_none() {
            let tun = ns.run(|| sys::open_tun(DELAY_DEV))?;
            ns.ip(&format!(
                "link set dev {DELAY_DEV} txqueuelen 10000 up\nroute replace default dev {DELAY_DEV} table {DELAY_TABLE}"
            ))?;
            st.relay = Some(DelayRelay::start(
                tun,
                ns.name(),
                self.lab.ctx().stopper()?,
            )?);
        }
        if let Some(relay) = &st.relay {
            // Set before the rules appear; after they are gone, packets
            // already held still leave at their release time.
            relay.set_delay(delay);
        }
        let rules = |verb: &str| {
            let pref = DELAY_RULE_PREF;
            format!(
                "rule {verb} pref {pref} iif down lookup {DELAY_TABLE}\nrule {verb} pref {} iif up lookup {DELAY_TABLE}",
                pref + 1
            )
        };
        match (st.delay.is_zero(), delay.is_zero()) {
            (true, false) => ns.ip(&rules("add"))?,
            (false, true) => ns.ip(&rules("del"))?,
            _ => {}
        }
        st.delay = delay;
        Ok(())
    }

    /// Rate limit (tbf) on both of the ISP's veths, i.e. in both
    /// directions; `None` removes it.
    pub fn set_rate(&self, mbit: Option<u32>) -> Result<()> {
        ensure!(mbit != Some(0), "rate must be positive");
        let mut st = self.node.state();
        if mbit.is_some() || st.rate_mbit.is_some() {
            self.node.apply_rate("down", mbit)?;
            self.node.apply_rate("up", mbit)?;
        }
        st.rate_mbit = mbit;
        Ok(())
    }
}

impl IspNode {
    /// Sets or removes the tbf root qdisc of `dev` in the ISP namespace.
    pub(crate) fn apply_rate(&self, dev: &str, mbit: Option<u32>) -> Result<()> {
        let Some(mbit) = mbit else {
            return self
                .ns
                .exec(&["tc", "qdisc", "del", "dev", dev, "root"])
                .map(drop);
        };
        // 10 ms worth of bytes, at least a few full-size packets.
        let burst = (u64::from(mbit) * 1_000_000 / 8 / 100)
            .max(16 * 1024)
            .to_string();
        let rate = format!("{mbit}mbit");
        self.ns
            .exec(&[
                "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                &burst, "latency", "100ms",
            ])
            .map(drop)
    }
}

/// Rewrites the ISP's `ip lab` nftables table (forward chain) from the
/// blackhole and loss settings, always with ingress source filtering
/// (BCP 38): like a real ISP, it forwards from the router only packets whose
/// source is the router's address on this link, so a reply that leaves
/// through the wrong WAN is dropped instead of silently working.
pub(crate) fn apply_filter(node: &IspNode, st: &IspState) -> Result<()> {
    let mut rules = format!(
        "iifname \"down\" ip saddr != {} drop\n",
        st.router_addr.trunc()
    );
    if st.blackhole {
        rules += "drop\n";
    }
    match st.loss_pct {
        0 => {}
        // `numgen … mod 100` yields 0..=99: "< 100" is out of range.
        100.. => rules += "oifname \"down\" drop\n",
        pct => writeln!(rules, "oifname \"down\" numgen random mod 100 < {pct} drop")?,
    }
    node.ns.nft(&replace_table("filter hook forward", &rules))?;
    if let Some(v6) = &st.v6 {
        // The same for IPv6 (table `ip6 lab`): sources from the link /64 or
        // the delegated prefix only.
        let mut rules = format!(
            "iifname \"down\" ip6 saddr != {{ {}, {} }} drop\n",
            v6.link, v6.delegation
        );
        if st.blackhole || v6.blackhole6 {
            rules += "drop\n";
        }
        match st.loss_pct {
            0 => {}
            100.. => rules += "oifname \"down\" drop\n",
            pct => writeln!(rules, "oifname \"down\" numgen random mod 100 < {pct} drop")?,
        }
        node.ns
            .nft(&replace_table6("filter hook forward", &rules))?;
    }
    Ok(())
}

/// An nft script that atomically replaces table `ip lab` with one chain
/// of `hook` (e.g. "filter hook forward") holding `rules`, or deletes the
/// table when `rules` is empty.
pub(crate) fn replace_table(hook: &str, rules: &str) -> String {
    replace_family_table("ip", hook, rules)
}

/// [`replace_table`] for IPv6: table `ip6 lab`.
pub(crate) fn replace_table6(hook: &str, rules: &str) -> String {
    replace_family_table("ip6", hook, rules)
}

fn replace_family_table(family: &str, hook: &str, rules: &str) -> String {
    let mut script = format!("table {family} lab {{}}\ndelete table {family} lab\n");
    if !rules.is_empty() {
        let chain = hook.rsplit(' ').next().unwrap_or("main");
        script += &format!("table {family} lab {{\n chain {chain} {{\n  type {hook} priority 100; policy accept;\n{rules} }}\n}}\n");
    }
    script
}

impl Lab {
    /// Makes internet address `addr` (a probe target or server, IPv4 or
    /// IPv6) stop answering anything, or answer again.
    pub fn set_target_blocked(&self, addr: impl Into<IpAddr>, blocked: bool) -> Result<()> {
        let addr = addr.into();
        let mut set = lock(&self.blocked);
        if blocked {
            set.insert(addr);
        } else {
            set.remove(&addr);
        }
        let rules = |v6: bool, keyword: &str| {
            let list: Vec<String> = set
                .iter()
                .filter(|a| a.is_ipv6() == v6)
                .map(IpAddr::to_string)
                .collect();
            if list.is_empty() {
                String::new()
            } else {
                format!("{keyword} daddr {{ {} }} drop\n", list.join(", "))
            }
        };
        self.inet
            .nft(&replace_table("filter hook input", &rules(false, "ip")))?;
        if self.is_dual_stack() {
            self.inet
                .nft(&replace_table6("filter hook input", &rules(true, "ip6")))?;
        }
        Ok(())
    }
}
