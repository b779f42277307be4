//! Types shared by the eBPF datapath (`mwan-ebpf`) and userspace (`mwan-user`).
//!
//! The boundary between them is declared once: the maps in
//! [`for_each_map!`] ([`maps`]: names, kinds, key and value types,
//! capacities), the counters in [`counters`]. Every type here is
//! `#[repr(C)]`, has explicit padding and layout assertions. Userspace
//! writes the configuration maps (`WANS`, `POLICIES`, `SETTINGS`, `RULE_*`,
//! `BYPASS`, `DOMAIN_DST`) and the layout marker (`ABI`); the datapath
//! writes the state maps (`FLOWS`, `HOST_PINS`, `WAN_STATS`,
//! `GLOBAL_STATS`). IPv6 has its own flow, WAN, policy, address-rule,
//! bypass and learned-destination maps (`*6`, the per-family maps); the
//! port, protocol, interface and action rule maps, `SETTINGS`, the counters
//! and the host pins serve both families.
//!
//! Addresses and ports in keys are stored exactly as they appear in the packet
//! (network byte order); use [`FlowKey::src`] and friends to read them.
//!
//! **Adding a map** (a shared one, or one per family such as per-WAN
//! passive-health counters for each family) is one entry in
//! [`for_each_map!`], plus its value type here with its layout assertions;
//! the datapath's static, userspace's handle, pinning, removal, sizing and
//! migration follow from it ([`maps`] says how). **Adding a counter** is one
//! entry appended to the table in [`counters`]: its `GS_*` index, status
//! name, metric and help; status, `/metrics` and the tests follow.
#![no_std]

pub mod counters;
pub mod maps;
pub use counters::*;
pub use maps::*;

/// The version of the layout and meaning of the pinned maps' keys and values,
/// stored in the `ABI` map when the maps are created (and, for older
/// daemons, in `Settings::abi_version`). Bump it whenever a key or value type
/// changes (size, field order, meaning): a daemon that finds pins of another
/// version refuses to take them over. A change of a map's size alone
/// (`max_entries`: `MAX_WANS`, `GS_COUNT`, a trie's capacity) needs no bump:
/// the new daemon moves the entries into a map of the new size (see
/// `mwan-user` datapath, `migrate`).
pub const ABI_VERSION: u32 = 1;

/// WAN ids are `0..MAX_WANS`. Marks, routing tables and rule priorities are
/// derived from the id.
pub const MAX_WANS: u32 = 32;
/// "No WAN": the flow is routed by the main table (bypass) or nothing is
/// eligible.
pub const WAN_NONE: u8 = 0xff;

/// Policy rules are matched with 64-bit masks: at most 64 rules.
pub const MAX_RULES: u32 = 64;
/// Policy 0 is the default policy; rule `i` (0-based) uses the policy its
/// action names in `RULE_ACTION[i]`.
pub const MAX_POLICIES: u32 = MAX_RULES + 1;
pub const DEFAULT_POLICY: u32 = 0;

/// Weighted choice: a policy is a table of `SLOTS` WAN ids, each WAN holding a
/// number of slots proportional to its weight. A random slot is picked for a
/// new flow. 1024 slots keep every share within 0.1 percentage points of the
/// exact weight share.
pub const SLOTS: usize = 1024;

/// IPv6 extension headers (hop-by-hop, routing, destination options,
/// fragment) the classifier walks before the L4 header; a packet with more
/// is not mwan's business.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// Capacity of `DOMAIN_DST`: learned addresses at once. A plain hash, not
/// an LRU: an entry must stay exactly as long as its TTL (userspace deletes
/// it), never be evicted by the kernel while a client still connects to
/// it; when it is full, userspace stops learning new addresses (and counts
/// them) rather than silently losing old ones. 262,144 entries of 12 bytes
/// plus hash overhead take about 20 MiB at most, and hold far more addresses
/// than a LAN resolves within the longest TTLs.
pub const DOMAIN_DST_CAPACITY: u32 = 262_144;

/// tc program for LAN interfaces with an Ethernet header.
pub const PROG_LAN_ETH: &str = "mwan_lan_eth";
/// tc program for LAN interfaces without a link-layer header (tun, WireGuard).
pub const PROG_LAN_L3: &str = "mwan_lan_l3";
/// tc program for the WAN interfaces (ingress; any link type).
pub const PROG_WAN: &str = "mwan_wan";

