//! Routing plumbing over rtnetlink: the WAN tables, mwan's ip rules, the
//! balance route, and what the daemon needs to know about links, addresses
//! and gateways (including change notifications).
//!
//! Every route and rule mwan adds carries protocol [`RTPROT_MWAN`]
//! (`proto 109`), so [`Net::sync_rules`] and [`Net::remove_all_mwan`] touch
//! exactly mwan's objects and are safe to run again after a crash.
//! Netlink errors are returned naming the operation and the object; nothing
//! is retried or skipped silently.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteNextHop, RouteScope, RouteType,
};
use netlink_packet_route::rule::RuleMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::netlink::op_error;
use crate::RTPROT_MWAN;
use msg::{
    is_mwan_rule, mwan_route, parse_addr, parse_addr6, parse_link, parse_rule, route_dst,
    route_metric, route_nexthops, route_table, rule_message, rule_priority,
};

mod events;
mod msg;
#[cfg(test)]
pub(crate) mod testns;
#[cfg(test)]
mod tests;

/// The kernel's main routing table.
pub const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;

/// Dumps that the kernel marks inconsistent (`NLM_F_DUMP_INTR`) are retried
/// this many times.
const DUMP_ATTEMPTS: usize = 5;

/// A network interface as mwan sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFF_UP`: administratively up.
    pub admin_up: bool,
    /// `IFF_LOWER_UP` or `IFF_RUNNING`: the link has carrier.
    pub carrier: bool,
    /// The link has an Ethernet header (`ARPHRD_ETHER`: Ethernet, VLAN,
    /// bridge, veth, Wi-Fi, bond, …); `false` for L3 links (tun,
    /// WireGuard, PPP) whose packets start with the IP header.
    pub l2: bool,
}

pub use crate::config::Family;

/// The netlink address family of routes and rules of a family.
pub(crate) fn af(f: Family) -> AddressFamily {
    match f {
        Family::Ipv4 => AddressFamily::Inet,
        Family::Ipv6 => AddressFamily::Inet6,
    }
}

/// Where a route sends packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nexthop {
    /// `None`: a point-to-point link, the route goes via the device
    /// (IPv4 only: an IPv6 nexthop always has a gateway, usually the
    /// router's link-local address).
    pub gateway: Option<IpAddr>,
    pub ifindex: u32,
}

impl Nexthop {
    /// The family of the routes through it (a device route: IPv4).
    pub fn family(&self) -> Family {
        match self.gateway {
            Some(IpAddr::V6(_)) => Family::Ipv6,
            _ => Family::Ipv4,
        }
    }
}

impl fmt::Display for Nexthop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.gateway {
            Some(gw) => write!(f, "via {gw} ifindex {}", self.ifindex),
            None => write!(f, "ifindex {}", self.ifindex),
        }
    }
}

/// A change reported by [`Net::events`].
#[derive(Clone, Debug)]
pub enum NetEvent {
    /// A link appeared or its flags changed.
    Link(Link),
    LinkRemoved {
        index: u32,
        name: String,
    },
    /// An IPv4 or IPv6 address was added or removed.
    Addr {
        index: u32,
        addr: IpNet,
        added: bool,
    },
    /// An IPv4 or IPv6 route was added, changed or removed in `table`. Routes of the
    /// `local` table and mwan's own routes (its echo) are not reported.
    /// Note that the kernel does not notify the routes it drops when a link
    /// goes down; watch `Link` events for that.
    Route {
        table: u32,
        ifindex: Option<u32>,
        default: bool,
    },
    /// The kernel dropped notifications (the socket buffer overflowed):
    /// anything may have changed, re-read the state.
    Overrun,
}

/// One of mwan's ip rules: `priority: from <selector> lookup <table>`, of
/// one family (`ip rule` or `ip -6 rule`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleSpec {
    pub family: Family,
    pub priority: u32,
    pub selector: Selector,
    pub table: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    All,
    /// `from all lookup main suppress_prefixlength 0`: routes of the table
    /// except its default routes.
    AllSuppressDefault,
    Fwmark {
        mark: u32,
        mask: u32,
    },
    /// From one address (of the rule's family).
    From(IpAddr),
    /// `iif lo`: packets the router itself sends.
    Local,
}

