//! IPv6 of a dual-stack lab ([`crate::LabBuilder::dual_stack`]): the
//! addresses, the ISPs' Router Advertisements (dnsmasq), their delegated
//! prefixes and the LAN's ULA prefix.
//!
//! ```text
//! LAN hosts ── lan0 fd00:0:2::/64 ── [router] ── wanI 2001:db8:I::/64 (RAs) ── [ispI] ── 2001:db8:fe:I::/64 ── [inet]
//!                                       delegated 2001:db8:I00::/56 → router's WAN address (static route)
//! ```
//!
//! Each ISP's link is a /64 on which dnsmasq sends Router Advertisements
//! (`enable-ra`, `ra-only`: SLAAC, no DHCPv6). On a [`RouterKind::Dhcp`]
//! router the WANs accept them while forwarding (`accept_ra = 2`): the
//! router configures its WAN address by SLAAC (EUI-64 from a fixed MAC, so
//! it is known in advance) and gets a `proto ra` default route per WAN via
//! the ISP's link-local address, metric 100+I like IPv4's DHCP routes. The
//! other kinds ignore RAs and have the fixed address `2001:db8:I::2`, with
//! [`RouterKind::SingleDefault`]'s one static default route via ISP 1.
//!
//! dnsmasq does no DHCPv6 prefix delegation, so the delegation is static:
//! the ISP routes its delegated prefix to the router's WAN address, and
//! [`Isp::renumber_delegation6`] replaces it as a new delegation after a
//! reconnect would. Nothing on the router learns it (configure it).

use std::net::{Ipv6Addr, SocketAddrV6};
use std::process::Command;

use anyhow::{bail, Result};
use ipnet::Ipv6Net;

use crate::isp::{Isp, IspNode, IspState};
use crate::ns::Netns;
use crate::proc::Proc;
use crate::topology::{
    Lab, RouterKind, BULK_PORT, DNS_PORT, STREAM_PORT, TCP_PROBE_PORT, TCP_WHOAMI_PORT,
    UDP_WHOAMI_PORT,
};

/// IPv6 ICMP / probe targets in the internet namespace (like
/// [`crate::PROBE_TARGETS`]; [`TCP_PROBE_PORT`] answers on each).
pub const PROBE_TARGETS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 3),
];
/// The main IPv6 server: the services of [`crate::SERVER`].
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
/// A second IPv6 server with the same services, in [`SERVER6_NET2`] (for
/// rules by destination).
pub const SERVER6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);
/// The /48 of [`SERVER6_2`] (and not of [`SERVER6`]).
pub const SERVER6_NET2: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0), 48);
/// The DNS responder's IPv6 address.
pub const DNS_SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x53);

const fn on6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}
pub const TCP_WHOAMI6: SocketAddrV6 = on6(SERVER6, TCP_WHOAMI_PORT);
pub const UDP_WHOAMI6: SocketAddrV6 = on6(SERVER6, UDP_WHOAMI_PORT);
pub const STREAM6: SocketAddrV6 = on6(SERVER6, STREAM_PORT);
pub const BULK6: SocketAddrV6 = on6(SERVER6, BULK_PORT);
pub const TCP_PROBE6: SocketAddrV6 = on6(SERVER6, TCP_PROBE_PORT);
pub const DNS6: SocketAddrV6 = on6(DNS_SERVER6, DNS_PORT);

/// `lan0`'s IPv6 prefix (ULA); the router is `::1`, host i is `::(0x10+i)`.
/// Only `lan0` is dual-stack.
pub const LAN0_6: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 0, 2, 0, 0, 0, 0, 0), 64);
pub const LAN0_ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 2, 0, 0, 0, 0, 1);

/// The address of host `i` of `lan0`.
pub(crate) fn host_addr6(i: usize) -> Ipv6Addr {
    in_net(LAN0_6, 0x10 + i as u128)
}

/// Address `iid` (the low bits) in `net`.
pub fn in_net(net: Ipv6Net, iid: u128) -> Ipv6Addr {
    let host_mask = u128::MAX.checked_shr(net.prefix_len().into()).unwrap_or(0);
    Ipv6Addr::from(u128::from(net.network()) | (iid & host_mask))
}

/// The interface identifier (low 64 bits) of `addr`.
pub fn iid(addr: Ipv6Addr) -> u64 {
    u128::from(addr) as u64
}

/// ISP `i`'s link at creation: 2001:db8:I::/64.
pub(crate) fn initial_link6(i: usize) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(0x2001, 0xdb8, i as u16, 0, 0, 0, 0, 0), 64)
}

