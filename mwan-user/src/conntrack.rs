//! Conntrack entries over ctnetlink (a `NETLINK_NETFILTER` socket): dump
//! the table (IPv4 and IPv6 entries), delete selected entries and set their
//! marks.
//!
//! The few messages needed are encoded and decoded here. An entry is deleted
//! by sending back what identifies it in the dump — its original tuple
//! exactly as the kernel encoded it, its zone and its id — so ICMP
//! type/code, GRE keys or zone directions need no re-encoding, and an entry
//! replaced since the dump (new id) is left alone.
//!
//! The entries of one WAN are deleted by the kernel itself, in one request
//! ([`flush_marked`]: a flush filtered by the ct mark that records every
//! connection's WAN, see `nft`), so 100,000 of them go in milliseconds.
//!
//! Blocking; the daemon calls it from `spawn_blocking`. Dumps of any size
//! arrive in many datagrams; deletes are sent in batches and their
//! acknowledgements collected, so hundreds of thousands of entries take
//! about a second.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use crate::family::Family;
use crate::netlink::{force_rcvbuf, op_error};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// Attribute type bits (without NLA_F_NESTED and NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_MARK: u16 = 8;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_MARK_MASK: u16 = 21;
const NFNETLINK_V1: u8 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMPV6_ID: u16 = 7;

const AF_UNSPEC: u8 = libc::AF_UNSPEC as u8;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

/// Requests sent per datagram (their acks must fit the receive buffer).
const BATCH: usize = 128;
const RCVBUF: usize = 8 << 20;
const DUMP_ATTEMPTS: usize = 5;

/// One direction of a connection (both addresses of one family). For ICMP
/// and ICMPv6, `sport` holds the echo id and `dport` is 0 (as in mwan's
/// flow keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtTuple {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl fmt::Display for CtTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proto {} {}:{} -> {}:{}",
            self.proto, self.src, self.sport, self.dst, self.dport
        )
    }
}

#[derive(Clone, Debug)]
pub struct CtEntry {
    pub orig: CtTuple,
    pub reply: CtTuple,
    pub mark: u32,
    /// `AF_INET` or `AF_INET6`: requests about the entry carry it.
    family: u8,
    /// The attributes that identify the entry to the kernel, as dumped
    /// (original tuple, zone, id).
    key: Vec<u8>,
}

impl CtEntry {
    pub fn is_ipv6(&self) -> bool {
        self.family == AF_INET6
    }
}

/// The conntrack entries (IPv4 and IPv6) of the calling thread's network
/// namespace.
pub fn dump() -> Result<Vec<CtEntry>> {
    CtSocket::open()?.dump()
}

/// Deletes the entries (either family) matching `pred`; returns how many
/// were deleted.
/// Entries that vanish before their turn do not count and are no error.
pub fn delete_where(pred: impl Fn(&CtEntry) -> bool) -> Result<usize> {
    let mut socket = CtSocket::open()?;
    let entries = socket.dump()?;
    let doomed: Vec<&CtEntry> = entries.iter().filter(|e| pred(e)).collect();
    socket.delete(&doomed)
}

/// Deletes every entry of `family` (of both when `None`) whose ct mark
/// has `mark` in its `mask` bits, whatever its other bits: one request,
/// which the kernel carries out by walking its table itself (a flush with
/// a mark filter, `ctnetlink_flush_conntrack`), instead of a dump and a
/// delete per entry. The kernel does not say how many it deleted.
pub fn flush_marked(family: Option<Family>, mark: u32, mask: u32) -> Result<()> {
    let af = match family {
        None => AF_UNSPEC,
        Some(Family::Ipv4) => AF_INET,
        Some(Family::Ipv6) => AF_INET6,
    };
    let mut attrs = Vec::new();
    push_attr(&mut attrs, CTA_MARK, &(mark & mask).to_be_bytes());
    push_attr(&mut attrs, CTA_MARK_MASK, &mask.to_be_bytes());
    let mut socket = CtSocket::open()?;
    // The kernel honours the family of a flush only in a request of
    // nfnetlink version 1 (with version 0 it flushes both).
    socket.version = NFNETLINK_V1;
    socket.send_all(IPCTNL_MSG_CT_DELETE, 0, &[(af, &attrs)], |_| {
        format!("flushing the conntrack entries with mark {mark:#x}/{mask:#x}")
    })?;
    Ok(())
}

