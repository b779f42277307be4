//! DNS answers (RFC 1035 wire format): what addresses a response gives for
//! the name that was asked, through which CNAMEs, and for how long.
//!
//! The parser trusts nothing. Every read is bounds-checked; names are
//! decompressed with each pointer required to point before the previous one
//! (so decompression always ends), at most [`MAX_JUMPS`] jumps, labels of at
//! most 63 bytes and names of at most 255 bytes; every section must hold the
//! records its count announces. Anything wrong makes the whole message an
//! error: a message mwan does not fully understand teaches it nothing.
//!
//! Only what a client can rely on is learned: a response (QR) to a standard
//! query with one question of class IN, RCODE NOERROR, not truncated; an
//! address is taken only for the question's name or for the end of the
//! CNAME chain that starts at it, within the answer section. Records for
//! other names (unsolicited extras) are ignored.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::name::push_label;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
pub const CLASS_IN: u16 = 1;
/// Largest DNS message (the TCP length prefix is 16 bits).
pub const MAX_MESSAGE: usize = 65_535;
/// Compression pointers followed while reading one name.
pub const MAX_JUMPS: usize = 32;
/// Longest CNAME chain followed (resolvers stop well before: unbound at 11).
pub const MAX_CNAMES: usize = 16;
const HEADER_LEN: usize = 12;

/// Why a message was not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// It ends before what it announces (header, name, record, count).
    Truncated,
    /// Longer than any DNS message can be.
    Oversized,
    /// A compression pointer that does not point back before the previous
    /// one (a loop or a forward reference), into the header, or too many.
    BadPointer,
    /// A label type other than a plain label or a pointer (0x40, 0x80).
    BadLabel,
    /// A name longer than 255 bytes on the wire.
    NameTooLong,
    /// A record's data does not have the size its type needs.
    BadRdata,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireError::Truncated => "truncated",
            WireError::Oversized => "longer than 65535 bytes",
            WireError::BadPointer => "bad compression pointer",
            WireError::BadLabel => "unknown label type",
            WireError::NameTooLong => "name longer than 255 bytes",
            WireError::BadRdata => "record data of the wrong size",
        })
    }
}

impl std::error::Error for WireError {}

/// The header fields that decide whether an answer teaches anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    /// QR: a response, not a query.
    pub response: bool,
    pub opcode: u8,
    /// TC: the server cut the answer (UDP); the client retries over TCP.
    pub truncated: bool,
    pub rcode: u8,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

/// One address an answer gives, and how it was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    pub addr: IpAddr,
    /// The question's name, then each CNAME target in turn; the last is the
    /// address record's owner.
    pub chain: Vec<String>,
    /// Seconds: the smallest TTL of the CNAMEs used and the address record.
    pub ttl: u32,
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub header: Header,
    /// The question (name, type), when there is exactly one of class IN.
    pub question: Option<(String, u16)>,
    /// Empty unless the response is usable (see the module doc).
    pub learned: Vec<Learned>,
}

/// A bounds-checked reader over the message.
struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let b = self.msg.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a (possibly compressed) name at the current position, leaving
    /// the position after it in place (after its first pointer, if any).
    fn name(&mut self) -> Result<String, WireError> {
        let mut out = String::new();
        self.walk_name(|label| push_label(&mut out, label))?;
        Ok(out)
    }

    /// Checks a name as [`Reader::name`] does, without building it (the
    /// records of the sections that are not used).
    fn skip_name(&mut self) -> Result<(), WireError> {
        self.walk_name(|_| {})
    }

    /// Decompresses the name at the current position, label by label.
    fn walk_name(&mut self, mut label_fn: impl FnMut(&[u8])) -> Result<(), WireError> {
        let mut at = self.pos;
        // Where the labels being read started: a pointer must point before.
        let mut floor = self.pos;
        let mut resume = None;
        let mut jumps = 0;
        let mut wire_len = 0usize;
        loop {
            let len = *self.msg.get(at).ok_or(WireError::Truncated)?;
            match len & 0xc0 {
                0x00 => {
                    wire_len += 1 + len as usize;
                    if wire_len > 255 {
                        return Err(WireError::NameTooLong);
                    }
                    if len == 0 {
                        at += 1;
                        break;
                    }
                    let label = self
                        .msg
                        .get(at + 1..at + 1 + len as usize)
                        .ok_or(WireError::Truncated)?;
                    label_fn(label);
                    at += 1 + len as usize;
                }
                0xc0 => {
                    let low = *self.msg.get(at + 1).ok_or(WireError::Truncated)?;
                    let target = (((len & 0x3f) as usize) << 8) | low as usize;
                    jumps += 1;
                    if target >= floor || target < HEADER_LEN || jumps > MAX_JUMPS {
                        return Err(WireError::BadPointer);
                    }
                    resume.get_or_insert(at + 2);
                    floor = target;
                    at = target;
                }
                _ => return Err(WireError::BadLabel),
            }
        }
        self.pos = resume.unwrap_or(at);
        Ok(())
    }
}

