//! The eBPF datapath from userspace: loading the embedded object with its maps
//! pinned in `pin_dir`, attaching the classifier to LAN interfaces, writing
//! the configuration maps and reading the state maps.
//!
//! Lifetime: maps are pinned, tc filters are attached through netlink
//! (`cls_bpf`), so both outlive the daemon. A new daemon reuses the pinned
//! maps (the flows survive) and replaces the filters without a gap: the new
//! program is attached at the other of two priorities before the old filter is
//! removed (`Datapath::attach`). Pinned maps are compared with the object
//! before they are reused; a map of another size is replaced and its entries
//! migrated, another layout is refused ([`migrate`]).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use aya::programs::links::Link;
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use mwan_common::*;

use crate::config::{Config, Sticky, StickyKey};
use crate::family::Family;
use crate::policy::CompiledRules;

mod migrate;
mod raw;
pub use migrate::{pinned_geometry, Geometry};

/// The datapath object, built from `mwan-ebpf` by build.rs.
static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mwan.bpf.o"));

/// The embedded datapath object (for measurements that load it alone).
pub fn object() -> &'static [u8] {
    EBPF_OBJ
}

/// The two tc priorities mwan alternates between when it replaces its filter.
pub const TC_PRIORITIES: [u16; 2] = [0x6d00, 0x6d01];
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Typed handles on every map, whether taken from a loaded object (daemon) or
/// opened from the pins (CLI).
pub struct Maps {
    pub flows: HashMap<MapData, FlowKey, FlowValue>,
    pub flows6: HashMap<MapData, FlowKey6, FlowValue>,
    pub host_pins: HashMap<MapData, HostKey, HostValue>,
    pub wans: Array<MapData, WanEntry>,
    pub wans6: Array<MapData, WanEntry>,
    pub names: Array<MapData, WanName>,
    pub policies: Array<MapData, Policy>,
    pub policies6: Array<MapData, Policy>,
    pub settings: Array<MapData, Settings>,
    pub wan_stats: PerCpuArray<MapData, WanCounters>,
    pub global_stats: PerCpuArray<MapData, u64>,
    pub rule_src: LpmTrie<MapData, [u8; 4], u64>,
    pub rule_dst: LpmTrie<MapData, [u8; 4], u64>,
    pub rule_src6: LpmTrie<MapData, [u8; 16], u64>,
    pub rule_dst6: LpmTrie<MapData, [u8; 16], u64>,
    pub rule_sport: Array<MapData, u64>,
    pub rule_dport: Array<MapData, u64>,
    pub rule_proto: Array<MapData, u64>,
    pub rule_iface: HashMap<MapData, u32, u64>,
    pub rule_action: Array<MapData, u32>,
    pub bypass: LpmTrie<MapData, [u8; 4], u8>,
    pub bypass6: LpmTrie<MapData, [u8; 16], u8>,
    /// Learned destinations of rules by domain name. `None` only in the
    /// CLI, for pins made by an mwan older than this map.
    /// `DOMAIN_DST` and `DOMAIN_DST6` (absent in pins of older daemons).
    pub domain_dst: Option<DomainMaps>,
}

fn typed<T: TryFrom<Map>>(map: Map, name: &str) -> Result<T>
where
    T::Error: std::fmt::Display,
{
    T::try_from(map).map_err(|e| anyhow!("map {name}: {e}"))
}

impl Maps {
    fn build(mut take: impl FnMut(&str) -> Result<Option<Map>>) -> Result<Maps> {
        macro_rules! m {
            ($name:expr) => {
                typed(
                    take($name)?.ok_or_else(|| anyhow!("map {} missing", $name))?,
                    $name,
                )?
            };
        }
        Ok(Maps {
            flows: m!(MAP_FLOWS),
            flows6: m!(MAP_FLOWS6),
            host_pins: m!(MAP_HOST_PINS),
            wans: m!(MAP_WANS),
            wans6: m!(MAP_WANS6),
            names: m!(MAP_WAN_NAMES),
            policies: m!(MAP_POLICIES),
            policies6: m!(MAP_POLICIES6),
            settings: m!(MAP_SETTINGS),
            wan_stats: m!(MAP_WAN_STATS),
            global_stats: m!(MAP_GLOBAL_STATS),
            rule_src: m!(MAP_RULE_SRC),
            rule_dst: m!(MAP_RULE_DST),
            rule_src6: m!(MAP_RULE_SRC6),
            rule_dst6: m!(MAP_RULE_DST6),
            rule_sport: m!(MAP_RULE_SPORT),
            rule_dport: m!(MAP_RULE_DPORT),
            rule_proto: m!(MAP_RULE_PROTO),
            rule_iface: m!(MAP_RULE_IFACE),
            rule_action: m!(MAP_RULE_ACTION),
            bypass: m!(MAP_BYPASS),
            bypass6: m!(MAP_BYPASS6),
            domain_dst: match (take(MAP_DOMAIN_DST)?, take(MAP_DOMAIN_DST6)?) {
                (Some(v4), Some(v6)) => Some(DomainMaps {
                    v4: typed(v4, MAP_DOMAIN_DST)?,
                    v6: typed(v6, MAP_DOMAIN_DST6)?,
                }),
                _ => None,
            },
        })
    }

