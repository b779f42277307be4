//! The four ways of getting a LAN onto the internet that the benchmarks
//! compare, each set up in the lab's router namespace and removed again:
//!
//! * (a) plain routing and NAT through ISP 1, no balancing (the baseline);
//! * (b) a multipath default route over every ISP (L4 hash), NAT per WAN;
//! * (c) an nftables ct-mark balancer, equivalent to what mwan3 (OpenWrt)
//!   and VyOS install: per packet, restore the conntrack mark to the packet
//!   mark; for a new connection from the LAN pick a WAN mark with
//!   `numgen random`; save the mark to conntrack; fwmark rules send each
//!   mark to a per-WAN routing table; masquerade per WAN (over IPv6 too:
//!   (c6) of section 1b, [`Balancer`] of [`Family::V6`]);
//! * (d) mwan itself (the real binary, through the test harness).
//!
//! And mwan taken apart, to see what each of its pieces costs (section 1c):
//! every piece is exactly what mwan installs (it is started with `--keep`,
//! stopped, and everything but the piece removed), added to plain routing:
//!
//! * (e) plain routing in a namespace that has had ip rules: once a rule
//!   is added, the kernel looks every route up through the rule list for
//!   the namespace's life (`fib_has_custom_rules` is never cleared, and
//!   the local and main tables stay unmerged), so (a) and (b) run in a
//!   namespace that never had one, and every variant from (c) on in another;
//! * (f) (e) + mwan's ip rules and tables (packets unmarked);
//! * (g) (e) + mwan's nftables table (the ct-mark record and restore, NAT);
//! * (h) (e) + mwan's classifier on the LAN (its marks route nothing);
//! * (i) mwan without its nftables table: classifier and ip rules (the
//!   marks route), NAT by a plain masquerade.
//!
//! And mwan as a loaded router has it (sections 1 and 2):
//!
//! * (d+domains) with a rule listing 50,000 names (`domains_file`);
//! * (d+sticky) with `sticky = "host"`;
//! * (d+scrape) with `metrics_listen` on and `/metrics` fetched every second
//!   while the variant is set up (so during its measurement);
//! * (d+all) with all three.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, ensure, Context, Result};
use lab::mwan::{config, config_with, Mwan};
use lab::{Lab, TCP_WHOAMI, TCP_WHOAMI6};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Plain,
    Multipath,
    NftCtMark,
    Mwan,
    PlainRuled,
    Rules,
    NftTable,
    Classifier,
    NoNft,
    /// mwan built from another revision (`MWAN_BENCH_BASE_BIN`), for an
    /// A/B comparison of the datapath in the same rounds.
    MwanBase,
    /// mwan with a 50,000-name domain rule, host pins, its metrics scraped,
    /// and all three.
    MwanDomains,
    MwanSticky,
    MwanScrape,
    MwanAll,
}

/// The ways compared in sections 1 and 2.
pub const ALL: [Variant; 4] = [
    Variant::Plain,
    Variant::Multipath,
    Variant::NftCtMark,
    Variant::Mwan,
];

/// mwan's pieces, one at a time (section 1c).
pub const PARTS: [Variant; 5] = [
    Variant::PlainRuled,
    Variant::Rules,
    Variant::NftTable,
    Variant::Classifier,
    Variant::NoNft,
];

/// mwan with what a loaded router has (sections 1 and 2).
pub const LOADED: [Variant; 4] = [
    Variant::MwanDomains,
    Variant::MwanSticky,
    Variant::MwanScrape,
    Variant::MwanAll,
];

/// Names in the domain rule of (d+domains) and (d+all).
pub const DOMAIN_NAMES: usize = 50_000;

/// Where (d+scrape) and (d+all) serve their metrics (in the router).
const METRICS_LISTEN: &str = "127.0.0.1:9849";