/// The offset the datapath reads `struct nf_conn`'s `mark` at, as
/// compiled: the loader puts the running kernel's offset in its place
/// (from the kernel's BTF). Word-aligned, and far beyond the struct's real
/// size, so that no other load of the program has it.
pub const CT_MARK_OFFSET_MARKER: i16 = 0x7ff4;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// The key of a pinned flow: the 5-tuple as seen on the LAN interface.
/// For ICMP echo the identifier is stored as `sport` and `dport` is 0; for
/// other protocols without ports both are 0. Non-first fragments have no
/// key: they are never pinned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address, network byte order.
    pub saddr: u32,
    /// Destination address, network byte order.
    pub daddr: u32,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    pub fn src(&self) -> [u8; 4] {
        self.saddr.to_ne_bytes()
    }
    pub fn dst(&self) -> [u8; 4] {
        self.daddr.to_ne_bytes()
    }
    pub fn src_port(&self) -> u16 {
        u16::from_be(self.sport)
    }
    pub fn dst_port(&self) -> u16 {
        u16::from_be(self.dport)
    }
}

/// The value of a pinned flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the first packet.
    pub first_seen_ns: u64,
    /// `bpf_ktime_get_ns()` of the latest packet.
    pub last_seen_ns: u64,
    /// Packets and bytes from the LAN side (uploads).
    pub packets: u64,
    pub bytes: u64,
    /// The WAN the flow is pinned to, or [`WAN_NONE`] for a main-table flow.
    pub wan: u8,
    /// The policy that chose the WAN; used to re-choose when the WAN dies.
    pub policy: u8,
    /// The WAN the flow was first pinned to, if it was moved because that WAN
    /// went down; [`WAN_NONE`] otherwise.
    pub moved_from: u8,
    /// [`FLOW_SYN`], [`FLOW_ANSWERED`] (passive health). Daemons before
    /// passive health left this byte zero (padding): their pins count
    /// nothing.
    pub flags: u8,
    pub _pad: [u8; 4],
}

/// [`FlowValue::flags`]: pinned by a TCP SYN to a WAN; its handshake is
/// counted in `PASSIVE` (`first_seen_ns` is then `bpf_ktime_get_ns()`).
pub const FLOW_SYN: u8 = 1;
/// [`FlowValue::flags`]: the client's first packet after its SYN that is
/// not a SYN passed (the SYN-ACK reached it): the handshake was answered.
pub const FLOW_ANSWERED: u8 = 2;
/// [`FlowValue::flags`]: its SYN was retransmitted; its handshake, once
/// answered, is not timed (its time would be the client's retransmission
/// timeout, which is loss, not delay).
pub const FLOW_RETRIED: u8 = 4;

/// The index of WAN `id`'s counters of one family in `PASSIVE`.
pub const fn passive_index(id: u32, ipv6: bool) -> u32 {
    id * 2 + ipv6 as u32
}

/// What passive health needs of the LAN's TCP handshakes through one WAN
/// in one family (per CPU), the value of `PASSIVE`. The counters are
/// cumulative; the destination sets are cleared by userspace when it
/// reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassiveCounters {
    /// Connections pinned by a SYN (including re-pins of unanswered ones).
    pub syns: u64,
    /// Handshakes answered.
    pub answered: u64,
    /// SYNs of a pinned connection not yet answered.
    pub retransmits: u64,
    /// Total time of the timed handshakes (SYN to the client's ACK).
    pub handshake_ns: u64,
    /// Bit [`dst_bit`] of each destination a SYN went to.
    pub syn_dsts: u64,
    /// Bit [`dst_bit`] of each destination whose handshake was answered.
    pub answered_dsts: u64,
    /// The answered handshakes whose SYN was not retransmitted: those
    /// `handshake_ns` times.
    pub timed: u64,
}

/// A destination's bit in the 64-bit destination sets: the top 6 bits of
/// a multiplicative hash of the address (folded to 32 bits for IPv6).
#[inline(always)]
pub const fn dst_bit(folded: u32) -> u64 {
    1u64 << (folded.wrapping_mul(0x9e37_79b1) >> 26)
}

/// The key of a pinned IPv6 flow, as [`FlowKey`] (ICMPv6 echo requests
/// keyed by identifier as `sport`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    /// Source address, as in the packet.
    pub saddr: [u8; 16],
    /// Destination address, as in the packet.
    pub daddr: [u8; 16],
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey6 {
    pub fn src_port(&self) -> u16 {
        u16::from_be(self.sport)
    }
    pub fn dst_port(&self) -> u16 {
        u16::from_be(self.dport)
    }
}

/// [`HostKey::kind`]: the host's source MAC address (`bytes[..6]`), on an
/// Ethernet LAN with `sticky_key = "mac"`.
pub const HOST_KEY_MAC: u8 = 1;
/// The host's IPv4 address (`bytes[..4]`).
pub const HOST_KEY_IPV4: u8 = 2;
/// The host's IPv6 /64 (`bytes[..8]`, the rest zero).
pub const HOST_KEY_IPV6: u8 = 3;

