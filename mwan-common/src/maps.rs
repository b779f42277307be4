//! The kernel boundary: every map the datapath and userspace share,
//! declared once in [`for_each_map!`].
//!
//! Each entry gives the map's handle name (a field of userspace's `Maps`),
//! its pinned name, its kind and key and value types as aya-ebpf spells
//! them, its default capacity, whether the config sizes it (`sized by
//! MaxFlows`, `MaxHosts`) and the [`Since`] of the mwan that added it.
//! Shared maps serve both address families; a per-family entry is two
//! maps, the IPv4 one and its IPv6 twin, whose key types are those of
//! [`FamilyKeys`] (`F::FlowKey`, `F::Addr`, `F::DomainKey`).
//!
//! What derives from it:
//! * here: the name constants in [`map`], the table [`MAPS`] (geometry,
//!   sizing, age of every map) and [`map::names`] (one family's names);
//! * `mwan-ebpf`: the `#[map]` statics and a `FamilyMaps` trait giving
//!   each family's per-family maps (`F::flows()`, `F::wans()`, …);
//! * `mwan-user` (`datapath::maps`): the typed handles (`Maps`, one
//!   `FamilyMaps<F>` per family), what is pinned and removed, what the
//!   loader sizes, what the migration compares.
//!
//! **Adding a map** is one entry here (and its value type in `lib.rs` with
//! its layout assertions): shared maps under `shared`, maps with one
//! instance per family under `per_family`, appended at the end of their
//! list, `since` naming the mwan that adds it (a new [`Since`] variant for
//! a new release). Both sides then have the map; the datapath uses it by
//! its static (`NAME`, or `F::field()` per family), userspace by its field
//! (`maps.field`, `maps.v4.field`). Tests compare the object's maps with
//! [`MAPS`] and docs/ARCHITECTURE.md's map table with the names.
//!
//! **A counter** is one entry of the table in [`crate::counters`].
//!
//! A callback (`macro_rules!` taking the two lists) expands where
//! `mwan_common::*` is in scope: the entries name the shared types
//! unqualified.

