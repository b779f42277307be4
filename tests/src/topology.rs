//! The lab topology: addresses, the builder and the [`Lab`] value.
//!
//! ```text
//! LAN hosts ── lan0 (192.0.2.0/25) ─┐            ┌─ wan1 ── down [isp1] up ──┐
//! LAN1 hosts ─ lan1 (192.0.2.128/25)┴─ [router] ─┤                          ├─ [inet] servers
//!                                                └─ wanN ── down [ispN] up ──┘
//! ```

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Result};
use ipnet::Ipv4Net;

use crate::ctx::LabCtx;
use crate::dual::{self, DNS_SERVER6, LAN0_ROUTER6, PROBE_TARGETS6, SERVER6, SERVER6_2};
use crate::isp::{Isp, IspNode};
use crate::labdir::LabDir;
use crate::ns::{self, Netns, PREFIX};
use crate::relay::TunWire;
use crate::servers::ServerHandle;

/// ICMP / probe targets in the internet namespace (nothing listens there
/// but [`TCP_PROBE_PORT`]).
pub const PROBE_TARGETS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 51, 100, 1),
    Ipv4Addr::new(198, 51, 100, 2),
    Ipv4Addr::new(198, 51, 100, 3),
];
/// The main server: TCP/UDP whoami, stream, bulk and TCP probe ports.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// A second server address with the same services as [`SERVER`].
pub const SERVER2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The DNS responder's address.
pub const DNS_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);

pub const TCP_WHOAMI_PORT: u16 = 8080;
pub const UDP_WHOAMI_PORT: u16 = 8081;
/// Stream paced at [`STREAM_PACE`].
pub const STREAM_PORT: u16 = 8082;
/// Stream as fast as the path allows (throughput tests).
pub const BULK_PORT: u16 = 8083;
/// Plain TCP listener on every internet address (TCP probes).
pub const TCP_PROBE_PORT: u16 = 443;
pub const DNS_PORT: u16 = 53;

pub const TCP_WHOAMI: SocketAddrV4 = SocketAddrV4::new(SERVER, TCP_WHOAMI_PORT);
/// [`TCP_WHOAMI`] on [`SERVER2`].
pub const TCP_WHOAMI2: SocketAddrV4 = SocketAddrV4::new(SERVER2, TCP_WHOAMI_PORT);
pub const UDP_WHOAMI: SocketAddrV4 = SocketAddrV4::new(SERVER, UDP_WHOAMI_PORT);
pub const STREAM: SocketAddrV4 = SocketAddrV4::new(SERVER, STREAM_PORT);
pub const BULK: SocketAddrV4 = SocketAddrV4::new(SERVER, BULK_PORT);
pub const TCP_PROBE: SocketAddrV4 = SocketAddrV4::new(SERVER, TCP_PROBE_PORT);
pub const DNS: SocketAddrV4 = SocketAddrV4::new(DNS_SERVER, DNS_PORT);
/// Bytes per second sent by the stream server on [`STREAM_PORT`].
pub const STREAM_PACE: u64 = 2 * 1024 * 1024;

/// First LAN (bridge `lan0`); the router is `.1`, host i is `.(10+i)`.
pub const LAN0: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(192, 0, 2, 0), 25);
pub const LAN0_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Second LAN (bridge `lan1`, see [`LabBuilder::second_lan`]); the router
/// is `.129`, host i is `.(138+i)`.
pub const LAN1: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(192, 0, 2, 128), 25);
pub const LAN1_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 129);
/// The point-to-point LAN of [`LabBuilder::tunnel_host`]: the router's
/// `tun0` is this address, its peer (the host) [`TUNNEL_HOST`].
pub const TUNNEL_ROUTER: Ipv4Addr = Ipv4Addr::new(100, 64, 250, 1);
pub const TUNNEL_HOST: Ipv4Addr = Ipv4Addr::new(100, 64, 250, 2);
/// The router's end of the point-to-point LAN.
pub const TUNNEL_IFACE: &str = "tun0";
/// Every WAN-side address (router ↔ ISP links) is in here.
pub const CGNAT: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10);
/// The link between the two routers of [`LabBuilder::ha_pair`] (`sync`
/// in both), for conntrackd: router `k` is 100.64.254.(1+k)/24.
pub const HA_SYNC_NET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 254, 0), 24);