/// Every variant, in the order of [`Variant::index`].
pub const EVERY: [Variant; 14] = [
    Variant::Plain,
    Variant::Multipath,
    Variant::NftCtMark,
    Variant::Mwan,
    Variant::PlainRuled,
    Variant::Rules,
    Variant::NftTable,
    Variant::Classifier,
    Variant::NoNft,
    Variant::MwanBase,
    Variant::MwanDomains,
    Variant::MwanSticky,
    Variant::MwanScrape,
    Variant::MwanAll,
];

/// The mwan binary of the A/B variant ([`Variant::MwanBase`]), if one is
/// given.
pub fn base_bin() -> Option<std::path::PathBuf> {
    std::env::var_os("MWAN_BENCH_BASE_BIN").map(Into::into)
}

impl Variant {
    pub fn letter(self) -> &'static str {
        match self {
            Variant::Plain => "a",
            Variant::Multipath => "b",
            Variant::NftCtMark => "c",
            Variant::Mwan => "d",
            Variant::PlainRuled => "e",
            Variant::Rules => "f",
            Variant::NftTable => "g",
            Variant::Classifier => "h",
            Variant::NoNft => "i",
            Variant::MwanBase => "d0",
            Variant::MwanDomains => "d+domains",
            Variant::MwanSticky => "d+sticky",
            Variant::MwanScrape => "d+scrape",
            Variant::MwanAll => "d+all",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Variant::Plain => "plain routing + NAT (baseline)",
            Variant::Multipath => "multipath route",
            Variant::NftCtMark => "nftables ct-mark balancer (mwan3/VyOS style)",
            Variant::Mwan => "mwan",
            Variant::PlainRuled => "plain routing + NAT, in a namespace that has had ip rules",
            Variant::Rules => "(e) + mwan's ip rules (packets unmarked)",
            Variant::NftTable => "(e) + mwan's nftables table",
            Variant::Classifier => "(e) + mwan's classifier (marks unused)",
            Variant::NoNft => "mwan without its nftables table (classifier + ip rules)",
            Variant::MwanBase => "mwan, base build (MWAN_BENCH_BASE_BIN)",
            Variant::MwanDomains => "mwan + 50,000 names (domains_file)",
            Variant::MwanSticky => "mwan + host pins (sticky = \"host\")",
            Variant::MwanScrape => "mwan + /metrics scraped every 1 s",
            Variant::MwanAll => "mwan + names, host pins, scraped",
        }
    }

    pub fn index(self) -> usize {
        EVERY.iter().position(|v| *v == self).expect("listed")
    }

    /// Whether the variant runs in a namespace that never had an ip rule
    /// (see the module's documentation).
    pub fn pristine(self) -> bool {
        matches!(self, Variant::Plain | Variant::Multipath)
    }

    /// The pieces of mwan the variant keeps, for the variants made of
    /// mwan's pieces.
    fn pieces(self) -> Option<Pieces> {
        let p = |rules, nft, classifier| {
            Some(Pieces {
                rules,
                nft,
                classifier,
            })
        };
        match self {
            Variant::Rules => p(true, false, false),
            Variant::NftTable => p(false, true, false),
            Variant::Classifier => p(false, false, true),
            Variant::NoNft => p(true, false, true),
            _ => None,
        }
    }

    /// What a loaded variant adds to (d): a domain rule, host pins, the
    /// metrics endpoint scraped.
    fn load(self) -> (bool, bool, bool) {
        match self {
            Variant::MwanDomains => (true, false, false),
            Variant::MwanSticky => (false, true, false),
            Variant::MwanScrape => (false, false, true),
            Variant::MwanAll => (true, true, true),
            _ => (false, false, false),
        }
    }
}

