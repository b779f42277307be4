//! What single values mean: durations, integers in range, interface
//! names, paths, addresses, prefixes, ports. Each reader takes a value with
//! its place and reports a problem there.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};
use toml::Spanned;

use super::error::Problem;
use super::raw::{kind, Setting};
use super::shape::{Described, Int, IntOrStr, IntOrText, List, OneOrMany, Str};
use super::types::{Gateway, Gateway6, PortRange};

pub(super) fn text<K>(v: &Spanned<Str<K>>) -> Result<String, Problem> {
    Ok(v.get_ref().as_str().to_string())
}

/// The strings of a list.
pub(super) fn texts<K>(items: &[Spanned<Str<K>>]) -> Vec<String> {
    items
        .iter()
        .map(|i| i.get_ref().as_str().to_string())
        .collect()
}

pub(super) fn duration<K>(v: &Spanned<Str<K>>) -> Result<Duration, Problem> {
    let s = v.get_ref().as_str();
    humantime::parse_duration(s).map_err(|e| {
        Problem::at(
            v,
            format!("`{s}` is not a duration ({e}); write e.g. \"200ms\", \"5s\", \"10m\""),
        )
    })
}

pub(super) fn positive_duration<K>(v: &Spanned<Str<K>>) -> Result<Duration, Problem> {
    let d = duration(v)?;
    if d.is_zero() {
        return Err(Problem::at(v, "must be greater than zero"));
    }
    Ok(d)
}

/// An integer in `range`.
pub(super) fn ranged<K, T>(v: &Spanned<Int<K>>, range: RangeInclusive<T>) -> Result<T, Problem>
where
    T: Copy + Into<i64> + TryFrom<i64>,
{
    let (lo, hi) = ((*range.start()).into(), (*range.end()).into());
    in_range(v, v.get_ref().0, lo, hi).and_then(|n| {
        T::try_from(n).map_err(|_| Problem::at(v, format!("{n} is out of range {lo}..={hi}")))
    })
}

fn in_range<T>(v: &Spanned<T>, n: i64, lo: i64, hi: i64) -> Result<i64, Problem> {
    if n < lo || n > hi {
        Err(Problem::at(v, format!("{n} is out of range {lo}..={hi}")))
    } else {
        Ok(n)
    }
}

impl<K> Setting<Int<K>> {
    /// The integer, if set, in `range`.
    pub(super) fn ranged<T>(&self, range: RangeInclusive<T>) -> Result<Option<T>, Problem>
    where
        T: Copy + Into<i64> + TryFrom<i64>,
    {
        self.read(|v| ranged(v, range))
    }
}

pub(super) fn ifname<K>(v: &Spanned<Str<K>>) -> Result<String, Problem> {
    let name = v.get_ref().as_str();
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        return Err(Problem::at(
            v,
            format!(
                "`{name}` is not a valid interface name (1 to 15 characters, no '/' or spaces)"
            ),
        ));
    }
    Ok(name.to_string())
}

pub(super) fn absolute_path<K>(v: &Spanned<Str<K>>) -> Result<PathBuf, Problem> {
    let path = PathBuf::from(v.get_ref().as_str());
    if !path.is_absolute() {
        return Err(Problem::at(
            v,
            format!("`{}` must be an absolute path", path.display()),
        ));
    }
    Ok(path)
}

/// An `ADDRESS:PORT` to listen on, IPv4 or IPv6 (`[::1]:9849`).
pub(super) fn listen_addr<K>(v: &Spanned<Str<K>>) -> Result<SocketAddr, Problem> {
    let s = v.get_ref().as_str();
    let a: SocketAddr = s.parse().map_err(|_| {
        Problem::at(
            v,
            format!(
                "`{s}` is not an address and port: write e.g. \"127.0.0.1:9849\" or \"[::1]:9849\""
            ),
        )
    })?;
    if a.port() == 0 {
        return Err(Problem::at(v, format!("`{s}`: port 0 is not a fixed port")));
    }
    Ok(a)
}

/// An IPv4 address that can be a unicast `role` ("a source address").
pub(super) fn unicast_ipv4<K>(v: &Spanned<Str<K>>, role: &str) -> Result<Ipv4Addr, Problem> {
    let a = ipv4(v)?;
    if a.is_loopback() {
        return Err(Problem::at(v, format!("`{a}` cannot be {role}")));
    }
    routable_ipv4(v, a, role)
}

/// `ha_address`: an HA pair's virtual address (not unspecified, broadcast
/// or multicast).
pub(super) fn ha_address<K>(v: &Spanned<Str<K>>) -> Result<Ipv4Addr, Problem> {
    routable_ipv4(v, ipv4(v)?, "a gateway address")
}

fn ipv4<K>(v: &Spanned<Str<K>>) -> Result<Ipv4Addr, Problem> {
    let s = v.get_ref().as_str();
    s.parse()
        .map_err(|_| Problem::at(v, format!("`{s}` is not an IPv4 address")))
}

fn routable_ipv4<K>(v: &Spanned<Str<K>>, a: Ipv4Addr, role: &str) -> Result<Ipv4Addr, Problem> {
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
        return Err(Problem::at(v, format!("`{a}` cannot be {role}")));
    }
    Ok(a)
}