/// Router `k`'s own address (0 or 1) of an [`LabBuilder::ha_pair`] on the
/// LAN: 192.0.2.(2+k); [`LAN0_ROUTER`] is the pair's virtual gateway
/// address, held by the active router.
pub fn ha_lan_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 2 + k as u8)
}

/// Router `k`'s own address on ISP `isp`'s link of an HA pair:
/// 100.64.isp.(3+k)/24. The ISP's single public address for the pair,
/// 100.64.isp.2 ([`Isp::router_addr`]), is the virtual address the active
/// router holds.
pub fn ha_wan_addr(isp: usize, k: usize) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(100, 64, isp as u8, 3 + k as u8), 24)
}

/// Router `k`'s address on the sync link ([`HA_SYNC_NET`]).
pub fn ha_sync_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 254, 1 + k as u8)
}

/// Hosts per LAN (the /25 leaves room for this many from `.10`/`.138`).
const MAX_HOSTS: usize = 117;
/// ISPs use 100.64.I.0/24; readdressing suggests 100.64.(100+I).0/24.
const MAX_ISPS: usize = 32;

/// Router address of ISP `i`'s link at creation: 100.64.i.2/24.
pub(crate) fn initial_router_addr(isp: usize) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(100, 64, isp as u8, 2), 24)
}

/// ISP `i`'s gateway address at creation: 100.64.i.1.
pub(crate) fn initial_gateway(isp: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, isp as u8, 1)
}

/// The ISP's own address on the link to the internet: 100.100.i.1 (the
/// internet side is 100.100.i.2).
pub(crate) fn uplink_addr(isp: usize, internet_side: bool) -> Ipv4Addr {
    Ipv4Addr::new(100, 100, isp as u8, if internet_side { 2 } else { 1 })
}

/// Initial settings of one ISP.
#[derive(Debug, Clone, Default)]
pub struct IspSpec {
    pub(crate) rate_mbit: Option<u32>,
    pub(crate) delay: Duration,
    pub(crate) loss_pct: u32,
}

impl IspSpec {
    /// Rate limit in both directions ([`Isp::set_rate`]).
    pub fn rate_mbit(mut self, mbit: u32) -> Self {
        self.rate_mbit = Some(mbit);
        self
    }

    /// One-way delay in each direction ([`Isp::set_delay`]).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Downstream loss ([`Isp::set_loss`]).
    pub fn loss(mut self, pct: u32) -> Self {
        self.loss_pct = pct;
        self
    }
}

/// How the router's main routing table is set up for its uplinks, as the
/// admins of the tutorials set theirs up. mwan must work on every kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterKind {
    /// A DHCP client per uplink: a `proto dhcp` default route via each
    /// ISP's gateway, metric 100+I.
    Dhcp,
    /// Static addresses and no default route in the main table (the seeds'
    /// `route del default`: the balancer owns the default route).
    Static,
    /// One static default route, via ISP 1 only (the seeds' primary line;
    /// the tests make it the dead one).
    SingleDefault,
}

impl RouterKind {
    /// The kind named by `$MWAN_LAB_ROUTER` (`dhcp`, `static` or
    /// `single-default`), [`RouterKind::Dhcp`] when unset. `cargo xtask
    /// test` runs the core suites once per kind.
    pub fn from_env() -> RouterKind {
        match std::env::var("MWAN_LAB_ROUTER").as_deref() {
            Ok("static") => RouterKind::Static,
            Ok("single-default") => RouterKind::SingleDefault,
            Ok("dhcp") | Ok("") | Err(_) => RouterKind::Dhcp,
            Ok(other) => panic!("MWAN_LAB_ROUTER={other}: want dhcp, static or single-default"),
        }
    }