/// Which of what mwan installs a variant keeps.
#[derive(Clone, Copy, Debug)]
pub struct Pieces {
    /// Its ip rules (both families) and routing tables.
    pub rules: bool,
    /// Its nftables table `inet mwan` (ct-mark record and restore, NAT).
    pub nft: bool,
    /// Its classifier on the LAN interfaces.
    pub classifier: bool,
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
    scraper: Option<Scraper>,
    balancer: Option<Balancer<'l>>,
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
        scraper: None,
        balancer: None,
        torn_down: false,
    };
    let n = lab.isp_count();
    let r = lab.router();
    match v {
        Variant::Plain | Variant::PlainRuled => {
            r.ip(&format!(
                "route replace default via {} dev wan1 proto static metric 10",
                lab.isp(1).gateway()
            ))?;
            nft(lab, Family::V4, &masquerade(Family::V4, 1..=1))?;
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
            nft(lab, Family::V4, &masquerade(Family::V4, 1..=n))?;
        }
        Variant::NftCtMark => active.balancer = Some(Balancer::install(lab, Family::V4)?),
        Variant::Mwan | Variant::MwanBase => {
            let text = match mwan_config {
                Some(t) => t.to_string(),
                None => config(lab, ""),
            };
            let m = match (v, base_bin()) {
                (Variant::MwanBase, Some(bin)) => Mwan::start_bin(lab, &bin, &text, &[])?,
                (Variant::MwanBase, None) => bail!("no MWAN_BENCH_BASE_BIN"),
                _ => Mwan::start(lab, &text)?,
            };
            m.wait_all_up(Duration::from_secs(15))?;
            active.mwan = Some(m);
        }
        Variant::MwanDomains | Variant::MwanSticky | Variant::MwanScrape | Variant::MwanAll => {
            start_loaded(&mut active)?
        }
        Variant::Rules | Variant::NftTable | Variant::Classifier | Variant::NoNft => {
            let pieces = v.pieces().expect("a variant of pieces");
            active.mwan = Some(start_pieces(lab, pieces, mwan_config)?);
            r.ip(&format!(
                "route replace default via {} dev wan1 proto static metric 10",
                lab.isp(1).gateway()
            ))?;
            if !pieces.nft {
                nft(lab, Family::V4, &masquerade(Family::V4, 1..=n))?;
            }
        }
    }
    // Every host reaches the internet through the variant.
    for h in lab.hosts() {
        h.tcp_whoami(TCP_WHOAMI)
            .with_context(|| format!("variant ({}) does not forward", v.letter()))?;
    }
    Ok(active)
}

/// Starts mwan (`--keep`), waits for its WANs, stops it (the datapath
/// stays) and removes what `keep` does not name. Returns the stopped
/// daemon's handle, whose `stop --teardown` removes the rest.
pub fn start_pieces<'l>(lab: &'l Lab, keep: Pieces, mwan_config: Option<&str>) -> Result<Mwan<'l>> {
    let text = match mwan_config {
        Some(t) => t.to_string(),
        None => config(lab, ""),
    };
    let mut m = Mwan::start_with(lab, &text, &["--keep"])?;
    m.wait_all_up(Duration::from_secs(15))?;
    m.stop_with(libc::SIGTERM)?;
    let r = lab.router();
    if !keep.nft {
        r.exec(&["nft", "delete", "table", "inet", "mwan"])?;
    }
    if !keep.rules {
        r.exec(&["ip", "rule", "flush", "protocol", "109"])?;
        r.exec(&["ip", "-6", "rule", "flush", "protocol", "109"])?;
    }
    if !keep.classifier {
        for lan in ["lan0", "lan1"] {
            let _ = r.exec(&["tc", "qdisc", "del", "dev", lan, "clsact"]);
        }
    }
    Ok(m)
}

/// Marks an ip rule as ever added in the router of `lab`: the kernel then
/// looks routes up through the rule list for good (see the module's
/// documentation), as it does wherever a variant with rules ran.
pub fn add_a_rule_once(lab: &Lab) -> Result<()> {
    let r = lab.router();
    let pref = RULE_PREF.to_string();
    for family in ["-4", "-6"] {
        r.exec(&["ip", family, "rule", "add", "pref", &pref, "lookup", "main"])?;
        r.exec(&["ip", family, "rule", "del", "pref", &pref])?;
    }
    Ok(())
}