/// Calls `$callback!` with every map, in two lists:
///
/// ```text
/// shared {
///     /// doc
///     field: NAME = Kind<Key, Value> [capacity] (sized by Sizing)? since Since;
/// }
/// per_family {
///     /// doc
///     field: NAME, NAME6 = Kind<Key, Value> [capacity] (sized by Sizing)? since Since;
/// }
/// ```
///
/// Kinds are aya-ebpf's: `Array<V>`, `PerCpuArray<V>` (keys `u32`),
/// `HashMap<K, V>`, `LruHashMap<K, V>`, `LpmTrie<K, V>` (keys
/// `Key<K>`: a prefix length and `K`). In `per_family`, `F` is the
/// family ([`FamilyKeys`]); `since` is the IPv4 map's, the IPv6 one is
/// never older than [`Since::Ipv6`].
#[macro_export]
macro_rules! for_each_map {
    ($callback:ident) => {
        $callback! {
            shared {
                /// `ABI[0]`: [`ABI_VERSION`] of the maps pinned beside it,
                /// written by userspace when the maps are created. Its own
                /// layout never changes, so any daemon can read it.
                abi: ABI = Array<u32> [1] since AbiMarker;
                /// Per-host pins (`sticky = "host"`), written by the
                /// datapath: one entry per host for both families.
                host_pins: HOST_PINS = LruHashMap<HostKey, HostValue> [65_536]
                    sized by MaxHosts since Ipv6;
                /// WAN id → name (NUL padded), so that a restarted daemon
                /// gives names the ids of the flows it inherits.
                wan_names: WAN_NAMES = Array<WanName> [MAX_WANS] since First;
                /// `SETTINGS[0]`: mark mask, sticky mode, rule count, ….
                settings: SETTINGS = Array<Settings> [1] since First;
                /// Per-CPU traffic counters per WAN id, written by the
                /// datapath.
                wan_stats: WAN_STATS = PerCpuArray<WanCounters> [MAX_WANS] since First;
                /// Per-CPU event counters, indexed by `GS_*`
                /// ([`COUNTERS`]), written by the datapath.
                global_stats: GLOBAL_STATS = PerCpuArray<u64> [GS_COUNT] since First;
                /// Source port (host order) → mask of the rules it matches.
                rule_sport: RULE_SPORT = Array<u64> [65_536] since First;
                /// Destination port (host order) → mask of the rules it
                /// matches.
                rule_dport: RULE_DPORT = Array<u64> [65_536] since First;
                /// IP protocol → mask of the rules it matches.
                rule_proto: RULE_PROTO = Array<u64> [256] since First;
                /// LAN ifindex → mask of the rules naming the interface.
                rule_iface: RULE_IFACE = HashMap<u32, u64> [256] since First;
                /// Rule → the policy its action names.
                rule_action: RULE_ACTION = Array<u32> [MAX_RULES] since First;
                /// WAN ifindex → its [`WanIface`]: the WAN-side program
                /// gives every packet arriving on a WAN that WAN's mark.
                wan_ifaces: WAN_IFACES = HashMap<u32, WanIface> [MAX_WANS] since WanSide;
                /// Per-CPU TCP handshake counters ([`PassiveCounters`]) at
                /// [`passive_index`]`(id, ipv6)`, written by the datapath,
                /// read (and the destination sets cleared) by userspace.
                passive: PASSIVE = PerCpuArray<PassiveCounters> [2 * MAX_WANS] since Passive;
            }
            per_family {
                /// The pins ([`FlowKey`], [`FlowKey6`] → [`FlowValue`]),
                /// written by the datapath.
                flows: FLOWS, FLOWS6 = LruHashMap<F::FlowKey, FlowValue> [262_144]
                    sized by MaxFlows since First;
                /// Mark and `alive` per WAN id. `WANS6[id].alive` says
                /// whether the WAN's IPv6 is usable; the mark is the WAN's
                /// one mark.
                wans: WANS, WANS6 = Array<WanEntry> [MAX_WANS] since First;
                /// The compiled policies (0 = default). `POLICIES6` has the
                /// ids of `POLICIES`, its slots filled from the
                /// IPv6-eligible WANs.
                policies: POLICIES, POLICIES6 = Array<Policy> [MAX_POLICIES] since First;
                /// Source prefix → mask of the rules whose `src` allows it.
                rule_src: RULE_SRC, RULE_SRC6 = LpmTrie<F::Addr, u64> [4096] since First;
                /// Destination prefix → mask of the rules whose `dst`
                /// allows it.
                rule_dst: RULE_DST, RULE_DST6 = LpmTrie<F::Addr, u64> [4096] since First;
                /// Local and connected destinations: never balanced.
                bypass: BYPASS, BYPASS6 = LpmTrie<F::Addr, u8> [4096] since First;
                /// Destination address → mask of the rules by domain name
                /// (bit *i* for rule *i*) whose names resolved to it in a
                /// DNS answer mwan relayed; ORed with `RULE_DST`'s mask on
                /// a flow-map miss. Written and expired by userspace only
                /// ([`DOMAIN_DST_CAPACITY`]).
                domain_dst: DOMAIN_DST, DOMAIN_DST6 = HashMap<F::DomainKey, u64>
                    [DOMAIN_DST_CAPACITY] since DomainRules;
            }
        }
    };
}

/// The key types that differ between the families' maps: the datapath's
/// `Family` trait and userspace's mirror build on it.
///
/// The types are bounded by `'static` only: a `Copy` bound here changes
/// how the compiler inlines the datapath's generic code (the classifier
/// compiled 138 instructions shorter), which is a change of the datapath
/// to measure and verify on its own, not a side effect of this trait.
pub trait FamilyKeys: Sized + 'static {
    /// Whether this is IPv6 (its per-family maps are the `*6` ones).
    const IPV6: bool;
    /// The flow map's key.
    type FlowKey: 'static;
    /// An address as the tries key it (with a prefix length).
    type Addr: 'static;
    /// An address as `DOMAIN_DST` keys it.
    type DomainKey: 'static;
}

/// IPv4.
pub struct V4;
/// IPv6.
pub struct V6;

impl FamilyKeys for V4 {
    const IPV6: bool = false;
    type FlowKey = crate::FlowKey;
    type Addr = [u8; 4];
    type DomainKey = u32;
}

impl FamilyKeys for V6 {
    const IPV6: bool = true;
    type FlowKey = crate::FlowKey6;
    type Addr = [u8; 16];
    type DomainKey = [u8; 16];
}