    /// The main-table default route the router has for ISP `i` with
    /// `gateway`, as `ip route` commands (empty for none).
    pub(crate) fn default_route(self, i: usize, gateway: Ipv4Addr) -> String {
        match self {
            RouterKind::Dhcp => format!(
                "route replace default via {gateway} dev wan{i} proto dhcp metric {}",
                100 + i
            ),
            RouterKind::SingleDefault if i == 1 => {
                format!("route replace default via {gateway} dev wan{i} proto static")
            }
            RouterKind::Static | RouterKind::SingleDefault => String::new(),
        }
    }
}

/// Describes a lab; [`LabBuilder::build`] creates it.
#[derive(Debug, Clone)]
pub struct LabBuilder {
    lan_hosts: usize,
    lan1_hosts: Option<usize>,
    isps: Option<Vec<IspSpec>>,
    tunnel_host: bool,
    ha: bool,
    dual_stack: bool,
    kind: RouterKind,
}

impl LabBuilder {
    /// IPv6 as well (see `dual.rs` for the plan): each ISP link gets a
    /// 2001:db8 /64 with Router Advertisements from the ISP (dnsmasq) and
    /// a statically delegated prefix, `lan0` the ULA prefix [`crate::LAN0_6`]
    /// with static host addresses and the router as their default route,
    /// and the internet's servers, probe targets and DNS responder answer
    /// on IPv6 too ([`crate::SERVER6`], [`crate::PROBE_TARGETS6`]). ISPs
    /// filter IPv6 sources like IPv4 ones. Not with [`LabBuilder::ha_pair`];
    /// `lan1` and the tunnel host stay IPv4-only.
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// Two routers instead of one, as an HA pair: `lan0` is a bridge in a
    /// switch namespace with the hosts and both routers on it (router `k`
    /// has [`ha_lan_addr`]`(k)`, the hosts' gateway [`LAN0_ROUTER`] belongs
    /// to whichever router holds it), each ISP's `down` is a bridge with a
    /// port to each router (`wanI` with [`ha_wan_addr`]), and a veth `sync`
    /// joins the routers. No address is virtual until a VRRP daemon adds
    /// it. No second LAN, tunnel host, readdressing or PPP in this mode.
    pub fn ha_pair(mut self) -> Self {
        self.ha = true;
        self
    }

    /// The router's kind (default: [`RouterKind::from_env`]). Tests of a
    /// DHCP client's behaviour (`gateway = "auto"`, renumbering) set
    /// [`RouterKind::Dhcp`] themselves.
    pub fn router_kind(mut self, kind: RouterKind) -> Self {
        self.kind = kind;
        self
    }

    /// Adds a host behind a point-to-point link (router `tun0`
    /// [`TUNNEL_ROUTER`] ↔ host `eth0` [`TUNNEL_HOST`], no Ethernet), as a
    /// VPN or a routed tunnel brings clients to the router.
    pub fn tunnel_host(mut self) -> Self {
        self.tunnel_host = true;
        self
    }

    /// Hosts on `lan0` (default 3).
    pub fn lan_hosts(mut self, n: usize) -> Self {
        self.lan_hosts = n;
        self
    }

    /// Adds bridge `lan1` (192.0.2.128/25) with `hosts` hosts.
    pub fn second_lan(mut self, hosts: usize) -> Self {
        self.lan1_hosts = Some(hosts);
        self
    }

    /// `n` ISPs with default settings (default 2), replacing earlier ones.
    pub fn isps(mut self, n: usize) -> Self {
        self.isps = Some(vec![IspSpec::default(); n]);
        self
    }

    /// Adds one ISP.
    pub fn isp(mut self, spec: IspSpec) -> Self {
        self.isps.get_or_insert_with(Vec::new).push(spec);
        self
    }