/// Sets the `mask` bits of the ct mark of every entry for which
/// `mark_of` names a mark (the other bits stay as dumped); returns how many
/// entries changed. Used to record the WAN of connections older than
/// mwan's nftables rules (see `nft`).
pub fn mark_where(mask: u32, mark_of: impl Fn(&CtEntry) -> Option<u32>) -> Result<usize> {
    let mut socket = CtSocket::open()?;
    let entries = socket.dump()?;
    let mut changed = Vec::new();
    let mut requests = Vec::new();
    for e in &entries {
        let Some(mark) = mark_of(e) else { continue };
        let new = (e.mark & !mask) | (mark & mask);
        if new != e.mark {
            let mut attrs = e.key.clone();
            push_attr(&mut attrs, CTA_MARK, &new.to_be_bytes());
            requests.push((e.family, attrs));
            changed.push(e);
        }
    }
    let items: Vec<(u8, &[u8])> = requests.iter().map(|(f, a)| (*f, a.as_slice())).collect();
    socket.send_all(IPCTNL_MSG_CT_NEW, 0, &items, |i| {
        format!("setting the mark of conntrack entry {}", changed[i].orig)
    })
}

/// The entry whose reply direction is `reply`, if conntrack has one: the
/// connection as the client made it, before NAT.
pub fn by_reply(reply: &CtTuple) -> Result<Option<CtEntry>> {
    Lookup::open()?.by_reply(reply)
}

/// A ctnetlink socket kept open for lookups of single entries by their
/// reply direction: the DNS relay learns from it, per query, which server
/// a redirected query was for. A lookup is one request and its answer,
/// which the kernel queues before the request's `send` returns.
pub struct Lookup {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Lookup {
    pub fn open() -> Result<Lookup> {
        let mut socket = Socket::new(NETLINK_NETFILTER).context("opening a ctnetlink socket")?;
        socket.bind_auto().context("binding the ctnetlink socket")?;
        Ok(Lookup {
            socket,
            seq: 0,
            buf: vec![0; 16 * 1024],
        })
    }

    /// The entry whose reply direction is `reply`, if conntrack has one.
    pub fn by_reply(&mut self, reply: &CtTuple) -> Result<Option<CtEntry>> {
        let (family, attrs) = reply_attrs(reply)?;
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket
            .send(
                &request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, seq, family, &attrs),
                0,
            )
            .context("asking conntrack")?;
        loop {
            // SAFETY: `buf` outlives the call and its length is passed.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return Err(op_error("reading conntrack's answer", &e));
            }
            // Answers to earlier lookups that gave up are skipped.
            for m in messages(&self.buf[..n as usize]).filter(|m| m.seq == seq) {
                match m.kind {
                    NLMSG_ERROR => match error_code(m.payload) {
                        0 => {}
                        libc::ENOENT => return Ok(None),
                        code => {
                            return Err(op_error(
                                "looking up a conntrack entry",
                                &io::Error::from_raw_os_error(code),
                            ))
                        }
                    },
                    k if k == msg_type(IPCTNL_MSG_CT_NEW) => return Ok(parse_entry(m.payload)),
                    _ => {}
                }
            }
        }
    }
}

/// The family and attributes of a request for the entry whose reply
/// direction is `reply`.
fn reply_attrs(reply: &CtTuple) -> Result<(u8, Vec<u8>)> {
    const NLA_F_NESTED: u16 = 0x8000;
    let mut ip = Vec::new();
    let family = match (reply.src, reply.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            push_attr(&mut ip, CTA_IP_V4_SRC, &s.octets());
            push_attr(&mut ip, CTA_IP_V4_DST, &d.octets());
            AF_INET
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            push_attr(&mut ip, CTA_IP_V6_SRC, &s.octets());
            push_attr(&mut ip, CTA_IP_V6_DST, &d.octets());
            AF_INET6
        }
        _ => bail!("conntrack tuple {reply} mixes address families"),
    };
    let mut proto = Vec::new();
    push_attr(&mut proto, CTA_PROTO_NUM, &[reply.proto]);
    push_attr(&mut proto, CTA_PROTO_SRC_PORT, &reply.sport.to_be_bytes());
    push_attr(&mut proto, CTA_PROTO_DST_PORT, &reply.dport.to_be_bytes());
    let mut tuple = Vec::new();
    push_attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    push_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    let mut attrs = Vec::new();
    push_attr(&mut attrs, CTA_TUPLE_REPLY | NLA_F_NESTED, &tuple);
    Ok((family, attrs))
}

