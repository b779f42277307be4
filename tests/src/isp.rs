//! ISP namespaces and their link to the router: creation, renumbering,
//! removal. Impairments are in `impair.rs`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{ensure, Result};
use ipnet::Ipv4Net;

use crate::ctx::LabCtx;
use crate::dual::Isp6State;
use crate::lock;
use crate::ns::Netns;
use crate::relay::{DelayRelay, TunWire};
use crate::topology::{ha_wan_addr, initial_gateway, initial_router_addr, uplink_addr, Lab, CGNAT};

/// One ISP of the lab (namespace `<lab>iI`).
pub(crate) struct IspNode {
    pub(crate) index: usize,
    pub(crate) ns: Netns,
    /// Routers of an HA pair on this ISP's `down` bridge (port `r{k}`
    /// to router `k`); 0 for the single router's veth.
    ha_routers: usize,
    state: Mutex<IspState>,
}

/// What the ISP looks like now; changed only with the lock held, which
/// also serializes the commands that change it.
pub(crate) struct IspState {
    pub(crate) router_addr: Ipv4Net,
    pub(crate) gateway: Ipv4Addr,
    /// Every router-side subnet this ISP has used (for [`Lab::wan_of`]).
    subnets: Vec<Ipv4Net>,
    pub(crate) blackhole: bool,
    pub(crate) loss_pct: u32,
    pub(crate) rate_mbit: Option<u32>,
    pub(crate) delay: Duration,
    pub(crate) relay: Option<DelayRelay>,
    /// A dialled point-to-point link replacing the veth (see
    /// [`Isp::dial_point_to_point`]).
    ppp: Option<TunWire>,
    /// The IPv6 side, in a dual-stack lab.
    pub(crate) v6: Option<Isp6State>,
}

impl IspNode {
    /// Creates ISP `index`: its namespace, the uplink veth into `inet`
    /// (configured on the internet side by the caller) and the link to the
    /// router (or to both routers of an HA pair).
    pub(crate) fn create(
        ctx: &Arc<LabCtx>,
        index: usize,
        routers: &[&Netns],
        inet: &Netns,
    ) -> Result<IspNode> {
        let ns = Netns::create(format!("{}i{index}", ctx.name), ctx.clone())?;
        ns.sysctls(&[("net.ipv4.ip_forward", "1")])?;
        ns.ip(&format!(
            "link set dev lo up\n\
             link add name up type veth peer name isp{index} netns {inet}\n\
             addr add {up}/24 dev up\n\
             link set dev up up\n\
             route add default via {internet}",
            inet = inet.name(),
            up = uplink_addr(index, false),
            internet = uplink_addr(index, true),
        ))?;
        let dual = ctx.dual_stack;
        let router_addr = initial_router_addr(index);
        let state = IspState {
            router_addr,
            gateway: initial_gateway(index),
            subnets: vec![router_addr.trunc()],
            blackhole: false,
            loss_pct: 0,
            rate_mbit: None,
            delay: Duration::ZERO,
            relay: None,
            ppp: None,
            v6: dual.then(|| Isp6State::new(ctx.kind, index)),
        };
        let node = IspNode {
            index,
            ns,
            ha_routers: if routers.len() > 1 { routers.len() } else { 0 },
            state: Mutex::new(state),
        };
        if dual {
            node.create_uplink6()?;
        }
        if node.ha_routers > 0 {
            node.create_ha_links(routers, &node.state())?;
        } else {
            node.create_wan_link(routers[0], &mut node.state())?;
        }
        crate::impair::apply_filter(&node, &node.state())?;
        Ok(node)
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, IspState> {
        lock(&self.state)
    }

    pub(crate) fn has_used(&self, addr: IpAddr) -> bool {
        let st = self.state();
        match addr {
            IpAddr::V4(a) => st.subnets.iter().any(|net| net.contains(&a)),
            IpAddr::V6(a) => st
                .v6
                .as_ref()
                .is_some_and(|v6| v6.used.iter().any(|net| net.contains(&a))),
        }
    }

    /// The veth `wanI` (router) ↔ `down` (ISP) with the addresses, rate
    /// limit and the main-table default route of the lab's
    /// [`RouterKind`](crate::topology::RouterKind), and in a dual-stack lab
    /// the IPv6 side (`dual.rs`).
    fn create_wan_link(&self, router: &Netns, st: &mut IspState) -> Result<()> {
        let i = self.index;
        let mac = match st.v6 {
            Some(_) => format!("address {} ", crate::dual::wan_mac(i)),
            None => String::new(),
        };
        router.ip(&format!(
            "link add name wan{i} {mac}type veth peer name down netns {isp}\n\
             addr add {addr} dev wan{i}",
            isp = self.ns.name(),
            addr = st.router_addr,
        ))?;
        if let Some(v6) = &st.v6 {
            self.prepare_wan6(router, v6)?;
        }
        router.ip(&format!("link set dev wan{i} up"))?;
        self.ns.ip(&format!(
            "addr add {}/{} dev down\nlink set dev down up",
            st.gateway,
            st.router_addr.prefix_len()
        ))?;
        if st.v6.is_some() {
            self.finish_wan6(router, st)?;
        }
        router.sysctls(&[(format!("net.ipv4.conf.wan{i}.rp_filter").as_str(), "2")])?;
        let route = self.ns.ctx.kind.default_route(i, st.gateway);
        if !route.is_empty() {
            router.ip(&route)?;
        }
        if st.rate_mbit.is_some() {
            self.apply_rate("down", st.rate_mbit)?;
        }
        Ok(())
    }
}

impl IspNode {
    /// An HA pair's uplink: `down` is a bridge holding the gateway address
    /// (a switch in front of the ISP's router), port `r{k}` a veth to
    /// router `k`'s `wanI` with [`ha_wan_addr`]. The public address both
    /// routers share is the VRRP daemon's to add.
    fn create_ha_links(&self, routers: &[&Netns], st: &IspState) -> Result<()> {
        let i = self.index;
        let mut cmds = format!(
            "link add name down type bridge\naddr add {}/{} dev down\nlink set dev down up\n",
            st.gateway,
            st.router_addr.prefix_len()
        );
        for (k, r) in routers.iter().enumerate() {
            cmds += &format!(
                "link add name r{k} type veth peer name wan{i} netns {}\nlink set dev r{k} master down up\n",
                r.name()
            );
        }
        self.ns.ip(&cmds)?;
        for (k, r) in routers.iter().enumerate() {
            r.ip(&format!(
                "addr add {} dev wan{i}\nlink set dev wan{i} up",
                ha_wan_addr(i, k)
            ))?;
            r.sysctls(&[(format!("net.ipv4.conf.wan{i}.rp_filter").as_str(), "2")])?;
            let route = self.ns.ctx.kind.default_route(i, st.gateway);
            if !route.is_empty() {
                r.ip(&route)?;
            }
        }
        if st.rate_mbit.is_some() {
            self.apply_rate("down", st.rate_mbit)?;
        }
        Ok(())
    }

