//! Typed handles on the datapath's maps, from the registry
//! (`mwan_common::for_each_map!`), and their readers and writers.
//!
//! [`Maps`] holds the shared maps by their registry field and each
//! family's own in a [`FamilyMaps<F>`] (`maps.v4`, `maps.v6`): code that
//! differs only by family is written once, generic over [`MapFamily`] (the
//! mirror of the datapath's `Family` trait), and `Maps` dispatches on
//! [`Family`].

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::{Deref, DerefMut};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues};
use aya::Pod;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use mwan_common::*;

use super::{migrate, open_pinned_map, AnyFlowKey, EBPF_OBJ};
use crate::config::Config;
use crate::dns::learned::{Change, LearnedSink};
use crate::family::Family;
use crate::policy::CompiledRules;

/// A map handle with the name its map is pinned as (for messages).
pub struct Named<H> {
    pub name: &'static str,
    handle: H,
}

impl<H> Deref for Named<H> {
    type Target = H;
    fn deref(&self) -> &H {
        &self.handle
    }
}

impl<H> DerefMut for Named<H> {
    fn deref_mut(&mut self) -> &mut H {
        &mut self.handle
    }
}

/// The map `name` as a typed handle.
fn typed<H: TryFrom<Map>>(map: Map, name: &'static str) -> Result<Named<H>>
where
    H::Error: std::fmt::Display,
{
    let handle = H::try_from(map).map_err(|e| anyhow!("map {name}: {e}"))?;
    Ok(Named { name, handle })
}

/// What userspace needs of an address family's maps, as the datapath's
/// `Family` trait: the key types (as aya handles them) and how addresses
/// and prefixes become keys.
pub trait MapFamily: FamilyKeys<FlowKey: Pod + Eq, Addr: Pod, DomainKey: Pod> {
    const FAMILY: Family;
    /// A prefix of this family, as the tries key it.
    type Net: TrieNet<Data = Self::Addr>;
    fn any_flow(k: Self::FlowKey) -> AnyFlowKey;
    /// `k` if it is of this family.
    fn flow_key(k: &AnyFlowKey) -> Option<Self::FlowKey>;
    /// `DOMAIN_DST`'s key for `a`, if it is of this family.
    fn domain_key(a: &IpAddr) -> Option<Self::DomainKey>;
}

impl MapFamily for V4 {
    const FAMILY: Family = Family::Ipv4;
    type Net = Ipv4Net;
    fn any_flow(k: FlowKey) -> AnyFlowKey {
        AnyFlowKey::V4(k)
    }
    fn flow_key(k: &AnyFlowKey) -> Option<FlowKey> {
        match k {
            AnyFlowKey::V4(k) => Some(*k),
            AnyFlowKey::V6(_) => None,
        }
    }
    fn domain_key(a: &IpAddr) -> Option<u32> {
        match a {
            IpAddr::V4(a) => Some(u32::from_ne_bytes(a.octets())),
            IpAddr::V6(_) => None,
        }
    }
}

impl MapFamily for V6 {
    const FAMILY: Family = Family::Ipv6;
    type Net = Ipv6Net;
    fn any_flow(k: FlowKey6) -> AnyFlowKey {
        AnyFlowKey::V6(k)
    }
    fn flow_key(k: &AnyFlowKey) -> Option<FlowKey6> {
        match k {
            AnyFlowKey::V6(k) => Some(*k),
            AnyFlowKey::V4(_) => None,
        }
    }
    fn domain_key(a: &IpAddr) -> Option<[u8; 16]> {
        match a {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        }
    }
}

/// aya's handle for a map of the registry's kind (an LRU hash is a hash
/// to userspace).
macro_rules! handle {
    (Array<$v:ty>) => { Array<MapData, $v> };
    (PerCpuArray<$v:ty>) => { PerCpuArray<MapData, $v> };
    (HashMap<$k:ty, $v:ty>) => { HashMap<MapData, $k, $v> };
    (LruHashMap<$k:ty, $v:ty>) => { HashMap<MapData, $k, $v> };
    (LpmTrie<$k:ty, $v:ty>) => { LpmTrie<MapData, $k, $v> };
}

/// [`Maps`] and [`FamilyMaps`] with a field per map of the registry.
macro_rules! user_maps {
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
        /// Typed handles on every map, whether taken from a loaded object
        /// (daemon) or opened from the pins (CLI).
        pub struct Maps {
            $( $(#[$sattr])* pub $sfield: Named<handle!($skind<$($sp),+>)>, )*
            pub v4: FamilyMaps<V4>,
            pub v6: FamilyMaps<V6>,
            /// `DOMAIN_DST`/`DOMAIN_DST6` are lent to their writer (the
            /// DNS relay): these handles write nothing until they are given
            /// back.
            domain_lent: bool,
        }

        /// Typed handles on one family's own maps.
        pub struct FamilyMaps<F: MapFamily> {
            $( $(#[$attr])* pub $field: Named<handle!($kind<$($p),+>)>, )*
            family: PhantomData<F>,
        }

        impl Maps {
            /// Takes every map by name from `take`.
            fn build(mut take: impl FnMut(&'static str) -> Result<Map>) -> Result<Maps> {
                Ok(Maps {
                    $( $sfield: typed(take(map::$sname)?, map::$sname)?, )*
                    v4: FamilyMaps::build(&mut take)?,
                    v6: FamilyMaps::build(&mut take)?,
                    domain_lent: false,
                })
            }
        }

        impl<F: MapFamily> FamilyMaps<F> {
            fn build(take: &mut impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
                let names = map::names::<F>();
                Ok(FamilyMaps {
                    $( $field: typed(take(names.$field)?, names.$field)?, )*
                    family: PhantomData,
                })
            }
        }
    };
}

for_each_map!(user_maps);

impl Maps {
    /// The maps of the object the daemon loaded (taken out of it).
    pub(super) fn take_from(ebpf: &mut aya::Ebpf) -> Result<Maps> {
        Maps::build(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        })
    }

    /// Opens the maps pinned by a daemon (for the CLI: no program is
    /// loaded). Pins made by an older mwan, without the maps this one
    /// reads, are refused with what the older one lacked.
    pub fn open_pinned(pin_dir: &Path) -> Result<Maps> {
        let pinned_before = MAPS
            .iter()
            .any(|m| m.since == Since::First && pin_dir.join(m.name).exists());
        let maps = Maps::build(|name| {
            let path = pin_dir.join(name);
            let since = MapSpec::of(name).map_or(Since::First, |m| m.since);
            if pinned_before && since > Since::First && !path.exists() {
                bail!(
                    "the maps in {} were pinned by an mwan without {} (no {name}); \
                     restart the daemon with this mwan",
                    pin_dir.display(),
                    since.feature()
                );
            }
            let data = open_pinned_map(pin_dir, name)?;
            Map::from_map_data(data).map_err(|e| anyhow!("{}: {e}", path.display()))
        })?;
        check_abi(pin_dir)?;
        Ok(maps)
    }

    pub fn settings(&self) -> Result<Settings> {
        Ok(self.settings.get(&0, 0)?)
    }

    fn write_settings(&mut self, s: &Settings) -> Result<()> {
        self.settings
            .set(0, s, 0)
            .with_context(|| format!("writing {}", self.settings.name))
    }

    /// WAN `id`'s entry of family `f` (IPv6: `alive` says whether its IPv6
    /// is usable; the mark is the WAN's one mark).
    pub fn wan(&self, f: Family, id: u8) -> Result<WanEntry> {
        match f {
            Family::Ipv4 => self.v4.wan(id),
            Family::Ipv6 => self.v6.wan(id),
        }
    }

    pub fn write_wan(&mut self, f: Family, id: u8, entry: WanEntry) -> Result<()> {
        match f {
            Family::Ipv4 => self.v4.write_wan(id, entry),
            Family::Ipv6 => self.v6.write_wan(id, entry),
        }
    }

    /// Policy `i` of family `f`.
    pub fn policy(&self, f: Family, i: u32) -> Result<Policy> {
        match f {
            Family::Ipv4 => self.v4.policy(i),
            Family::Ipv6 => self.v6.policy(i),
        }
    }

    /// Writes every policy of family `f` (the same ids in both families,
    /// slots from the WANs eligible for that family).
    pub fn write_policies(&mut self, f: Family, policies: &[Policy]) -> Result<()> {
        match f {
            Family::Ipv4 => self.v4.write_policies(policies),
            Family::Ipv6 => self.v6.write_policies(policies),
        }
    }

    /// Makes family `f`'s bypass trie hold exactly `prefixes` (all of
    /// family `f`).
    pub fn write_bypass(&mut self, f: Family, prefixes: &[IpNet]) -> Result<()> {
        match f {
            Family::Ipv4 => self.v4.write_bypass(prefixes),
            Family::Ipv6 => self.v6.write_bypass(prefixes),
        }
    }

    /// WAN names by id, as the daemon that owns the pins recorded them.
    /// WAN interface `ifindex`'s entry of `WAN_IFACES`.
    pub fn write_wan_iface(&mut self, ifindex: u32, w: WanIface) -> Result<()> {
        let name = self.wan_ifaces.name;
        self.wan_ifaces
            .insert(ifindex, w, 0)
            .with_context(|| format!("writing {name}[{ifindex}]"))
    }

    /// Removes WAN interface `ifindex` from `WAN_IFACES` (no error if it is
    /// not there).
    pub fn remove_wan_iface(&mut self, ifindex: u32) -> Result<()> {
        let name = self.wan_ifaces.name;
        match self.wan_ifaces.remove(&ifindex) {
            Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(e) => Err(anyhow!("removing {name}[{ifindex}]: {e}")),
        }
    }

    pub fn names(&self) -> Result<Vec<Option<String>>> {
        (0..MAX_WANS)
            .map(|i| {
                let n = self.wan_names.get(&i, 0)?;
                let len = n.name.iter().position(|b| *b == 0).unwrap_or(WAN_NAME_LEN);
                Ok((len > 0).then(|| String::from_utf8_lossy(&n.name[..len]).into_owned()))
            })
            .collect()
    }

    pub fn write_name(&mut self, id: u8, name: Option<&str>) -> Result<()> {
        let mut n = WanName::default();
        if let Some(name) = name {
            let b = name.as_bytes();
            if b.len() >= WAN_NAME_LEN {
                bail!("WAN name `{name}` is too long");
            }
            n.name[..b.len()].copy_from_slice(b);
        }
        let table = self.wan_names.name;
        self.wan_names
            .set(id as u32, n, 0)
            .with_context(|| format!("writing {table}[{id}]"))
    }

    /// Writes the rule maps. `previous` (what the maps hold now, if known)
    /// limits the port arrays to the entries that change. The caller then
    /// sets `Settings::rule_count`, which switches matching on.
    fn write_rules(
        &mut self,
        rules: &CompiledRules,
        previous: Option<&CompiledRules>,
        ifindex: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<()> {
        for (map, want, before) in [
            (
                &mut self.rule_proto,
                &rules.proto,
                previous.map(|p| &p.proto),
            ),
            (
                &mut self.rule_sport,
                &rules.sport,
                previous.map(|p| &p.sport),
            ),
            (
                &mut self.rule_dport,
                &rules.dport,
                previous.map(|p| &p.dport),
            ),
        ] {
            for (i, v) in want.iter().enumerate() {
                if before.is_some_and(|b| b[i] == *v) {
                    continue;
                }
                let name = map.name;
                map.set(i as u32, *v, 0)
                    .with_context(|| format!("writing {name}[{i}]"))?;
            }
        }
        self.v4.write_rule_tries(&rules.src, &rules.dst)?;
        self.v6.write_rule_tries(&rules.src6, &rules.dst6)?;
        let mut want_iface = BTreeMap::new();
        for (name, mask) in &rules.iface {
            if let Some(idx) = ifindex(name) {
                want_iface.insert(idx, *mask);
            }
        }
        let stale: Vec<u32> = self
            .rule_iface
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !want_iface.contains_key(k))
            .collect();
        for k in stale {
            let _ = self.rule_iface.remove(&k);
        }
        let (iface, action) = (self.rule_iface.name, self.rule_action.name);
        for (k, v) in want_iface {
            self.rule_iface
                .insert(k, v, 0)
                .with_context(|| format!("writing {iface}[{k}]"))?;
        }
        for (i, a) in rules.actions.iter().enumerate() {
            self.rule_action
                .set(i as u32, *a, 0)
                .with_context(|| format!("writing {action}[{i}]"))?;
        }
        Ok(())
    }

    /// Writes SETTINGS for `cfg` and the rule maps for `rules` (compiled from
    /// `cfg`). `previous` is what the rule maps hold now, if known: equal
    /// rules are not written again. Rules are written with matching switched
    /// off (`rule_count` 0), then switched on: a half-written rule set is
    /// never used.
    pub fn write_rules_and_settings(
        &mut self,
        cfg: &Config,
        rules: &CompiledRules,
        previous: Option<&CompiledRules>,
        ifindex: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<()> {
        // A rule turned on or off by its schedule changes its bit in the
        // protocol masks only: each entry is written whole, and every
        // state in between is a valid rule set, so matching stays on.
        let schedule_only = previous.is_some_and(|p| {
            let mut p = p.clone();
            p.proto.clone_from(&rules.proto);
            p.active.clone_from(&rules.active);
            p == *rules
        });
        if previous != Some(rules) {
            if !schedule_only {
                self.write_settings(&super::settings(cfg, rules, 0))?;
            }
            self.write_rules(rules, previous, ifindex)?;
        }
        self.write_settings(&super::settings(cfg, rules, rules.count))
    }

    /// Applies changes of the learned-address table
    /// ([`crate::dns::learned`]) to `DOMAIN_DST` and `DOMAIN_DST6`: a new
    /// mask, or a deletion (tests; the daemon lends the maps to the DNS
    /// relay, see [`Maps::lend_domain_dst`]).
    pub fn write_domain_dst(&mut self, changes: &[Change]) -> Result<()> {
        if self.domain_lent {
            bail!("DOMAIN_DST is lent to the DNS relay");
        }
        for (addr, mask) in changes {
            match Family::of(addr) {
                Family::Ipv4 => write_domain::<V4>(&mut self.v4.domain_dst, addr, *mask)?,
                Family::Ipv6 => write_domain::<V6>(&mut self.v6.domain_dst, addr, *mask)?,
            }
        }
        Ok(())
    }

    /// Empties `DOMAIN_DST` and `DOMAIN_DST6` (a start: what another daemon
    /// learned has no expiry record here, and its masks index that daemon's
    /// rules). Nothing to do while they are lent: their writer emptied them
    /// when it took them.
    pub fn clear_domain_dst(&mut self) -> Result<()> {
        if !self.domain_lent {
            clear_hash(&mut self.v4.domain_dst);
            clear_hash(&mut self.v6.domain_dst);
        }
        Ok(())
    }

    /// Lends the learned destinations to their one writer while it runs
    /// (the DNS relay, which learns and expires them): until
    /// [`Maps::give_back_domain_dst`], these handles neither write nor
    /// clear them. `pin_dir`: where they are pinned.
    pub fn lend_domain_dst(&mut self, pin_dir: &Path) -> Result<DomainMaps> {
        if self.domain_lent {
            bail!("DOMAIN_DST is lent already");
        }
        let d = DomainMaps::open_pinned(pin_dir)?;
        self.domain_lent = true;
        Ok(d)
    }

    /// The learned destinations are this handle's again.
    pub fn give_back_domain_dst(&mut self, d: DomainMaps) {
        drop(d);
        self.domain_lent = false;
    }

    /// Per-WAN counters summed over CPUs, by WAN id.
    pub fn wan_counters(&self) -> Result<Vec<WanCounters>> {
        (0..MAX_WANS)
            .map(|i| {
                let per_cpu = self.wan_stats.get(&i, 0)?;
                Ok(per_cpu
                    .iter()
                    .fold(WanCounters::default(), |a, c| WanCounters {
                        packets: a.packets + c.packets,
                        bytes: a.bytes + c.bytes,
                        flows: a.flows + c.flows,
                    }))
            })
            .collect()
    }

    /// WAN `id`'s handshake counters of family `f` summed over CPUs, their
    /// destination sets ORed; the sets are cleared (they hold what came
    /// since the previous read). A datapath update between the read and
    /// the clear may be lost: the counters are statistics.
    pub fn take_passive(&mut self, f: Family, id: u8) -> Result<PassiveCounters> {
        let i = passive_index(id as u32, f == Family::Ipv6);
        let per_cpu = self.passive.get(&i, 0)?;
        let sum = sum_passive(&per_cpu);
        if sum.syn_dsts | sum.answered_dsts != 0 {
            let cleared: Vec<PassiveCounters> = per_cpu
                .iter()
                .map(|c| PassiveCounters {
                    syn_dsts: 0,
                    answered_dsts: 0,
                    ..*c
                })
                .collect();
            self.passive.set(i, PerCpuValues::try_from(cleared)?, 0)?;
        }
        Ok(sum)
    }

    /// WAN `id`'s handshake counters of family `f` summed over CPUs (the
    /// destination sets left as they are).
    pub fn passive_counters(&self, f: Family, id: u8) -> Result<PassiveCounters> {
        let i = passive_index(id as u32, f == Family::Ipv6);
        Ok(sum_passive(&self.passive.get(&i, 0)?))
    }

    /// `GLOBAL_STATS` summed over CPUs, by index (see [`COUNTERS`]).
    pub fn global_counters(&self) -> Result<Vec<u64>> {
        (0..GS_COUNT)
            .map(|i| Ok(self.global_stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// Every pinned flow of both families, IPv4 first.
    pub fn flows(&self) -> Result<Vec<(AnyFlowKey, FlowValue)>> {
        let mut out = self.v4.flows()?;
        out.extend(self.v6.flows()?);
        Ok(out)
    }

    /// The pin of flow `k`.
    pub fn flow(&self, k: &AnyFlowKey) -> Result<FlowValue> {
        match k.family() {
            Family::Ipv4 => self.v4.flow(k),
            Family::Ipv6 => self.v6.flow(k),
        }
    }

    /// Pins flow `k` as `v`.
    pub fn write_flow(&mut self, k: &AnyFlowKey, v: FlowValue) -> Result<()> {
        match k.family() {
            Family::Ipv4 => self.v4.write_flow(k, v),
            Family::Ipv6 => self.v6.write_flow(k, v),
        }
    }

    /// Removes every pin of both families.
    pub fn clear_flows(&mut self) {
        clear_hash(&mut self.v4.flows);
        clear_hash(&mut self.v6.flows);
    }
}

impl<F: MapFamily> FamilyMaps<F> {
    fn wan(&self, id: u8) -> Result<WanEntry> {
        Ok(self.wans.get(&(id as u32), 0)?)
    }

    fn write_wan(&mut self, id: u8, entry: WanEntry) -> Result<()> {
        let name = self.wans.name;
        self.wans
            .set(id as u32, entry, 0)
            .with_context(|| format!("writing {name}[{id}]"))
    }

    fn policy(&self, i: u32) -> Result<Policy> {
        Ok(self.policies.get(&i, 0)?)
    }

    /// Writes every entry (missing ones empty).
    fn write_policies(&mut self, policies: &[Policy]) -> Result<()> {
        let name = self.policies.name;
        for i in 0..MAX_POLICIES {
            let p = policies.get(i as usize).copied().unwrap_or(Policy::EMPTY);
            self.policies
                .set(i, p, 0)
                .with_context(|| format!("writing {name}[{i}]"))?;
        }
        Ok(())
    }

    fn write_bypass(&mut self, prefixes: &[IpNet]) -> Result<()> {
        let name = self.bypass.name;
        let want = prefixes
            .iter()
            .map(|p| match F::Net::of(&p.trunc()) {
                Some(n) => Ok((n, 1u8)),
                None => Err(anyhow!("{name}: {p} is not an {} prefix", F::FAMILY)),
            })
            .collect::<Result<_>>()?;
        sync_trie(&mut self.bypass, want)
    }

    fn write_rule_tries(&mut self, src: &[(F::Net, u64)], dst: &[(F::Net, u64)]) -> Result<()> {
        sync_trie(&mut self.rule_src, src.iter().copied().collect())?;
        sync_trie(&mut self.rule_dst, dst.iter().copied().collect())
    }

    fn flows(&self) -> Result<Vec<(AnyFlowKey, FlowValue)>> {
        self.flows
            .iter()
            .map(|kv| kv.map(|(k, v)| (F::any_flow(k), v)).map_err(Into::into))
            .collect()
    }

    fn flow(&self, k: &AnyFlowKey) -> Result<FlowValue> {
        let key = F::flow_key(k).ok_or_else(|| anyhow!("{k:?} is not an {} flow", F::FAMILY))?;
        Ok(self.flows.get(&key, 0)?)
    }

    fn write_flow(&mut self, k: &AnyFlowKey, v: FlowValue) -> Result<()> {
        let key = F::flow_key(k).ok_or_else(|| anyhow!("{k:?} is not an {} flow", F::FAMILY))?;
        Ok(self.flows.insert(key, v, 0)?)
    }
}

/// Whether map `name` is missing from `pin_dir` because an mwan that
/// predates it made the pins.
pub(super) fn predates(pin_dir: &Path, name: &str) -> bool {
    !pin_dir.join(name).exists() && MapSpec::of(name).is_some_and(|m| m.since > Since::First)
}

/// Opens family `F`'s flow map as pinned in `pin_dir`, `None` when an
/// mwan that predates it made the pins.
pub(super) fn open_flows<F: MapFamily>(pin_dir: &Path) -> Result<Option<FlowMap<F>>> {
    let name = map::names::<F>().flows;
    if predates(pin_dir, name) {
        return Ok(None);
    }
    let data = open_pinned_map(pin_dir, name)?;
    typed(Map::LruHashMap(data), name).map(Some)
}

/// Family `F`'s flow map (`FamilyMaps::flows`).
pub type FlowMap<F> = Named<HashMap<MapData, <F as FamilyKeys>::FlowKey, FlowValue>>;

/// Family `F`'s learned destinations (`FamilyMaps::domain_dst`).
pub type DomainMap<F> = Named<HashMap<MapData, <F as FamilyKeys>::DomainKey, u64>>;

/// The learned destinations of rules by domain name, lent to the DNS
/// relay while it runs ([`Maps::lend_domain_dst`]): `DOMAIN_DST` (IPv4, from A records) and `DOMAIN_DST6` (IPv6,
/// from AAAA records).
pub struct DomainMaps {
    v4: DomainMap<V4>,
    v6: DomainMap<V6>,
}

impl DomainMaps {
    /// Opens the pair pinned in `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<DomainMaps> {
        fn open<F: MapFamily>(pin_dir: &Path) -> Result<DomainMap<F>> {
            let name = map::names::<F>().domain_dst;
            typed(Map::HashMap(open_pinned_map(pin_dir, name)?), name)
        }
        Ok(DomainMaps {
            v4: open::<V4>(pin_dir)?,
            v6: open::<V6>(pin_dir)?,
        })
    }
}

/// The relay's sink: a new mask, or a deletion; one `bpf()` call each, so
/// when it returns the classifier's next lookup sees it (and the answer
/// may be released).
impl LearnedSink for DomainMaps {
    fn apply(&mut self, changes: &[Change]) -> Result<()> {
        for (addr, mask) in changes {
            match Family::of(addr) {
                Family::Ipv4 => write_domain::<V4>(&mut self.v4, addr, *mask)?,
                Family::Ipv6 => write_domain::<V6>(&mut self.v6, addr, *mask)?,
            }
        }
        Ok(())
    }

    fn clear(&mut self) -> Result<()> {
        clear_hash(&mut self.v4);
        clear_hash(&mut self.v6);
        Ok(())
    }
}

/// Sets `addr`'s mask in `map`, or (`None`) removes it if present.
fn write_domain<F: MapFamily>(
    map: &mut DomainMap<F>,
    addr: &IpAddr,
    mask: Option<u64>,
) -> Result<()> {
    let name = map.name;
    let key = F::domain_key(addr).ok_or_else(|| anyhow!("{name}: {addr} is not {}", F::FAMILY))?;
    let done = match mask {
        Some(m) => map.insert(key, m, 0),
        None => match map.remove(&key) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            r => r,
        },
    };
    done.with_context(|| format!("writing {name}[{addr}]"))
}

/// Removes every entry of a hash map.
fn clear_hash<K: Pod, V: Pod>(map: &mut HashMap<MapData, K, V>) {
    let keys: Vec<K> = map.keys().filter_map(|k| k.ok()).collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// For the CLI: refuses maps of another layout version (the daemon
/// checks every map's geometry too, see [`migrate`]).
fn check_abi(pin_dir: &Path) -> Result<()> {
    let want = migrate::expected(EBPF_OBJ, &[])?;
    let plan = migrate::Plan::read(pin_dir, &want)?;
    if let migrate::Stored::Marker(v) | migrate::Stored::Settings(v) = plan.stored {
        if v != ABI_VERSION {
            bail!(
                "the maps pinned in {} were made by an mwan with map layout {v} (this one uses {}); \
                 use the mwan that made them, or run `mwan stop --teardown` first",
                pin_dir.display(),
                ABI_VERSION
            );
        }
    }
    Ok(())
}

/// A prefix as an LPM trie of its family keys it.
pub trait TrieNet: Ord + Copy + std::fmt::Display {
    type Data: Pod;
    fn key(&self) -> Key<Self::Data>;
    fn from_key(k: &Key<Self::Data>) -> Option<Self>;
    /// `n` if it is of this family.
    fn of(n: &IpNet) -> Option<Self>;
}

impl TrieNet for Ipv4Net {
    type Data = [u8; 4];
    fn key(&self) -> Key<[u8; 4]> {
        Key::new(self.prefix_len() as u32, self.network().octets())
    }
    fn from_key(k: &Key<[u8; 4]>) -> Option<Self> {
        Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8).ok()
    }
    fn of(n: &IpNet) -> Option<Self> {
        match n {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        }
    }
}

impl TrieNet for Ipv6Net {
    type Data = [u8; 16];
    fn key(&self) -> Key<[u8; 16]> {
        Key::new(self.prefix_len() as u32, self.network().octets())
    }
    fn from_key(k: &Key<[u8; 16]>) -> Option<Self> {
        Ipv6Net::new(Ipv6Addr::from(k.data()), k.prefix_len() as u8).ok()
    }
    fn of(n: &IpNet) -> Option<Self> {
        match n {
            IpNet::V6(n) => Some(*n),
            IpNet::V4(_) => None,
        }
    }
}

/// Makes `trie` hold exactly `want`.
fn sync_trie<N: TrieNet, V: Pod + PartialEq>(
    trie: &mut Named<LpmTrie<MapData, N::Data, V>>,
    want: BTreeMap<N, V>,
) -> Result<()> {
    let present: Vec<Key<N::Data>> = trie.keys().filter_map(|k| k.ok()).collect();
    for k in present {
        if N::from_key(&k).is_none_or(|n| !want.contains_key(&n)) {
            let _ = trie.remove(&k);
        }
    }
    let name = trie.name;
    for (net, v) in want {
        trie.insert(&net.key(), v, 0)
            .with_context(|| format!("writing {name}[{net}]"))?;
    }
    Ok(())
}

/// Per-CPU handshake counters summed, their destination sets ORed.
fn sum_passive(per_cpu: &PerCpuValues<PassiveCounters>) -> PassiveCounters {
    per_cpu
        .iter()
        .fold(PassiveCounters::default(), |a, c| PassiveCounters {
            syns: a.syns + c.syns,
            answered: a.answered + c.answered,
            retransmits: a.retransmits + c.retransmits,
            handshake_ns: a.handshake_ns + c.handshake_ns,
            syn_dsts: a.syn_dsts | c.syn_dsts,
            answered_dsts: a.answered_dsts | c.answered_dsts,
            timed: a.timed + c.timed,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/ARCHITECTURE.md's map table names every map of the registry,
    /// and its counter list every counter.
    #[test]
    fn architecture_md_lists_every_map_and_counter() {
        let doc = include_str!("../../../docs/ARCHITECTURE.md");
        let section = doc
            .split("## Maps (mwan-common)")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("a map section");
        for m in MAPS {
            assert!(
                section.contains(&format!("| `{}`", m.name))
                    || section.contains(&format!(", `{}` |", m.name)),
                "docs/ARCHITECTURE.md's map table lacks {}",
                m.name
            );
        }
        for c in COUNTERS {
            assert!(
                doc.contains(&format!("`{}`", c.name)),
                "docs/ARCHITECTURE.md lacks the counter {}",
                c.name
            );
        }
    }

    #[test]
    fn prefixes_of_the_other_family_are_refused() {
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert_eq!(<Ipv4Net as TrieNet>::of(&v6), None);
        assert!(<Ipv6Net as TrieNet>::of(&v6).is_some());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(V4::domain_key(&a), Some(u32::from_ne_bytes([192, 0, 2, 1])));
        assert_eq!(V6::domain_key(&a), None);
    }
}