/// Appends a netlink attribute (header, value, padding).
fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = NLA_HDRLEN + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len() + align(len) - len, 0);
}

struct CtSocket {
    socket: Socket,
    seq: u32,
    /// The nfnetlink version of the requests [`CtSocket::send_all`] sends.
    version: u8,
}

impl CtSocket {
    fn open() -> Result<CtSocket> {
        let mut socket = Socket::new(NETLINK_NETFILTER).context("opening a ctnetlink socket")?;
        socket.bind_auto().context("binding the ctnetlink socket")?;
        // Error acks without a copy of the request.
        socket
            .set_cap_ack(true)
            .context("setting NETLINK_CAP_ACK")?;
        force_rcvbuf(socket.as_raw_fd(), RCVBUF).context("sizing the ctnetlink socket")?;
        Ok(CtSocket {
            socket,
            seq: 0,
            version: 0,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn recv(&self) -> Result<Vec<u8>> {
        Ok(self
            .socket
            .recv_from_full()
            .context("reading from ctnetlink")?
            .0)
    }

    fn dump(&mut self) -> Result<Vec<CtEntry>> {
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.next_seq();
            self.socket
                .send(
                    &request(
                        IPCTNL_MSG_CT_GET,
                        NLM_F_REQUEST | NLM_F_DUMP,
                        seq,
                        AF_UNSPEC,
                        &[],
                    ),
                    0,
                )
                .context("requesting a conntrack dump")?;
            let (mut entries, mut interrupted) = (Vec::new(), false);
            'dump: loop {
                let data = self.recv()?;
                for m in messages(&data).filter(|m| m.seq == seq) {
                    interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                    match m.kind {
                        NLMSG_DONE => break 'dump,
                        NLMSG_ERROR => match error_code(m.payload) {
                            0 => {}
                            code => {
                                return Err(op_error(
                                    "dumping conntrack",
                                    &io::Error::from_raw_os_error(code),
                                ))
                            }
                        },
                        k if k == msg_type(IPCTNL_MSG_CT_NEW) => {
                            entries.extend(parse_entry(m.payload))
                        }
                        _ => {}
                    }
                }
            }
            if !interrupted {
                return Ok(entries);
            }
        }
        bail!("dumping conntrack: the table kept changing during {DUMP_ATTEMPTS} attempts")
    }

    fn delete(&mut self, entries: &[&CtEntry]) -> Result<usize> {
        let keys: Vec<(u8, &[u8])> = entries
            .iter()
            .map(|e| (e.family, e.key.as_slice()))
            .collect();
        self.send_all(IPCTNL_MSG_CT_DELETE, 0, &keys, |i| {
            format!("deleting conntrack entry {}", entries[i].orig)
        })
    }

    /// Sends one request per item of `items` (its family and attributes),
    /// `BATCH` per datagram, and counts the acknowledged ones.
    /// `ENOENT` answers are skipped; another error stops after its batch and
    /// is returned, naming the item with `describe`.
    fn send_all(
        &mut self,
        ct_msg: u16,
        flags: u16,
        items: &[(u8, &[u8])],
        describe: impl Fn(usize) -> String,
    ) -> Result<usize> {
        let mut done = 0;
        for (b, batch) in items.chunks(BATCH).enumerate() {
            let first = self.seq.wrapping_add(1);
            let mut datagram = Vec::new();
            for (family, attrs) in batch {
                let seq = self.next_seq();
                let mut r = request(
                    ct_msg,
                    NLM_F_REQUEST | NLM_F_ACK | flags,
                    seq,
                    *family,
                    attrs,
                );
                r[NLMSG_HDRLEN + 1] = self.version;
                datagram.extend(r);
            }
            self.socket
                .send(&datagram, 0)
                .context("sending ctnetlink requests")?;
            let (mut pending, mut failure) = (batch.len(), None);
            while pending > 0 {
                let data = self.recv()?;
                for m in messages(&data).filter(|m| m.kind == NLMSG_ERROR) {
                    let i = m.seq.wrapping_sub(first) as usize;
                    if i >= batch.len() {
                        continue;
                    }
                    pending -= 1;
                    match error_code(m.payload) {
                        0 => done += 1,
                        libc::ENOENT => {}
                        code => {
                            failure.get_or_insert((i, code));
                        }
                    }
                }
            }
            if let Some((i, code)) = failure {
                let op = format!("{} (after {done} done)", describe(b * BATCH + i));
                return Err(op_error(op, &io::Error::from_raw_os_error(code)));
            }
        }
        Ok(done)
    }
}

fn msg_type(ct_msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | ct_msg
}

/// A ctnetlink request about `family` (`AF_UNSPEC`: a dump of both):
/// netlink header, nfgenmsg, `attrs`.
fn request(ct_msg: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&msg_type(ct_msg).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.extend_from_slice(&[family, 0, 0, 0]); // family, version 0, res_id 0
    m.extend_from_slice(attrs);
    m
}

struct Message<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    /// After the netlink header.
    payload: &'a [u8],
}