/// In `ip rule` syntax, for messages.
impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.family == Family::Ipv6 {
            f.write_str("-6 ")?;
        }
        write!(f, "{} ", self.priority)?;
        match self.selector {
            Selector::All | Selector::AllSuppressDefault => f.write_str("from all")?,
            Selector::Fwmark { mark, mask } => write!(f, "fwmark {mark:#x}/{mask:#x}")?,
            Selector::From(a) => write!(f, "from {a}")?,
            Selector::Local => f.write_str("from all iif lo")?,
        }
        match self.table {
            RT_TABLE_MAIN => f.write_str(" lookup main")?,
            t => write!(f, " lookup {t}")?,
        }
        if self.selector == Selector::AllSuppressDefault {
            f.write_str(" suppress_prefixlength 0")?;
        }
        Ok(())
    }
}

/// The rule set of family `family` for a config, with
/// `P = rule_priority`, and `wans` (id, mark, addresses of the family):
///
/// * `P`: all → main, ignoring its default routes;
/// * `P+10+i`: fwmark mark(i)/mask → `table_base+i` for each WAN id `i`;
/// * `P+100+i`: from each address of WAN `i` → `table_base+i` (IPv4: its
///   address; IPv6: SLAAC gives several: stable, temporary, deprecated
///   ones of an old prefix);
/// * `P+199`: all → the balance table, only when `refuse_forwarded` (every
///   WAN down under `all_down = "unreachable"`: the table then holds an
///   unreachable route, so forwarded connections are refused too);
/// * `P+200`: `iif lo` → the balance table `table_base + MAX_WANS`: the
///   router's own traffic. Forwarded traffic without a mark (a `main = true`
///   rule) is routed by the main table.
///
/// IPv6 without any WAN that has IPv6: no rule at all (the host's IPv6 is
/// left alone).
pub fn wanted_rules(
    family: Family,
    rule_priority: u32,
    table_base: u32,
    mark_mask: u32,
    wans: &[(u8, u32, Vec<IpAddr>)],
    refuse_forwarded: bool,
) -> Vec<RuleSpec> {
    if family == Family::Ipv6 && wans.is_empty() {
        return Vec::new();
    }
    let p = rule_priority;
    let mut rules = vec![
        RuleSpec {
            family,
            priority: p,
            selector: Selector::AllSuppressDefault,
            table: RT_TABLE_MAIN,
        },
        RuleSpec {
            family,
            priority: p + 200,
            selector: Selector::Local,
            table: balance_table(table_base),
        },
    ];
    if refuse_forwarded {
        rules.push(RuleSpec {
            family,
            priority: p + 199,
            selector: Selector::All,
            table: balance_table(table_base),
        });
    }
    for (id, mark, addrs) in wans {
        let (id, mark) = (u32::from(*id), *mark);
        rules.push(RuleSpec {
            family,
            priority: p + 10 + id,
            selector: Selector::Fwmark {
                mark,
                mask: mark_mask,
            },
            table: table_base + id,
        });
        for a in addrs {
            rules.push(RuleSpec {
                family,
                priority: p + 100 + id,
                selector: Selector::From(*a),
                table: table_base + id,
            });
        }
    }
    rules.sort_by_key(|r| r.priority);
    rules.dedup();
    rules
}

/// The balance table of a config: after the tables of the WAN ids.
pub fn balance_table(table_base: u32) -> u32 {
    table_base + mwan_common::MAX_WANS
}

/// Kernel multipath weights (1..=256) for config weights (1..=1000): kept as
/// they are when they fit, otherwise scaled so the largest becomes 256.
pub fn kernel_weights(weights: &[u32]) -> Vec<u32> {
    let max = weights.iter().copied().max().unwrap_or(1).max(1);
    weights
        .iter()
        .map(|&w| {
            let w = if max <= 256 {
                w
            } else {
                ((u64::from(w) * 256 + u64::from(max) / 2) / u64::from(max)) as u32
            };
            w.clamp(1, 256)
        })
        .collect()
}