/// ISP `i`'s delegated prefix at creation: 2001:db8:I00::/56 (hex), e.g.
/// 2001:db8:100::/56 for ISP 1.
pub fn initial_delegation6(i: usize) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(0x2001, 0xdb8, 0x100 * i as u16, 0, 0, 0, 0, 0),
        56,
    )
}

/// A second delegation for ISP `i` (for [`Isp::renumber_delegation6`]):
/// 2001:db8:I80::/56.
pub fn other_delegation6(i: usize) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(0x2001, 0xdb8, 0x100 * i as u16 + 0x80, 0, 0, 0, 0, 0),
        56,
    )
}

/// Another link /64 for ISP `i` (for [`Isp::renumber_link6`]):
/// 2001:db8:(0x80+I)::/64.
pub fn other_link6(i: usize) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(0x2001, 0xdb8, 0x80 + i as u16, 0, 0, 0, 0, 0),
        64,
    )
}

/// The MAC of the router's `wanI` in a dual-stack lab (so its SLAAC
/// address is known): 02:00:00:00:II:02.
pub(crate) fn wan_mac(i: usize) -> String {
    format!("02:00:00:00:{i:02x}:02")
}

/// The router's address on `link`: SLAAC (EUI-64 of [`wan_mac`]) on a DHCP
/// router, `::2` on the others.
pub(crate) fn router_addr6(kind: RouterKind, i: usize, link: Ipv6Net) -> Ipv6Addr {
    match kind {
        // 02:00:00:00:II:02 → 0000:00ff:fe00:II02 (universal/local bit
        // flipped).
        RouterKind::Dhcp => in_net(link, 0x00ff_fe00_0002 | ((i as u128 & 0xff) << 8)),
        RouterKind::Static | RouterKind::SingleDefault => in_net(link, 2),
    }
}

/// The ISP's global address on `link` (`::1`).
pub(crate) fn gateway6_on(link: Ipv6Net) -> Ipv6Addr {
    in_net(link, 1)
}

/// ISP `i`'s address on its uplink to the internet, 2001:db8:fe:I::1 (the
/// internet side is `::2`).
pub(crate) fn uplink6(i: usize, internet_side: bool) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0xfe,
        i as u16,
        0,
        0,
        0,
        if internet_side { 2 } else { 1 },
    )
}

/// The IPv6 side of one ISP.
pub(crate) struct Isp6State {
    pub(crate) link: Ipv6Net,
    pub(crate) router_addr: Ipv6Addr,
    pub(crate) delegation: Ipv6Net,
    /// Every link and delegated prefix this ISP has used (for
    /// [`Lab::wan_of`]).
    pub(crate) used: Vec<Ipv6Net>,
    /// IPv6 alone blackholed ([`Isp::set_blackhole6`]).
    pub(crate) blackhole6: bool,
    /// The RA daemon.
    pub(crate) ra: Option<Proc>,
}

impl Isp6State {
    pub(crate) fn new(kind: RouterKind, i: usize) -> Isp6State {
        let link = initial_link6(i);
        let delegation = initial_delegation6(i);
        Isp6State {
            link,
            router_addr: router_addr6(kind, i, link),
            delegation,
            used: vec![link, delegation],
            blackhole6: false,
            ra: None,
        }
    }
}

impl IspNode {
    /// The ISP's IPv6 uplink and default route (dual-stack labs).
    pub(crate) fn create_uplink6(&self) -> Result<()> {
        let i = self.index;
        self.ns.sysctls(&[("net.ipv6.conf.all.forwarding", "1")])?;
        self.ns.ip(&format!(
            "addr add {}/64 dev up\nroute add ::/0 via {}",
            uplink6(i, false),
            uplink6(i, true)
        ))
    }

    /// Router side of the IPv6 link, before `wanI` comes up: RAs accepted
    /// (DHCP kind) or a fixed address (the others).
    pub(crate) fn prepare_wan6(&self, router: &Netns, v6: &Isp6State) -> Result<()> {
        let i = self.index;
        let conf = |key: &str| format!("net.ipv6.conf.wan{i}.{key}");
        match self.ns.ctx.kind {
            RouterKind::Dhcp => {
                let metric = (100 + i).to_string();
                router.sysctls(&[
                    (conf("accept_ra").as_str(), "2"),
                    (conf("autoconf").as_str(), "1"),
                    (conf("ra_defrtr_metric").as_str(), metric.as_str()),
                    (conf("router_solicitation_interval").as_str(), "1"),
                ])?;
            }
            RouterKind::Static | RouterKind::SingleDefault => {
                router.sysctls(&[
                    (conf("accept_ra").as_str(), "0"),
                    (conf("autoconf").as_str(), "0"),
                ])?;
                router.ip(&format!(
                    "addr add {}/{} dev wan{i}",
                    v6.router_addr,
                    v6.link.prefix_len()
                ))?;
            }
        }
        Ok(())
    }