/// A map's kind: aya-ebpf's type, the kernel's map type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Array,
    PerCpuArray,
    HashMap,
    LruHashMap,
    LpmTrie,
}

impl MapKind {
    /// `BPF_MAP_TYPE_*`.
    pub const fn map_type(self) -> u32 {
        match self {
            MapKind::HashMap => 1,
            MapKind::Array => 2,
            MapKind::PerCpuArray => 6,
            MapKind::LruHashMap => 9,
            MapKind::LpmTrie => 11,
        }
    }

    /// One value per CPU (counters): a value layout change resets them.
    pub const fn per_cpu(self) -> bool {
        matches!(self, MapKind::PerCpuArray)
    }
}

/// The config setting that sizes a map (`max_entries`), instead of its
/// default capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    /// `max_flows`.
    MaxFlows,
    /// `max_hosts`.
    MaxHosts,
}

/// The mwan that added a map, oldest first: pins made by an older one lack
/// it (a daemon creates it when it takes them over; the CLI refuses to
/// read them, naming what the older mwan had not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Since {
    /// The first mwan.
    First,
    /// The layout marker (`ABI`).
    AbiMarker,
    /// Rules by domain name (`DOMAIN_DST`).
    DomainRules,
    /// IPv6 (the `*6` maps) and host pins for both families.
    Ipv6,
    /// The program on the WAN interfaces (`WAN_IFACES`).
    WanSide,
    /// Passive health (`PASSIVE`).
    Passive,
}

impl Since {
    /// What the mwans before this one lacked, for messages.
    pub const fn feature(self) -> &'static str {
        match self {
            Since::First => "maps",
            Since::AbiMarker => "a layout marker",
            Since::DomainRules => "rules by domain name",
            Since::Ipv6 => "IPv6",
            Since::WanSide => "the program on the WAN interfaces",
            Since::Passive => "passive health",
        }
    }

    const fn max(self, other: Since) -> Since {
        if (self as u8) < (other as u8) {
            other
        } else {
            self
        }
    }
}

/// One map as the registry declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    /// As the kernel knows them (an LPM trie's key has its prefix length
    /// first; a per-CPU value is one CPU's).
    pub key_size: u32,
    pub value_size: u32,
    /// The default `max_entries` (the object's).
    pub max_entries: u32,
    pub sized_by: Option<Sizing>,
    pub since: Since,
}

impl MapSpec {
    const EMPTY: MapSpec = MapSpec {
        name: "",
        kind: MapKind::Array,
        key_size: 0,
        value_size: 0,
        max_entries: 0,
        sized_by: None,
        since: Since::First,
    };
}

/// `(key_size, value_size)` of a map of `$kind<$params>`.
#[doc(hidden)]
#[macro_export]
macro_rules! __map_sizes {
    (Array<$v:ty>) => {
        (4, ::core::mem::size_of::<$v>())
    };
    (PerCpuArray<$v:ty>) => {
        (4, ::core::mem::size_of::<$v>())
    };
    (HashMap<$k:ty, $v:ty>) => {
        (::core::mem::size_of::<$k>(), ::core::mem::size_of::<$v>())
    };
    (LruHashMap<$k:ty, $v:ty>) => {
        (::core::mem::size_of::<$k>(), ::core::mem::size_of::<$v>())
    };
    (LpmTrie<$k:ty, $v:ty>) => {
        (
            4 + ::core::mem::size_of::<$k>(),
            ::core::mem::size_of::<$v>(),
        )
    };
}

macro_rules! sizing {
    () => {
        None
    };
    ($sz:ident) => {
        Some(Sizing::$sz)
    };
}

macro_rules! map_spec {
    ($name:expr, $kind:ident<$($p:ty),+>, $cap:expr, $(sized by $sz:ident)?, $since:expr) => {{
        let (key_size, value_size) = crate::__map_sizes!($kind<$($p),+>);
        MapSpec {
            name: $name,
            kind: MapKind::$kind,
            key_size: key_size as u32,
            value_size: value_size as u32,
            max_entries: $cap,
            sized_by: sizing!($($sz)?),
            since: $since,
        }
    }};
}