/// The identity of a LAN host for `sticky = "host"`: its MAC address, or
/// (L3 LANs, `sticky_key = "address"`) its IPv4 address or IPv6 /64.
/// Unused bytes are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostKey {
    pub kind: u8,
    pub _pad: [u8; 3],
    pub bytes: [u8; 16],
}

/// `Settings::sticky_host`: off.
pub const STICKY_OFF: u32 = 0;
/// Hosts by address (IPv4 address, IPv6 /64). Also what daemons before
/// IPv6 wrote for `sticky = "host"`.
pub const STICKY_ADDRESS: u32 = 1;
/// Hosts by source MAC on Ethernet LANs (by address on L3 LANs).
pub const STICKY_MAC: u32 = 2;

/// Per-client-host pin (`sticky = "host"`), the value of `HOST_PINS` (and
/// of the older `HOSTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostValue {
    pub last_seen_ns: u64,
    pub wan: u8,
    pub _pad: [u8; 7],
}

/// One entry of the `WANS` array, indexed by WAN id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WanEntry {
    /// The mark (within `Settings::mark_mask`) routed to this WAN's table.
    pub mark: u32,
    /// Non-zero while pins to this WAN are valid. When 0, a flow pinned to
    /// the WAN is re-chosen on its next packet.
    pub alive: u32,
}

pub const POLICY_BALANCE: u32 = 0;
pub const POLICY_ORDERED: u32 = 1;
pub const POLICY_MAIN: u32 = 2;

/// A compiled policy: what a new flow that selects it gets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `POLICY_BALANCE` (weighted, host stickiness applies), `POLICY_ORDERED`
    /// (first eligible WAN of an ordered list) or `POLICY_MAIN` (no mark).
    pub kind: u32,
    /// Non-zero when `slots` is filled. A rule policy with no eligible WAN
    /// falls back to the default policy; a default policy with no eligible
    /// WAN leaves new flows unmarked (main table).
    pub active: u32,
    /// Bit `i` set when WAN `i` owns at least one slot.
    pub wan_mask: u64,
    pub slots: [u8; SLOTS],
}

impl Policy {
    pub const EMPTY: Policy = Policy {
        kind: POLICY_BALANCE,
        active: 0,
        wan_mask: 0,
        slots: [WAN_NONE; SLOTS],
    };
}