/// An rtnetlink connection (requests and dumps; see [`Net::events`] for
/// notifications). Dropping it closes the connection.
pub struct Net {
    handle: rtnetlink::Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Net {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Net {
    /// Opens a connection in the network namespace of the calling thread.
    /// Must be called inside a tokio runtime.
    pub async fn connect() -> Result<Net> {
        // Strict checking makes the kernel filter dumps by table and
        // interface instead of sending every route.
        let (conn, handle, _) =
            rtnetlink::new_connection_with_strict_check().context("opening an rtnetlink socket")?;
        Ok(Net {
            handle,
            conn: tokio::spawn(conn),
        })
    }

    /// Sends one request and returns the messages of the answer; a netlink
    /// error becomes an `io::Error` with its errno.
    async fn request(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        Ok(self.request_raw(msg, flags).await?.0)
    }

    /// `request`, also telling whether any answer had `NLM_F_DUMP_INTR`.
    async fn request_raw(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<(Vec<RouteNetlinkMessage>, bool)> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        let mut answer = self
            .handle
            .clone()
            .request(req)
            .map_err(|e| io::Error::other(format!("rtnetlink connection closed: {e}")))?;
        let (mut out, mut interrupted) = (Vec::new(), false);
        while let Some(m) = answer.next().await {
            interrupted |= m.header.flags & NLM_F_DUMP_INTR != 0;
            match m.payload {
                NetlinkPayload::InnerMessage(inner) => out.push(inner),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                _ => {}
            }
        }
        Ok((out, interrupted))
    }

    /// A dump, repeated while the kernel says it was inconsistent (the last
    /// attempt is taken as it is).
    async fn dump(&self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        for _ in 1..DUMP_ATTEMPTS {
            let (out, interrupted) = self.request_raw(msg.clone(), NLM_F_DUMP).await?;
            if !interrupted {
                return Ok(out);
            }
        }
        Ok(self.request_raw(msg, NLM_F_DUMP).await?.0)
    }

    /// The link named `name`, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(m), 0).await {
            Ok(answer) => Ok(answer.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => parse_link(l),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(op_error(format!("reading link {name}"), &e)),
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>> {
        let answer = self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .await
            .map_err(|e| op_error("listing links", &e))?;
        Ok(answer
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => parse_link(l),
                _ => None,
            })
            .collect())
    }

    /// The link-layer (MAC) address of each neighbour of the links
    /// `ifindexes`, both families, from the kernel's neighbour tables.
    pub async fn neighbours(
        &self,
        ifindexes: &[u32],
    ) -> Result<std::collections::HashMap<IpAddr, [u8; 6]>> {
        use netlink_packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourMessage,
        };
        let answer = self
            .dump(RouteNetlinkMessage::GetNeighbour(
                NeighbourMessage::default(),
            ))
            .await
            .map_err(|e| op_error("listing neighbours", &e))?;
        let mut out = std::collections::HashMap::new();
        for m in answer {
            let RouteNetlinkMessage::NewNeighbour(n) = m else {
                continue;
            };
            if !ifindexes.contains(&n.header.ifindex) {
                continue;
            }
            let (mut ip, mut mac) = (None, None);
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        ip = Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        ip = Some(IpAddr::V6(*v6))
                    }
                    NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                        mac = <[u8; 6]>::try_from(&b[..]).ok()
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.insert(ip, mac);
            }
        }
        Ok(out)
    }

    /// The IPv4 addresses of a link, primary addresses first.
    pub async fn ipv4_addrs(&self, ifindex: u32) -> Result<Vec<Ipv4Net>> {
        let mut addrs: Vec<(bool, Ipv4Net)> = self
            .addresses(ifindex)
            .await?
            .into_iter()
            .filter(|(index, ..)| *index == ifindex)
            .map(|(_, secondary, net)| (secondary, net))
            .collect();
        addrs.sort_by_key(|(secondary, _)| *secondary);
        Ok(addrs.into_iter().map(|(_, net)| net).collect())
    }

    /// Every IPv4 address of the host with its link: local addresses and,
    /// through their prefix length, the connected prefixes.
    pub async fn all_ipv4_addrs(&self) -> Result<Vec<(u32, Ipv4Net)>> {
        Ok(self
            .addresses(0)
            .await?
            .into_iter()
            .map(|(index, _, net)| (index, net))
            .collect())
    }

    /// `(ifindex, secondary, address)` of the IPv4 addresses of one link
    /// (`ifindex` 0: all links).
    async fn addresses(&self, ifindex: u32) -> Result<Vec<(u32, bool, Ipv4Net)>> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.index = ifindex;
        let answer = self
            .dump(RouteNetlinkMessage::GetAddress(m))
            .await
            .map_err(|e| op_error("listing IPv4 addresses", &e))?;
        Ok(answer
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => parse_addr(a),
                _ => None,
            })
            .collect())
    }

    /// The global IPv6 addresses of a link (SLAAC, DHCPv6 or static; not
    /// link-local ones), in the kernel's order.
    pub async fn ipv6_addrs(&self, ifindex: u32) -> Result<Vec<Ipv6Net>> {
        Ok(self
            .addresses6(ifindex)
            .await?
            .into_iter()
            .filter(|(index, _)| *index == ifindex)
            .map(|(_, net)| net)
            .collect())
    }

    /// Every global IPv6 address of the host with its link.
    pub async fn all_ipv6_addrs(&self) -> Result<Vec<(u32, Ipv6Net)>> {
        self.addresses6(0).await
    }

    async fn addresses6(&self, ifindex: u32) -> Result<Vec<(u32, Ipv6Net)>> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.index = ifindex;
        let answer = self
            .dump(RouteNetlinkMessage::GetAddress(m))
            .await
            .map_err(|e| op_error("listing IPv6 addresses", &e))?;
        Ok(answer
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => parse_addr6(a),
                _ => None,
            })
            .collect())
    }

    /// The gateway of `gateway = "auto"` (IPv4) or `gateway6 = "auto"`
    /// (IPv6: the router learned from Router Advertisements, a `proto ra`
    /// route of the main table, or a DHCPv6 client's route): a default
    /// route through `ifindex` in any table but the local table, mwan's own
    /// routes and the tables in `exclude`. The main table wins, then the
    /// lowest metric. A default route via the device alone (PPP) gives a
    /// nexthop without gateway.
    pub async fn learned_default(
        &self,
        family: Family,
        ifindex: u32,
        exclude: RangeInclusive<u32>,
    ) -> Result<Option<Nexthop>> {
        let routes = match self.routes(family, None, Some(ifindex)).await {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(op_error(format!("listing routes of ifindex {ifindex}"), &e)),
        };
        Ok(routes
            .iter()
            .filter(|r| {
                let table = route_table(r);
                r.header.destination_prefix_length == 0
                    && r.header.kind == RouteType::Unicast
                    && u8::from(r.header.protocol) != RTPROT_MWAN
                    && table != RT_TABLE_LOCAL
                    && !exclude.contains(&table)
            })
            .filter_map(|r| {
                let nh = route_nexthops(r)
                    .into_iter()
                    .find(|nh| nh.ifindex == ifindex)?;
                let table = route_table(r);
                Some(((table != RT_TABLE_MAIN, route_metric(r), table), nh))
            })
            .min_by_key(|(key, _)| *key)
            .map(|(_, nh)| nh))
    }

    /// Sets the default route of a WAN table:
    /// `default via <gw> dev <if> table <table> proto mwan` (replacing
    /// whatever default route the table had).
    pub async fn set_table_default(&self, table: u32, nh: Nexthop) -> Result<()> {
        let mut m = mwan_route(nh.family(), table, RouteType::Unicast);
        match nh.gateway {
            Some(gw) => m.attributes.push(RouteAttribute::Gateway(gw.into())),
            None => m.header.scope = RouteScope::Link,
        }
        m.attributes.push(RouteAttribute::Oif(nh.ifindex));
        self.replace_route(m)
            .await
            .map_err(|e| op_error(format!("setting default {nh} table {table}"), &e))
    }

    /// The nexthop of mwan's default route of `family` in `table`, if it
    /// has one. The kernel deletes it without a notification when its
    /// interface goes administratively down or loses its last address.
    pub async fn table_default(&self, family: Family, table: u32) -> Result<Option<Nexthop>> {
        let routes = match self.routes(family, Some(table), None).await {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(op_error(format!("listing routes of table {table}"), &e)),
        };
        Ok(routes
            .iter()
            .find(|r| {
                route_table(r) == table
                    && r.header.destination_prefix_length == 0
                    && u8::from(r.header.protocol) == RTPROT_MWAN
            })
            .and_then(|r| route_nexthops(r).into_iter().next()))
    }

    /// Sets the balance table of `family`: a weighted multipath default
    /// route over `nexthops` (config weights, scaled by
    /// [`kernel_weights`]; next hops of `family`); when empty, an
    /// `unreachable default` route if `unreachable`, else no route.
    pub async fn set_balance(
        &self,
        family: Family,
        table: u32,
        nexthops: &[(Nexthop, u32)],
        unreachable: bool,
    ) -> Result<()> {
        if nexthops.is_empty() && !unreachable {
            return self.delete_default(family, table).await;
        }
        let m = if nexthops.is_empty() {
            mwan_route(family, table, RouteType::Unreachable)
        } else {
            let weights: Vec<u32> = nexthops.iter().map(|(_, w)| *w).collect();
            let hops = nexthops
                .iter()
                .zip(kernel_weights(&weights))
                .map(|((nh, _), weight)| {
                    let mut hop = RouteNextHop::default();
                    hop.interface_index = nh.ifindex;
                    hop.hops = (weight - 1) as u8;
                    if let Some(gw) = nh.gateway {
                        hop.attributes.push(RouteAttribute::Gateway(gw.into()));
                    }
                    hop
                })
                .collect();
            let mut m = mwan_route(family, table, RouteType::Unicast);
            m.attributes.push(RouteAttribute::MultiPath(hops));
            m
        };
        self.replace_route(m).await.map_err(|e| {
            let what = nexthops
                .iter()
                .map(|(nh, w)| format!("{nh} weight {w}"))
                .collect::<Vec<_>>();
            let what = if what.is_empty() {
                "unreachable".to_string()
            } else {
                what.join(", ")
            };
            op_error(
                format!("setting balance route of table {table} ({what})"),
                &e,
            )
        })
    }

    async fn replace_route(&self, m: RouteMessage) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map(drop)
    }

    /// Deletes mwan's default route of `table`, whatever its type, if any.
    async fn delete_default(&self, family: Family, table: u32) -> Result<()> {
        let mut m = mwan_route(family, table, RouteType::Unspec);
        m.header.scope = RouteScope::NoWhere;
        match self
            .request(RouteNetlinkMessage::DelRoute(m), NLM_F_ACK)
            .await
        {
            Err(e) if !gone(&e) => Err(op_error(
                format!("deleting default route of table {table}"),
                &e,
            )),
            _ => Ok(()),
        }
    }

    /// Deletes the `clsact` qdisc of `ifindex` when no tc filter is left on
    /// it (mwan added it; other programs' filters keep it). Returns whether
    /// it was removed.
    pub async fn remove_clsact_if_unused(&self, ifindex: u32) -> Result<bool> {
        use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
        for minor in [TcHandle::MIN_INGRESS, TcHandle::MIN_EGRESS] {
            let mut m = TcMessage::default();
            m.header.index = ifindex as i32;
            m.header.parent = TcHandle {
                major: 0xffff,
                minor,
            };
            match self
                .request(RouteNetlinkMessage::GetTrafficFilter(m), NLM_F_DUMP)
                .await
            {
                Ok(filters) if !filters.is_empty() => return Ok(false),
                Ok(_) => {}
                // No clsact qdisc (any more): nothing to remove.
                Err(_) => return Ok(false),
            }
        }
        let mut m = TcMessage::default();
        m.header.index = ifindex as i32;
        m.header.parent = TcHandle::CLSACT;
        m.header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        m.attributes.push(TcAttribute::Kind("clsact".into()));
        match self
            .request(RouteNetlinkMessage::DelQueueDiscipline(m), NLM_F_ACK)
            .await
        {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(op_error(
                format!("deleting the clsact qdisc of interface {ifindex}"),
                &e,
            )),
        }
    }

    /// Deletes every route of `family` in `table`.
    pub async fn flush_table(&self, family: Family, table: u32) -> Result<()> {
        let routes = match self.routes(family, Some(table), None).await {
            Ok(r) => r,
            // The kernel has no such table (or no IPv6 at all): nothing to
            // flush.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EAFNOSUPPORT)) => {
                return Ok(())
            }
            Err(e) => return Err(op_error(format!("listing routes of table {table}"), &e)),
        };
        for r in routes.iter().filter(|r| route_table(r) == table) {
            // Deleting by destination, TOS and metric, like `ip route del`.
            let mut m = RouteMessage::default();
            m.header = r.header.clone();
            m.header.scope = RouteScope::NoWhere;
            m.header.kind = RouteType::Unspec;
            m.attributes = r
                .attributes
                .iter()
                .filter(|a| {
                    matches!(
                        a,
                        RouteAttribute::Destination(_)
                            | RouteAttribute::Priority(_)
                            | RouteAttribute::Table(_)
                    )
                })
                .cloned()
                .collect();
            if let Err(e) = self
                .request(RouteNetlinkMessage::DelRoute(m), NLM_F_ACK)
                .await
            {
                if !gone(&e) {
                    let dst = route_dst(r).map_or("?".into(), |d| d.to_string());
                    return Err(op_error(format!("deleting route {dst} table {table}"), &e));
                }
            }
        }
        Ok(())
    }

    /// Routes of `family`, filtered by the kernel by table and output
    /// interface.
    async fn routes(
        &self,
        family: Family,
        table: Option<u32>,
        oif: Option<u32>,
    ) -> io::Result<Vec<RouteMessage>> {
        let mut m = RouteMessage::default();
        m.header.address_family = af(family);
        if let Some(t) = table {
            m.attributes.push(RouteAttribute::Table(t));
        }
        if let Some(i) = oif {
            m.attributes.push(RouteAttribute::Oif(i));
        }
        Ok(self
            .dump(RouteNetlinkMessage::GetRoute(m))
            .await?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) if r.header.address_family == af(family) => {
                    Some(r)
                }
                _ => None,
            })
            .collect())
    }

    /// IPv4 and IPv6 rules with mwan's protocol, with their spec when they
    /// have the shape of an mwan rule.
    async fn owned_rules(&self) -> Result<Vec<(Option<RuleSpec>, RuleMessage)>> {
        let mut out = Vec::new();
        for family in Family::BOTH {
            let mut m = RuleMessage::default();
            m.header.family = af(family);
            let answer = match self.dump(RouteNetlinkMessage::GetRule(m)).await {
                Ok(a) => a,
                // A kernel without IPv6 has no IPv6 rules.
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => continue,
                Err(e) => return Err(op_error("listing rules", &e)),
            };
            out.extend(answer.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r)
                    if r.header.family == af(family) && is_mwan_rule(&r) =>
                {
                    Some((parse_rule(&r), r))
                }
                _ => None,
            }));
        }
        Ok(out)
    }

    /// mwan's current rules (those mwan could have made).
    pub async fn mwan_rules(&self) -> Result<Vec<RuleSpec>> {
        Ok(self
            .owned_rules()
            .await?
            .into_iter()
            .filter_map(|(s, _)| s)
            .collect())
    }

    /// Makes mwan's rules of both families exactly `want`: adds the missing
    /// ones first, then deletes the other rules with mwan's protocol. Other
    /// rules are left alone.
    pub async fn sync_rules(&self, want: &[RuleSpec]) -> Result<()> {
        let have = self.owned_rules().await?;
        for spec in want {
            if !have.iter().any(|(s, _)| s.as_ref() == Some(spec)) {
                let msg = RouteNetlinkMessage::NewRule(rule_message(spec));
                match self
                    .request(msg, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
                    .await
                {
                    Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                        return Err(op_error(format!("adding rule {spec}"), &e))
                    }
                    _ => {}
                }
            }
        }
        for (spec, msg) in have {
            if spec.as_ref().is_some_and(|s| want.contains(s)) {
                continue;
            }
            self.delete_rule(spec, msg).await?;
        }
        Ok(())
    }

    async fn delete_rule(&self, spec: Option<RuleSpec>, msg: RuleMessage) -> Result<()> {
        let priority = rule_priority(&msg);
        match self
            .request(RouteNetlinkMessage::DelRule(msg), NLM_F_ACK)
            .await
        {
            Err(e) if !gone(&e) => {
                let what =
                    spec.map_or_else(|| format!("{priority} (proto mwan)"), |s| s.to_string());
                Err(op_error(format!("deleting rule {what}"), &e))
            }
            _ => Ok(()),
        }
    }

    /// Removes every rule with mwan's protocol and every route of `tables`,
    /// both families.
    /// Tries everything and reports all failures.
    pub async fn remove_all_mwan(&self, tables: RangeInclusive<u32>) -> Result<()> {
        let mut errors = Vec::new();
        match self.owned_rules().await {
            Ok(rules) => {
                for (spec, msg) in rules {
                    errors.extend(self.delete_rule(spec, msg).await.err());
                }
            }
            Err(e) => errors.push(e),
        }
        for t in tables {
            for f in Family::BOTH {
                errors.extend(self.flush_table(f, t).await.err());
            }
        }
        match errors.len() {
            0 => Ok(()),
            _ => Err(anyhow!(
                "removing mwan's rules and routes: {}",
                errors
                    .iter()
                    .map(|e| format!("{e:#}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }
    }
}

/// The object to delete is already gone.
fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}