    pub fn build(self) -> Result<Lab> {
        let isps = self.isps.unwrap_or_else(|| vec![IspSpec::default(); 2]);
        let lan1_hosts = self.lan1_hosts.unwrap_or(0);
        ensure!(
            self.lan_hosts <= MAX_HOSTS && lan1_hosts <= MAX_HOSTS,
            "at most {MAX_HOSTS} hosts per LAN"
        );
        ensure!((1..=MAX_ISPS).contains(&isps.len()), "1 to {MAX_ISPS} ISPs");
        ensure!(
            !self.ha || (self.lan1_hosts.is_none() && !self.tunnel_host),
            "an HA pair lab has one LAN and no tunnel host"
        );
        ensure!(!(self.ha && self.dual_stack), "an HA pair lab is IPv4-only");
        if self.dual_stack {
            dual::check_dnsmasq()?;
        }

        ns::sweep_leftovers()?;
        crate::labdir::sweep_leftovers();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // Locals drop in reverse order if a step fails: namespaces go
        // before the directory.
        let dir = LabDir::create(&name)?;
        let ctx = Arc::new(LabCtx::new(
            name.clone(),
            self.kind,
            self.dual_stack,
            dir.logs(),
        ));

        let router = Netns::create(format!("{name}r"), ctx.clone())?;
        router.sysctls(&[("net.ipv4.ip_forward", "1")])?;
        if self.dual_stack {
            router.sysctls(&[("net.ipv6.conf.all.forwarding", "1")])?;
        }
        let (peer, switch) = if self.ha {
            let peer = Netns::create(format!("{name}q"), ctx.clone())?;
            peer.sysctls(&[("net.ipv4.ip_forward", "1")])?;
            let switch = Netns::create(format!("{name}b"), ctx.clone())?;
            (Some(peer), Some(switch))
        } else {
            (None, None)
        };
        let inet = Netns::create(format!("{name}n"), ctx.clone())?;

        let mut cmds = String::from("link set dev lo up\n");
        let lan0 = build_lan(&ctx, &mut cmds, 0, self.lan_hosts, !self.ha)?;
        let lan1 = match self.lan1_hosts {
            Some(n) => build_lan(&ctx, &mut cmds, 1, n, true)?,
            None => Vec::new(),
        };
        let routers: Vec<&Netns> = std::iter::once(&router).chain(&peer).collect();
        match &switch {
            Some(switch) => {
                switch.ip(&cmds)?;
                build_ha_links(switch, &routers)?;
            }
            None => router.ip(&cmds)?,
        }
        for host in lan0.iter().chain(&lan1) {
            host.ip(&format!(
                "link set dev lo up\naddr add {}/25 dev eth0\nlink set dev eth0 up\nroute add default via {}",
                host.addr, host.gateway
            ))?;
        }
        if self.dual_stack {
            router.ip(&format!("addr add {LAN0_ROUTER6}/64 dev lan0"))?;
            for (i, host) in lan0.iter().enumerate() {
                host.ip(&format!(
                    "addr add {}/64 dev eth0\nroute add ::/0 via {LAN0_ROUTER6}",
                    dual::host_addr6(i)
                ))?;
            }
        }

        let tunnel = if self.tunnel_host {
            Some(build_tunnel(&ctx, &router)?)
        } else {
            None
        };

        let isp_nodes = (1..=isps.len())
            .map(|i| IspNode::create(&ctx, i, &routers, &inet))
            .collect::<Result<Vec<_>>>()?;

        let mut cmds = String::from("link set dev lo up\n");
        for addr in PROBE_TARGETS.iter().chain(&[SERVER, SERVER2, DNS_SERVER]) {
            cmds += &format!("addr add {addr}/32 dev lo\n");
        }
        for i in 1..=isps.len() {
            cmds += &format!(
                "addr add {}/24 dev isp{i}\nlink set dev isp{i} up\nroute add {} via {}\n",
                uplink_addr(i, true),
                initial_router_addr(i).trunc(),
                uplink_addr(i, false)
            );
        }
        if self.dual_stack {
            for addr in PROBE_TARGETS6
                .iter()
                .chain(&[SERVER6, SERVER6_2, DNS_SERVER6])
            {
                cmds += &format!("addr add {addr}/128 dev lo\n");
            }
            for i in 1..=isps.len() {
                let up = dual::uplink6(i, false);
                cmds += &format!(
                    "addr add {}/64 dev isp{i}\nroute add {} via {up}\nroute add {} via {up}\n",
                    dual::uplink6(i, true),
                    dual::initial_link6(i),
                    dual::initial_delegation6(i),
                );
            }
        }
        inet.ip(&cmds)?;
        let servers = start_servers(&inet, self.dual_stack)?;

        if self.ha {
            std::fs::create_dir(dir.root().join("state-1"))?;
        }
        let lab = Lab {
            ctx,
            _servers: servers,
            tunnel,
            isps: isp_nodes,
            lan0,
            lan1,
            router,
            peer,
            switch,
            inet,
            blocked: Mutex::new(BTreeSet::new()),
            plain_via: Mutex::new(None),
            dir,
        };
        if self.dual_stack && self.kind == RouterKind::Dhcp {
            lab.wait_slaac(&(1..=isps.len()).collect::<Vec<_>>())?;
        }
        for (i, spec) in isps.iter().enumerate() {
            let isp = lab.isp(i + 1);
            if spec.rate_mbit.is_some() {
                isp.set_rate(spec.rate_mbit)?;
            }
            if !spec.delay.is_zero() {
                isp.set_delay(spec.delay)?;
            }
            if spec.loss_pct > 0 {
                isp.set_loss(spec.loss_pct)?;
            }
        }
        Ok(lab)
    }
}