    /// Opens the maps pinned by a daemon (for the CLI: no program is loaded).
    pub fn open_pinned(pin_dir: &Path) -> Result<Maps> {
        let maps = Maps::build(|name| {
            let path = pin_dir.join(name);
            if name == MAP_DOMAIN_DST && !path.exists() {
                // Pinned by an mwan older than domain rules.
                return Ok(None);
            }
            if IPV6_MAPS.contains(&name) && !path.exists() {
                bail!(
                    "the maps in {} were pinned by an mwan without IPv6 (no {name}); \
                     restart the daemon with this mwan",
                    pin_dir.display()
                );
            }
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening {} (is mwan running with pin_dir = {}?)",
                    path.display(),
                    pin_dir.display()
                )
            })?;
            Map::from_map_data(data)
                .map(Some)
                .map_err(|e| anyhow!("{}: {e}", path.display()))
        })?;
        maps.check_abi(pin_dir)?;
        Ok(maps)
    }

    /// For the CLI: refuses maps of another layout version (the daemon
    /// checks every map's geometry too, see [`migrate`]).
    fn check_abi(&self, pin_dir: &Path) -> Result<()> {
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

    pub fn settings(&self) -> Result<Settings> {
        Ok(self.settings.get(&0, 0)?)
    }

    pub fn write_settings(&mut self, s: &Settings) -> Result<()> {
        self.settings.set(0, s, 0).context("writing SETTINGS")
    }

    fn wans_of(&self, f: Family) -> (&Array<MapData, WanEntry>, &'static str) {
        match f {
            Family::Ipv4 => (&self.wans, MAP_WANS),
            Family::Ipv6 => (&self.wans6, MAP_WANS6),
        }
    }

    /// Family `f`'s entry of a WAN (`WANS`, `WANS6`): `alive` says whether
    /// the WAN's family is usable, the mark is the WAN's one mark.
    pub fn write_wan(&mut self, f: Family, id: u8, entry: WanEntry) -> Result<()> {
        let map = match f {
            Family::Ipv4 => &mut self.wans,
            Family::Ipv6 => &mut self.wans6,
        };
        map.set(id as u32, entry, 0)
            .with_context(|| format!("writing {}[{id}]", self.wans_of(f).1))
    }

    pub fn wan(&self, f: Family, id: u8) -> Result<WanEntry> {
        Ok(self.wans_of(f).0.get(&(id as u32), 0)?)
    }

    /// WAN names by id, as the daemon that owns the pins recorded them.
    pub fn names(&self) -> Result<Vec<Option<String>>> {
        (0..MAX_WANS)
            .map(|i| {
                let n = self.names.get(&i, 0)?;
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
        self.names
            .set(id as u32, n, 0)
            .with_context(|| format!("writing WAN_NAMES[{id}]"))
    }

    /// Family `f`'s policies (`POLICIES`, `POLICIES6`): the same ids for
    /// both, slots from the WANs eligible for the family.
    pub fn write_policies(&mut self, f: Family, policies: &[Policy]) -> Result<()> {
        match f {
            Family::Ipv4 => write_policy_array(&mut self.policies, policies, MAP_POLICIES),
            Family::Ipv6 => write_policy_array(&mut self.policies6, policies, MAP_POLICIES6),
        }
    }

    pub fn policy(&self, f: Family, i: u32) -> Result<Policy> {
        let map = match f {
            Family::Ipv4 => &self.policies,
            Family::Ipv6 => &self.policies6,
        };
        Ok(map.get(&i, 0)?)
    }

    /// Writes the rule maps. `previous` (what the maps hold now, if known)
    /// limits the port arrays to the entries that change. The caller then
    /// sets `Settings::rule_count`, which switches matching on.
    pub fn write_rules(
        &mut self,
        rules: &CompiledRules,
        previous: Option<&CompiledRules>,
        ifindex: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<()> {
        let arrays: [(&mut Array<MapData, u64>, &Vec<u64>, Option<&Vec<u64>>, &str); 3] = [
            (
                &mut self.rule_proto,
                &rules.proto,
                previous.map(|p| &p.proto),
                MAP_RULE_PROTO,
            ),
            (
                &mut self.rule_sport,
                &rules.sport,
                previous.map(|p| &p.sport),
                MAP_RULE_SPORT,
            ),
            (
                &mut self.rule_dport,
                &rules.dport,
                previous.map(|p| &p.dport),
                MAP_RULE_DPORT,
            ),
        ];
        for (map, want, before, name) in arrays {
            for (i, v) in want.iter().enumerate() {
                if before.map(|b| b[i] == *v).unwrap_or(false) {
                    continue;
                }
                map.set(i as u32, *v, 0)
                    .with_context(|| format!("writing {name}[{i}]"))?;
            }
        }
        for (trie, want, name) in [
            (&mut self.rule_src, &rules.src, MAP_RULE_SRC),
            (&mut self.rule_dst, &rules.dst, MAP_RULE_DST),
        ] {
            sync_trie(trie, want.iter().map(|(n, m)| (*n, *m)).collect(), name)?;
        }
        for (trie, want, name) in [
            (&mut self.rule_src6, &rules.src6, MAP_RULE_SRC6),
            (&mut self.rule_dst6, &rules.dst6, MAP_RULE_DST6),
        ] {
            sync_trie(trie, want.iter().map(|(n, m)| (*n, *m)).collect(), name)?;
        }
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
        for (k, v) in want_iface {
            self.rule_iface
                .insert(k, v, 0)
                .with_context(|| format!("writing {MAP_RULE_IFACE}[{k}]"))?;
        }
        for (i, a) in rules.actions.iter().enumerate() {
            self.rule_action
                .set(i as u32, *a, 0)
                .with_context(|| format!("writing {MAP_RULE_ACTION}[{i}]"))?;
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
                self.write_settings(&settings(cfg, rules, 0))?;
            }
            self.write_rules(rules, previous, ifindex)?;
        }
        self.write_settings(&settings(cfg, rules, rules.count))
    }

    /// Makes family `f`'s bypass trie (`BYPASS`, `BYPASS6`) hold exactly
    /// `prefixes` (all of family `f`).
    pub fn write_bypass(&mut self, f: Family, prefixes: &[IpNet]) -> Result<()> {
        let wrong = || anyhow!("a bypass prefix of the wrong family for {f}");
        match f {
            Family::Ipv4 => {
                let want = prefixes
                    .iter()
                    .map(|p| match p {
                        IpNet::V4(p) => Ok((p.trunc(), 1u8)),
                        IpNet::V6(_) => Err(wrong()),
                    })
                    .collect::<Result<_>>()?;
                sync_trie(&mut self.bypass, want, MAP_BYPASS)
            }
            Family::Ipv6 => {
                let want = prefixes
                    .iter()
                    .map(|p| match p {
                        IpNet::V6(p) => Ok((p.trunc(), 1u8)),
                        IpNet::V4(_) => Err(wrong()),
                    })
                    .collect::<Result<_>>()?;
                sync_trie(&mut self.bypass6, want, MAP_BYPASS6)
            }
        }
    }

    /// Applies changes of the learned-address table
    /// ([`crate::dns::learned`]) to `DOMAIN_DST`: a new mask, or a deletion.
    /// Each write is one `bpf()` call; when it returns, the classifier's next
    /// lookup sees it (so a DNS answer may be released).
    pub fn write_domain_dst(&mut self, changes: &[crate::dns::learned::Change]) -> Result<()> {
        self.domain_dst
            .as_mut()
            .ok_or_else(|| anyhow!("map {MAP_DOMAIN_DST} is not pinned"))?
            .write(changes)
    }

    /// Empties `DOMAIN_DST` and `DOMAIN_DST6` (a start: what another daemon
    /// learned has no expiry record here, and its masks index that daemon's
    /// rules).
    pub fn clear_domain_dst(&mut self) -> Result<()> {
        if let Some(maps) = self.domain_dst.as_mut() {
            maps.clear();
        }
        Ok(())
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

    /// `GLOBAL_STATS` summed over CPUs, by index (see [`COUNTER_NAMES`]).
    pub fn global_counters(&self) -> Result<Vec<u64>> {
        (0..GS_COUNT)
            .map(|i| Ok(self.global_stats.get(&i, 0)?.iter().sum()))
            .collect()
    }
}

/// The names of the `GLOBAL_STATS` counters, by index, as `mwan status`
/// shows them.
pub const COUNTER_NAMES: [&str; GS_COUNT as usize] = [
    "new_flows",
    "repins",
    "host_pin_hits",
    "bypass",
    "midstream_unpinned",
    "no_wan",
    "insert_errors",
    "not_ipv4",
    "premarked",
    "malformed",
    "fragments",
];

/// The `SETTINGS` entry for `cfg`, whose rules compiled to `rules`;
/// `rule_count` 0 switches rule matching off.
pub fn settings(cfg: &Config, rules: &CompiledRules, rule_count: u32) -> Settings {
    Settings {
        abi_version: ABI_VERSION,
        mark_mask: cfg.mark_mask,
        sticky_host: match (cfg.sticky, cfg.sticky_key) {
            (Sticky::Connection, _) => STICKY_OFF,
            (Sticky::Host, StickyKey::Address) => STICKY_ADDRESS,
            (Sticky::Host, StickyKey::Mac) => STICKY_MAC,
        },
        rule_count,
        host_ttl_ns: cfg.host_ttl.as_nanos() as u64,
        rule_any_iface: rules.any_iface,
        rule_any_sport: rules.any_sport,
        rule_any_dport: rules.any_dport,
    }
}

/// The learned destinations of rules by domain name: `DOMAIN_DST`
/// (IPv4, from A records) and `DOMAIN_DST6` (IPv6, from AAAA records).
pub struct DomainMaps {
    pub v4: HashMap<MapData, u32, u64>,
    pub v6: HashMap<MapData, [u8; 16], u64>,
}

impl DomainMaps {
    /// Opens the pair pinned in `pin_dir` (the DNS relay's own handles).
    pub fn open_pinned(pin_dir: &Path) -> Result<DomainMaps> {
        let open =
            |name: &str| -> Result<Map> { Ok(Map::HashMap(open_pinned_map(pin_dir, name)?)) };
        Ok(DomainMaps {
            v4: HashMap::try_from(open(MAP_DOMAIN_DST)?)
                .map_err(|e| anyhow!("{MAP_DOMAIN_DST}: {e}"))?,
            v6: HashMap::try_from(open(MAP_DOMAIN_DST6)?)
                .map_err(|e| anyhow!("{MAP_DOMAIN_DST6}: {e}"))?,
        })
    }

    /// Writes learned-address changes ([`crate::dns::learned`]): a new
    /// mask, or a deletion; one `bpf()` call each, so when it returns the
    /// classifier's next lookup sees it.
    pub fn write(&mut self, changes: &[crate::dns::learned::Change]) -> Result<()> {
        for (addr, mask) in changes {
            let done = match addr {
                IpAddr::V4(a) => set_or_remove(&mut self.v4, u32::from_ne_bytes(a.octets()), *mask),
                IpAddr::V6(a) => set_or_remove(&mut self.v6, a.octets(), *mask),
            };
            let name = if addr.is_ipv4() {
                MAP_DOMAIN_DST
            } else {
                MAP_DOMAIN_DST6
            };
            done.with_context(|| format!("writing {name}[{addr}]"))?;
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        let keys: Vec<u32> = self.v4.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.v4.remove(&k);
        }
        let keys: Vec<[u8; 16]> = self.v6.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.v6.remove(&k);
        }
    }
}

/// Inserts `key` with `mask`, or (`None`) removes it if present.
fn set_or_remove<K: aya::Pod>(
    map: &mut HashMap<MapData, K, u64>,
    key: K,
    mask: Option<u64>,
) -> Result<()> {
    match mask {
        Some(m) => Ok(map.insert(key, m, 0)?),
        None => match map.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        },
    }
}

/// A prefix as an LPM trie of its family keys it.
trait TrieNet: Ord + Copy + std::fmt::Display {
    type Data: aya::Pod;
    fn key(&self) -> Key<Self::Data>;
    fn from_key(k: &Key<Self::Data>) -> Option<Self>;
}

impl TrieNet for Ipv4Net {
    type Data = [u8; 4];
    fn key(&self) -> Key<[u8; 4]> {
        Key::new(self.prefix_len() as u32, self.network().octets())
    }
    fn from_key(k: &Key<[u8; 4]>) -> Option<Self> {
        Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8).ok()
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
}

/// Makes `trie` hold exactly `want`.
fn sync_trie<N: TrieNet, V: aya::Pod + PartialEq>(
    trie: &mut LpmTrie<MapData, N::Data, V>,
    want: BTreeMap<N, V>,
    name: &str,
) -> Result<()> {
    let present: Vec<Key<N::Data>> = trie.keys().filter_map(|k| k.ok()).collect();
    for k in present {
        if N::from_key(&k)
            .map(|n| !want.contains_key(&n))
            .unwrap_or(true)
        {
            let _ = trie.remove(&k);
        }
    }
    for (net, v) in want {
        trie.insert(&net.key(), v, 0)
            .with_context(|| format!("writing {name}[{net}]"))?;
    }
    Ok(())
}

/// Writes every entry of a policy array (`POLICIES` or `POLICIES6`).
fn write_policy_array(
    map: &mut Array<MapData, Policy>,
    policies: &[Policy],
    name: &str,
) -> Result<()> {
    for i in 0..MAX_POLICIES {
        let p = policies.get(i as usize).copied().unwrap_or(Policy::EMPTY);
        map.set(i, p, 0)
            .with_context(|| format!("writing {name}[{i}]"))?;
    }
    Ok(())
}

/// The loaded datapath (daemon side).
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    /// True when the maps were already pinned (a restart: flows inherited).
    pub inherited: bool,
    /// The number of flows the flow map of each family holds at most
    /// (`FLOWS`'s max_entries; `FLOWS6` has the same).
    pub flow_capacity: u32,
    /// Maps replaced at this start (another size): their old maps stay
    /// until the new program has replaced the old filter.
    migration: migrate::Migration,
    /// What the load warned of (pins without a layout version).
    pub warnings: Vec<String>,
}