impl Default for Policy {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Global settings, `SETTINGS[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub abi_version: u32,
    /// The bits of `skb->mark` that mwan owns.
    pub mark_mask: u32,
    /// [`STICKY_OFF`], [`STICKY_ADDRESS`] or [`STICKY_MAC`] (`sticky` and
    /// `sticky_key`).
    pub sticky_host: u32,
    /// Number of policy rules; 0 skips rule matching entirely.
    pub rule_count: u32,
    pub host_ttl_ns: u64,
    /// Rules that do not constrain the LAN interface.
    pub rule_any_iface: u64,
    /// Rules that do not constrain source ports (used for ICMP and
    /// portless protocols, which only match such rules).
    pub rule_any_sport: u64,
    /// Rules that do not constrain destination ports.
    pub rule_any_dport: u64,
}

/// Per-WAN counters of traffic balanced from the LAN (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WanCounters {
    pub packets: u64,
    pub bytes: u64,
    /// New flows pinned to this WAN (including re-pins).
    pub flows: u64,
}

/// A WAN name as stored in the `WAN_NAMES` array (NUL padded), so that a
/// restarted daemon maps names to the same ids as the flows it inherits.
pub const WAN_NAME_LEN: usize = 32;

/// A WAN interface, the value of `WAN_IFACES` (by ifindex): the datapath
/// gives every packet arriving on it the WAN's mark, so that a reply's
/// reverse-path check finds the WAN's table (`src_valid_mark`), and the
/// first packet of an inbound connection carries its WAN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WanIface {
    pub mark: u32,
    /// The WAN's id.
    pub id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WanName {
    pub name: [u8; WAN_NAME_LEN],
}

impl Default for WanName {
    fn default() -> Self {
        Self {
            name: [0; WAN_NAME_LEN],
        }
    }
}

// The layouts are shared with the datapath and pinned across daemon versions:
// any change of a size or field offset below is a layout change (bump
// `ABI_VERSION`), and the build fails until these assertions are updated.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<FlowKey>() == 16);
    assert!(offset_of!(FlowKey, saddr) == 0);
    assert!(offset_of!(FlowKey, daddr) == 4);
    assert!(offset_of!(FlowKey, sport) == 8);
    assert!(offset_of!(FlowKey, dport) == 10);
    assert!(offset_of!(FlowKey, proto) == 12);
    assert!(offset_of!(FlowKey, _pad) == 13);

    assert!(size_of::<FlowValue>() == 40);
    assert!(offset_of!(FlowValue, first_seen_ns) == 0);
    assert!(offset_of!(FlowValue, last_seen_ns) == 8);
    assert!(offset_of!(FlowValue, packets) == 16);
    assert!(offset_of!(FlowValue, bytes) == 24);
    assert!(offset_of!(FlowValue, wan) == 32);
    assert!(offset_of!(FlowValue, policy) == 33);
    assert!(offset_of!(FlowValue, moved_from) == 34);
    assert!(offset_of!(FlowValue, flags) == 35);
    assert!(offset_of!(FlowValue, _pad) == 36);

    assert!(size_of::<PassiveCounters>() == 56);
    assert!(offset_of!(PassiveCounters, syns) == 0);
    assert!(offset_of!(PassiveCounters, answered) == 8);
    assert!(offset_of!(PassiveCounters, retransmits) == 16);
    assert!(offset_of!(PassiveCounters, handshake_ns) == 24);
    assert!(offset_of!(PassiveCounters, syn_dsts) == 32);
    assert!(offset_of!(PassiveCounters, answered_dsts) == 40);
    assert!(offset_of!(PassiveCounters, timed) == 48);

    assert!(size_of::<FlowKey6>() == 40);
    assert!(offset_of!(FlowKey6, saddr) == 0);
    assert!(offset_of!(FlowKey6, daddr) == 16);
    assert!(offset_of!(FlowKey6, sport) == 32);
    assert!(offset_of!(FlowKey6, dport) == 34);
    assert!(offset_of!(FlowKey6, proto) == 36);
    assert!(offset_of!(FlowKey6, _pad) == 37);

    assert!(size_of::<HostKey>() == 20);
    assert!(offset_of!(HostKey, kind) == 0);
    assert!(offset_of!(HostKey, _pad) == 1);
    assert!(offset_of!(HostKey, bytes) == 4);

    assert!(size_of::<HostValue>() == 16);
    assert!(offset_of!(HostValue, last_seen_ns) == 0);
    assert!(offset_of!(HostValue, wan) == 8);
    assert!(offset_of!(HostValue, _pad) == 9);

    assert!(size_of::<WanEntry>() == 8);
    assert!(offset_of!(WanEntry, mark) == 0);
    assert!(offset_of!(WanEntry, alive) == 4);

    assert!(size_of::<Policy>() == 16 + SLOTS);
    assert!(offset_of!(Policy, kind) == 0);
    assert!(offset_of!(Policy, active) == 4);
    assert!(offset_of!(Policy, wan_mask) == 8);
    assert!(offset_of!(Policy, slots) == 16);

    assert!(size_of::<Settings>() == 48);
    assert!(offset_of!(Settings, abi_version) == 0);
    assert!(offset_of!(Settings, mark_mask) == 4);
    assert!(offset_of!(Settings, sticky_host) == 8);
    assert!(offset_of!(Settings, rule_count) == 12);
    assert!(offset_of!(Settings, host_ttl_ns) == 16);
    assert!(offset_of!(Settings, rule_any_iface) == 24);
    assert!(offset_of!(Settings, rule_any_sport) == 32);
    assert!(offset_of!(Settings, rule_any_dport) == 40);

    assert!(size_of::<WanCounters>() == 24);
    assert!(offset_of!(WanCounters, packets) == 0);
    assert!(offset_of!(WanCounters, bytes) == 8);
    assert!(offset_of!(WanCounters, flows) == 16);

    assert!(size_of::<WanIface>() == 8);
    assert!(offset_of!(WanIface, mark) == 0);
    assert!(offset_of!(WanIface, id) == 4);

    assert!(size_of::<WanName>() == WAN_NAME_LEN);
    assert!(offset_of!(WanName, name) == 0);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for HostKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for HostValue {}
    unsafe impl aya::Pod for WanEntry {}
    unsafe impl aya::Pod for Policy {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for WanCounters {}
    unsafe impl aya::Pod for WanName {}
    unsafe impl aya::Pod for WanIface {}
    unsafe impl aya::Pod for PassiveCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn flow_key_reads_network_order() {
        let k = FlowKey {
            saddr: u32::from_ne_bytes([192, 0, 2, 10]),
            daddr: u32::from_ne_bytes([198, 51, 100, 1]),
            sport: 40000u16.to_be(),
            dport: 443u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        assert_eq!(k.src(), [192, 0, 2, 10]);
        assert_eq!(k.dst(), [198, 51, 100, 1]);
        assert_eq!(k.src_port(), 40000);
        assert_eq!(k.dst_port(), 443);
    }
}
