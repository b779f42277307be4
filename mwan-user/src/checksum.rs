//! The Internet checksum (RFC 1071), for the packets mwan builds itself
//! (ICMP probes, nudge segments) and for the lab's ping.

/// The one's-complement checksum of the concatenation of `chunks` (a
/// pseudo-header and a segment, say). A packet whose checksum field is
/// filled in sums to 0.
pub fn internet(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for &b in chunks.iter().flat_map(|c| c.iter()) {
        match odd.take() {
            Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
            None => odd = Some(b),
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::internet;

    #[test]
    fn rfc1071_example_and_odd_lengths() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2.
        assert_eq!(
            internet(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            !0xddf2
        );
        // Split anywhere, even mid-word: the same sum.
        assert_eq!(
            internet(&[&[0x00, 0x01, 0xf2], &[0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            !0xddf2
        );
        assert_eq!(internet(&[&[0xff]]), !0xff00);
    }
}