impl Datapath {
    /// Loads the programs, reusing the maps pinned in `pin_dir` or creating
    /// and pinning them. `pin_dir` must be on bpffs (see [`ensure_bpffs`]).
    /// Pins of another layout are refused before anything is changed; maps
    /// of another size are replaced, their entries copied (call
    /// [`Datapath::finish_migration`] once every filter is attached, or
    /// [`Datapath::abort_migration`] when the start fails).
    pub fn load(pin_dir: &Path, max_flows: u32, max_hosts: u32) -> Result<Datapath> {
        check_kernel(kernel_release().as_deref())?;
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating {}", pin_dir.display()))?;
        let want = migrate::expected(EBPF_OBJ, &map_sizes(max_flows, max_hosts))?;
        // Read-only: refuse incompatible pins before the loader reuses them.
        let plan = migrate::Plan::read(pin_dir, &want)?;
        let mut warnings = Vec::new();
        if let Some(w) = plan.check(pin_dir)? {
            tracing::warn!("{w}");
            warnings.push(w);
        }
        let inherited = plan.inherited();
        let mut migration = migrate::Migration::prepare(pin_dir, &plan)?;
        let loaded = Self::load_object(pin_dir, max_flows, max_hosts).and_then(|(ebpf, maps)| {
            migration.copy()?;
            migrate::write_marker(pin_dir)?;
            Ok((ebpf, maps))
        });
        let (ebpf, maps) = match loaded {
            Ok(l) => l,
            Err(e) => {
                migration.abort();
                return Err(e);
            }
        };
        let flow_capacity = pinned_geometry(&pin_dir.join(MAP_FLOWS))?
            .map(|g| g.max_entries)
            .unwrap_or(max_flows);
        Ok(Datapath {
            ebpf,
            maps,
            inherited,
            flow_capacity,
            migration,
            warnings,
        })
    }

