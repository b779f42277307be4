//! Building and reading rtnetlink messages: links, addresses, routes and
//! mwan's rules.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::AddressFamily;

use super::{af, Family, Link, Nexthop, RuleSpec, Selector};
use crate::RTPROT_MWAN;

pub(super) fn parse_link(m: &LinkMessage) -> Option<Link> {
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    let flags = m.header.flags;
    Some(Link {
        index: m.header.index,
        name,
        admin_up: flags.contains(LinkFlags::Up),
        carrier: flags.intersects(LinkFlags::LowerUp | LinkFlags::Running),
        l2: m.header.link_layer_type == LinkLayerType::Ether,
    })
}

/// `(ifindex, secondary, local address/prefix)` of an IPv4 address message.
pub(super) fn parse_addr(m: &AddressMessage) -> Option<(u32, bool, Ipv4Net)> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let ip = |want_local: bool| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) if want_local => Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) if !want_local => Some(*ip),
            _ => None,
        })
    };
    // IFA_LOCAL is the local address; IFA_ADDRESS is the peer's on
    // point-to-point links.
    let local = ip(true).or_else(|| ip(false))?;
    let secondary = m.header.flags.contains(AddressHeaderFlags::Secondary)
        || m.attributes.iter().any(
            |a| matches!(a, AddressAttribute::Flags(f) if f.contains(AddressFlags::Secondary)),
        );
    Some((
        m.header.index,
        secondary,
        Ipv4Net::new(local, m.header.prefix_len).ok()?,
    ))
}

/// `(ifindex, address/prefix)` of a global IPv6 address message (not
/// link-local, host or site scope) that can be used: not still tentative
/// (duplicate address detection running: packets cannot come from it) and
/// not a duplicate. A renumbered link's new address counts from the moment
/// it is usable (see the daemon's `renew`).
pub(super) fn parse_addr6(m: &AddressMessage) -> Option<(u32, Ipv6Net)> {
    if m.header.family != AddressFamily::Inet6 || m.header.scope != AddressScope::Universe {
        return None;
    }
    let unusable = AddressFlags::Tentative | AddressFlags::Dadfailed;
    let flags = m
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(m.header.flags.bits())));
    if flags.intersects(unusable) {
        return None;
    }
    let addr = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V6(ip)) | AddressAttribute::Address(IpAddr::V6(ip)) => {
            Some(*ip)
        }
        _ => None,
    })?;
    Some((
        m.header.index,
        Ipv6Net::new(addr, m.header.prefix_len).ok()?,
    ))
}

/// A route of mwan in `table`: `default proto mwan`, to be completed.
pub(super) fn mwan_route(family: Family, table: u32, kind: RouteType) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = af(family);
    m.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    m.header.protocol = RouteProtocol::from(RTPROT_MWAN);
    m.header.scope = RouteScope::Universe;
    m.header.kind = kind;
    m.attributes.push(RouteAttribute::Table(table));
    m
}

pub(super) fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

pub(super) fn route_metric(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

pub(super) fn route_dst(r: &RouteMessage) -> Option<Ipv4Net> {
    let addr = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(*a),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Ipv4Net::new(addr, r.header.destination_prefix_length).ok()
}

fn gateway_of(attrs: &[RouteAttribute]) -> Option<IpAddr> {
    attrs.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(IpAddr::V4(*gw)),
        RouteAttribute::Gateway(RouteAddress::Inet6(gw)) => Some(IpAddr::V6(*gw)),
        _ => None,
    })
}

/// The nexthops of a route: its multipath entries, or its gateway and
/// output interface.
pub(super) fn route_nexthops(r: &RouteMessage) -> Vec<Nexthop> {
    for a in &r.attributes {
        if let RouteAttribute::MultiPath(hops) = a {
            return hops
                .iter()
                .map(|h| Nexthop {
                    gateway: gateway_of(&h.attributes),
                    ifindex: h.interface_index,
                })
                .collect();
        }
    }
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
        .map(|ifindex| Nexthop {
            gateway: gateway_of(&r.attributes),
            ifindex,
        })
        .into_iter()
        .collect()
}

pub(super) fn rule_message(spec: &RuleSpec) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = af(spec.family);
    // Without FR_ACT_TO_TBL the rule matches but looks nothing up.
    m.header.action = RuleAction::ToTable;
    m.header.table = u8::try_from(spec.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    m.attributes.push(RuleAttribute::Table(spec.table));
    m.attributes.push(RuleAttribute::Priority(spec.priority));
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(RTPROT_MWAN)));
    match spec.selector {
        Selector::All => {}
        Selector::AllSuppressDefault => m.attributes.push(RuleAttribute::SuppressPrefixLen(0)),
        Selector::Fwmark { mark, mask } => {
            m.attributes.push(RuleAttribute::FwMark(mark));
            m.attributes.push(RuleAttribute::FwMask(mask));
        }
        Selector::From(a) => {
            m.header.src_len = if a.is_ipv4() { 32 } else { 128 };
            m.attributes.push(RuleAttribute::Source(a));
        }
        Selector::Local => m.attributes.push(RuleAttribute::Iifname("lo".into())),
    }
    m
}

pub(super) fn is_mwan_rule(m: &RuleMessage) -> bool {
    m.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Protocol(p) if u8::from(*p) == RTPROT_MWAN))
}

pub(super) fn rule_priority(m: &RuleMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

/// The spec of a rule if it is exactly of a shape `rule_message` makes.
pub(super) fn parse_rule(m: &RuleMessage) -> Option<RuleSpec> {
    let h = &m.header;
    let family = match h.family {
        AddressFamily::Inet => Family::Ipv4,
        AddressFamily::Inet6 => Family::Ipv6,
        _ => return None,
    };
    if h.action != RuleAction::ToTable || h.dst_len != 0 || h.tos != 0 {
        return None;
    }
    let (mut priority, mut table) = (0, u32::from(h.table));
    let (mut mark, mut mask, mut source, mut suppress) = (None, u32::MAX, None, None);
    let mut local = false;
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::FwMask(v) => mask = *v,
            RuleAttribute::Source(a @ IpAddr::V4(_)) if h.src_len == 32 => source = Some(*a),
            RuleAttribute::Source(a @ IpAddr::V6(_)) if h.src_len == 128 => source = Some(*a),
            RuleAttribute::Iifname(n) if n == "lo" => local = true,
            // The kernel reports "unset" as -1.
            RuleAttribute::SuppressPrefixLen(n) if *n != u32::MAX => suppress = Some(*n),
            RuleAttribute::SuppressPrefixLen(_) | RuleAttribute::Protocol(_) => {}
            _ => return None,
        }
    }
    let selector = match (mark, source, suppress) {
        (None, None, None) if h.src_len == 0 && local => Selector::Local,
        _ if local => return None,
        (None, None, None) if h.src_len == 0 => Selector::All,
        (None, None, Some(0)) if h.src_len == 0 => Selector::AllSuppressDefault,
        (Some(mark), None, None) if h.src_len == 0 => Selector::Fwmark { mark, mask },
        (None, Some(a), None) => Selector::From(a),
        _ => return None,
    };
    Some(RuleSpec {
        family,
        priority,
        selector,
        table,
    })
}
