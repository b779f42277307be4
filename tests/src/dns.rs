//! Just enough of the DNS wire format for the responder and its client.

/// Size of the fixed DNS header.
const HEADER: usize = 12;

/// A parsed DNS response (header fields and the first question's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsReply {
    pub id: u16,
    /// Response code (0 = NOERROR).
    pub rcode: u8,
    /// Number of answer records.
    pub answers: u16,
    /// The question's name, dotted, without the trailing dot.
    pub name: String,
}

/// A recursive query for `name`, type A, class IN.
pub(crate) fn query(id: u16, name: &str) -> Vec<u8> {
    query_type(id, name, 1)
}

/// A recursive query for `name`, type `qtype` (1 A, 28 AAAA), class IN.
pub(crate) fn query_type(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut msg = Vec::with_capacity(HEADER + name.len() + 6);
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&[0x01, 0x00]); // RD
    msg.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.split('.').filter(|l| !l.is_empty()) {
        msg.push(label.len().min(63) as u8);
        msg.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    msg.push(0);
    msg.extend_from_slice(&qtype.to_be_bytes());
    msg.extend_from_slice(&[0, 1]); // IN
    msg
}

/// The responder's answer to `query`: same id, opcode, RD and first
/// question; QR and RA set; NOERROR; no records. `None` for something that
/// is not a query.
pub(crate) fn respond(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < HEADER || query[2] & 0x80 != 0 {
        return None;
    }
    let questions = u16::from_be_bytes([query[4], query[5]]);
    let end = if questions == 0 {
        HEADER
    } else {
        question_end(query)?
    };
    let mut answer = query[..end].to_vec();
    answer[2] = 0x80 | (query[2] & 0x79); // QR, opcode, RD (AA and TC clear)
    answer[3] = 0x80; // RA, rcode NOERROR
    answer[4..6].copy_from_slice(&questions.min(1).to_be_bytes());
    answer[6..12].fill(0);
    Some(answer)
}

/// Parses a response to a query made with [`query`].
pub(crate) fn parse_reply(msg: &[u8]) -> Option<DnsReply> {
    if msg.len() < HEADER || msg[2] & 0x80 == 0 {
        return None;
    }
    let mut name = Vec::new();
    let mut pos = HEADER;
    while msg.get(pos).is_some_and(|&len| len != 0) {
        let len = usize::from(msg[pos]);
        name.push(String::from_utf8_lossy(msg.get(pos + 1..pos + 1 + len)?).into_owned());
        pos += 1 + len;
    }
    Some(DnsReply {
        id: u16::from_be_bytes([msg[0], msg[1]]),
        rcode: msg[3] & 0x0f,
        answers: u16::from_be_bytes([msg[6], msg[7]]),
        name: name.join("."),
    })
}

/// End offset of the first question (uncompressed name, type, class).
/// The addresses of the A and AAAA records in a response's answer section
/// (whatever their owner: the end of a CNAME chain too), in order.
pub(crate) fn addresses(msg: &[u8]) -> Option<Vec<std::net::IpAddr>> {
    let answers = u16::from_be_bytes([*msg.get(6)?, *msg.get(7)?]);
    let mut pos = question_end(msg)?;
    let mut out = Vec::new();
    for _ in 0..answers {
        // The owner: labels ending in a zero byte or a pointer.
        loop {
            let len = *msg.get(pos)?;
            if len & 0xc0 == 0xc0 {
                pos += 2;
                break;
            }
            pos += 1 + usize::from(len);
            if len == 0 {
                break;
            }
        }
        let rtype = u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]);
        let rdlen = usize::from(u16::from_be_bytes([*msg.get(pos + 8)?, *msg.get(pos + 9)?]));
        let rdata = msg.get(pos + 10..pos + 10 + rdlen)?;
        if rtype == 1 && rdlen == 4 {
            out.push(std::net::Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]).into());
        } else if rtype == 28 && rdlen == 16 {
            let octets: [u8; 16] = rdata.try_into().ok()?;
            out.push(std::net::Ipv6Addr::from(octets).into());
        }
        pos += 10 + rdlen;
    }
    Some(out)
}

fn question_end(msg: &[u8]) -> Option<usize> {
    let mut pos = HEADER;
    loop {
        let len = usize::from(*msg.get(pos)?);
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        pos += 1 + len;
    }
    let end = pos + 1 + 4;
    (end <= msg.len()).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_echoes_id_and_question() {
        let q = query(0x1234, "probe.example.");
        let r = respond(&q).unwrap();
        assert_eq!(r.len(), q.len());
        assert_eq!(&r[12..], &q[12..]);
        let parsed = parse_reply(&r).unwrap();
        assert_eq!(
            parsed,
            DnsReply {
                id: 0x1234,
                rcode: 0,
                answers: 0,
                name: "probe.example".into()
            }
        );
        assert_eq!(r[2] & 0x01, 0x01, "RD copied");
    }

    #[test]
    fn garbage_is_ignored() {
        assert!(respond(&[1, 2, 3]).is_none());
        let mut q = query(1, "x");
        q.truncate(q.len() - 2);
        assert!(respond(&q).is_none());
        let r = respond(&query(1, "x")).unwrap();
        assert!(respond(&r).is_none(), "responses are not answered");
    }
}
