//! mwan datapath: a tc classifier on each LAN-facing interface (ingress, so
//! before the routing decision) that pins every new IPv4 flow to one WAN and
//! sets `skb->mark` to that WAN's mark; fwmark rules installed by userspace
//! send each mark to the WAN's routing table.
//!
//! Per packet: parse, look the flow up in the LRU flow map, and on a hit whose
//! WAN is still alive, count and mark. Everything else (rule matching, the
//! weighted choice, host stickiness) only runs for the first packet of a flow
//! or when its WAN died.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use mwan_common::*;

/// The layout version of the maps beside it (written by userspace when the
/// maps are created, read by the next daemon before it takes them over).
#[map(name = "ABI")]
static ABI: Array<u32> = Array::pinned(1, 0);
// Sizes of FLOWS and HOSTS are set by the loader from the config; the values
// here are the defaults.
#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(262_144, 0);
#[map(name = "HOSTS")]
static HOSTS: LruHashMap<u32, HostValue> = LruHashMap::pinned(65_536, 0);
#[map(name = "WANS")]
static WANS: Array<WanEntry> = Array::pinned(MAX_WANS, 0);
#[map(name = "WAN_NAMES")]
static WAN_NAMES: Array<WanName> = Array::pinned(MAX_WANS, 0);
#[map(name = "POLICIES")]
static POLICIES: Array<Policy> = Array::pinned(MAX_POLICIES, 0);
#[map(name = "SETTINGS")]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);
#[map(name = "WAN_STATS")]
static WAN_STATS: PerCpuArray<WanCounters> = PerCpuArray::pinned(MAX_WANS, 0);
#[map(name = "GLOBAL_STATS")]
static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::pinned(GS_COUNT, 0);
#[map(name = "RULE_SRC")]
static RULE_SRC: LpmTrie<[u8; 4], u64> = LpmTrie::pinned(4096, 0);
#[map(name = "RULE_DST")]
static RULE_DST: LpmTrie<[u8; 4], u64> = LpmTrie::pinned(4096, 0);
#[map(name = "RULE_SPORT")]
static RULE_SPORT: Array<u64> = Array::pinned(65_536, 0);
#[map(name = "RULE_DPORT")]
static RULE_DPORT: Array<u64> = Array::pinned(65_536, 0);
#[map(name = "RULE_PROTO")]
static RULE_PROTO: Array<u64> = Array::pinned(256, 0);
#[map(name = "RULE_IFACE")]
static RULE_IFACE: HashMap<u32, u64> = HashMap::pinned(256, 0);
#[map(name = "RULE_ACTION")]
static RULE_ACTION: Array<u32> = Array::pinned(MAX_RULES, 0);
#[map(name = "BYPASS")]
static BYPASS: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(4096, 0);
#[map(name = "DOMAIN_DST")]
static DOMAIN_DST: HashMap<u32, u64> = HashMap::pinned(DOMAIN_DST_CAPACITY, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ICMP_ECHO: u8 = 8;
/// Minimum header lengths: a shorter L4 header makes the packet malformed.
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
/// The longest IPv4 header (IHL 15).
const MAX_IP_HLEN: usize = 60;
/// Refresh a host pin's activity time at most this often.
const HOST_REFRESH_NS: u64 = 1_000_000_000;
/// A non-TCP flow idle this long has lost its conntrack entry (and NAT
/// binding; conntrack's UDP stream timeout is 120 s): the next packet is a
/// new connection.
const STALE_NS: u64 = 180_000_000_000;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

// Both programs return TC_ACT_UNSPEC: the packet continues to any later tc
// filter (a shaper's classifier, say) and then up the stack unchanged apart
// from its mark.

#[classifier]
pub fn mwan_lan_eth(ctx: TcContext) -> i32 {
    classify::<ETH_HLEN>(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn mwan_lan_l3(ctx: TcContext) -> i32 {
    classify::<0>(&ctx);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = GLOBAL_STATS.get_ptr_mut(idx) {
        // Per-CPU slot: no other writer.
        unsafe { *p += 1 };
    }
}

struct Packet {
    key: FlowKey,
    tcp_flags: u8,
    ifindex: u32,
    len: u32,
}

/// What [`parse`] makes of a packet.
enum Parsed {
    /// A packet of an IPv4 flow: classified.
    Flow(Packet),
    /// Not mwan's business, left as it is: another ethertype (IPv6, ARP), a
    /// VLAN-tagged frame on the parent interface (it belongs to the VLAN
    /// interface, where mwan sees it untagged if that is a LAN), ICMP other
    /// than an echo request (errors follow the connection they belong to).
    NotOurs,
    /// A non-first IPv4 fragment: it has no L4 header, so it cannot name its
    /// flow. Conntrack's defragmentation in prerouting reassembles it with
    /// the first fragment, whose mark the datagram then carries.
    Fragment,
    /// A frame the kernel drops later (IPv4 version not 4, header shorter
    /// than 20 bytes, total length shorter than the header or longer than the
    /// frame, an L4 header cut short): it must not create a pin.
    Malformed,
    /// The headers are in the packet but not all in its linear area.
    Nonlinear,
}

/// Bounds-checked pointer into the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Reads `N` bytes at `off` after a single bounds check (the verifier only
/// accepts packet reads it has seen checked).
#[inline(always)]
fn bytes_at<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    let p = ptr_at::<[u8; N]>(ctx, off)?;
    Some(unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn be16(b: &[u8], i: usize) -> u16 {
    ((b[i] as u16) << 8) | b[i + 1] as u16
}

/// A 16-bit field as stored in the packet (network byte order), the form
/// `FlowKey` keeps ports in.
#[inline(always)]
fn raw16(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

/// `Nonlinear` when the packet holds `need` bytes beyond its linear area,
/// `Malformed` when it is shorter than that.
#[inline(always)]
fn short(ctx: &TcContext, need: usize) -> Parsed {
    if (ctx.len() as usize) < need {
        Parsed::Malformed
    } else {
        Parsed::Nonlinear
    }
}

/// Reads the headers of a packet whose IPv4 header starts at `L3` (14 after
/// an Ethernet header, 0 on a point-to-point LAN). The checks a normal
/// packet passes are compares on header bytes already read (and the skb's
/// VLAN flag): a few instructions, no helper call, no pull.
#[inline(always)]
fn parse<const L3: usize>(ctx: &TcContext) -> Parsed {
    let skb = ctx.skb.skb;
    if L3 == ETH_HLEN {
        // tc ingress sees a VLAN tag already moved from the frame into the
        // skb; the frame is then delivered to the VLAN interface.
        if unsafe { (*skb).vlan_present } != 0 {
            return Parsed::NotOurs;
        }
        let eth = match bytes_at::<ETH_HLEN>(ctx, 0) {
            Some(b) => b,
            None => return short(ctx, ETH_HLEN),
        };
        if be16(&eth, 12) != ETH_P_IP {
            return Parsed::NotOurs;
        }
    } else if u16::from_be(unsafe { (*skb).protocol } as u16) != ETH_P_IP {
        return Parsed::NotOurs;
    }
    let ip = match bytes_at::<20>(ctx, L3) {
        Some(b) => b,
        None => return short(ctx, L3 + 20),
    };
    let len = ctx.len() as usize;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let mut tot_len = be16(&ip, 2) as usize;
    if tot_len == 0 && len > L3 + 0xffff {
        // IPv4 BIG TCP: a GRO packet beyond 64 KiB has total length 0 and
        // spans the rest of the skb.
        tot_len = len - L3;
    }
    if ip[0] >> 4 != 4 || ihl < 20 || tot_len < ihl || L3 + tot_len > len {
        return Parsed::Malformed;
    }
    // Only the first fragment carries the L4 header.
    if be16(&ip, 6) & 0x1fff != 0 {
        return Parsed::Fragment;
    }
    let proto = ip[9];
    let mut key = FlowKey {
        saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: 0,
        dport: 0,
        proto,
        _pad: [0; 3],
    };
    let mut tcp_flags = 0;
    let l4 = L3 + ihl;
    // The L4 header must lie within the datagram (which lies within the
    // frame): a failed read below then means paged data, not a short packet.
    let end = L3 + tot_len;
    match proto {
        PROTO_TCP => {
            if l4 + TCP_HLEN > end {
                return Parsed::Malformed;
            }
            let h = match bytes_at::<14>(ctx, l4) {
                Some(h) => h,
                None => return Parsed::Nonlinear,
            };
            key.sport = raw16(&h, 0);
            key.dport = raw16(&h, 2);
            tcp_flags = h[13];
        }
        PROTO_UDP => {
            if l4 + UDP_HLEN > end {
                return Parsed::Malformed;
            }
            let h = match bytes_at::<4>(ctx, l4) {
                Some(h) => h,
                None => return Parsed::Nonlinear,
            };
            key.sport = raw16(&h, 0);
            key.dport = raw16(&h, 2);
        }
        PROTO_ICMP => {
            if l4 + ICMP_HLEN > end {
                return Parsed::Malformed;
            }
            // Echo requests are flows keyed by their identifier; errors
            // and other ICMP follow the main table.
            let h = match bytes_at::<6>(ctx, l4) {
                Some(h) => h,
                None => return Parsed::Nonlinear,
            };
            if h[0] != ICMP_ECHO {
                return Parsed::NotOurs;
            }
            key.sport = raw16(&h, 4);
        }
        _ => {}
    }
    Parsed::Flow(Packet {
        key,
        tcp_flags,
        ifindex: unsafe { (*skb).ifindex },
        len: len as u32,
    })
}

#[inline(always)]
fn classify<const L3: usize>(ctx: &TcContext) {
    let mut parsed = parse::<L3>(ctx);
    if let Parsed::Nonlinear = parsed {
        // The headers are in the packet but partly in paged data: pull them
        // into the linear area (which may copy a cloned skb) once and parse
        // again. Only such packets pay for it.
        let want = (L3 + MAX_IP_HLEN + TCP_HLEN).min(ctx.len() as usize) as u32;
        if ctx.pull_data(want).is_err() {
            count(GS_PASS);
            return;
        }
        parsed = parse::<L3>(ctx);
    }
    let pkt = match parsed {
        Parsed::Flow(p) => p,
        Parsed::NotOurs | Parsed::Nonlinear => {
            count(GS_PASS);
            return;
        }
        Parsed::Fragment => {
            count(GS_FRAGMENTS);
            return;
        }
        Parsed::Malformed => {
            count(GS_MALFORMED);
            return;
        }
    };
    let settings = match SETTINGS.get(0) {
        Some(s) => s,
        None => return,
    };
    // A packet whose mark already names a WAN was steered before us: with
    // br_netfilter, nftables prerouting (which gives every packet of an
    // established connection the mark recorded in its conntrack entry)
    // runs at the bridge port, before tc ingress of the bridge. Respect
    // it; a pinned flow's packets are still counted.
    let premarked = unsafe { (*ctx.skb.skb).mark } & settings.mark_mask != 0;
    // The coarse clock (CLOCK_MONOTONIC at tick resolution) is enough for
    // idle times and host TTLs, and cheaper per packet.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let opening = pkt.key.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

    if let Some(flow) = FLOWS.get_ptr_mut(&pkt.key) {
        let flow = unsafe { &mut *flow };
        if premarked || !starts_anew(flow, pkt.key.proto == PROTO_TCP, opening, now) {
            // Plain adds: a flow's packets are normally handled by one CPU
            // (RSS), so lost updates are rare; the counters are statistics.
            flow.last_seen_ns = now;
            flow.packets += 1;
            flow.bytes += pkt.len as u64;
            if flow.wan == WAN_NONE {
                return;
            }
            if premarked {
                account(flow.wan, pkt.len, false);
                return;
            }
            if let Some(wan) = alive_wan(flow.wan) {
                if settings.sticky_host != 0 {
                    refresh_host(pkt.key.saddr, flow.wan, now);
                }
                account(flow.wan, pkt.len, false);
                set_mark(ctx, settings, wan.mark);
                return;
            }
            // The WAN died: choose again with the policy that chose it.
            let old = flow.wan;
            let new = choose(flow.policy as u32, pkt.key.saddr, settings, now);
            if new == WAN_NONE {
                count(GS_NO_WAN);
                return;
            }
            count(GS_REPINS);
            flow.wan = new;
            if flow.moved_from == WAN_NONE {
                flow.moved_from = old;
            }
            if let Some(wan) = alive_wan(new) {
                account(new, pkt.len, true);
                set_mark(ctx, settings, wan.mark);
            }
            return;
        }
        // A new connection reusing the 5-tuple of a finished one: it is
        // placed afresh below (and overwrites the old pin).
    }

    if premarked {
        count(GS_PREMARKED);
        return;
    }
    // First packet of a flow (as far as the map knows).
    if BYPASS
        .get(Key::new(32, pkt.key.daddr.to_ne_bytes()))
        .is_some()
    {
        count(GS_BYPASS);
        return;
    }
    if pkt.key.proto == PROTO_TCP && !opening {
        // Not a connection opening: a reply of a connection that came in
        // through a WAN (nftables restores its mark from conntrack) or a
        // connection older than mwan. Leave it to the routing tables.
        count(GS_MIDSTREAM);
        return;
    }
    let policy = if settings.rule_count == 0 {
        DEFAULT_POLICY
    } else {
        match_rules(&pkt, settings)
    };
    let wan = choose(policy, pkt.key.saddr, settings, now);
    if wan == WAN_NONE {
        if !is_main_policy(policy) {
            count(GS_NO_WAN);
            return;
        }
    }
    let value = FlowValue {
        first_seen_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: pkt.len as u64,
        wan,
        policy: policy as u8,
        moved_from: WAN_NONE,
        _pad: [0; 5],
    };
    if FLOWS.insert(&pkt.key, &value, 0).is_err() {
        count(GS_INSERT_ERRORS);
    }
    count(GS_NEW_FLOWS);
    if wan == WAN_NONE {
        return;
    }
    if let Some(entry) = WANS.get(wan as u32) {
        account(wan, pkt.len, true);
        set_mark(ctx, settings, entry.mark);
    }
}

/// Whether the packet that hit `flow` really starts a new connection that
/// should be placed by today's policy rather than follow an old pin: a
/// non-TCP flow idle longer than conntrack keeps its NAT binding, or a TCP
/// SYN whose pinned WAN its policy no longer offers (drained, a better tier
/// back, rules changed). A retransmitted SYN keeps its WAN otherwise.
#[inline(always)]
fn starts_anew(flow: &FlowValue, tcp: bool, opening: bool, now: u64) -> bool {
    if !opening {
        return !tcp && now.wrapping_sub(flow.last_seen_ns) > STALE_NS;
    }
    if flow.wan == WAN_NONE {
        return true;
    }
    match POLICIES.get(flow.policy as u32) {
        Some(p) => p.kind == POLICY_MAIN || p.wan_mask & (1u64 << (flow.wan & 63)) == 0,
        None => true,
    }
}

#[inline(always)]
fn is_main_policy(policy: u32) -> bool {
    match POLICIES.get(policy) {
        Some(p) => p.kind == POLICY_MAIN,
        None => false,
    }
}

#[inline(always)]
fn alive_wan(id: u8) -> Option<&'static WanEntry> {
    match WANS.get(id as u32) {
        Some(w) if w.alive != 0 => Some(w),
        _ => None,
    }
}

#[inline(always)]
fn set_mark(ctx: &TcContext, settings: &Settings, mark: u32) {
    let old = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark((old & !settings.mark_mask) | (mark & settings.mark_mask));
}

#[inline(always)]
fn account(wan: u8, len: u32, new_flow: bool) {
    if let Some(c) = WAN_STATS.get_ptr_mut(wan as u32) {
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += len as u64;
        if new_flow {
            c.flows += 1;
        }
    }
}

#[inline(always)]
fn refresh_host(saddr: u32, wan: u8, now: u64) {
    if let Some(h) = HOSTS.get_ptr_mut(&saddr) {
        let h = unsafe { &mut *h };
        if h.wan == wan && now.wrapping_sub(h.last_seen_ns) > HOST_REFRESH_NS {
            h.last_seen_ns = now;
        }
    }
}

/// Picks a WAN for a new flow under `policy_id`. Returns `WAN_NONE` for a
/// main-table policy or when nothing is eligible.
#[inline(always)]
fn choose(policy_id: u32, saddr: u32, settings: &Settings, now: u64) -> u8 {
    let mut policy = match POLICIES.get(policy_id) {
        Some(p) => p,
        None => return WAN_NONE,
    };
    if policy.kind == POLICY_MAIN {
        return WAN_NONE;
    }
    if policy.active == 0 {
        // A rule whose WANs are all out falls back to the default policy.
        policy = match POLICIES.get(DEFAULT_POLICY) {
            Some(p) if p.active != 0 && p.kind != POLICY_MAIN => p,
            _ => return WAN_NONE,
        };
    }
    let sticky = settings.sticky_host != 0 && policy.kind == POLICY_BALANCE;
    let mut stale_pin = false;
    if sticky {
        if let Some(h) = HOSTS.get_ptr_mut(&saddr) {
            let h = unsafe { &mut *h };
            if host_pin_usable(h, policy, settings, now) {
                h.last_seen_ns = now;
                count(GS_HOST_HITS);
                return h.wan;
            }
            stale_pin = true;
        }
    }
    let slot = (unsafe { bpf_get_prandom_u32() } as usize) & (SLOTS - 1);
    let wan = policy.slots[slot];
    if sticky && wan != WAN_NONE {
        let h = HostValue {
            last_seen_ns: now,
            wan,
            _pad: [0; 7],
        };
        // A host's first connections often start together on several CPUs
        // (a browser opening a page): only the first creates the pin, the
        // others adopt it.
        let flags = if stale_pin { BPF_ANY } else { BPF_NOEXIST };
        if HOSTS.insert(&saddr, &h, flags).is_err() {
            if let Some(h) = HOSTS.get_ptr_mut(&saddr) {
                let h = unsafe { &*h };
                if host_pin_usable(h, policy, settings, now) {
                    count(GS_HOST_HITS);
                    return h.wan;
                }
            }
        }
    }
    wan
}

#[inline(always)]
fn host_pin_usable(h: &HostValue, policy: &Policy, settings: &Settings, now: u64) -> bool {
    let fresh = now.wrapping_sub(h.last_seen_ns) < settings.host_ttl_ns;
    fresh
        && (h.wan as u32) < 64
        && policy.wan_mask & (1u64 << h.wan) != 0
        && alive_wan(h.wan).is_some()
}

/// First-match rule evaluation with one bit per rule: each dimension yields
/// the set of rules it allows, the lowest set bit of their intersection is
/// the first matching rule.
#[inline(always)]
fn match_rules(pkt: &Packet, settings: &Settings) -> u32 {
    let k = &pkt.key;
    let mut m = match RULE_PROTO.get(k.proto as u32) {
        Some(v) => *v,
        None => 0,
    };
    if m == 0 {
        return DEFAULT_POLICY;
    }
    m &= match RULE_IFACE.get_ptr(&pkt.ifindex) {
        Some(v) => unsafe { *v },
        None => settings.rule_any_iface,
    };
    if m == 0 {
        return DEFAULT_POLICY;
    }
    m &= match RULE_SRC.get(Key::new(32, k.saddr.to_ne_bytes())) {
        Some(v) => *v,
        None => 0,
    };
    if m == 0 {
        return DEFAULT_POLICY;
    }
    // The destination dimension: the rules whose `dst` CIDRs (or no `dst`
    // and no `domains`) allow the address, plus the rules by domain name
    // whose names resolved to it (learned from DNS answers). A rule with
    // both `dst` and `domains` allows the union.
    let learned = match DOMAIN_DST.get_ptr(&k.daddr) {
        Some(v) => unsafe { *v },
        None => 0,
    };
    m &= learned
        | match RULE_DST.get(Key::new(32, k.daddr.to_ne_bytes())) {
            Some(v) => *v,
            None => 0,
        };
    if m == 0 {
        return DEFAULT_POLICY;
    }
    if k.proto == PROTO_TCP || k.proto == PROTO_UDP {
        m &= match RULE_SPORT.get(u16::from_be(k.sport) as u32) {
            Some(v) => *v,
            None => 0,
        };
        m &= match RULE_DPORT.get(u16::from_be(k.dport) as u32) {
            Some(v) => *v,
            None => 0,
        };
    } else {
        m &= settings.rule_any_sport & settings.rule_any_dport;
    }
    if m == 0 {
        return DEFAULT_POLICY;
    }
    let rule = lowest_bit(m);
    match RULE_ACTION.get(rule) {
        Some(p) if *p < MAX_POLICIES => *p,
        _ => DEFAULT_POLICY,
    }
}

/// Index of the lowest set bit of a non-zero mask, without relying on a ctz
/// instruction (BPF has none).
#[inline(always)]
fn lowest_bit(m: u64) -> u32 {
    let b = m & m.wrapping_neg();
    let mut i = 0;
    if b & 0xffff_ffff_0000_0000 != 0 {
        i += 32;
    }
    if b & 0xffff_0000_ffff_0000 != 0 {
        i += 16;
    }
    if b & 0xff00_ff00_ff00_ff00 != 0 {
        i += 8;
    }
    if b & 0xf0f0_f0f0_f0f0_f0f0 != 0 {
        i += 4;
    }
    if b & 0xcccc_cccc_cccc_cccc != 0 {
        i += 2;
    }
    if b & 0xaaaa_aaaa_aaaa_aaaa != 0 {
        i += 1;
    }
    i
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