/// `gateway`: an IPv4 address or "auto".
pub(super) fn gateway(v: &Spanned<Str<kind::Gateway>>) -> Result<Gateway, Problem> {
    let s = v.get_ref().as_str();
    if s == "auto" {
        return Ok(Gateway::Auto);
    }
    let a: Ipv4Addr = s
        .parse()
        .map_err(|_| Problem::at(v, not(s, kind::Gateway::EXPECTING)))?;
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
        return Err(Problem::at(v, format!("`{a}` cannot be a gateway")));
    }
    Ok(Gateway::Fixed(a))
}

/// `gateway6`: an IPv6 address or "auto".
pub(super) fn gateway6(v: &Spanned<Str<kind::Gateway6>>) -> Result<Gateway6, Problem> {
    let s = v.get_ref().as_str();
    if s == "auto" {
        return Ok(Gateway6::Auto);
    }
    let a: Ipv6Addr = s
        .parse()
        .map_err(|_| Problem::at(v, not(s, kind::Gateway6::EXPECTING)))?;
    if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
        return Err(Problem::at(v, format!("`{a}` cannot be a gateway")));
    }
    Ok(Gateway6::Fixed(a))
}

/// "`x` is not WHAT".
pub(super) fn not(s: &str, what: impl fmt::Display) -> String {
    format!("`{s}` is not {what}")
}

/// An IPv6 prefix for NPT: 1 to 64 bits, no bits after them.
pub(super) fn npt_prefix<K>(v: &Spanned<Str<K>>) -> Result<Ipv6Net, Problem> {
    let s = v.get_ref().as_str();
    let net: Ipv6Net = s
        .parse()
        .map_err(|_| Problem::at(v, not(s, "an IPv6 prefix (ADDRESS/LENGTH)")))?;
    if net.prefix_len() == 0 || net.prefix_len() > 64 {
        return Err(Problem::at(
            v,
            format!("`{s}`: the prefix length must be 1 to 64 (the interface identifier is kept)"),
        ));
    }
    if net != net.trunc() {
        return Err(Problem::at(
            v,
            format!(
                "`{s}` has bits set after the prefix length: write `{}`",
                net.trunc()
            ),
        ));
    }
    Ok(net)
}

/// `mark_mask`: one contiguous run of bits, as an integer or a string
/// (`"0x00ff0000"`).
pub(super) fn mark_mask(v: &Spanned<IntOrStr<kind::MarkMask>>) -> Result<u32, Problem> {
    let n = match &v.get_ref().0 {
        IntOrText::Int(i) => in_range(v, *i, 1, u32::MAX.into())? as u32,
        IntOrText::Text(s) => {
            let t = s.trim();
            let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) => u32::from_str_radix(h, 16),
                None => t.parse::<u32>(),
            };
            parsed.map_err(|_| Problem::at(v, not(s, "a 32-bit number")))?
        }
    };
    // The WAN number (id + 1) is stored at the mask's lowest bit.
    let capacity = (n >> n.trailing_zeros()) as u64;
    if n == 0 || (capacity & (capacity + 1)) != 0 {
        return Err(Problem::at(
            v,
            format!("{n:#x} must be one contiguous run of bits (such as 0x00ff0000)"),
        ));
    }
    Ok(n)
}

/// A list of ports and port ranges (`[25, "8000-8100"]`), not empty.
pub(super) fn ports<K>(v: &Spanned<List<IntOrStr<K>>>) -> Result<Vec<PortRange>, Problem> {
    let port = |s: &str| -> Result<u16, Problem> {
        match s.trim().parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ => Err(Problem::at(v, format!("`{s}` is not a port (1..=65535)"))),
        }
    };
    let mut out = Vec::new();
    for item in &v.get_ref().0 {
        let r = match &item.get_ref().0 {
            IntOrText::Int(p) => {
                let p = in_range(v, *p, 1, 65535)? as u16;
                PortRange { first: p, last: p }
            }
            IntOrText::Text(s) => {
                let r = match s.split_once('-') {
                    Some((a, b)) => PortRange {
                        first: port(a)?,
                        last: port(b)?,
                    },
                    None => {
                        let p = port(s)?;
                        PortRange { first: p, last: p }
                    }
                };
                if r.first > r.last {
                    return Err(Problem::at(v, format!("range `{s}` is reversed")));
                }
                r
            }
        };
        out.push(r);
    }
    if out.is_empty() {
        return Err(Problem::at(
            v,
            "is empty; leave the key out to match any port",
        ));
    }
    Ok(out)
}

/// A list of IPv4 and IPv6 addresses and prefixes, not empty; a prefix
/// with host bits set is refused.
pub(super) fn nets<K>(v: &Spanned<OneOrMany<Str<K>>>) -> Result<Vec<IpNet>, Problem> {
    let items = &v.get_ref().0;
    if items.is_empty() {
        return Err(Problem::at(
            v,
            "is empty; leave the key out to match any address",
        ));
    }
    items
        .iter()
        .map(|item| {
            let s = item.get_ref().as_str();
            if let Ok(n) = s.parse::<IpNet>() {
                if n.network() != n.addr() {
                    return Err(Problem::at(
                        v,
                        format!("`{s}` has host bits set; did you mean `{}`?", n.trunc()),
                    ));
                }
                return Ok(n);
            }
            s.parse::<IpAddr>()
                .map(IpNet::from)
                .map_err(|_| Problem::at(v, format!("`{s}` is not an IP address or CIDR")))
        })
        .collect()
}