/// Creates the host namespaces of LAN `lan` and appends to `cmds` the
/// router commands for its bridge and ports.
/// `with_gateway`: the bridge has the router's address (it is in the
/// router); an HA pair's bridge is in the switch and has none.
fn build_lan(
    ctx: &Arc<LabCtx>,
    cmds: &mut String,
    lan: usize,
    hosts: usize,
    with_gateway: bool,
) -> Result<Vec<Host>> {
    let (net, gateway, tag) = if lan == 0 {
        (LAN0, LAN0_ROUTER, 'h')
    } else {
        (LAN1, LAN1_ROUTER, 'k')
    };
    *cmds += &format!("link add name lan{lan} type bridge\nlink set dev lan{lan} up\n");
    if with_gateway {
        *cmds += &format!("addr add {gateway}/25 dev lan{lan}\n");
    }
    (0..hosts)
        .map(|i| {
            let ns = Netns::create(format!("{}{tag}{i}", ctx.name), ctx.clone())?;
            *cmds += &format!(
                "link add name lan{lan}p{i} type veth peer name eth0 netns {}\nlink set dev lan{lan}p{i} master lan{lan} up\n",
                ns.name()
            );
            let addr = Ipv4Addr::from(u32::from(net.network()) + 10 + i as u32);
            let addr6 = (lan == 0 && ctx.dual_stack).then(|| dual::host_addr6(i));
            Ok(Host {
                ns,
                addr,
                gateway,
                addr6,
            })
        })
        .collect()
}

/// An HA pair's LAN ports and sync link: router `k`'s `lan0` is a veth
/// to port `r{k}` of the switch's bridge `lan0`; `sync` joins the routers.
fn build_ha_links(switch: &Netns, routers: &[&Netns]) -> Result<()> {
    let mut cmds = String::new();
    for (k, r) in routers.iter().enumerate() {
        cmds += &format!(
            "link add name r{k} type veth peer name lan0 netns {}\nlink set dev r{k} master lan0 up\n",
            r.name()
        );
    }
    switch.ip(&cmds)?;
    routers[0].ip(&format!(
        "link add name sync type veth peer name sync netns {}",
        routers[1].name()
    ))?;
    for (k, r) in routers.iter().enumerate() {
        r.ip(&format!(
            "link set dev lo up\naddr add {}/25 dev lan0\nlink set dev lan0 up\naddr add {}/{} dev sync\nlink set dev sync up",
            ha_lan_addr(k),
            ha_sync_addr(k),
            HA_SYNC_NET.prefix_len()
        ))?;
    }
    Ok(())
}