    /// ISP side of the IPv6 link once `down` exists: the gateway address,
    /// the delegated prefix's route, the RA daemon (started once) and the
    /// static default route of [`RouterKind::SingleDefault`].
    pub(crate) fn finish_wan6(&self, router: &Netns, st: &mut IspState) -> Result<()> {
        let i = self.index;
        let v6 = st.v6.as_mut().expect("dual-stack ISP");
        let gw = gateway6_on(v6.link);
        self.ns.ip(&format!(
            "addr replace {gw}/{} dev down\nroute replace {} via {} dev down",
            v6.link.prefix_len(),
            v6.delegation,
            v6.router_addr
        ))?;
        if self.ns.ctx.kind == RouterKind::SingleDefault && i == 1 {
            router.ip(&format!(
                "route replace ::/0 via {gw} dev wan{i} proto static"
            ))?;
        }
        if v6.ra.is_none() {
            v6.ra = Some(start_ra(&self.ns, i)?);
        }
        Ok(())
    }
}

/// dnsmasq as the ISP's RA server on `down`, in the foreground (the lab
/// kills it with the namespace): SLAAC-only RAs for every prefix on `down`
/// (`constructor:down`, so a renumbered link is followed and the old
/// prefix deprecated), every 10 s, router lifetime 30 min; no DNS, no
/// DHCP.
fn start_ra(ns: &Netns, i: usize) -> Result<Proc> {
    let leases = ns.ctx.log_dir.join(format!("isp{i}-dnsmasq.leases"));
    let args = [
        "--keep-in-foreground".to_string(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--port=0".into(),
        "--pid-file=".into(),
        "--interface=down".into(),
        "--enable-ra".into(),
        "--dhcp-range=::,constructor:down,ra-only,64,1d".into(),
        "--ra-param=down,10,1800".into(),
        format!("--dhcp-leasefile={}", leases.display()),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    ns.spawn("dnsmasq", &argv, &[])
}

/// Fails with a clear message when the RA daemon is missing.
pub(crate) fn check_dnsmasq() -> Result<()> {
    let found = Command::new("dnsmasq").arg("--version").output().is_ok();
    if !found {
        bail!(
            "a dual-stack lab needs dnsmasq (Debian: dnsmasq-base; `cargo xtask test` installs it)"
        );
    }
    Ok(())
}

impl Lab {
    /// Whether the lab has IPv6 ([`crate::LabBuilder::dual_stack`]).
    pub fn is_dual_stack(&self) -> bool {
        self.ctx().dual_stack
    }
}

impl Isp<'_> {
    fn with6<T>(&self, f: impl FnOnce(&mut Isp6State) -> T) -> T {
        let mut st = self.node.state();
        f(st.v6.as_mut().expect("not a dual-stack lab"))
    }

    /// The ISP's link /64 now (initially 2001:db8:I::/64).
    pub fn link6(&self) -> Ipv6Net {
        self.with6(|v6| v6.link)
    }

    /// The router's global address on the link now (SLAAC on a DHCP
    /// router, `::2` on the others).
    pub fn router_addr6(&self) -> Ipv6Addr {
        self.with6(|v6| v6.router_addr)
    }

    /// The ISP's global address on the link (`::1`), a static next hop.
    pub fn gateway6(&self) -> Ipv6Addr {
        self.with6(|v6| gateway6_on(v6.link))
    }

    /// The ISP's link-local address on the link (the next hop its RAs
    /// announce).
    pub fn gateway6_link_local(&self) -> Result<Ipv6Addr> {
        let out = self.ns().sh("ip -6 -o addr show dev down scope link")?;
        out.split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .and_then(|a| a.split('/').next()?.parse().ok())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no link-local address on ISP {}'s down: {out}",
                    self.index()
                )
            })
    }

    /// The prefix the ISP delegates (routes) to the router now.
    pub fn delegation6(&self) -> Ipv6Net {
        self.with6(|v6| v6.delegation)
    }

    /// Replaces the delegated prefix by `prefix` (from 2001:db8::/32), as a
    /// new delegation after a reconnect: the ISP and the internet route
    /// only the new one (to the router's WAN address), and the ISP's
    /// source filter follows.
    pub fn renumber_delegation6(&self, prefix: Ipv6Net) -> Result<()> {
        let mut st = self.node.state();
        let v6 = st.v6.as_mut().expect("not a dual-stack lab");
        let old = v6.delegation;
        let i = self.index();
        let mut isp = format!("route replace {prefix} via {} dev down\n", v6.router_addr);
        let mut inet = format!("route replace {prefix} via {}\n", uplink6(i, false));
        if old != prefix {
            isp += &format!("route del {old}\n");
            inet += &format!("route del {old}\n");
        }
        self.ns().ip(&isp)?;
        self.lab.inet.ip(&inet)?;
        v6.delegation = prefix;
        if !v6.used.contains(&prefix) {
            v6.used.push(prefix);
        }
        crate::impair::apply_filter(self.node, &st)
    }

    /// Renumbers the link to `link` (a /64 of 2001:db8::/32) as after an
    /// ISP reconnect: the ISP's address moves to `link` (its RAs announce
    /// the new prefix and deprecate the old), the router's static address
    /// (non-DHCP kinds) moves too, the delegated prefix is routed to the
    /// router's new address, and the internet routes only the new link.
    /// On a DHCP router this returns once the router has its new SLAAC
    /// address.
    pub fn renumber_link6(&self, link: Ipv6Net) -> Result<()> {
        anyhow::ensure!(link.prefix_len() == 64, "{link}: a link is a /64");
        let i = self.index();
        let kind = self.lab.router_kind();
        {
            let mut st = self.node.state();
            let v6 = st.v6.as_mut().expect("not a dual-stack lab");
            let (old, old_addr) = (v6.link, v6.router_addr);
            let addr = router_addr6(kind, i, link);
            let mut isp = format!(
                "addr add {}/64 dev down\naddr del {}/64 dev down\n",
                gateway6_on(link),
                gateway6_on(old)
            );
            isp += &format!("route replace {} via {addr} dev down\n", v6.delegation);
            let inet = format!(
                "route replace {link} via {up}\nroute del {old} via {up}\n",
                up = uplink6(i, false)
            );
            if kind != RouterKind::Dhcp {
                let mut router =
                    format!("addr add {addr}/64 dev wan{i}\naddr del {old_addr}/64 dev wan{i}\n");
                if kind == RouterKind::SingleDefault && i == 1 {
                    router += &format!(
                        "route replace ::/0 via {} dev wan{i} proto static\n",
                        gateway6_on(link)
                    );
                }
                self.lab.router.ip(&router)?;
            }
            self.ns().ip(&isp)?;
            self.lab.inet.ip(&inet)?;
            v6.link = link;
            v6.router_addr = addr;
            if !v6.used.contains(&link) {
                v6.used.push(link);
            }
            crate::impair::apply_filter(self.node, &st)?;
        }
        if kind == RouterKind::Dhcp {
            self.lab.wait_slaac(&[i])?;
        }
        self.lab.refresh_plain_route(i)
    }

    /// Silent IPv6-only blackhole: the ISP drops every IPv6 packet it would
    /// forward (its IPv4 works; its gateway still answers Neighbour
    /// Discovery and sends RAs), the common "IPv6 broken" ISP fault.
    pub fn set_blackhole6(&self, on: bool) -> Result<()> {
        let mut st = self.node.state();
        st.v6.as_mut().expect("not a dual-stack lab").blackhole6 = on;
        crate::impair::apply_filter(self.node, &st)
    }
}

