//! DNS over TCP (RFC 1035 4.2.2, RFC 7766): each message is preceded by its
//! length in two bytes, and a stream may carry several messages in one
//! segment or one message across several segments.

/// Reassembles DNS messages from a TCP byte stream. Complete messages are
/// taken out as soon as they are there, so at most one incomplete message
/// (up to 65,537 bytes) is ever held.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
    /// Start of the next unread length prefix in `buf`.
    start: usize,
}

impl Deframer {
    pub fn new() -> Deframer {
        Deframer::default()
    }

    /// Adds bytes received on the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if one has arrived. A zero length prefix
    /// yields an empty message (which the parser refuses).
    pub fn next_message(&mut self) -> Option<&[u8]> {
        let rest = &self.buf[self.start..];
        let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
        let msg = rest.get(2..2 + len)?;
        self.start += 2 + len;
        Some(msg)
    }

    /// Bytes received but not yet returned as a message.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// A message with its length prefix, to write on a stream; `None` when it is
/// longer than a DNS message can be.
pub fn frame(msg: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(msg.len()).ok()?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::wire::{parse_response, tests::simple_answer, tests::Rng};
    use super::*;

    fn drain(d: &mut Deframer) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(m) = d.next_message() {
            out.push(m.to_vec());
        }
        out
    }

    #[test]
    fn several_messages_in_one_segment() {
        let a = simple_answer();
        let b = vec![1, 2, 3];
        let mut seg = frame(&a).unwrap();
        seg.extend(frame(&b).unwrap());
        seg.extend(frame(&[]).unwrap());
        seg.extend_from_slice(&[0, 9, 1]); // the start of a fourth
        let mut d = Deframer::new();
        d.push(&seg);
        assert_eq!(drain(&mut d), vec![a.clone(), b, vec![]]);
        assert_eq!(d.pending(), 3);
        d.push(&[2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(drain(&mut d), vec![vec![1, 2, 3, 4, 5, 6, 7, 8, 9]]);
        assert_eq!(d.pending(), 0);
        assert!(parse_response(&frame(&a).unwrap()[2..]).is_ok());
    }

    /// A stream of messages cut into random segments (down to one byte, and
    /// through the length prefix) comes out whole and in order.
    #[test]
    fn messages_across_segments() {
        let msgs: Vec<Vec<u8>> = (0..50u8)
            .map(|i| (0..(i as usize * 37) % 700).map(|j| j as u8 ^ i).collect())
            .chain([simple_answer(), vec![0xab; 65_535]])
            .collect();
        let stream: Vec<u8> = msgs.iter().flat_map(|m| frame(m).unwrap()).collect();
        let mut rng = Rng(42);
        for _ in 0..20 {
            let mut d = Deframer::new();
            let mut got = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let most = if rng.below(2) == 0 { 3 } else { 3000 };
                let n = 1 + rng.below(most);
                let end = (at + n).min(stream.len());
                d.push(&stream[at..end]);
                got.extend(drain(&mut d));
                assert!(d.pending() <= 2 + 65_535 + n);
                at = end;
            }
            assert_eq!(got, msgs);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn frame_refuses_what_does_not_fit() {
        assert_eq!(frame(&[7; 3]).unwrap(), vec![0, 3, 7, 7, 7]);
        assert!(frame(&vec![0; 65_535]).is_some());
        assert!(frame(&vec![0; 65_536]).is_none());
    }
}