/// The host of [`LabBuilder::tunnel_host`] and its link to the router.
fn build_tunnel(ctx: &Arc<LabCtx>, router: &Netns) -> Result<TunnelLan> {
    let ns = Netns::create(format!("{}t0", ctx.name), ctx.clone())?;
    let wire = TunWire::between(router, TUNNEL_IFACE, &ns, "eth0")?;
    router.ip(&format!(
        "addr add {TUNNEL_ROUTER} peer {TUNNEL_HOST} dev {TUNNEL_IFACE}
link set dev {TUNNEL_IFACE} up"
    ))?;
    ns.ip(&format!(
        "link set dev lo up
addr add {TUNNEL_HOST} peer {TUNNEL_ROUTER} dev eth0
link set dev eth0 up
route add default dev eth0"
    ))?;
    Ok(TunnelLan {
        _wire: wire,
        host: Host {
            ns,
            addr: TUNNEL_HOST,
            gateway: TUNNEL_ROUTER,
            addr6: None,
        },
    })
}

/// The link stops before the host's namespace goes.
struct TunnelLan {
    _wire: TunWire,
    host: Host,
}

fn start_servers(inet: &Netns, dual_stack: bool) -> Result<Vec<ServerHandle>> {
    let mut servers = Vec::new();
    let mut ips: Vec<IpAddr> = vec![SERVER.into(), SERVER2.into()];
    let mut any: Vec<IpAddr> = vec![Ipv4Addr::UNSPECIFIED.into()];
    let mut dns: Vec<SocketAddr> = vec![DNS.into()];
    if dual_stack {
        ips.extend([IpAddr::from(SERVER6), SERVER6_2.into()]);
        any.push(std::net::Ipv6Addr::UNSPECIFIED.into());
        dns.push(dual::DNS6.into());
    }
    for ip in ips {
        servers.push(inet.tcp_whoami_server((ip, TCP_WHOAMI_PORT))?);
        servers.push(inet.udp_whoami_server((ip, UDP_WHOAMI_PORT))?);
        servers.push(inet.stream_server((ip, STREAM_PORT), Some(STREAM_PACE))?);
        servers.push(inet.stream_server((ip, BULK_PORT), None)?);
    }
    for ip in any {
        servers.push(inet.tcp_probe_server((ip, TCP_PROBE_PORT))?);
    }
    for addr in dns {
        servers.push(inet.dns_server(addr)?);
    }
    Ok(servers)
}

/// A LAN host: its namespace (through `Deref`) and address.
pub struct Host {
    ns: Netns,
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
    /// Its static IPv6 address (dual-stack `lan0` hosts).
    addr6: Option<std::net::Ipv6Addr>,
}

impl Host {
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host's static IPv6 address in [`crate::LAN0_6`]; panics for a host
    /// without IPv6 (not a dual-stack lab, or not on `lan0`).
    pub fn addr6(&self) -> std::net::Ipv6Addr {
        self.addr6
            .expect("this host has no IPv6 (dual-stack labs, lan0)")
    }

    /// The router's address on this host's LAN (its default gateway).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }
}

impl Deref for Host {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

/// A running lab. Dropping it (also while unwinding from a panic) stops
/// every server, relay and process, deletes the namespaces and unmounts
/// and deletes the lab directory.
pub struct Lab {
    ctx: Arc<LabCtx>,
    // Fields drop in declaration order: servers and relays end before
    // their namespaces are deleted, the directory (bpffs) goes last.
    /// Held for their `Drop` (stop and join).
    _servers: Vec<ServerHandle>,
    tunnel: Option<TunnelLan>,
    pub(crate) isps: Vec<IspNode>,
    lan0: Vec<Host>,
    lan1: Vec<Host>,
    pub(crate) router: Netns,
    /// The second router of an HA pair.
    peer: Option<Netns>,
    /// The LAN switch of an HA pair.
    switch: Option<Netns>,
    pub(crate) inet: Netns,
    pub(crate) blocked: Mutex<BTreeSet<IpAddr>>,
    pub(crate) plain_via: Mutex<Option<usize>>,
    dir: LabDir,
}

impl Lab {
    /// Defaults: 3 LAN hosts, 2 ISPs, no second LAN.
    pub fn builder() -> LabBuilder {
        LabBuilder {
            lan_hosts: 3,
            lan1_hosts: None,
            isps: None,
            tunnel_host: false,
            ha: false,
            dual_stack: false,
            kind: RouterKind::from_env(),
        }
    }