fn mark(isp: usize) -> u32 {
    (isp as u32) << MARK_SHIFT
}

/// An address family, for the variants that exist in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The nftables family of the bench's table.
    fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// `ip`'s option for the family.
    fn ip(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    /// ISP `i`'s next hop for the router.
    fn gateway(self, lab: &Lab, i: usize) -> IpAddr {
        match self {
            Family::V4 => lab.isp(i).gateway().into(),
            Family::V6 => lab.isp(i).gateway6().into(),
        }
    }

    /// The source address a server in the internet sees from LAN host 0.
    fn whoami(self, lab: &Lab) -> Result<IpAddr> {
        let h = lab.host(0);
        Ok(match self {
            Family::V4 => (*h.tcp_whoami(TCP_WHOAMI)?.ip()).into(),
            Family::V6 => (*h.tcp_whoami(TCP_WHOAMI6)?.ip()).into(),
        })
    }
}

fn masquerade(family: Family, isps: std::ops::RangeInclusive<usize>) -> String {
    format!(
        "table {} {NFT_TABLE} {{\n{}}}\n",
        family.nft(),
        postrouting(isps)
    )
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
/// CONNMARK --save-mark; VyOS load-balancing does the same), in nftables,
/// for `family` (NAT66 for IPv6, as mwan's `ipv6 = "nat"`).
pub fn ct_mark_balancer(family: Family, n: usize) -> String {
    let choices: Vec<String> = (1..=n)
        .map(|i| format!("{} : {:#x}", i - 1, mark(i)))
        .collect();
    format!(
        "table {} {NFT_TABLE} {{\n chain prerouting {{\n  type filter hook prerouting priority mangle; policy accept;\n\
         \x20 meta mark set ct mark and {MARK_MASK:#x}\n\
         \x20 meta mark and {MARK_MASK:#x} == 0 iifname \"lan*\" ct state new meta mark set numgen random mod {n} map {{ {} }}\n\
         \x20 ct mark set meta mark and {MARK_MASK:#x}\n }}\n{}}}\n",
        family.nft(),
        choices.join(", "),
        postrouting(1..=n)
    )
}

/// The balancer's routing, as `ip -batch` lines of `family`: replies to
/// the LAN by the main table (without its default routes), then each WAN's
/// mark to its table with a default route via that ISP.
fn balancer_routes(lab: &Lab, family: Family) -> Result<String> {
    let mut ip = format!("rule add pref {RULE_PREF} lookup main suppress_prefixlength 0\n");
    for i in 1..=lab.isp_count() {
        let table = TABLE_BASE + i as u32;
        writeln!(
            ip,
            "route replace default via {} dev wan{i} proto static table {table}",
            family.gateway(lab, i)
        )?;
        writeln!(
            ip,
            "rule add pref {} fwmark {:#x}/{MARK_MASK:#x} lookup {table}",
            RULE_PREF + i as u32,
            mark(i)
        )?;
    }
    Ok(ip)
}

/// Undoes [`balancer_routes`] (every line tried: `ip -force`).
fn balancer_routes_removal(n: usize) -> String {
    let mut ip = format!("rule del pref {RULE_PREF}\n");
    for i in 1..=n {
        ip += &format!(
            "rule del pref {}\nroute flush table {}\n",
            RULE_PREF + i as u32,
            TABLE_BASE + i as u32
        );
    }
    ip
}

/// Runs `ip -batch` lines of `family` in the router of `lab`; with
/// `force`, every line is tried even after one failed.
fn ip_batch(lab: &Lab, family: Family, force: bool, batch: &str) -> Result<()> {
    let mut argv = vec!["ip", family.ip()];
    if force {
        argv.push("-force");
    }
    argv.extend(["-batch", "-"]);
    lab.router().exec_input(&argv, Some(batch)).map(drop)
}

/// Replaces the bench's nftables table of `family` by `table` (none if
/// empty).
fn nft(lab: &Lab, family: Family, table: &str) -> Result<()> {
    let f = family.nft();
    let script = format!("table {f} {NFT_TABLE} {{}}\ndelete table {f} {NFT_TABLE}\n{table}");
    lab.router()
        .exec_input(&["nft", "-f", "-"], Some(&script))
        .map(drop)
}

/// Connections from a LAN host through the balancer, to see that it
/// spreads them over every WAN: with a fair random choice per connection,
/// all of them on one of two WANs has a chance of 2^-19.
const SPREAD_CONNECTIONS: usize = 20;

/// The ct-mark balancer, (c) or (c6): its rules, tables and nftables
/// table in the router of a lab. Removed by [`Balancer::remove`] or when
/// dropped (so also when its setup or a measurement fails).
pub struct Balancer<'l> {
    lab: &'l Lab,
    family: Family,
    removed: bool,
}