    fn load_object(pin_dir: &Path, max_flows: u32, max_hosts: u32) -> Result<(Ebpf, Maps)> {
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for (name, size) in map_sizes(max_flows, max_hosts) {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(EBPF_OBJ).with_context(|| {
            format!("loading the eBPF datapath (maps in {})", pin_dir.display())
        })?;
        for name in [PROG_LAN_ETH, PROG_LAN_L3] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        let maps = Maps::build(|name| {
            ebpf.take_map(name)
                .map(Some)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        })?;
        Ok((ebpf, maps))
    }

    /// Once the new program has replaced the old filter on every LAN
    /// interface: copies what the old program pinned meanwhile and removes
    /// the replaced maps' old pins.
    pub fn finish_migration(&mut self) {
        self.migration.finish();
    }

    /// What this start did with the inherited maps, map by map.
    pub fn migrations(&self) -> &[crate::control::MapMigration] {
        &self.migration.report
    }

    /// A failed start: the replaced maps' old pins are put back, so the old
    /// program's maps are the pinned ones again.
    pub fn abort_migration(&mut self) {
        self.migration.abort();
    }

    /// A loaded classifier by name ([`PROG_LAN_ETH`] or [`PROG_LAN_L3`]),
    /// e.g. to run it on crafted packets (`BPF_PROG_TEST_RUN`).
    pub fn program(&self, name: &str) -> Result<&SchedClassifier> {
        self.ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .try_into()
            .map_err(|e| anyhow!("program {name}: {e}"))
    }

    /// Attaches the classifier at tc ingress of `iface` (the Ethernet or the
    /// L3 variant), replacing a previous mwan filter without a gap. The
    /// filter stays in the kernel after this process exits. Returns whether
    /// mwan had to add the `clsact` qdisc (teardown removes it again).
    pub fn attach(&mut self, iface: &str, l2: bool) -> Result<bool> {
        let name = if l2 { PROG_LAN_ETH } else { PROG_LAN_L3 };
        let added_qdisc = match tc::qdisc_add_clsact(iface) {
            Ok(()) => true,
            // EEXIST: the qdisc is there already.
            Err(tc::TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST) => false,
            Err(e) => return Err(anyhow!("adding clsact qdisc to {iface}: {e}")),
        };
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?;
        let mut attached_at = None;
        for prio in TC_PRIORITIES {
            let opts = TcAttachOptions::Netlink(NlOptions {
                priority: prio,
                handle: TC_HANDLE,
                classid: None,
            });
            match prog.attach_with_options(iface, TcAttachType::Ingress, opts) {
                Ok(id) => {
                    // Keep the filter when this process exits.
                    let link = prog.take_link(id)?;
                    std::mem::forget(link);
                    attached_at = Some(prio);
                    break;
                }
                Err(e) if is_exists(&e) => continue,
                Err(e) => {
                    return Err(anyhow!(
                        "attaching {name} to {iface} (tc ingress, priority {prio:#x}): {e}"
                    ))
                }
            }
        }
        let prio = attached_at.ok_or_else(|| {
            anyhow!("both mwan tc priorities {TC_PRIORITIES:x?} are in use on {iface}; run `mwan stop --teardown` to clear them")
        })?;
        for old in TC_PRIORITIES.into_iter().filter(|p| *p != prio) {
            detach_filter(iface, old);
        }
        Ok(added_qdisc)
    }
}

fn is_exists(e: &aya::programs::ProgramError) -> bool {
    matches!(e, aya::programs::ProgramError::TcError(tc::TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST))
}

fn detach_filter(iface: &str, prio: u16) -> bool {
    match SchedClassifierLink::attached(iface, TcAttachType::Ingress, prio, TC_HANDLE, None) {
        Ok(link) => link.detach().is_ok(),
        Err(_) => false,
    }
}

/// Removes mwan's filters from `iface` (both priorities). Returns whether
/// one was there. Safe when the interface or the filters are gone.
pub fn detach(iface: &str) -> bool {
    TC_PRIORITIES
        .iter()
        .fold(false, |any, p| detach_filter(iface, *p) | any)
}

/// The maps sized from the config: the flow maps of both families hold
/// `max_flows` each, the host pins `max_hosts`.
fn map_sizes(max_flows: u32, max_hosts: u32) -> [(&'static str, u32); 3] {
    [
        (MAP_FLOWS, max_flows),
        (MAP_FLOWS6, max_flows),
        (MAP_HOST_PINS, max_hosts),
    ]
}

/// The maps added for IPv6 (and host pins for both families): a CLI
/// finding pins without them is talking to an older daemon.
const IPV6_MAPS: [&str; 7] = [
    MAP_FLOWS6,
    MAP_HOST_PINS,
    MAP_WANS6,
    MAP_POLICIES6,
    MAP_RULE_SRC6,
    MAP_RULE_DST6,
    MAP_BYPASS6,
];

/// Maps older versions pinned that this one no longer has: taken over
/// (`HOSTS` into `HOST_PINS`, see [`migrate`]) and removed by teardown.
pub const LEGACY_MAPS: [&str; 1] = [MAP_HOSTS];

/// Every map mwan pins, by name.
pub const PINNED_MAPS: [&str; 25] = [
    MAP_ABI,
    MAP_FLOWS,
    MAP_FLOWS6,
    MAP_HOST_PINS,
    MAP_WANS,
    MAP_WANS6,
    MAP_WAN_NAMES,
    MAP_POLICIES,
    MAP_POLICIES6,
    MAP_SETTINGS,
    MAP_WAN_STATS,
    MAP_GLOBAL_STATS,
    MAP_RULE_SRC,
    MAP_RULE_DST,
    MAP_RULE_SRC6,
    MAP_RULE_DST6,
    MAP_RULE_SPORT,
    MAP_RULE_DPORT,
    MAP_RULE_PROTO,
    MAP_RULE_IFACE,
    MAP_RULE_ACTION,
    MAP_BYPASS,
    MAP_BYPASS6,
    MAP_DOMAIN_DST,
    MAP_DOMAIN_DST6,
];

/// Deletes mwan's pins in `pin_dir` (maps are freed when no program uses
/// them any more) and the directory when it is empty. Anything else there
/// (other programs' pins, the kernel's `maps.debug` in a bpffs root) stays.
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    for name in PINNED_MAPS.into_iter().chain(LEGACY_MAPS) {
        // `<name>_OLD`: a map being replaced when a daemon died.
        for p in [pin_dir.join(name), migrate::aside_path(pin_dir, name)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow!("removing pin {}: {e}", p.display())),
            }
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        // Gone already, not empty, or a mount point mwan will unmount.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENOTEMPTY | libc::EBUSY)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(anyhow!("removing {}: {e}", pin_dir.display())),
    }
}