    /// Unique name (`mwl{pid}x{n}`); every namespace name starts with it.
    pub fn name(&self) -> &str {
        &self.ctx.name
    }

    pub fn router(&self) -> &Netns {
        &self.router
    }

    /// Whether this is an HA pair lab ([`LabBuilder::ha_pair`]).
    pub fn is_ha_pair(&self) -> bool {
        self.peer.is_some()
    }

    /// Router `k` of an HA pair (0: [`Lab::router`], 1: the other one).
    /// Panics on other `k`, or `k` = 1 in a lab with one router.
    pub fn ha_router(&self, k: usize) -> &Netns {
        match k {
            0 => &self.router,
            1 => self.peer.as_ref().expect("not an HA pair lab"),
            _ => panic!("an HA pair has routers 0 and 1, not {k}"),
        }
    }

    /// The LAN switch of an HA pair (bridge `lan0`, port `r{k}` to router
    /// `k`).
    pub fn ha_switch(&self) -> &Netns {
        self.switch.as_ref().expect("not an HA pair lab")
    }

    /// The internet namespace (servers and probe targets).
    pub fn inet(&self) -> &Netns {
        &self.inet
    }

    /// Host `i` (0-based) of `lan0`.
    pub fn host(&self, i: usize) -> &Host {
        &self.lan0[i]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.lan0
    }

    /// Whether the lab has hosts on the second LAN (`lan1`).
    pub fn has_second_lan(&self) -> bool {
        !self.lan1.is_empty()
    }

    /// The host of [`LabBuilder::tunnel_host`], if the lab has one.
    pub fn tunnel_host(&self) -> Option<&Host> {
        self.tunnel.as_ref().map(|t| &t.host)
    }

    /// Host `i` (0-based) of `lan1`.
    pub fn lan1_host(&self, i: usize) -> &Host {
        &self.lan1[i]
    }

    /// ISP `i` (1-based, like `wanI`). Panics if there is no such ISP.
    pub fn isp(&self, i: usize) -> Isp<'_> {
        let node = i.checked_sub(1).and_then(|k| self.isps.get(k));
        let node = node.unwrap_or_else(|| panic!("no ISP {i} (lab has {})", self.isps.len()));
        Isp { lab: self, node }
    }

    pub fn isp_count(&self) -> usize {
        self.isps.len()
    }

    /// The ISP whose router-side subnet (current or earlier, see
    /// [`Isp::readdress`]) contains `addr`: maps the source address an
    /// internet server saw to the ISP the traffic used. For IPv6: the
    /// ISP's link /64s and delegated prefixes, current or earlier.
    pub fn wan_of(&self, addr: impl Into<IpAddr>) -> Option<usize> {
        let addr = addr.into();
        self.isps
            .iter()
            .find(|node| node.has_used(addr))
            .map(|node| node.index)
    }

    /// A bpffs path for mwan's pins (not created; its parent is the lab's
    /// private bpffs mount, which outlives any process of the lab).
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.bpf().join("mwan")
    }

    /// An empty directory for mwan's state files.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.state()
    }

    /// [`Lab::pin_dir`] for router `k` of an HA pair (each router has its
    /// own datapath).
    pub fn ha_pin_dir(&self, k: usize) -> PathBuf {
        match k {
            0 => self.pin_dir(),
            _ => self.dir.bpf().join(format!("mwan-{k}")),
        }
    }

    /// [`Lab::state_dir`] for router `k` of an HA pair (made by the lab).
    pub fn ha_state_dir(&self, k: usize) -> PathBuf {
        match k {
            0 => self.state_dir(),
            _ => self.dir.root().join(format!("state-{k}")),
        }
    }

    /// Where the stdout/stderr of spawned processes go.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.logs()
    }

    /// The lab's directory (`/run/mwan-lab/<name>`).
    pub fn dir(&self) -> PathBuf {
        self.dir.root().to_path_buf()
    }

    /// How the router's main table routes the uplinks.
    pub fn router_kind(&self) -> RouterKind {
        self.ctx.kind
    }

    pub(crate) fn ctx(&self) -> &Arc<LabCtx> {
        &self.ctx
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.ctx.shutdown();
    }
}