macro_rules! registry_items {
    (
        shared { $(
            $(#[$sattr:meta])*
            $sfield:ident: $sname:ident = $skind:ident<$($sp:ty),+> [$scap:expr]
                $(sized by $ssz:ident)? since $ssince:ident;
        )* }
        per_family { $(
            $(#[$attr:meta])*
            $field:ident: $name4:ident, $name6:ident = $kind:ident<$($p:ty),+> [$cap:expr]
                $(sized by $sz:ident)? since $since:ident;
        )* }
    ) => {
        /// The pinned names of the maps ([`for_each_map!`]), and of the
        /// maps older versions pinned.
        pub mod map {
            use super::*;
            $( $(#[$sattr])* pub const $sname: &str = stringify!($sname); )*
            $(
                $(#[$attr])* pub const $name4: &str = stringify!($name4);
                $(#[$attr])* pub const $name6: &str = stringify!($name6);
            )*
            /// The pre-IPv6 per-host pins (IPv4 address → [`HostValue`]).
            /// No longer in the object: a daemon that inherits it copies
            /// its entries into [`HOST_PINS`] as address keys and removes
            /// the pin.
            pub const HOSTS: &str = "HOSTS";
            /// Maps older versions pinned that this one no longer has.
            pub const LEGACY: [&str; 1] = [HOSTS];

            /// One family's per-family maps, by name.
            #[derive(Clone, Copy, Debug)]
            pub struct FamilyNames {
                $( pub $field: &'static str, )*
            }

            /// Family `F`'s map names.
            pub const fn names<F: FamilyKeys>() -> FamilyNames {
                if F::IPV6 {
                    FamilyNames { $( $field: $name6, )* }
                } else {
                    FamilyNames { $( $field: $name4, )* }
                }
            }
        }

        const SHARED: [MapSpec; [$(stringify!($sname)),*].len()] = [$(
            map_spec!(map::$sname, $skind<$($sp),+>, $scap, $(sized by $ssz)?, Since::$ssince),
        )*];

        const PER_FAMILY: usize = [$(stringify!($field)),*].len();

        const fn family_specs<F: FamilyKeys>() -> [MapSpec; PER_FAMILY] {
            let names = map::names::<F>();
            [$({
                let since = if F::IPV6 {
                    Since::$since.max(Since::Ipv6)
                } else {
                    Since::$since
                };
                map_spec!(names.$field, $kind<$($p),+>, $cap, $(sized by $sz)?, since)
            },)*]
        }
    };
}

use crate::*;
for_each_map!(registry_items);

/// Every map mwan pins: the shared ones, then IPv4's, then IPv6's.
pub const MAPS: [MapSpec; SHARED.len() + 2 * PER_FAMILY] = {
    let v4 = family_specs::<V4>();
    let v6 = family_specs::<V6>();
    let mut out = [MapSpec::EMPTY; SHARED.len() + 2 * PER_FAMILY];
    let mut i = 0;
    while i < out.len() {
        out[i] = if i < SHARED.len() {
            SHARED[i]
        } else if i < SHARED.len() + PER_FAMILY {
            v4[i - SHARED.len()]
        } else {
            v6[i - SHARED.len() - PER_FAMILY]
        };
        i += 1;
    }
    out
};

impl MapSpec {
    /// The registry's entry for the map pinned as `name`.
    pub fn of(name: &str) -> Option<&'static MapSpec> {
        MAPS.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_families_pair_up() {
        for (i, a) in MAPS.iter().enumerate() {
            assert!(MAPS[i + 1..].iter().all(|b| b.name != a.name), "{}", a.name);
        }
        assert_eq!(map::names::<V4>().flows, "FLOWS");
        assert_eq!(map::names::<V6>().domain_dst, "DOMAIN_DST6");
        let flows6 = MapSpec::of(map::FLOWS6).unwrap();
        assert_eq!((flows6.key_size, flows6.value_size), (40, 40));
        assert_eq!(flows6.sized_by, Some(Sizing::MaxFlows));
        assert_eq!(flows6.since, Since::Ipv6);
        assert_eq!(
            MapSpec::of(map::DOMAIN_DST).unwrap().since,
            Since::DomainRules
        );
        assert_eq!(MapSpec::of(map::RULE_SRC6).unwrap().key_size, 4 + 16);
        assert_eq!(
            MapSpec::of(map::GLOBAL_STATS).unwrap().max_entries,
            GS_COUNT
        );
    }
}