    /// The ISP's ports facing the routers: `down` itself, or the bridge
    /// ports of an HA pair.
    pub(crate) fn router_ports(&self) -> Vec<String> {
        match self.ha_routers {
            0 => vec!["down".to_string()],
            n => (0..n).map(|k| format!("r{k}")).collect(),
        }
    }

    /// Fails for operations an HA pair's uplink does not model.
    fn not_ha(&self, what: &str) -> Result<()> {
        ensure!(
            self.ha_routers == 0,
            "{what} is not supported on an HA pair's ISP {}",
            self.index
        );
        Ok(())
    }
}

/// Handle on ISP `I` of a lab, from [`Lab::isp`]. Every setter is
/// reversible and takes effect immediately.
pub struct Isp<'a> {
    pub(crate) lab: &'a Lab,
    pub(crate) node: &'a IspNode,
}

impl<'a> Isp<'a> {
    /// 1-based index (`wanI`, `ispI`).
    pub fn index(&self) -> usize {
        self.node.index
    }

    /// The ISP's namespace (`down` faces the router, `up` the internet).
    pub fn ns(&self) -> &'a Netns {
        &self.node.ns
    }

    /// The router's interface to this ISP: `wanI`.
    pub fn wan_interface(&self) -> String {
        format!("wan{}", self.node.index)
    }

    /// The router's address on the link now (initially 100.64.I.2/24).
    pub fn router_addr(&self) -> Ipv4Net {
        self.node.state().router_addr
    }

    /// The ISP's gateway address on the link now (initially 100.64.I.1).
    pub fn gateway(&self) -> Ipv4Addr {
        self.node.state().gateway
    }

    /// What the ISP counted on its side of the link to the router (its
    /// `down` interface): bytes (received, sent), as an ISP meters a line.
    pub fn link_bytes(&self) -> Result<(u64, u64)> {
        let out = self.node.ns.sh(
            "cat /sys/class/net/down/statistics/rx_bytes /sys/class/net/down/statistics/tx_bytes",
        )?;
        let v: Vec<u64> = out
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        ensure!(v.len() == 2, "reading the counters of down: {out:?}");
        Ok((v[0], v[1]))
    }

    /// Renumbers the link, as a new DHCP lease would: the ISP's gateway
    /// becomes `gateway`, the router's `wanI` gets `router_addr` and its
    /// `proto dhcp` default route goes via the new gateway, and the
    /// internet routes the new subnet to this ISP. Old addresses and routes
    /// are removed. Both addresses must be in 100.64.0.0/10, e.g.
    /// 100.64.(100+I).2/24 and 100.64.(100+I).1.
    pub fn readdress(&self, router_addr: Ipv4Net, gateway: Ipv4Addr) -> Result<()> {
        ensure!(
            CGNAT.contains(&router_addr) && router_addr.contains(&gateway) && gateway != router_addr.addr(),
            "{router_addr} / {gateway}: want a router address and a gateway in one subnet of {CGNAT}"
        );
        self.node.not_ha("readdressing")?;
        let i = self.node.index;
        {
            let mut st = self.node.state();
            let (old_addr, old_gw) = (st.router_addr, st.gateway);
            let mut isp_cmds = format!(
                "addr replace {gateway}/{} dev down\n",
                router_addr.prefix_len()
            );
            let mut inet_cmds = format!(
                "route replace {} via {}\n",
                router_addr.trunc(),
                uplink_addr(i, false)
            );
            let mut router_cmds = format!(
                "addr replace {router_addr} dev wan{i}\n{}\n",
                self.lab.ctx().kind.default_route(i, gateway)
            );
            if (old_gw, old_addr.prefix_len()) != (gateway, router_addr.prefix_len()) {
                isp_cmds += &format!("addr del {old_gw}/{} dev down\n", old_addr.prefix_len());
            }
            if old_addr.trunc() != router_addr.trunc() {
                inet_cmds += &format!(
                    "route del {} via {}\n",
                    old_addr.trunc(),
                    uplink_addr(i, false)
                );
            }
            if old_addr != router_addr {
                router_cmds += &format!("addr del {old_addr} dev wan{i}\n");
            }
            self.node.ns.ip(&isp_cmds)?;
            self.lab.inet.ip(&inet_cmds)?;
            self.lab.router.ip(&router_cmds)?;
            st.router_addr = router_addr;
            st.gateway = gateway;
            if !st.subnets.contains(&router_addr.trunc()) {
                st.subnets.push(router_addr.trunc());
            }
            crate::impair::apply_filter(self.node, &st)?;
        }
        self.lab.refresh_plain_route(i)
    }

    /// Deletes the router's `wanI` (and so the ISP's `down`), as when a PPP
    /// link is not dialled.
    pub fn remove_wan_interface(&self) -> Result<()> {
        self.node.not_ha("removing the WAN interface")?;
        let _st = self.node.state();
        self.lab
            .router
            .ip(&format!("link del dev wan{}", self.node.index))
    }

    /// Dials a PPP-like session: the router's link to this ISP becomes a
    /// point-to-point tun device `name` (no Ethernet, no ARP) with the
    /// router's current address and the gateway as its peer, and a main
    /// table `default dev NAME` route without a gateway, as pppd installs
    /// it. `wanI` must be gone ([`Isp::remove_wan_interface`]). Blackhole,
    /// loss and delay work as on the veth; carrier, rate, readdressing
    /// and `remove/restore_wan_interface` do not apply to it.
    pub fn dial_point_to_point(&self, name: &str) -> Result<()> {
        self.node.not_ha("a point-to-point link")?;
        let mut st = self.node.state();
        ensure!(
            st.ppp.is_none(),
            "ISP {} is already dialled",
            self.node.index
        );
        let wire = TunWire::between(&self.lab.router, name, &self.node.ns, "down")?;
        let (addr, gw) = (st.router_addr.addr(), st.gateway);
        self.node.ns.ip(&format!(
            "addr add {gw} peer {addr} dev down
link set dev down up"
        ))?;
        self.lab.router.ip(&format!(
            "addr add {addr} peer {gw} dev {name}
link set dev {name} up
             route replace default dev {name} proto boot metric {}",
            100 + self.node.index
        ))?;
        st.ppp = Some(wire);
        Ok(())
    }

    /// Hangs the session of [`Isp::dial_point_to_point`] up: both tun
    /// devices (and the router's routes through them) disappear.
    pub fn hang_up(&self) -> Result<()> {
        let wire = self.node.state().ppp.take();
        ensure!(wire.is_some(), "ISP {} is not dialled", self.node.index);
        drop(wire);
        Ok(())
    }

    /// Recreates `wanI` after [`Isp::remove_wan_interface`], with its
    /// current addresses, default route and rate limit, carrier up.
    pub fn restore_wan_interface(&self) -> Result<()> {
        self.node.not_ha("restoring the WAN interface")?;
        self.node
            .create_wan_link(&self.lab.router, &mut self.node.state())?;
        if self.lab.is_dual_stack() && self.lab.router_kind() == crate::RouterKind::Dhcp {
            self.lab.wait_slaac(&[self.node.index])?;
        }
        self.lab.refresh_plain_route(self.node.index)
    }
}
