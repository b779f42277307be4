//! The four ways of getting a LAN onto the internet that the benchmarks
//! compare, each set up in the lab's router namespace and removed again:
//!
//! * (a) plain routing and NAT through ISP 1, no balancing (the baseline);
//! * (b) a multipath default route over every ISP (L4 hash), NAT per WAN;
//! * (c) an nftables ct-mark balancer, equivalent to what mwan3 (OpenWrt)
//!   and VyOS install: per packet, restore the conntrack mark to the packet
//!   mark; for a new connection from the LAN pick a WAN mark with
//!   `numgen random`; save the mark to conntrack; fwmark rules send each
//!   mark to a per-WAN routing table; masquerade per WAN;
//! * (d) mwan itself (the real binary, through the test harness).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lab::mwan::{config, Mwan};
use lab::{Lab, TCP_WHOAMI};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Plain,
    Multipath,
    NftCtMark,
    Mwan,
}

pub const ALL: [Variant; 4] = [
    Variant::Plain,
    Variant::Multipath,
    Variant::NftCtMark,
    Variant::Mwan,
];

impl Variant {
    pub fn letter(self) -> &'static str {
        match self {
            Variant::Plain => "a",
            Variant::Multipath => "b",
            Variant::NftCtMark => "c",
            Variant::Mwan => "d",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Variant::Plain => "plain routing + NAT (baseline)",
            Variant::Multipath => "multipath route",
            Variant::NftCtMark => "nftables ct-mark balancer (mwan3/VyOS style)",
            Variant::Mwan => "mwan",
        }
    }

    pub fn index(self) -> usize {
        ALL.iter().position(|v| *v == self).expect("listed")
    }
}

/// Routing tables and rule priorities the bench uses in the router
/// namespace (far from mwan's 1000+).
const TABLE_BASE: u32 = 200;
const RULE_PREF: u32 = 100;
const MARK_SHIFT: u32 = 8;
const MARK_MASK: u32 = 0xff00;
const NFT_TABLE: &str = "bench";

/// One variant, set up; removed when dropped (or by [`Active::teardown`]).
pub struct Active<'l> {
    lab: &'l Lab,
    pub variant: Variant,
    pub mwan: Option<Mwan<'l>>,
    multipath_policy: Option<String>,
    torn_down: bool,
}

/// Sets up `v` in the router of `lab` (every ISP of the lab is a WAN) and
/// checks that a LAN host reaches the internet through it.
pub fn setup<'l>(lab: &'l Lab, v: Variant, mwan_config: Option<&str>) -> Result<Active<'l>> {
    let mut active = Active {
        lab,
        variant: v,
        mwan: None,
        multipath_policy: None,
        torn_down: false,
    };
    let n = lab.isp_count();
    let r = lab.router();
    match v {
        Variant::Plain => {
            r.ip(&format!(
                "route replace default via {} dev wan1 proto static metric 10",
                lab.isp(1).gateway()
            ))?;
            nft(lab, &masquerade(1..=1))?;
        }
        Variant::Multipath => {
            let old = r.sh("cat /proc/sys/net/ipv4/fib_multipath_hash_policy")?;
            active.multipath_policy = Some(old.trim().to_string());
            r.sysctls(&[("net.ipv4.fib_multipath_hash_policy", "1")])?;
            let mut route = String::from("route replace default proto static metric 10");
            for i in 1..=n {
                write!(
                    route,
                    " nexthop via {} dev wan{i} weight 1",
                    lab.isp(i).gateway()
                )?;
            }
            r.ip(&route)?;
            nft(lab, &masquerade(1..=n))?;
        }
        Variant::NftCtMark => {
            let mut ip = format!("rule add pref {RULE_PREF} lookup main suppress_prefixlength 0\n");
            for i in 1..=n {
                let table = TABLE_BASE + i as u32;
                writeln!(
                    ip,
                    "route replace default via {} dev wan{i} proto static table {table}",
                    lab.isp(i).gateway()
                )?;
                writeln!(
                    ip,
                    "rule add pref {} fwmark {:#x}/{MARK_MASK:#x} lookup {table}",
                    RULE_PREF + i as u32,
                    mark(i)
                )?;
            }
            r.ip(&ip)?;
            nft(lab, &ct_mark_balancer(n))?;
        }
        Variant::Mwan => {
            let text = match mwan_config {
                Some(t) => t.to_string(),
                None => config(lab, ""),
            };
            let m = Mwan::start(lab, &text)?;
            m.wait_all_up(Duration::from_secs(15))?;
            active.mwan = Some(m);
        }
    }
    // Every host reaches the internet through the variant.
    for h in lab.hosts() {
        h.tcp_whoami(TCP_WHOAMI)
            .with_context(|| format!("variant ({}) does not forward", v.letter()))?;
    }
    Ok(active)
}