/// The netlink messages of a datagram (stops at a malformed one).
fn messages(mut data: &[u8]) -> impl Iterator<Item = Message<'_>> {
    std::iter::from_fn(move || {
        if data.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return None;
        }
        let m = Message {
            kind: u16::from_ne_bytes([data[4], data[5]]),
            flags: u16::from_ne_bytes([data[6], data[7]]),
            seq: u32::from_ne_bytes(data[8..12].try_into().unwrap()),
            payload: &data[NLMSG_HDRLEN..len],
        };
        data = &data[align(len).min(data.len())..];
        Some(m)
    })
}

/// The errno of an NLMSG_ERROR payload (0: acknowledgement).
fn error_code(payload: &[u8]) -> i32 {
    payload.get(0..4).map_or(libc::EBADMSG, |b| {
        -i32::from_ne_bytes(b.try_into().unwrap())
    })
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Attributes as (type, payload, whole attribute with its padding).
fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < NLA_HDRLEN {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        if len < NLA_HDRLEN || len > data.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        let whole = &data[..align(len).min(data.len())];
        data = &data[whole.len()..];
        Some((kind, &whole[NLA_HDRLEN..len], whole))
    })
}

fn be16(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(..2)?.try_into().ok()?))
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// An entry from a ctnetlink message payload (nfgenmsg and attributes);
/// `None` if it is neither IPv4 nor IPv6 or lacks a tuple.
fn parse_entry(payload: &[u8]) -> Option<CtEntry> {
    let family = *payload.first()?;
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let (mut orig, mut reply, mut mark, mut key) = (None, None, 0, Vec::new());
    for (kind, value, whole) in attrs(payload.get(NFGENMSG_LEN..)?) {
        match kind {
            CTA_TUPLE_ORIG => {
                orig = parse_tuple(value);
                key.extend_from_slice(whole);
            }
            CTA_TUPLE_REPLY => reply = parse_tuple(value),
            CTA_MARK => mark = be32(value)?,
            CTA_ZONE | CTA_ID => key.extend_from_slice(whole),
            _ => {}
        }
    }
    Some(CtEntry {
        orig: orig?,
        reply: reply?,
        mark,
        family,
        key,
    })
}

fn parse_tuple(data: &[u8]) -> Option<CtTuple> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut sport, mut dport, mut icmp_id) = (0, 0, 0);
    for (kind, value, _) in attrs(data) {
        match kind {
            CTA_TUPLE_IP => {
                for (kind, value, _) in attrs(value) {
                    let v4 = || {
                        Some(IpAddr::V4(Ipv4Addr::from(
                            <[u8; 4]>::try_from(value.get(..4)?).ok()?,
                        )))
                    };
                    let v6 = || {
                        Some(IpAddr::V6(Ipv6Addr::from(
                            <[u8; 16]>::try_from(value.get(..16)?).ok()?,
                        )))
                    };
                    match kind {
                        CTA_IP_V4_SRC => src = v4(),
                        CTA_IP_V4_DST => dst = v4(),
                        CTA_IP_V6_SRC => src = v6(),
                        CTA_IP_V6_DST => dst = v6(),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (kind, value, _) in attrs(value) {
                    match kind {
                        CTA_PROTO_NUM => proto = value.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = be16(value)?,
                        CTA_PROTO_DST_PORT => dport = be16(value)?,
                        CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => icmp_id = be16(value)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let proto = proto?;
    if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        (sport, dport) = (icmp_id, 0);
    }
    Some(CtTuple {
        proto,
        src: src?,
        dst: dst?,
        sport,
        dport,
    })
}

#[cfg(test)]
mod tests;