impl Lab {
    /// Waits (10 s at most) until the router has its SLAAC address on the
    /// WANs of `isps` and a `proto ra` default route through each.
    pub(crate) fn wait_slaac(&self, isps: &[usize]) -> Result<()> {
        let want: Vec<(usize, Ipv6Addr)> = isps
            .iter()
            .map(|&i| (i, self.isp(i).router_addr6()))
            .collect();
        let mut last = String::new();
        let ok = crate::wait_until(std::time::Duration::from_secs(10), || {
            let Ok(addrs) = self.router.sh("ip -6 -o addr show scope global") else {
                return false;
            };
            let Ok(routes) = self.router.sh("ip -6 route show default") else {
                return false;
            };
            last = format!("{addrs}{routes}");
            want.iter().all(|(i, a)| {
                addrs.contains(&format!("{a}/64"))
                    && routes
                        .lines()
                        .any(|l| l.contains(&format!("dev wan{i} ")) && l.contains("proto ra"))
            })
        });
        if !ok {
            bail!("the router did not learn its IPv6 WAN addresses and routes by RA: {want:?}\n{last}");
        }
        Ok(())
    }

    /// Adds `addr` (in [`LAN0_6`]) to LAN host `i`, as a temporary
    /// (privacy) address would appear; the host's default source stays its
    /// static address.
    pub fn add_host_addr6(&self, i: usize, addr: Ipv6Addr) -> Result<()> {
        anyhow::ensure!(LAN0_6.contains(&addr), "{addr} is not in {LAN0_6}");
        self.host(i).ip(&format!(
            "addr add {addr}/64 dev eth0 nodad preferred_lft 0"
        ))
    }
}
