//! The datapath's event counters (`GLOBAL_STATS`, per CPU u64 counters of
//! events off the hot path; per-packet totals are in `WAN_STATS`),
//! declared once: each entry's `GS_*` index (what the datapath counts
//! with), its name in `mwan status --json`, its Prometheus metric and the
//! metric's help. docs/METRICS.md lists the metrics (a test checks).
//!
//! **Adding a counter** is one entry at the end, with the next index:
//! indices are only ever appended (a daemon with a larger `GS_COUNT` keeps
//! the inherited counters, see the migration), never reused or reordered.

/// One `GLOBAL_STATS` counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    /// Its index (`GS_*`).
    pub index: u32,
    /// Its key in `mwan status --json` (`counters`).
    pub name: &'static str,
    /// Its metric (a Prometheus counter).
    pub metric: &'static str,
    /// The metric's help text.
    pub help: &'static str,
}

macro_rules! counters {
    ($(
        $(#[$attr:meta])*
        $konst:ident = $index:literal, $name:ident, $metric:literal: $help:literal;
    )*) => {
        $(
            #[doc = $help]
            #[doc = ""]
            $(#[$attr])*
            pub const $konst: u32 = $index;
        )*
        /// The number of counters (`GLOBAL_STATS`'s `max_entries`).
        pub const GS_COUNT: u32 = [$($index),*].len() as u32;
        /// Every counter, by index.
        pub const COUNTERS: [Counter; GS_COUNT as usize] = [$(Counter {
            index: $konst,
            name: stringify!($name),
            metric: $metric,
            help: $help,
        }),*];
    };
}

counters! {
    GS_NEW_FLOWS = 0, new_flows, "mwan_datapath_new_pins_total":
        "New flows the datapath placed (their first packet; re-pins are counted apart).";
    GS_REPINS = 1, repins, "mwan_datapath_repins_total":
        "Pinned flows moved to another WAN because theirs was no longer alive.";
    GS_HOST_HITS = 2, host_pin_hits, "mwan_datapath_host_pin_hits_total":
        "New flows that reused their LAN host's pin (sticky = \"host\").";
    GS_BYPASS = 3, bypass, "mwan_datapath_bypass_packets_total":
        "Packets to local or connected destinations, never pinned.";
    /// Replies to inbound connections, flows older than mwan.
    GS_MIDSTREAM = 4, midstream_unpinned, "mwan_datapath_midstream_unpinned_total":
        "First packets of TCP flows that were not a SYN, left to the WAN recorded in conntrack or the main table.";
    GS_NO_WAN = 5, no_wan, "mwan_datapath_no_wan_total":
        "New flows while no WAN was eligible (left to the main table or refused by all_down).";
    GS_INSERT_ERRORS = 6, insert_errors, "mwan_datapath_insert_errors_total":
        "Failed flow or host map inserts.";
    /// Not IP: ARP, VLAN-tagged frames on the parent interface. ICMP and
    /// ICMPv6 other than echo requests: Neighbour Discovery, MLD, errors.
    /// IPv6 next headers other than TCP, UDP and ICMPv6 after at most
    /// `MAX_IPV6_EXT_HEADERS` extension headers: ESP, AH, no next header,
    /// unknown ones. Also packets whose headers could not be pulled into
    /// the linear area. The status name predates IPv6.
    GS_PASS = 7, not_ipv4, "mwan_datapath_not_ipv4_packets_total":
        "Packets the classifier leaves alone (a name from before IPv6): not IP (ARP, VLAN-tagged frames), ICMP and ICMPv6 other than echo requests, IPv6 next headers other than TCP, UDP and ICMPv6.";
    /// Restored from conntrack for a reply of an inbound connection, where
    /// br_netfilter runs nftables before tc ingress: left as they are.
    GS_PREMARKED = 8, premarked, "mwan_datapath_premarked_packets_total":
        "First packets of flows that already carried an mwan mark (br_netfilter: restored from conntrack).";
    /// IPv4: version not 4, header length under 20, total length shorter
    /// than the header or longer than the frame. IPv6: version not 6,
    /// payload length beyond the frame, an extension header cut short.
    /// Either: an L4 header cut short. The kernel drops them later.
    GS_MALFORMED = 9, malformed, "mwan_datapath_malformed_packets_total":
        "IPv4 and IPv6 frames with invalid or truncated headers (never pinned).";
    /// Conntrack reassembles them with the first fragment, which is
    /// classified.
    GS_FRAGMENTS = 10, fragments, "mwan_datapath_fragments_total":
        "Non-first IPv4 and IPv6 fragments (never pinned; conntrack reassembles them).";
    /// A lost pin (evicted, deleted, a connection older than mwan or
    /// replicated by an HA pair) is made again from the WAN its connection
    /// records in conntrack.
    GS_CT_PINS = 11, pins_from_conntrack, "mwan_datapath_pins_from_conntrack_total":
        "Flows the flow map did not know whose WAN was read from their conntrack entry (lost pins, connections older than mwan, an HA pair's replicated connections).";
}

// The table is indexed by `GS_*`: entry `i` has index `i`.
const _: () = {
    let mut i = 0;
    while i < COUNTERS.len() {
        assert!(COUNTERS[i].index as usize == i);
        i += 1;
    }
};
