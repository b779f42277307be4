//! Change notifications: link, address and route multicast groups of both
//! families on a socket of their own.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use futures::Stream;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket};

use super::msg::{parse_addr, parse_addr6, parse_link, route_nexthops, route_table};
use super::{Net, NetEvent, RT_TABLE_LOCAL};
use crate::netlink::force_rcvbuf;
use crate::RTPROT_MWAN;

// Multicast groups (include/uapi/linux/rtnetlink.h).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// Receive buffer of the event socket: room for the notifications of a few
/// thousand route changes (a flapping PPP link with a full table) before the
/// kernel drops some and the stream reports [`NetEvent::Overrun`].
const EVENT_RCVBUF: usize = 8 << 20;

impl Net {
    /// Notifications of link, address and route changes (IPv4 and IPv6:
    /// global IPv6 addresses, and IPv6 routes such as those Router
    /// Advertisements install), from a
    /// socket of its own opened in the calling thread's network namespace
    /// (call inside a tokio runtime). The stream ends only if the socket
    /// fails (logged).
    pub fn events(&self) -> Result<impl Stream<Item = NetEvent> + Send + Unpin + 'static> {
        let mut socket = TokioSocket::new(netlink_sys::protocols::NETLINK_ROUTE)
            .context("opening an rtnetlink event socket")?;
        let s = socket.socket_mut();
        s.bind_auto()
            .context("binding the rtnetlink event socket")?;
        for group in [
            RTNLGRP_LINK,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_IFADDR,
            RTNLGRP_IPV6_ROUTE,
        ] {
            s.add_membership(group)
                .with_context(|| format!("joining rtnetlink group {group}"))?;
        }
        force_rcvbuf(s.as_raw_fd(), EVENT_RCVBUF).context("sizing the rtnetlink event socket")?;
        let stream = futures::stream::unfold(
            (socket, VecDeque::new()),
            |(socket, mut pending)| async move {
                loop {
                    if let Some(ev) = pending.pop_front() {
                        return Some((ev, (socket, pending)));
                    }
                    match socket.recv_from_full().await {
                        Ok((buf, _)) => pending.extend(parse_events(&buf)),
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            return Some((NetEvent::Overrun, (socket, pending)))
                        }
                        Err(e) => {
                            tracing::error!("rtnetlink event socket failed: {e}");
                            return None;
                        }
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }
}

/// The events in one datagram of the event socket.
pub(super) fn parse_events(buf: &[u8]) -> Vec<NetEvent> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            break;
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]) {
            Ok(m) => {
                if let NetlinkPayload::InnerMessage(m) = m.payload {
                    out.extend(net_event(m));
                }
            }
            Err(e) => tracing::debug!("ignoring an undecodable rtnetlink notification: {e}"),
        }
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    out
}

fn net_event(m: RouteNetlinkMessage) -> Option<NetEvent> {
    use RouteNetlinkMessage as M;
    match m {
        // Bridge port notifications (AF_BRIDGE) are about the bridge, not
        // the link: a port leaving a bridge sends a DELLINK.
        M::NewLink(l) if l.header.interface_family == AddressFamily::Unspec => {
            parse_link(&l).map(NetEvent::Link)
        }
        M::DelLink(l) if l.header.interface_family == AddressFamily::Unspec => {
            Some(NetEvent::LinkRemoved {
                index: l.header.index,
                name: parse_link(&l).map(|l| l.name).unwrap_or_default(),
            })
        }
        M::NewAddress(a) => addr_event(&a, true),
        M::DelAddress(a) => addr_event(&a, false),
        M::NewRoute(r) | M::DelRoute(r) => route_event(&r),
        _ => None,
    }
}

fn addr_event(a: &AddressMessage, added: bool) -> Option<NetEvent> {
    let (index, addr) = match parse_addr(a) {
        Some((index, _, addr)) => (index, addr.into()),
        None => parse_addr6(a).map(|(index, addr)| (index, addr.into()))?,
    };
    Some(NetEvent::Addr { index, addr, added })
}

fn route_event(r: &RouteMessage) -> Option<NetEvent> {
    let table = route_table(r);
    if !matches!(
        r.header.address_family,
        AddressFamily::Inet | AddressFamily::Inet6
    ) || table == RT_TABLE_LOCAL
        || u8::from(r.header.protocol) == RTPROT_MWAN
    {
        return None;
    }
    Some(NetEvent::Route {
        table,
        ifindex: route_nexthops(r).first().map(|nh| nh.ifindex),
        default: r.header.destination_prefix_length == 0,
    })
}