impl<'l> Balancer<'l> {
    /// Installs the balancer for `family` over every ISP of `lab` and
    /// checks that a LAN host's connections leave through every WAN.
    pub fn install(lab: &'l Lab, family: Family) -> Result<Balancer<'l>> {
        let b = Balancer {
            lab,
            family,
            removed: false,
        };
        ip_batch(lab, family, false, &balancer_routes(lab, family)?)?;
        nft(lab, family, &ct_mark_balancer(family, lab.isp_count()))?;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..SPREAD_CONNECTIONS {
            let src = family.whoami(lab)?;
            seen.insert(
                lab.wan_of(src)
                    .with_context(|| format!("{src} is no WAN's"))?,
            );
        }
        ensure!(
            seen.len() == lab.isp_count(),
            "the {} ct-mark balancer sent {SPREAD_CONNECTIONS} connections through WANs {seen:?} only",
            family.name()
        );
        Ok(b)
    }

    /// Removes the rules, tables and nftables table, and flushes the
    /// router's conntrack table (no connection keeps a mark or NAT
    /// binding of the balancer).
    pub fn remove(mut self) -> Result<()> {
        self.take_down()
    }

    fn take_down(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let (lab, family) = (self.lab, self.family);
        let results = [
            ip_batch(lab, family, true, &balancer_routes_removal(lab.isp_count())),
            nft(lab, family, ""),
            // The lab's plain-routing reset: deletes its (unused) table and
            // flushes the router's conntrack table (both families).
            lab.clear_plain_routing(),
        ];
        results
            .into_iter()
            .collect::<Result<Vec<()>>>()
            .map(drop)
            .with_context(|| format!("removing the {} ct-mark balancer", family.name()))
    }
}

impl Drop for Balancer<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.take_down() {
            eprintln!("bench: {e:#}");
        }
    }
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
        let mut errors = Vec::new();
        if let Some(s) = self.scraper.take() {
            if let Err(e) = s.stop() {
                errors.push(e);
            }
        }
        if let Some(b) = self.balancer.take() {
            if let Err(e) = b.remove() {
                errors.push(e);
            }
        }
        if let Some(mut m) = self.mwan.take() {
            let stopped = if m.is_running() {
                m.stop_with(libc::SIGTERM).map(drop)
            } else {
                m.cli_ok(&["stop", "--teardown"]).map(drop)
            };
            if let Err(e) = stopped {
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
            Variant::Plain
            | Variant::Multipath
            | Variant::PlainRuled
            | Variant::Rules
            | Variant::NftTable
            | Variant::Classifier
            | Variant::NoNft => {
                let _ = r.ip("route del default proto static metric 10");
            }
            Variant::NftCtMark => {}
            Variant::Mwan
            | Variant::MwanBase
            | Variant::MwanDomains
            | Variant::MwanSticky
            | Variant::MwanScrape
            | Variant::MwanAll => {}
        }
        if let Some(old) = self.multipath_policy.take() {
            if let Err(e) = r.sysctls(&[("net.ipv4.fib_multipath_hash_policy", &old)]) {
                errors.push(e);
            }
        }
        if let Err(e) = nft(lab, Family::V4, "") {
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

/// Starts mwan as the loaded variant of `active` has it (and checks that
/// it does: the DNS relay runs, host pins are on), and the scraper.
fn start_loaded(active: &mut Active) -> Result<()> {
    let (lab, v) = (active.lab, active.variant);
    let m = Mwan::start(lab, &loaded_config(lab, v)?)?;
    m.wait_all_up(Duration::from_secs(15))?;
    let (domains, sticky, scrape) = v.load();
    let relay = m
        .log()
        .contains("DNS relay for rules by domain name started");
    ensure!(
        relay == domains,
        "({}): the DNS relay runs: {relay}",
        v.letter()
    );
    let host = m.status().sticky == "host";
    ensure!(host == sticky, "({}): host pins: {host}", v.letter());
    active.mwan = Some(m);
    if scrape {
        active.scraper = Some(Scraper::start(lab)?);
    }
    Ok(())
}

/// The config of a loaded variant: the lab's, with `sticky = "host"`,
/// `metrics_listen` and a rule whose `domains_file` (written to the lab's
/// directory once) lists [`DOMAIN_NAMES`] names, as `v` has them.
fn loaded_config(lab: &Lab, v: Variant) -> Result<String> {
    let (domains, sticky, scrape) = v.load();
    let mut top = String::new();
    if sticky {
        top += "sticky = \"host\"\n";
    }
    if scrape {
        top += &format!("metrics_listen = \"{METRICS_LISTEN}\"\n");
    }
    let mut rule = String::new();
    if domains {
        let list = lab.dir().join("bench-names.list");
        if !list.exists() {
            std::fs::write(&list, super::domains::names_file(DOMAIN_NAMES))?;
        }
        rule = format!(
            "\n[[rule]]\nname = \"by name\"\ndomains_file = \"{}\"\nwans = [\"isp2\", \"isp1\"]\n",
            list.display()
        );
    }
    Ok(config_with(lab, &top, &|_| String::new(), &rule))
}

/// Fetches `/metrics` from the daemon once a second, in the router
/// namespace, as a Prometheus server would, until stopped.
struct Scraper {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Scraper {
    fn start(lab: &Lab) -> Result<Scraper> {
        let netns = std::fs::File::open(lab.router().path())?;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new().name("scraper".into()).spawn({
            let (stop, ok) = (stop.clone(), ok.clone());
            move || scrape(&netns, &stop, &ok)
        })?;
        Ok(Scraper {
            stop,
            ok,
            thread: Some(thread),
        })
    }

    /// Stops the scraper: an error if a scrape failed or none was made.
    fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let res = self.thread.take().expect("running").join();
        res.map_err(|_| anyhow::anyhow!("the scraper panicked"))??;
        ensure!(
            self.ok.load(Ordering::Relaxed) > 0,
            "/metrics was not scraped"
        );
        Ok(())
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn scrape(netns: &std::fs::File, stop: &AtomicBool, ok: &AtomicU64) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor, for this thread only.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns into the router");
    }
    let addr = METRICS_LISTEN.parse().expect("valid address");
    let mut next = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) && !super::sig::stopped() {
        let r = lab::http::http_get(addr, "/metrics")?;
        ensure!(
            r.status == 200,
            "/metrics answered {}: {}",
            r.status,
            r.text()
        );
        ok.fetch_add(1, Ordering::Relaxed);
        next += Duration::from_secs(1);
        while std::time::Instant::now() < next && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}