fn statfs_magic(p: &Path) -> Option<i64> {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

fn on_bpffs(p: &Path) -> bool {
    statfs_magic(p) == Some(BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` is on a bpffs, mounting one when needed (inside
/// `ip netns exec`, /sys/fs/bpf is not mounted). Returns the mount point
/// mwan created, if any, so teardown can unmount it.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<Option<PathBuf>> {
    let existing = pin_dir
        .ancestors()
        .find(|a| a.exists())
        .ok_or_else(|| anyhow!("{} has no existing ancestor", pin_dir.display()))?;
    if on_bpffs(existing) {
        return Ok(None);
    }
    // Mount at the conventional place when the pin dir is under it,
    // otherwise on the pin dir itself.
    let std_mount = Path::new("/sys/fs/bpf");
    let target = if pin_dir.starts_with(std_mount) && std_mount.is_dir() {
        std_mount.to_path_buf()
    } else {
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating {}", pin_dir.display()))?;
        pin_dir.to_path_buf()
    };
    let src = CString::new("bpf").expect("no NUL");
    let tgt = CString::new(target.as_os_str().as_encoded_bytes()).context("mount point path")?;
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting bpffs at {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(Some(target))
}

/// Unmounts a bpffs mwan mounted (pins in it are gone with it).
pub fn unmount(target: &Path) -> Result<()> {
    let tgt = CString::new(target.as_os_str().as_encoded_bytes()).context("mount point path")?;
    if unsafe { libc::umount2(tgt.as_ptr(), libc::MNT_DETACH) } != 0 {
        bail!(
            "unmounting {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Takes an exclusive lock on the pin directory: a second daemon for the
/// same pins refuses to start. The lock lives as long as the returned file.
pub fn lock_pin_dir(pin_dir: &Path) -> Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let f =
        std::fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "another mwan daemon is running with pin_dir = {} (stop it first, or use another pin_dir)",
                pin_dir.display()
            );
        }
        bail!("locking {}: {e}", pin_dir.display());
    }
    Ok(f)
}

/// The current `bpf_ktime_get_ns()` clock (CLOCK_MONOTONIC), to age flows.
pub fn ktime_now_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads a hash map (the flow or host map) in batches with
/// `BPF_MAP_LOOKUP_BATCH`: one syscall per `chunk` entries instead of two per
/// entry, so listing a million flows takes a fraction of a second and never
/// involves the daemon.
pub fn read_hash_batched<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: &MapData,
    chunk: u32,
    mut each: impl FnMut(&K, &V) -> bool,
) -> Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = map.fd().as_fd().as_raw_fd();
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    raw::read_batched(fd, ks, vs, chunk, |k, v| {
        // SAFETY: the slices hold exactly one K and one V (Pod: any bytes).
        let (k, v) = unsafe {
            (
                std::ptr::read_unaligned(k.as_ptr() as *const K),
                std::ptr::read_unaligned(v.as_ptr() as *const V),
            )
        };
        each(&k, &v)
    })
}

/// The key of a pinned flow of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnyFlowKey {
    V4(FlowKey),
    V6(FlowKey6),
}

/// (proto, src, dst, sport, dport), ports in host order.
pub type Tuple5 = (u8, IpAddr, IpAddr, u16, u16);

impl AnyFlowKey {
    pub fn family(&self) -> crate::config::Family {
        match self {
            AnyFlowKey::V4(_) => crate::config::Family::Ipv4,
            AnyFlowKey::V6(_) => crate::config::Family::Ipv6,
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            AnyFlowKey::V4(k) => k.proto,
            AnyFlowKey::V6(k) => k.proto,
        }
    }
    pub fn src(&self) -> IpAddr {
        match self {
            AnyFlowKey::V4(k) => Ipv4Addr::from(k.src()).into(),
            AnyFlowKey::V6(k) => Ipv6Addr::from(k.saddr).into(),
        }
    }
    pub fn dst(&self) -> IpAddr {
        match self {
            AnyFlowKey::V4(k) => Ipv4Addr::from(k.dst()).into(),
            AnyFlowKey::V6(k) => Ipv6Addr::from(k.daddr).into(),
        }
    }
    pub fn src_port(&self) -> u16 {
        match self {
            AnyFlowKey::V4(k) => k.src_port(),
            AnyFlowKey::V6(k) => k.src_port(),
        }
    }
    pub fn dst_port(&self) -> u16 {
        match self {
            AnyFlowKey::V4(k) => k.dst_port(),
            AnyFlowKey::V6(k) => k.dst_port(),
        }
    }
    pub fn tuple(&self) -> Tuple5 {
        (
            self.proto(),
            self.src(),
            self.dst(),
            self.src_port(),
            self.dst_port(),
        )
    }
}

/// Reads the pinned flows of both families (`FLOWS`, then `FLOWS6` when
/// pinned: an mwan before IPv6 has none) in batches, as
/// [`read_hash_batched`]; `each` returns false to stop.
pub fn read_flows(
    pin_dir: &Path,
    chunk: u32,
    mut each: impl FnMut(AnyFlowKey, &FlowValue) -> bool,
) -> Result<()> {
    let mut go_on = true;
    read_hash_batched::<FlowKey, FlowValue>(
        &open_pinned_map(pin_dir, MAP_FLOWS)?,
        chunk,
        |k, v| {
            go_on = each(AnyFlowKey::V4(*k), v);
            go_on
        },
    )?;
    if !go_on || !pin_dir.join(MAP_FLOWS6).exists() {
        return Ok(());
    }
    read_hash_batched::<FlowKey6, FlowValue>(
        &open_pinned_map(pin_dir, MAP_FLOWS6)?,
        chunk,
        |k, v| each(AnyFlowKey::V6(*k), v),
    )
}

/// The pinned flow maps of both families, to rewrite pins from outside
/// the datapath.
pub struct FlowMaps {
    v4: HashMap<MapData, FlowKey, FlowValue>,
    v6: Option<HashMap<MapData, FlowKey6, FlowValue>>,
}

impl FlowMaps {
    pub fn open(pin_dir: &Path) -> Result<FlowMaps> {
        let open =
            |name: &str| -> Result<Map> { Ok(Map::LruHashMap(open_pinned_map(pin_dir, name)?)) };
        let v6 = if pin_dir.join(MAP_FLOWS6).exists() {
            Some(typed(open(MAP_FLOWS6)?, MAP_FLOWS6)?)
        } else {
            None
        };
        Ok(FlowMaps {
            v4: typed(open(MAP_FLOWS)?, MAP_FLOWS)?,
            v6,
        })
    }

    pub fn insert(&mut self, key: &AnyFlowKey, value: FlowValue) -> Result<()> {
        match key {
            AnyFlowKey::V4(k) => self.v4.insert(k, value, 0)?,
            AnyFlowKey::V6(k) => self
                .v6
                .as_mut()
                .ok_or_else(|| anyhow!("{MAP_FLOWS6} is not pinned"))?
                .insert(k, value, 0)?,
        }
        Ok(())
    }
}

/// A host pin's key as `mwan hosts` shows it: a MAC address
/// (`02:00:00:00:00:0a`), an IPv4 address or an IPv6 /64.
pub fn host_name(k: &HostKey) -> String {
    let b = &k.bytes;
    match k.kind {
        HOST_KEY_MAC => b[..6]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        HOST_KEY_IPV4 => Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        HOST_KEY_IPV6 => format!("{}/64", Ipv6Addr::from(*b)),
        kind => format!("host key kind {kind}"),
    }
}

/// The oldest kernel the datapath loads on: `bpf_ktime_get_coarse_ns`
/// came with Linux 5.11.
pub const MIN_KERNEL: (u32, u32) = (5, 11);

/// The running kernel's release (`uname -r`).
fn kernel_release() -> Option<String> {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let r = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    Some(r.to_string_lossy().into_owned())
}

/// Refuses kernels older than [`MIN_KERNEL`] with a message saying so (the
/// verifier's own complaint would name an unknown helper). An unreadable
/// release is let through: the verifier has the last word.
fn check_kernel(release: Option<&str>) -> Result<()> {
    let Some(release) = release else {
        return Ok(());
    };
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    if let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) {
        if (major, minor) < MIN_KERNEL {
            bail!(
                "mwan needs Linux {}.{} or later (its datapath uses bpf_ktime_get_coarse_ns); this kernel is {release}",
                MIN_KERNEL.0,
                MIN_KERNEL.1
            );
        }
    }
    Ok(())
}

/// Opens one pinned map by name (for batched reads).
pub fn open_pinned_map(pin_dir: &Path, name: &str) -> Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is mwan running with pin_dir = {}?)",
            path.display(),
            pin_dir.display()
        )
    })
}

/// The index of interface `name`, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_floor() {
        for ok in ["5.11.0", "6.18.3-amd64", "6.1.0-26-cloud-amd64", "10.0"] {
            check_kernel(Some(ok)).unwrap();
        }
        check_kernel(None).unwrap();
        check_kernel(Some("weird")).unwrap();
        for old in ["5.10.0-33-amd64", "4.19.0", "5.4"] {
            let e = check_kernel(Some(old)).unwrap_err().to_string();
            assert!(e.contains("Linux 5.11") && e.contains(old), "{e}");
        }
    }
}