/// A resource record, its data kept as a range of the message.
struct Record {
    owner: String,
    rtype: u16,
    class: u16,
    ttl: u32,
    rdata: std::ops::Range<usize>,
}

/// Reads a record; its owner name is built only when `named` (the answer
/// section), else only checked.
fn record(r: &mut Reader, named: bool) -> Result<Record, WireError> {
    let owner = if named {
        r.name()?
    } else {
        r.skip_name()?;
        String::new()
    };
    let rtype = r.u16()?;
    let class = r.u16()?;
    // RFC 2181 8: a TTL with the top bit set means zero.
    let ttl = match r.u32()? {
        t if t > i32::MAX as u32 => 0,
        t => t,
    };
    let len = r.u16()? as usize;
    let start = r.pos;
    r.bytes(len)?;
    Ok(Record {
        owner,
        rtype,
        class,
        ttl,
        rdata: start..start + len,
    })
}

/// Parses a DNS response and works out the addresses it gives for its
/// question. An `Err` means the message is malformed and must be ignored;
/// an `Ok` with nothing learned is a well-formed response that teaches
/// nothing (an error code, a truncated answer, a query).
pub fn parse_response(msg: &[u8]) -> Result<Response, WireError> {
    if msg.len() > MAX_MESSAGE {
        return Err(WireError::Oversized);
    }
    let mut r = Reader { msg, pos: 0 };
    let id = r.u16()?;
    let flags = r.u16()?;
    let header = Header {
        id,
        response: flags & 0x8000 != 0,
        opcode: ((flags >> 11) & 0xf) as u8,
        truncated: flags & 0x0200 != 0,
        rcode: (flags & 0xf) as u8,
        qdcount: r.u16()?,
        ancount: r.u16()?,
        nscount: r.u16()?,
        arcount: r.u16()?,
    };
    let mut questions = Vec::new();
    for _ in 0..header.qdcount {
        let name = r.name()?;
        let qtype = r.u16()?;
        let qclass = r.u16()?;
        questions.push((name, qtype, qclass));
    }
    let mut answers = Vec::new();
    for _ in 0..header.ancount {
        answers.push(record(&mut r, true)?);
    }
    // Authority and additional records are not used, but must be there.
    for _ in 0..u32::from(header.nscount) + u32::from(header.arcount) {
        record(&mut r, false)?;
    }
    // The data of the answers used: CNAME targets and addresses.
    let mut cnames: HashMap<&str, (String, u32)> = HashMap::new();
    let mut addrs: Vec<(&str, IpAddr, u32)> = Vec::new();
    let mut conflict = false;
    for a in &answers {
        let rdata = &msg[a.rdata.clone()];
        match a.rtype {
            TYPE_CNAME => {
                let mut rd = Reader {
                    msg,
                    pos: a.rdata.start,
                };
                let target = rd.name()?;
                if rd.pos != a.rdata.end {
                    return Err(WireError::BadRdata);
                }
                if a.class == CLASS_IN {
                    match cnames.get_mut(a.owner.as_str()) {
                        None => {
                            cnames.insert(&a.owner, (target, a.ttl));
                        }
                        // The same record twice: harmless.
                        Some((t, ttl)) if *t == target => *ttl = (*ttl).min(a.ttl),
                        // Two CNAMEs for one name: which is right is unknown.
                        Some(_) => conflict = true,
                    }
                }
            }
            TYPE_A => {
                let b: [u8; 4] = rdata.try_into().map_err(|_| WireError::BadRdata)?;
                if a.class == CLASS_IN {
                    addrs.push((&a.owner, IpAddr::V4(Ipv4Addr::from(b)), a.ttl));
                }
            }
            TYPE_AAAA => {
                let b: [u8; 16] = rdata.try_into().map_err(|_| WireError::BadRdata)?;
                if a.class == CLASS_IN {
                    addrs.push((&a.owner, IpAddr::V6(Ipv6Addr::from(b)), a.ttl));
                }
            }
            _ => {}
        }
    }
    let question = match questions.as_slice() {
        [(name, qtype, CLASS_IN)] => Some((name.clone(), *qtype)),
        _ => None,
    };
    let usable = header.response
        && header.opcode == 0
        && !header.truncated
        && header.rcode == 0
        && !conflict
        && question.is_some();
    let mut learned = Vec::new();
    if let (true, Some((qname, _))) = (usable, &question) {
        // The chain from the question's name: the order of the records in
        // the answer does not matter.
        let mut chain = vec![qname.clone()];
        let mut ttl = u32::MAX;
        let mut complete = true;
        while let Some((target, t)) = cnames.get(chain.last().expect("never empty").as_str()) {
            if chain.len() > MAX_CNAMES || chain.contains(target) {
                complete = false;
                break;
            }
            ttl = ttl.min(*t);
            chain.push(target.clone());
        }
        if complete {
            let end = chain.last().expect("never empty");
            for (owner, addr, t) in &addrs {
                if *owner == end.as_str() {
                    learned.push(Learned {
                        addr: *addr,
                        chain: chain.clone(),
                        ttl: ttl.min(*t),
                    });
                }
            }
        }
    }
    Ok(Response {
        header,
        question,
        learned,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds messages by hand, with compression where the test says so.
    pub(crate) struct Msg(pub Vec<u8>);

    impl Msg {
        /// A NOERROR response header with the given counts.
        pub fn response(id: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Msg {
            let mut m = Msg(Vec::new());
            m.u16(id).u16(0x8180).u16(qd).u16(an).u16(ns).u16(ar);
            m
        }
        pub fn u16(&mut self, v: u16) -> &mut Msg {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u32(&mut self, v: u32) -> &mut Msg {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        /// An uncompressed name; returns its offset.
        pub fn name(&mut self, name: &str) -> usize {
            let at = self.0.len();
            for l in name.split('.').filter(|l| !l.is_empty()) {
                self.0.push(l.len() as u8);
                self.0.extend_from_slice(l.as_bytes());
            }
            self.0.push(0);
            at
        }
        /// Labels followed by a pointer to `to`; returns its offset.
        pub fn name_ptr(&mut self, labels: &str, to: usize) -> usize {
            let at = self.0.len();
            for l in labels.split('.').filter(|l| !l.is_empty()) {
                self.0.push(l.len() as u8);
                self.0.extend_from_slice(l.as_bytes());
            }
            self.ptr(to);
            at
        }
        pub fn ptr(&mut self, to: usize) -> &mut Msg {
            self.u16(0xc000 | to as u16)
        }
        pub fn question(&mut self, name: &str, qtype: u16) -> usize {
            let at = self.name(name);
            self.u16(qtype).u16(CLASS_IN);
            at
        }
        /// Type, class IN, TTL, then `rdata` (after the owner name).
        pub fn rr(&mut self, rtype: u16, ttl: u32, rdata: &[u8]) -> &mut Msg {
            self.u16(rtype)
                .u16(CLASS_IN)
                .u32(ttl)
                .u16(rdata.len() as u16);
            self.0.extend_from_slice(rdata);
            self
        }
        /// A CNAME whose target is `labels` then a pointer to `to`.
        pub fn cname_ptr(&mut self, ttl: u32, labels: &str, to: usize) -> usize {
            self.u16(TYPE_CNAME).u16(CLASS_IN).u32(ttl);
            let len_at = self.0.len();
            self.u16(0);
            let target = self.name_ptr(labels, to);
            let len = (self.0.len() - target) as u16;
            self.0[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
            target
        }
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }

    fn learned(msg: &[u8]) -> Vec<(IpAddr, Vec<String>, u32)> {
        parse_response(msg)
            .unwrap()
            .learned
            .into_iter()
            .map(|l| (l.addr, l.chain, l.ttl))
            .collect()
    }

    fn chain(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// `www.gov.br A` answered with two addresses, owners compressed to the
    /// question (as every server writes it), and an OPT record.
    pub(crate) fn simple_answer() -> Vec<u8> {
        let mut m = Msg::response(0x1234, 1, 2, 0, 1);
        let q = m.question("WWW.Gov.BR", TYPE_A);
        m.ptr(q).rr(TYPE_A, 300, &[198, 51, 100, 10]);
        m.ptr(q).rr(TYPE_A, 60, &[198, 51, 100, 11]);
        // OPT: root name, type 41, payload size as class, no options.
        m.0.push(0);
        m.u16(41).u16(1232).u32(0).u16(0);
        m.0
    }

    #[test]
    fn a_simple_answer_with_compression() {
        let msg = simple_answer();
        let r = parse_response(&msg).unwrap();
        assert_eq!(r.header.id, 0x1234);
        assert!(r.header.response && !r.header.truncated);
        assert_eq!(r.question, Some(("www.gov.br".to_string(), TYPE_A)));
        assert_eq!(
            learned(&msg),
            vec![
                (v4("198.51.100.10"), chain(&["www.gov.br"]), 300),
                (v4("198.51.100.11"), chain(&["www.gov.br"]), 60),
            ]
        );
    }

    /// What a parse costs (printed, not asserted; `cargo test --release -p
    /// mwan-user parse_cost -- --nocapture`).
    #[test]
    fn parse_cost() {
        let msg = simple_answer();
        let n = 200_000;
        let t = std::time::Instant::now();
        let mut addrs = 0;
        for _ in 0..n {
            addrs += parse_response(std::hint::black_box(&msg))
                .unwrap()
                .learned
                .len();
        }
        assert_eq!(addrs, 2 * n);
        println!(
            "dns parse: {:?} per answer ({} bytes, 2 addresses, compressed, OPT)",
            t.elapsed() / n as u32,
            msg.len()
        );
    }

    /// A response as a server writes it, spelled out byte by byte:
    /// `www.example.com AAAA` → CNAME `example.com` (compressed to the
    /// question's second label) → AAAA, with an OPT record.
    #[test]
    fn a_literal_answer() {
        #[rustfmt::skip]
        let msg: &[u8] = &[
            0xab, 0xcd, 0x81, 0x80, 0x00, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01,
            // 12: question www.example.com AAAA IN
            3, b'w', b'w', b'w', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0,
            0x00, 0x1c, 0x00, 0x01,
            // 33: www.example.com CNAME example.com (pointer to 16), TTL 3600
            0xc0, 0x0c, 0x00, 0x05, 0x00, 0x01, 0x00, 0x00, 0x0e, 0x10, 0x00, 0x02, 0xc0, 0x10,
            // 47: example.com AAAA 2001:db8::e, TTL 600
            0xc0, 0x10, 0x00, 0x1c, 0x00, 0x01, 0x00, 0x00, 0x02, 0x58, 0x00, 0x10,
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0e,
            // OPT, UDP size 4096
            0x00, 0x00, 0x29, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        let r = parse_response(msg).unwrap();
        assert_eq!(r.header.id, 0xabcd);
        assert_eq!(
            (r.header.qdcount, r.header.ancount, r.header.arcount),
            (1, 2, 1)
        );
        assert_eq!(r.question, Some(("www.example.com".into(), TYPE_AAAA)));
        assert_eq!(
            learned(msg),
            vec![(
                IpAddr::V6("2001:db8::e".parse().unwrap()),
                chain(&["www.example.com", "example.com"]),
                600
            )]
        );
        for cut in 0..msg.len() {
            assert!(parse_response(&msg[..cut]).is_err(), "{cut}");
        }
    }

    /// question → CNAME → CNAME → A, each target compressed against an
    /// earlier name, in order and shuffled; the TTL is the chain's minimum.
    #[test]
    fn cname_chains_in_and_out_of_order() {
        let build = |order: [usize; 4]| {
            // The records are written in `order`. A name is spelled out
            // the first time it appears and pointed to afterwards; a CNAME
            // target is its first label plus a pointer to its parent when
            // the parent was written before.
            let mut m = Msg::response(7, 1, 4, 0, 0);
            let q = m.question("www.gov.br", TYPE_A);
            let mut at: HashMap<&str, usize> = HashMap::new();
            at.insert("www.gov.br", q);
            at.insert("gov.br", q + 4);
            let recs: [(&str, u16, u32, &str); 4] = [
                ("www.gov.br", TYPE_CNAME, 600, "edge.gov.br"),
                ("edge.gov.br", TYPE_CNAME, 120, "a1.cdn.example"),
                ("a1.cdn.example", TYPE_A, 300, "198.51.100.20"),
                ("a1.cdn.example", TYPE_AAAA, 30, "2001:db8::20"),
            ];
            for i in order {
                let (owner, t, ttl, data) = recs[i];
                match at.get(owner) {
                    Some(&o) => {
                        m.ptr(o);
                    }
                    None => {
                        let o = m.name(owner);
                        at.insert(owner, o);
                    }
                }
                match t {
                    TYPE_CNAME => {
                        let (first, rest) = data.split_once('.').unwrap();
                        let target = match at.get(rest) {
                            Some(&to) => m.cname_ptr(ttl, first, to),
                            None => {
                                let mut body = Msg(Vec::new());
                                body.name(data);
                                m.rr(TYPE_CNAME, ttl, &body.0);
                                m.0.len() - body.0.len()
                            }
                        };
                        at.entry(data).or_insert(target);
                    }
                    TYPE_A => {
                        let a: Ipv4Addr = data.parse().unwrap();
                        m.rr(TYPE_A, ttl, &a.octets());
                    }
                    _ => {
                        let a: Ipv6Addr = data.parse().unwrap();
                        m.rr(TYPE_AAAA, ttl, &a.octets());
                    }
                }
            }
            m.0
        };
        let want = vec![
            (
                v4("198.51.100.20"),
                chain(&["www.gov.br", "edge.gov.br", "a1.cdn.example"]),
                120,
            ),
            (
                IpAddr::V6("2001:db8::20".parse().unwrap()),
                chain(&["www.gov.br", "edge.gov.br", "a1.cdn.example"]),
                30,
            ),
        ];
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
            let msg = build(order);
            let mut got = learned(&msg);
            got.sort_by_key(|(a, _, _)| a.is_ipv6());
            assert_eq!(got, want, "order {order:?}");
        }
    }

    #[test]
    fn addresses_of_other_names_are_not_learned() {
        // The answer also carries an A for a name nobody asked about, and an
        // A for a CNAME's owner (invalid: a CNAME owner has no other data).
        let mut m = Msg::response(1, 1, 3, 0, 0);
        let q = m.question("www.gov.br", TYPE_A);
        m.name("bank.example");
        m.rr(TYPE_A, 300, &[203, 0, 113, 66]);
        m.ptr(q);
        m.cname_ptr(300, "x", q + 4);
        m.ptr(q).rr(TYPE_A, 300, &[203, 0, 113, 67]);
        assert_eq!(parse_response(&m.0).unwrap().learned, vec![]);
    }

    #[test]
    fn cname_loops_and_long_chains_teach_nothing() {
        // a → b → a, and an A for both.
        let mut m = Msg::response(1, 1, 4, 0, 0);
        let q = m.question("a.example", TYPE_A);
        m.ptr(q);
        let b = m.cname_ptr(300, "b", q + 2);
        m.ptr(b);
        m.cname_ptr(300, "a", q + 2);
        m.ptr(q).rr(TYPE_A, 300, &[192, 0, 2, 1]);
        m.ptr(b).rr(TYPE_A, 300, &[192, 0, 2, 2]);
        assert_eq!(learned(&m.0), vec![]);
        // A chain of MAX_CNAMES is followed, one more is not.
        for (n, learns) in [(MAX_CNAMES, true), (MAX_CNAMES + 1, false)] {
            let mut m = Msg::response(1, 1, n as u16 + 1, 0, 0);
            let q = m.question("c0.example", TYPE_A);
            let mut owner = q;
            for i in 1..=n {
                m.ptr(owner);
                owner = m.cname_ptr(60, &format!("c{i}"), q + 3);
            }
            m.ptr(owner).rr(TYPE_A, 60, &[192, 0, 2, 9]);
            let got = learned(&m.0);
            assert_eq!(!got.is_empty(), learns, "chain of {n}");
            if learns {
                assert_eq!(got[0].1.len(), n + 1);
                assert_eq!(got[0].1[n], format!("c{n}.example"));
            }
        }
    }

    #[test]
    fn two_different_cnames_for_one_name_teach_nothing() {
        let mut m = Msg::response(1, 1, 3, 0, 0);
        let q = m.question("a.example", TYPE_A);
        m.ptr(q);
        let b = m.cname_ptr(300, "b", q + 2);
        m.ptr(q);
        m.cname_ptr(300, "c", q + 2);
        m.ptr(b).rr(TYPE_A, 300, &[192, 0, 2, 1]);
        assert_eq!(learned(&m.0), vec![]);
        // The same CNAME twice is only a repetition.
        let mut m = Msg::response(1, 1, 3, 0, 0);
        let q = m.question("a.example", TYPE_A);
        m.ptr(q);
        let b = m.cname_ptr(300, "b", q + 2);
        m.ptr(q);
        m.cname_ptr(100, "b", q + 2);
        m.ptr(b).rr(TYPE_A, 200, &[192, 0, 2, 1]);
        assert_eq!(
            learned(&m.0),
            vec![(v4("192.0.2.1"), chain(&["a.example", "b.example"]), 100)]
        );
    }

    #[test]
    fn responses_that_are_not_usable_teach_nothing() {
        let base = simple_answer();
        let with_flags = |set: u16, clear: u16| {
            let mut m = base.clone();
            let f = (u16::from_be_bytes([m[2], m[3]]) | set) & !clear;
            m[2..4].copy_from_slice(&f.to_be_bytes());
            m
        };
        for (what, msg) in [
            ("a query", with_flags(0, 0x8000)),
            ("truncated", with_flags(0x0200, 0)),
            ("NXDOMAIN", with_flags(3, 0)),
            ("SERVFAIL", with_flags(2, 0)),
            ("opcode NOTIFY", with_flags(4 << 11, 0)),
        ] {
            let r = parse_response(&msg).unwrap();
            assert!(r.learned.is_empty(), "{what}");
        }
        assert!(
            parse_response(&with_flags(0x0200, 0))
                .unwrap()
                .header
                .truncated
        );
        // Two questions.
        let mut m = Msg::response(1, 2, 1, 0, 0);
        let q = m.question("a.example", TYPE_A);
        m.question("b.example", TYPE_A);
        m.ptr(q).rr(TYPE_A, 300, &[192, 0, 2, 1]);
        assert_eq!(learned(&m.0), vec![]);
        // Class CHAOS.
        let mut m = Msg::response(1, 1, 1, 0, 0);
        let q = m.name("a.example");
        m.u16(TYPE_A).u16(3);
        m.ptr(q).rr(TYPE_A, 300, &[192, 0, 2, 1]);
        assert_eq!(parse_response(&m.0).unwrap().question, None);
        assert_eq!(learned(&m.0), vec![]);
    }

    #[test]
    fn ttl_with_the_top_bit_set_is_zero() {
        let mut m = Msg::response(1, 1, 1, 0, 0);
        let q = m.question("a.example", TYPE_A);
        m.ptr(q).rr(TYPE_A, 0x8000_0001, &[192, 0, 2, 1]);
        assert_eq!(learned(&m.0)[0].2, 0);
    }

    #[test]
    fn wrong_rdata_sizes_are_refused() {
        for (t, len) in [(TYPE_A, 3), (TYPE_A, 5), (TYPE_AAAA, 4), (TYPE_AAAA, 17)] {
            let mut m = Msg::response(1, 1, 1, 0, 0);
            let q = m.question("a.example", t);
            m.ptr(q).rr(t, 300, &vec![1; len]);
            assert_eq!(parse_response(&m.0), Err(WireError::BadRdata), "{t} {len}");
        }
        // A CNAME whose name ends before or after its rdata.
        let mut m = Msg::response(1, 1, 1, 0, 0);
        let q = m.question("a.example", TYPE_A);
        let mut body = Msg(Vec::new());
        body.name("b.example");
        body.0.push(0);
        m.ptr(q).rr(TYPE_CNAME, 300, &body.0);
        assert_eq!(parse_response(&m.0), Err(WireError::BadRdata));
    }

    /// Every prefix of a valid message is refused (the counts announce
    /// more than it holds): never a panic, never an address.
    #[test]
    fn every_truncation_is_refused() {
        let mut m = Msg::response(9, 1, 3, 0, 0);
        let q = m.question("www.gov.br", TYPE_A);
        m.ptr(q);
        let t = m.cname_ptr(60, "edge", q + 4);
        m.ptr(t).rr(TYPE_A, 300, &[198, 51, 100, 1]);
        m.ptr(t).rr(
            TYPE_AAAA,
            300,
            &[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        );
        for msg in [simple_answer(), m.0] {
            let full = parse_response(&msg).unwrap().learned;
            assert!(!full.is_empty());
            for cut in 0..msg.len() {
                match parse_response(&msg[..cut]) {
                    Err(_) => {}
                    Ok(r) => panic!("prefix of {cut} bytes accepted: {r:?}"),
                }
            }
            // Trailing bytes after the counted records are ignored.
            let mut longer = msg.clone();
            longer.extend_from_slice(&[0xc0, 0x0c, 0xff]);
            assert_eq!(parse_response(&longer).unwrap().learned, full);
        }
    }

    #[test]
    fn counts_larger_than_the_data_are_refused() {
        let msg = simple_answer();
        for (at, v) in [(4, 2), (6, 3), (6, 0xffff), (8, 1), (10, 2)] {
            let mut m = msg.clone();
            m[at..at + 2].copy_from_slice(&(v as u16).to_be_bytes());
            assert_eq!(parse_response(&m), Err(WireError::Truncated), "{at}={v}");
        }
    }

    #[test]
    fn pointer_loops_and_forward_pointers_are_refused() {
        // The question's name is a pointer to itself.
        let mut m = Msg::response(1, 1, 0, 0, 0);
        m.ptr(12).u16(TYPE_A).u16(CLASS_IN);
        assert_eq!(parse_response(&m.0), Err(WireError::BadPointer));
        // A label then a pointer back to that label: backwards, but a loop.
        let mut m = Msg::response(1, 1, 0, 0, 0);
        m.name_ptr("a", 12);
        m.u16(TYPE_A).u16(CLASS_IN);
        assert_eq!(parse_response(&m.0), Err(WireError::BadPointer));
        // Two names pointing at each other (the second is forward).
        let mut m = Msg::response(1, 1, 1, 0, 0);
        m.name_ptr("a", 12 + 8);
        m.u16(TYPE_A).u16(CLASS_IN);
        let second = m.name_ptr("b", 12);
        assert_eq!(second, 12 + 8);
        m.rr(TYPE_A, 1, &[192, 0, 2, 1]);
        assert_eq!(parse_response(&m.0), Err(WireError::BadPointer));
        // A forward pointer to a valid name further on.
        let mut m = Msg::response(1, 1, 1, 0, 0);
        m.ptr(12 + 6).u16(TYPE_A).u16(CLASS_IN);
        m.name("a.example");
        m.rr(TYPE_A, 1, &[192, 0, 2, 1]);
        assert_eq!(parse_response(&m.0), Err(WireError::BadPointer));
        // A pointer into the header.
        let mut m = Msg::response(1, 1, 0, 0, 0);
        m.ptr(4).u16(TYPE_A).u16(CLASS_IN);
        assert_eq!(parse_response(&m.0), Err(WireError::BadPointer));
        // Extended label types 0x40 and 0x80.
        for t in [0x41u8, 0x81] {
            let mut m = Msg::response(1, 1, 0, 0, 0);
            m.0.extend_from_slice(&[t, b'a', 0]);
            m.u16(TYPE_A).u16(CLASS_IN);
            assert_eq!(parse_response(&m.0), Err(WireError::BadLabel));
        }
    }

    #[test]
    fn a_chain_of_backward_pointers_is_bounded() {
        // Each pointer points at the one before, down to "a.example": legal,
        // but more than MAX_JUMPS of them is refused.
        for (n, ok) in [(MAX_JUMPS, true), (MAX_JUMPS + 1, false)] {
            let mut m = Msg::response(1, 0, 0, 0, 0);
            let mut prev = m.name("a.example");
            for _ in 0..n {
                let at = m.0.len();
                m.ptr(prev);
                prev = at;
            }
            let mut r = Reader {
                msg: &m.0,
                pos: prev,
            };
            match r.name() {
                Ok(name) => {
                    assert!(ok, "{n} jumps accepted");
                    assert_eq!(name, "a.example");
                    assert_eq!(r.pos, prev + 2);
                }
                Err(e) => {
                    assert!(!ok, "{n} jumps: {e}");
                    assert_eq!(e, WireError::BadPointer);
                }
            }
        }
    }

    #[test]
    fn overlong_names_are_refused() {
        // 5 labels of 63: 5 * 64 + 1 = 321 bytes.
        let long = vec!["a".repeat(63); 5].join(".");
        let mut m = Msg::response(1, 1, 0, 0, 0);
        m.question(&long, TYPE_A);
        assert_eq!(parse_response(&m.0), Err(WireError::NameTooLong));
        // Exactly 255 bytes: 3 * 64 + 62 + 1.
        let max = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "a".repeat(61));
        let mut m = Msg::response(1, 1, 0, 0, 0);
        m.question(&max, TYPE_A);
        assert_eq!(parse_response(&m.0).unwrap().question.unwrap().0, max);
        // Built from pointers: a suffix of 240 bytes, then labels on top.
        let mut m = Msg::response(1, 1, 1, 0, 0);
        let base = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "a".repeat(46));
        let q = m.question(&base, TYPE_A);
        m.name_ptr(&"b".repeat(20), q);
        m.rr(TYPE_A, 1, &[192, 0, 2, 1]);
        assert_eq!(parse_response(&m.0), Err(WireError::NameTooLong));
        let mut huge = simple_answer();
        huge.resize(MAX_MESSAGE + 1, 0);
        assert_eq!(parse_response(&huge), Err(WireError::Oversized));
    }

    /// xorshift64*: a fixed-seed generator, enough to throw bytes at the
    /// parser without a crate.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Writes `name` compressed against what `written` records (full name:
    /// a pointer; a written parent: the first labels and a pointer; else
    /// spelled out), and records where each of its suffixes now is.
    fn put_name(m: &mut Msg, name: &str, written: &mut HashMap<String, usize>) {
        let labels: Vec<&str> = name.split('.').collect();
        for i in 0..labels.len() {
            let suffix = labels[i..].join(".");
            if let Some(&at) = written.get(&suffix) {
                m.ptr(at);
                return;
            }
            written.insert(suffix, m.0.len());
            m.0.push(labels[i].len() as u8);
            m.0.extend_from_slice(labels[i].as_bytes());
        }
        m.0.push(0);
    }

    /// Random CNAME graphs and address records over a few names, shuffled
    /// and compressed, against a model of what must be learned: the
    /// addresses of the end of the chain from the question, with the
    /// chain's minimum TTL; nothing for a loop, a fork or a chain too long.
    #[test]
    fn random_answers_match_the_model() {
        const NAMES: [&str; 7] = [
            "q.gov.br",
            "a.gov.br",
            "b.cdn.example",
            "c.cdn.example",
            "d.example",
            "gov.br",
            "x.q.gov.br",
        ];
        let mut rng = Rng(0x5eed);
        let mut learned_some = 0;
        for _ in 0..20_000 {
            // (owner, kind, data, ttl): kind 0 CNAME to NAMES[data], 1 A.
            let n = rng.below(9);
            let recs: Vec<(usize, u8, usize, u32)> = (0..n)
                .map(|_| {
                    (
                        rng.below(NAMES.len()),
                        rng.below(2) as u8,
                        rng.below(NAMES.len()),
                        1 + rng.below(1000) as u32,
                    )
                })
                .collect();
            // The model.
            let mut want = Vec::new();
            let mut cn: HashMap<usize, (usize, u32)> = HashMap::new();
            let mut fork = false;
            for &(o, k, d, t) in &recs {
                if k == 0 {
                    match cn.get_mut(&o) {
                        Some((d0, t0)) if *d0 == d => *t0 = (*t0).min(t),
                        Some(_) => fork = true,
                        None => {
                            cn.insert(o, (d, t));
                        }
                    }
                }
            }
            let mut path = vec![0usize];
            let mut ttl = u32::MAX;
            let mut ok = !fork;
            while let Some(&(d, t)) = cn.get(path.last().unwrap()) {
                if path.len() > MAX_CNAMES || path.contains(&d) {
                    ok = false;
                    break;
                }
                ttl = ttl.min(t);
                path.push(d);
            }
            if ok {
                for (i, &(o, k, d, t)) in recs.iter().enumerate() {
                    if k == 1 && o == *path.last().unwrap() {
                        let addr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i * 16 + d) as u8));
                        let names = path.iter().map(|&p| NAMES[p].to_string()).collect();
                        want.push((addr, names, ttl.min(t)));
                    }
                }
            }
            // The message.
            let mut m = Msg::response(1, 1, n as u16, 0, 0);
            let mut written = HashMap::new();
            put_name(&mut m, NAMES[0], &mut written);
            m.u16(TYPE_A).u16(CLASS_IN);
            for (i, &(o, k, d, t)) in recs.iter().enumerate() {
                put_name(&mut m, NAMES[o], &mut written);
                if k == 0 {
                    m.u16(TYPE_CNAME).u16(CLASS_IN).u32(t);
                    let len_at = m.0.len();
                    m.u16(0);
                    put_name(&mut m, NAMES[d], &mut written);
                    let len = (m.0.len() - len_at - 2) as u16;
                    m.0[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
                } else {
                    m.rr(TYPE_A, t, &[198, 51, 100, (i * 16 + d) as u8]);
                }
            }
            let got = learned(&m.0);
            learned_some += usize::from(!got.is_empty());
            assert_eq!(got, want, "{recs:?}");
        }
        assert!(learned_some > 2000, "{learned_some}");
    }

    /// Random messages and random mutations of valid ones: never a panic,
    /// and an address is only ever learned with a chain starting at the
    /// question's name and ending at an owner.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x6d77_616e_646e_7321);
        let seeds = [simple_answer(), {
            let mut m = Msg::response(9, 1, 2, 0, 0);
            let q = m.question("www.gov.br", TYPE_A);
            m.ptr(q);
            let t = m.cname_ptr(60, "edge", q + 4);
            m.ptr(t).rr(TYPE_A, 300, &[198, 51, 100, 1]);
            m.0
        }];
        let mut learned_any = 0;
        for i in 0..200_000 {
            let msg: Vec<u8> = if i % 2 == 0 {
                let len = rng.below(300);
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut m = seeds[rng.below(seeds.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(m.len());
                    match rng.below(3) {
                        0 => m[at] = rng.next() as u8,
                        1 => m[at] ^= 1 << rng.below(8),
                        _ => m.truncate(at),
                    }
                    if m.is_empty() {
                        break;
                    }
                }
                m
            };
            if let Ok(r) = parse_response(&msg) {
                for l in &r.learned {
                    learned_any += 1;
                    let (qname, _) = r.question.as_ref().expect("learned without a question");
                    assert_eq!(&l.chain[0], qname);
                    assert!(l.chain.len() <= MAX_CNAMES + 1);
                }
            }
        }
        // The mutations leave many messages valid: the check above ran.
        assert!(learned_any > 1000, "{learned_any}");
    }
}