fn mark(isp: usize) -> u32 {
    (isp as u32) << MARK_SHIFT
}

fn masquerade(isps: std::ops::RangeInclusive<usize>) -> String {
    format!("table ip {NFT_TABLE} {{\n{}}}\n", postrouting(isps))
}

/// Masquerade out of each WAN.
fn postrouting(isps: std::ops::RangeInclusive<usize>) -> String {
    let mut s = String::from(
        " chain postrouting {\n  type nat hook postrouting priority srcnat; policy accept;\n",
    );
    for i in isps {
        let _ = writeln!(s, "  oifname \"wan{i}\" masquerade");
    }
    s + " }\n"
}

/// What mwan3 installs (with iptables: mwan3_hook = CONNMARK
/// --restore-mark, policy chains with `-m statistic --mode random`,
/// CONNMARK --save-mark; VyOS load-balancing does the same), in nftables.
pub fn ct_mark_balancer(n: usize) -> String {
    let choices: Vec<String> = (1..=n)
        .map(|i| format!("{} : {:#x}", i - 1, mark(i)))
        .collect();
    format!(
        "table ip {NFT_TABLE} {{\n chain prerouting {{\n  type filter hook prerouting priority mangle; policy accept;\n\
         \x20 meta mark set ct mark and {MARK_MASK:#x}\n\
         \x20 meta mark and {MARK_MASK:#x} == 0 iifname \"lan*\" ct state new meta mark set numgen random mod {n} map {{ {} }}\n\
         \x20 ct mark set meta mark and {MARK_MASK:#x}\n }}\n{}}}\n",
        choices.join(", "),
        postrouting(1..=n)
    )
}

fn nft(lab: &Lab, table: &str) -> Result<()> {
    let script = format!("table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n{table}");
    lab.router()
        .exec_input(&["nft", "-f", "-"], Some(&script))
        .map(drop)
}

impl Active<'_> {
    /// Removes everything the variant added and flushes the router's
    /// conntrack table, so the next variant starts clean.
    pub fn teardown(mut self) -> Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let lab = self.lab;
        let r = lab.router();
        let n = lab.isp_count();
        let mut errors = Vec::new();
        if let Some(mut m) = self.mwan.take() {
            if let Err(e) = m.stop_with(libc::SIGTERM) {
                errors.push(e);
            }
            // mwan's teardown removes its tc filters but leaves the clsact
            // qdisc it added to the LAN interfaces; remove it, so the next
            // variant runs without an ingress hook.
            for lan in ["lan0", "lan1"] {
                let _ = r.exec(&["tc", "qdisc", "del", "dev", lan, "clsact"]);
            }
        }
        match self.variant {
            Variant::Plain | Variant::Multipath => {
                let _ = r.ip("route del default proto static metric 10");
            }
            Variant::NftCtMark => {
                let mut ip = format!("rule del pref {RULE_PREF}\n");
                for i in 1..=n {
                    ip += &format!(
                        "rule del pref {}\nroute flush table {}\n",
                        RULE_PREF + i as u32,
                        TABLE_BASE + i as u32
                    );
                }
                if let Err(e) = r.ip(&ip) {
                    errors.push(e);
                }
            }
            Variant::Mwan => {}
        }
        if let Some(old) = self.multipath_policy.take() {
            if let Err(e) = r.sysctls(&[("net.ipv4.fib_multipath_hash_policy", &old)]) {
                errors.push(e);
            }
        }
        if let Err(e) = nft(lab, "") {
            errors.push(e);
        }
        // The lab's plain-routing reset: deletes its (unused) table and
        // flushes the router's conntrack table.
        if let Err(e) = lab.clear_plain_routing() {
            errors.push(e);
        }
        if let Some(e) = errors.into_iter().next() {
            bail!("tearing down variant ({}): {e:#}", self.variant.letter());
        }
        Ok(())
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("bench: {e:#}");
        }
    }
}
