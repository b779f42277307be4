//! Taking over the maps another daemon pinned (a restart, an upgrade).
//!
//! aya's loader reuses a pinned map by path without comparing it with the
//! object it loads, so before loading, every pinned map's geometry (type,
//! key size, value size, max_entries, from `bpf_obj_get_info_by_fd`) is
//! compared with what the embedded object declares (parsed from its ELF,
//! with the sizes the config sets, `max_flows` and `max_hosts`), and the layout
//! version in the `ABI` map with [`ABI_VERSION`]:
//!
//! * same geometry: the map is reused as it is;
//! * only `max_entries` differs (`max_flows` changed, a longer array): the
//!   pin is moved aside to `<name>_OLD`, the loader creates and pins a map
//!   of the new size, and the entries are copied into it (the newest ones
//!   when it is smaller) before the new program replaces the old filter;
//!   entries the old program writes meanwhile are copied once more after
//!   the swap ([`Migration::finish`]);
//! * per-CPU counters (`WAN_STATS`, `GLOBAL_STATS`) of another value size
//!   start again from zero in a new map;
//! * anything else, or another layout version, is refused before anything
//!   is changed: no pin moved, no map written, no filter replaced.
//!
//! Pins without a version (made before the `ABI` map existed, or by a
//! daemon that died before writing it) are taken over only when every
//! map's type, key and value size match; the legacy `Settings::abi_version`
//! is honoured when present.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{MapData, MapInfo};
use mwan_common::*;
use tracing::{info, warn};

use super::raw::{
    lookup, read_batched, read_keyed, update, write_all, Entries, BPF_EXIST, BPF_NOEXIST,
};
use crate::control::MapMigration;

const BPF_MAP_TYPE_HASH: u32 = MapKind::HashMap.map_type();
const BPF_MAP_TYPE_ARRAY: u32 = MapKind::Array.map_type();
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = MapKind::PerCpuArray.map_type();
const BPF_MAP_TYPE_LRU_HASH: u32 = MapKind::LruHashMap.map_type();
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
const BPF_MAP_TYPE_LPM_TRIE: u32 = MapKind::LpmTrie.map_type();

/// Per-CPU counters (`WAN_STATS`, `GLOBAL_STATS`): a value layout change
/// resets them instead of refusing.
fn is_counter_map(name: &str) -> bool {
    MapSpec::of(name).is_some_and(|m| m.kind.per_cpu())
}

/// The shape of a map as the kernel knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl Geometry {
    fn same_layout(&self, other: &Geometry) -> bool {
        self.map_type == other.map_type
            && self.key_size == other.key_size
            && self.value_size == other.value_size
    }

    fn per_cpu(&self) -> bool {
        matches!(
            self.map_type,
            BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_LRU_PERCPU_HASH
        )
    }

    fn is_array(&self) -> bool {
        matches!(
            self.map_type,
            BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY
        )
    }
}

impl std::fmt::Display for Geometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match self.map_type {
            BPF_MAP_TYPE_HASH => "hash".to_string(),
            BPF_MAP_TYPE_ARRAY => "array".to_string(),
            BPF_MAP_TYPE_PERCPU_HASH => "per-CPU hash".to_string(),
            BPF_MAP_TYPE_PERCPU_ARRAY => "per-CPU array".to_string(),
            BPF_MAP_TYPE_LRU_HASH => "LRU hash".to_string(),
            BPF_MAP_TYPE_LRU_PERCPU_HASH => "LRU per-CPU hash".to_string(),
            BPF_MAP_TYPE_LPM_TRIE => "LPM trie".to_string(),
            t => format!("map type {t}"),
        };
        write!(
            f,
            "{t}, key {} B, value {} B, {} entries",
            self.key_size, self.value_size, self.max_entries
        )
    }
}

/// What the object `elf` declares for every map mwan pins, with the sizes
/// the loader is told to override (`max_flows`, `max_hosts`).
pub fn expected(elf: &[u8], sizes: &[(&str, u32)]) -> Result<BTreeMap<&'static str, Geometry>> {
    let obj = aya_obj::Object::parse(elf).map_err(|e| anyhow!("parsing the eBPF object: {e}"))?;
    MAPS.iter()
        .map(|spec| {
            let name = spec.name;
            let m = obj
                .maps
                .get(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
            let max_entries = sizes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .unwrap_or(m.max_entries());
            Ok((
                name,
                Geometry {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries,
                },
            ))
        })
        .collect()
}

/// The geometry of the map pinned at `path`, or `None` without a pin.
pub fn pinned_geometry(path: &Path) -> Result<Option<Geometry>> {
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(Some(geometry_of(&info)?))
}

fn geometry_of(info: &MapInfo) -> Result<Geometry> {
    Ok(Geometry {
        map_type: info.map_type().map_err(|e| anyhow!("map type: {e}"))? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    })
}

/// Where a pin is kept while its map is replaced (bpffs refuses names
/// with a dot).
pub fn aside_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("{name}_OLD"))
}

/// The pin a daemon would take over: `<name>`, or `<name>_OLD` left alone
/// by a daemon that died while replacing the map.
fn current_pin(pin_dir: &Path, name: &str) -> PathBuf {
    let pin = pin_dir.join(name);
    let aside = aside_path(pin_dir, name);
    if !pin.exists() && aside.exists() {
        aside
    } else {
        pin
    }
}

/// Renames a pin (atomic: the map stays pinned throughout).
fn move_pin(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

/// How one inherited map is taken over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Same geometry: reused as it is.
    Keep,
    /// Not pinned (a map this version added): the loader creates it.
    Missing,
    /// Only `max_entries` differs: a new map, the entries copied.
    Resize { from: u32, to: u32 },
    /// Counters of another layout: a new map, counting from zero.
    Reset { from: Geometry, to: Geometry },
    /// Another key or value layout: refused.
    Incompatible { have: Geometry, want: Geometry },
}

impl Verdict {
    pub fn compare(name: &str, have: Option<Geometry>, want: Geometry) -> Verdict {
        match have {
            None => Verdict::Missing,
            Some(h) if h == want => Verdict::Keep,
            Some(h) if h.same_layout(&want) => Verdict::Resize {
                from: h.max_entries,
                to: want.max_entries,
            },
            Some(h) if is_counter_map(name) && h.per_cpu() && want.per_cpu() => {
                Verdict::Reset { from: h, to: want }
            }
            Some(h) => Verdict::Incompatible { have: h, want },
        }
    }

    fn replaces_map(&self) -> bool {
        matches!(self, Verdict::Resize { .. } | Verdict::Reset { .. })
    }
}

/// The layout version the pins carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// From the `ABI` map.
    Marker(u32),
    /// From `SETTINGS[0].abi_version` (pins made before the `ABI` map).
    Settings(u32),
    /// No version at all (or 0: never written).
    Unknown,
}

/// What the pins in a directory are, compared with what this mwan needs.
#[derive(Debug)]
pub struct Plan {
    pub stored: Stored,
    pub maps: Vec<(&'static str, Verdict)>,
}

impl Plan {
    /// Reads the pins of `pin_dir` (without changing anything).
    pub fn read(pin_dir: &Path, want: &BTreeMap<&'static str, Geometry>) -> Result<Plan> {
        let mut maps = Vec::new();
        let mut have_of = BTreeMap::new();
        for (name, w) in want {
            let have = pinned_geometry(&current_pin(pin_dir, name))?;
            have_of.insert(*name, have);
            maps.push((*name, Verdict::compare(name, have, *w)));
        }
        let stored = read_stored(pin_dir, &have_of)?;
        Ok(Plan { stored, maps })
    }

    /// Whether any of mwan's maps is pinned (else: a fresh start).
    pub fn inherited(&self) -> bool {
        self.maps
            .iter()
            .any(|(n, v)| *n != map::ABI && *v != Verdict::Missing)
    }

    /// Refuses pins this mwan cannot take over, with what to do about them.
    /// Returns a warning to log when the pins are accepted without a
    /// version.
    pub fn check(&self, pin_dir: &Path) -> Result<Option<String>> {
        if !self.inherited() {
            // Nothing to take over (at most a stray marker, overwritten).
            return Ok(None);
        }
        let what_to_do = format!(
            "Nothing was changed: the running datapath keeps forwarding as it is. \
             To switch, run `mwan stop --teardown` (the mwan that made the pins or this \
             one), which removes the old datapath with its rules, filters and the pins \
             in {} (connections through mwan start over), then start this mwan; or go \
             on running the mwan that made them.",
            pin_dir.display()
        );
        let this = format!(
            "this mwan ({}) uses layout {ABI_VERSION}",
            env!("CARGO_PKG_VERSION")
        );
        let bad: Vec<String> = self
            .maps
            .iter()
            .filter_map(|(n, v)| match v {
                Verdict::Incompatible { have, want } => {
                    Some(format!("{n} is {have}, this mwan needs {want}"))
                }
                _ => None,
            })
            .collect();
        let version = match self.stored {
            Stored::Marker(v) | Stored::Settings(v) => Some(v),
            Stored::Unknown => None,
        };
        match version {
            Some(v) if v != ABI_VERSION => bail!(
                "the maps pinned in {} have map layout {v}, made by another mwan version; \
                 {this} and cannot take them over. {what_to_do}",
                pin_dir.display()
            ),
            Some(v) if !bad.is_empty() => bail!(
                "the maps pinned in {} claim map layout {v} but differ from it: {}; \
                 {this}. {what_to_do}",
                pin_dir.display(),
                bad.join("; ")
            ),
            None if !bad.is_empty() => bail!(
                "the maps pinned in {} carry no layout version (made by an older mwan, or \
                 by one that died while creating them) and differ from what this mwan \
                 needs: {}; {this}. {what_to_do}",
                pin_dir.display(),
                bad.join("; ")
            ),
            None => Ok(Some(format!(
                "the maps pinned in {} carry no layout version; taken over because every \
                 map's type, key and value size match layout {ABI_VERSION}",
                pin_dir.display()
            ))),
            _ => Ok(None),
        }
    }
}

/// Reads the layout version: the `ABI` map, else the legacy field.
fn read_stored(pin_dir: &Path, have: &BTreeMap<&'static str, Option<Geometry>>) -> Result<Stored> {
    let abi_geometry = Geometry {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    let read_u32 = |name: &str| -> Result<u32> {
        let path = current_pin(pin_dir, name);
        let map = MapData::from_pin(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let g = have[name].expect("pinned");
        let mut value = vec![0u8; g.value_size as usize];
        lookup(
            map.fd().as_fd().as_raw_fd(),
            &0u32.to_ne_bytes(),
            &mut value,
        )
        .with_context(|| format!("reading {}", path.display()))?;
        Ok(u32::from_ne_bytes(value[..4].try_into().expect("4 bytes")))
    };
    match have.get(map::ABI).copied().flatten() {
        Some(g) if g == abi_geometry => {
            // 0: created, never written (a start that failed): the legacy
            // field below may still tell.
            let v = read_u32(map::ABI)?;
            if v != 0 {
                return Ok(Stored::Marker(v));
            }
        }
        Some(g) => bail!(
            "{} is {g}, not the layout marker mwan expects ({abi_geometry}): \
             pins of another program? Nothing was changed.",
            pin_dir.join(map::ABI).display()
        ),
        None => {}
    }
    // `Settings::abi_version` is its first field since layout 1.
    match have.get(map::SETTINGS).copied().flatten() {
        Some(g) if g.map_type == BPF_MAP_TYPE_ARRAY && g.key_size == 4 && g.value_size >= 4 => {
            Ok(match read_u32(map::SETTINGS)? {
                0 => Stored::Unknown,
                v => Stored::Settings(v),
            })
        }
        _ => Ok(Stored::Unknown),
    }
}

/// Writes this mwan's layout version into the `ABI` map.
pub fn write_marker(pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join(map::ABI);
    let map = MapData::from_pin(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    update(
        map.fd().as_fd().as_raw_fd(),
        &0u32.to_ne_bytes(),
        &ABI_VERSION.to_ne_bytes(),
        0,
    )
    .with_context(|| format!("writing {}", path.display()))
}

/// A map being replaced: its old pin moved aside, the map kept open.
struct Aside {
    name: &'static str,
    verdict: Verdict,
    old: MapData,
    old_geometry: Geometry,
}

/// The maps replaced during one takeover, from moving their pins aside to
/// removing the old maps after the filter swap.
pub struct Migration {
    pin_dir: PathBuf,
    asides: Vec<Aside>,
    /// `bpf_ktime` when the entries were first copied: what the old program
    /// changed after that is copied again by [`Migration::finish`].
    copied_at_ns: u64,
    /// The `HOSTS` map of an mwan before IPv6 (host pins by IPv4 address),
    /// adopted into `HOST_PINS` as address keys.
    legacy_hosts: Option<(MapData, Geometry)>,
    /// What was done, map by map (for `mwan status`).
    pub report: Vec<MapMigration>,
}

fn record(map: &str, action: &str) -> MapMigration {
    MapMigration {
        map: map.to_string(),
        action: action.to_string(),
        ..MapMigration::default()
    }
}

impl Migration {
    /// Finishes what a daemon that died while replacing maps left, then
    /// moves aside the pins of the maps `plan` replaces (`<name>_OLD`). Call after
    /// [`Plan::check`]; the loader then creates the new maps.
    pub fn prepare(pin_dir: &Path, plan: &Plan) -> Result<Migration> {
        let mut report = Vec::new();
        for name in MAPS.iter().map(|m| m.name) {
            let pin = pin_dir.join(name);
            let aside = aside_path(pin_dir, name);
            if !aside.exists() {
                continue;
            }
            if !pin.exists() {
                warn!(
                    map = name,
                    "a previous start died while replacing this map; its old pin is put back"
                );
                move_pin(&aside, &pin)?;
                report.push(record(name, "put back"));
                continue;
            }
            // Both pins: the new map may be in use already, or not yet.
            // Whatever the old one holds that the new one lacks is copied.
            warn!(
                map = name,
                "a previous start died while replacing this map; merging its old entries"
            );
            let old = MapData::from_pin(&aside).map_err(|e| anyhow!("{}: {e}", aside.display()))?;
            let new = MapData::from_pin(&pin).map_err(|e| anyhow!("{}: {e}", pin.display()))?;
            let (og, ng) = (geometry_of(&old.info()?)?, geometry_of(&new.info()?)?);
            let mut r = record(name, "merged");
            if og.same_layout(&ng) {
                r.migrated = catch_up(name, &old, og, &new, ng, 0)?;
            }
            report.push(r);
            std::fs::remove_file(&aside)
                .with_context(|| format!("removing {}", aside.display()))?;
        }
        let mut m = Migration {
            pin_dir: pin_dir.to_path_buf(),
            asides: Vec::new(),
            copied_at_ns: 0,
            legacy_hosts: legacy_hosts(pin_dir)?,
            report,
        };
        for (name, verdict) in &plan.maps {
            if !verdict.replaces_map() {
                continue;
            }
            let pin = pin_dir.join(name);
            let moved = MapData::from_pin(&pin)
                .map_err(|e| anyhow!("{}: {e}", pin.display()))
                .and_then(|old| {
                    let g = geometry_of(&old.info()?)?;
                    move_pin(&pin, &aside_path(pin_dir, name))?;
                    Ok((old, g))
                });
            match moved {
                Ok((old, old_geometry)) => m.asides.push(Aside {
                    name,
                    verdict: verdict.clone(),
                    old,
                    old_geometry,
                }),
                Err(e) => {
                    m.abort();
                    return Err(e);
                }
            }
        }
        Ok(m)
    }

    /// Puts the old pins back (the new maps, unused, are freed): the
    /// running datapath is as it was. For a failed start.
    pub fn abort(&mut self) {
        self.legacy_hosts = None;
        for a in self.asides.drain(..) {
            let pin = self.pin_dir.join(a.name);
            let _ = std::fs::remove_file(&pin);
            if let Err(e) = move_pin(&aside_path(&self.pin_dir, a.name), &pin) {
                warn!(map = a.name, error = %e, "putting the old pin back");
            }
        }
    }

    /// Copies the old maps' entries into the new ones the loader pinned,
    /// before any filter uses them.
    pub fn copy(&mut self) -> Result<()> {
        self.copied_at_ns = super::ktime_now_ns();
        if let Some((old, og)) = &self.legacy_hosts {
            let n = adopt_hosts(&self.pin_dir, old, *og, 0)?;
            info!(
                "{n} host pins of {} adopted into {} as IPv4 address keys",
                map::HOSTS,
                map::HOST_PINS
            );
            let mut r = record(map::HOSTS, "adopted");
            r.migrated = n;
            self.report.push(r);
        }
        for a in &self.asides {
            let pin = self.pin_dir.join(a.name);
            let new = MapData::from_pin(&pin).map_err(|e| anyhow!("{}: {e}", pin.display()))?;
            let ng = geometry_of(&new.info()?)?;
            match &a.verdict {
                Verdict::Resize { from, to } => {
                    let t = std::time::Instant::now();
                    let (old_count, kept) = copy_entries(a.name, &a.old, a.old_geometry, &new, ng)?;
                    let unit = match a.name {
                        map::FLOWS | map::FLOWS6 => "pins",
                        map::HOST_PINS => "host pins",
                        n if is_counter_map(n) => "counters",
                        _ => "entries",
                    };
                    let dropped = old_count.saturating_sub(kept);
                    let tail = match dropped {
                        0 => String::new(),
                        _ if a.old_geometry.is_array() => format!(", the last {dropped} dropped"),
                        _ => format!(", {dropped} least recently used dropped (no room)"),
                    };
                    info!(
                        "{} resized from {from} to {to} entries, {kept} {unit} migrated{tail} ({} ms)",
                        a.name,
                        t.elapsed().as_millis()
                    );
                    self.report.push(MapMigration {
                        from: Some(*from),
                        to: Some(*to),
                        migrated: kept,
                        dropped,
                        ..record(a.name, "resized")
                    });
                }
                Verdict::Reset { from, to } => {
                    info!(
                        "{} changed layout ({from} → {to}): its counters start again from zero",
                        a.name
                    );
                    self.report.push(record(a.name, "reset"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// After the new program replaced the old filter everywhere: copies
    /// what the old program added or changed since [`Migration::copy`]
    /// (new flows in that window), then removes the old pins; each old map
    /// is freed when the old program is.
    pub fn finish(&mut self) {
        let since = self.copied_at_ns.saturating_sub(50_000_000);
        if let Some((old, og)) = self.legacy_hosts.take() {
            if let Err(e) = adopt_hosts(&self.pin_dir, &old, og, since) {
                warn!(error = %format!("{e:#}"), "adopting the takeover's last host pins");
            }
            let pin = self.pin_dir.join(map::HOSTS);
            if let Err(e) = std::fs::remove_file(&pin) {
                warn!(error = %e, "removing {}", pin.display());
            }
        }
        for a in self.asides.drain(..) {
            let pin = self.pin_dir.join(a.name);
            // Only the datapath's state maps change under the old program.
            if matches!(a.verdict, Verdict::Resize { .. }) && recency_offset(a.name).is_some() {
                let res = MapData::from_pin(&pin)
                    .map_err(|e| anyhow!("{}: {e}", pin.display()))
                    .and_then(|new| {
                        let ng = geometry_of(&new.info()?)?;
                        catch_up(a.name, &a.old, a.old_geometry, &new, ng, since)
                    });
                match res {
                    Ok(n) => {
                        info!(
                            map = a.name,
                            "{n} entries the old datapath wrote during the takeover ({} ms from the first copy to the filter swap) copied too",
                            super::ktime_now_ns().saturating_sub(self.copied_at_ns) / 1_000_000
                        );
                        if let Some(r) = self.report.iter_mut().find(|r| r.map == a.name) {
                            r.caught_up = n;
                        }
                    }
                    Err(e) => {
                        warn!(map = a.name, error = %format!("{e:#}"), "copying the takeover's last entries")
                    }
                }
            }
            let aside = aside_path(&self.pin_dir, a.name);
            if let Err(e) = std::fs::remove_file(&aside) {
                warn!(error = %e, "removing {}", aside.display());
            }
        }
    }
}

/// The `HOSTS` map pinned by an mwan before IPv6, if any, when its layout
/// is the one that version used (IPv4 address → `HostValue`).
fn legacy_hosts(pin_dir: &Path) -> Result<Option<(MapData, Geometry)>> {
    let pin = pin_dir.join(map::HOSTS);
    let Some(g) = pinned_geometry(&pin)? else {
        return Ok(None);
    };
    let usable = matches!(g.map_type, BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_LRU_HASH)
        && g.key_size == 4
        && g.value_size as usize == std::mem::size_of::<HostValue>();
    if !usable {
        warn!(
            "{} ({g}) is not a host map this mwan knows: its pins are not adopted",
            pin.display()
        );
        return Ok(None);
    }
    let map = MapData::from_pin(&pin).map_err(|e| anyhow!("{}: {e}", pin.display()))?;
    Ok(Some((map, g)))
}

/// Copies the host pins of a pre-IPv6 `HOSTS` map used since `since_ns`
/// into `HOST_PINS` as IPv4 address keys, where there is no pin yet.
/// Returns how many were copied.
fn adopt_hosts(pin_dir: &Path, old: &MapData, og: Geometry, since_ns: u64) -> Result<u64> {
    let pin = pin_dir.join(map::HOST_PINS);
    let new = MapData::from_pin(&pin).map_err(|e| anyhow!("{}: {e}", pin.display()))?;
    let nfd = new.fd().as_fd().as_raw_fd();
    let off = std::mem::offset_of!(HostValue, last_seen_ns);
    let entries = read_all(old.fd().as_fd().as_raw_fd(), og)?;
    let mut n = 0;
    for i in 0..entries.len() {
        let (k, v) = (entries.key(i), entries.value(i));
        if last_seen(v, off) < since_ns {
            continue;
        }
        let mut key = [0u8; std::mem::size_of::<HostKey>()];
        key[std::mem::offset_of!(HostKey, kind)] = HOST_KEY_IPV4;
        let at = std::mem::offset_of!(HostKey, bytes);
        key[at..at + 4].copy_from_slice(k);
        if update(nfd, &key, v, BPF_NOEXIST).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Copies every entry of `old` into `new` (a fresh map of the same layout):
/// arrays index by index, hashes the most recently used first when they
/// do not all fit. Returns (entries in `old`, entries copied).
fn copy_entries(
    name: &str,
    old: &MapData,
    og: Geometry,
    new: &MapData,
    ng: Geometry,
) -> Result<(u64, u64)> {
    let (ofd, nfd) = (old.fd().as_fd().as_raw_fd(), new.fd().as_fd().as_raw_fd());
    let vlen = value_len(&og)?;
    if og.is_array() {
        let n = og.max_entries.min(ng.max_entries);
        let mut value = vec![0u8; vlen];
        for i in 0..n {
            let key = i.to_ne_bytes();
            lookup(ofd, &key, &mut value).with_context(|| format!("reading {name}[{i}]"))?;
            update(nfd, &key, &value, 0).with_context(|| format!("writing {name}[{i}]"))?;
        }
        return Ok((og.max_entries as u64, n as u64));
    }
    let entries = read_all(ofd, og)?;
    let total = entries.len() as u64;
    let mut order: Vec<usize> = (0..entries.len()).collect();
    if let Some(off) = recency_offset(name) {
        // Oldest first: should the new map evict, it evicts the oldest.
        order.sort_by_key(|i| last_seen(entries.value(*i), off));
        let skip = order.len().saturating_sub(ng.max_entries as usize);
        order.drain(..skip);
    }
    let mut copied = write_all(nfd, &entries, &order).with_context(|| format!("writing {name}"))?;
    if matches!(
        ng.map_type,
        BPF_MAP_TYPE_LRU_HASH | BPF_MAP_TYPE_LRU_PERCPU_HASH
    ) {
        // An LRU map may evict before it is full (per-CPU free lists):
        // count what is there.
        copied = 0;
        read_batched(nfd, ng.key_size as usize, value_len(&ng)?, 4096, |_, _| {
            copied += 1;
            true
        })?;
    }
    Ok((total, copied))
}

/// Copies what `old` holds and `new` lacks, for entries of `old` used
/// since `since_ns` (0: all). A flow pinned in both, anew in `new` after
/// it was pinned in `old` (its first packets after the filter swap missed
/// the new map), gets its original WAN back. Returns how many were copied.
fn catch_up(
    name: &str,
    old: &MapData,
    og: Geometry,
    new: &MapData,
    ng: Geometry,
    since_ns: u64,
) -> Result<u64> {
    let Some(off) = recency_offset(name) else {
        return Ok(0);
    };
    let nfd = new.fd().as_fd().as_raw_fd();
    let mut n = 0;
    let mut current = vec![0u8; value_len(&ng)?];
    let entries = read_all(old.fd().as_fd().as_raw_fd(), og)?;
    for i in 0..entries.len() {
        let (k, v) = (entries.key(i), entries.value(i));
        if last_seen(v, off) < since_ns {
            continue;
        }
        let write = match lookup(nfd, k, &mut current) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Some((v.to_vec(), BPF_NOEXIST)),
            Err(e) => return Err(anyhow!("reading {name}: {e}")),
            Ok(()) if name == map::FLOWS || name == map::FLOWS6 => {
                merge_flow(v, &current).map(|m| (m, BPF_EXIST))
            }
            Ok(()) => None,
        };
        if let Some((value, flags)) = write {
            if update(nfd, k, &value, flags).is_ok() {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// A flow pinned in the old map, then again in the new one: the older pin
/// is the connection's (its NAT binding is on that WAN).
fn merge_flow(old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let read = |b: &[u8]| -> FlowValue {
        // SAFETY: `b` holds a FlowValue (value size checked), any bytes valid.
        unsafe { std::ptr::read_unaligned(b.as_ptr() as *const FlowValue) }
    };
    let (o, n) = (read(old), read(new));
    if n.first_seen_ns <= o.first_seen_ns {
        return None;
    }
    let merged = FlowValue {
        last_seen_ns: o.last_seen_ns.max(n.last_seen_ns),
        packets: o.packets + n.packets,
        bytes: o.bytes + n.bytes,
        ..o
    };
    // SAFETY: FlowValue is repr(C) without implicit padding.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &merged as *const FlowValue as *const u8,
            std::mem::size_of::<FlowValue>(),
        )
    };
    Some(bytes.to_vec())
}

/// Where the state maps keep `last_seen_ns` in their values.
fn recency_offset(name: &str) -> Option<usize> {
    match name {
        map::FLOWS | map::FLOWS6 => Some(std::mem::offset_of!(FlowValue, last_seen_ns)),
        map::HOST_PINS => Some(std::mem::offset_of!(HostValue, last_seen_ns)),
        _ => None,
    }
}

fn last_seen(value: &[u8], off: usize) -> u64 {
    value
        .get(off..off + 8)
        .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

/// The length of a value as the syscalls move it (per-CPU: one 8-byte
/// aligned slot per possible CPU).
fn value_len(g: &Geometry) -> Result<usize> {
    if g.per_cpu() {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        Ok((g.value_size as usize).div_ceil(8) * 8 * cpus)
    } else {
        Ok(g.value_size as usize)
    }
}

/// Every (key, value) of a non-array map: batched for hashes, key by key
/// otherwise (tries).
fn read_all(fd: RawFd, g: Geometry) -> Result<Entries> {
    let (ks, vs) = (g.key_size as usize, value_len(&g)?);
    if matches!(g.map_type, BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_LRU_HASH) {
        let mut out = Entries::new(ks, vs);
        read_batched(fd, ks, vs, 4096, |k, v| {
            out.push(k, v);
            true
        })?;
        return Ok(out);
    }
    read_keyed(fd, ks, vs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOWS_8K: Geometry = Geometry {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size: 16,
        value_size: 40,
        max_entries: 8192,
    };

    fn plan(stored: Stored, maps: Vec<(&'static str, Verdict)>) -> Plan {
        Plan { stored, maps }
    }

    #[test]
    fn the_embedded_object_declares_every_pinned_map() {
        let want = expected(super::super::EBPF_OBJ, &[(map::FLOWS, 1000)]).unwrap();
        assert_eq!(want.len(), MAPS.len());
        // The object has exactly the registry's maps (no other name), each
        // as the registry declares it.
        let obj = aya_obj::Object::parse(super::super::EBPF_OBJ).unwrap();
        let mut in_object: Vec<&str> = obj.maps.keys().map(|k| k.as_str()).collect();
        let mut in_registry: Vec<&str> = MAPS.iter().map(|m| m.name).collect();
        in_object.sort();
        in_registry.sort();
        assert_eq!(in_object, in_registry);
        for m in MAPS.iter().filter(|m| m.name != map::FLOWS) {
            let declared = Geometry {
                map_type: m.kind.map_type(),
                key_size: m.key_size,
                value_size: m.value_size,
                max_entries: m.max_entries,
            };
            assert_eq!(want[m.name], declared, "{}", m.name);
        }
        assert_eq!(
            want[map::FLOWS],
            Geometry {
                max_entries: 1000,
                ..FLOWS_8K
            }
        );
        assert_eq!(want[map::HOST_PINS].max_entries, 65_536);
        assert_eq!(
            want[map::HOST_PINS].value_size as usize,
            size_of::<HostValue>()
        );
        assert_eq!(
            want[map::SETTINGS].value_size as usize,
            size_of::<Settings>()
        );
        assert_eq!(want[map::GLOBAL_STATS].max_entries, GS_COUNT);
        assert_eq!(
            want[map::ABI],
            Geometry {
                map_type: BPF_MAP_TYPE_ARRAY,
                key_size: 4,
                value_size: 4,
                max_entries: 1
            }
        );
    }

    #[test]
    fn geometry_comparison() {
        let big = Geometry {
            max_entries: 65_536,
            ..FLOWS_8K
        };
        assert_eq!(
            Verdict::compare(map::FLOWS, Some(FLOWS_8K), FLOWS_8K),
            Verdict::Keep
        );
        assert_eq!(
            Verdict::compare(map::FLOWS, None, FLOWS_8K),
            Verdict::Missing
        );
        assert_eq!(
            Verdict::compare(map::FLOWS, Some(FLOWS_8K), big),
            Verdict::Resize {
                from: 8192,
                to: 65_536
            }
        );
        assert_eq!(
            Verdict::compare(map::FLOWS, Some(big), FLOWS_8K),
            Verdict::Resize {
                from: 65_536,
                to: 8192
            }
        );
        // A value or key layout change, or another type, is never resized.
        for have in [
            Geometry {
                value_size: 48,
                ..FLOWS_8K
            },
            Geometry {
                key_size: 40,
                ..FLOWS_8K
            },
            Geometry {
                map_type: BPF_MAP_TYPE_HASH,
                ..FLOWS_8K
            },
        ] {
            assert_eq!(
                Verdict::compare(map::FLOWS, Some(have), FLOWS_8K),
                Verdict::Incompatible {
                    have,
                    want: FLOWS_8K
                }
            );
        }
        // Counters: longer arrays keep their counters, another value
        // layout starts from zero.
        let gs = |n, v| Geometry {
            map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
            key_size: 4,
            value_size: v,
            max_entries: n,
        };
        assert_eq!(
            Verdict::compare(map::GLOBAL_STATS, Some(gs(9, 8)), gs(11, 8)),
            Verdict::Resize { from: 9, to: 11 }
        );
        assert_eq!(
            Verdict::compare(map::WAN_STATS, Some(gs(32, 24)), gs(32, 32)),
            Verdict::Reset {
                from: gs(32, 24),
                to: gs(32, 32)
            }
        );
        // …but only counters.
        assert!(matches!(
            Verdict::compare(map::POLICIES, Some(gs(65, 1040)), gs(65, 1048)),
            Verdict::Incompatible { .. }
        ));
    }

    #[test]
    fn versions_decide_before_geometry() {
        let dir = Path::new("/run/mwan/pins");
        let resize = vec![
            (
                map::FLOWS,
                Verdict::Resize {
                    from: 8192,
                    to: 65_536,
                },
            ),
            (map::HOST_PINS, Verdict::Keep),
        ];
        let bad = vec![
            (map::FLOWS, Verdict::Keep),
            (
                map::SETTINGS,
                Verdict::Incompatible {
                    have: Geometry {
                        map_type: BPF_MAP_TYPE_ARRAY,
                        key_size: 4,
                        value_size: 56,
                        max_entries: 1,
                    },
                    want: Geometry {
                        map_type: BPF_MAP_TYPE_ARRAY,
                        key_size: 4,
                        value_size: 48,
                        max_entries: 1,
                    },
                },
            ),
        ];
        // Same version: a resize is fine.
        assert_eq!(
            plan(Stored::Marker(ABI_VERSION), resize.clone())
                .check(dir)
                .unwrap(),
            None
        );
        assert_eq!(
            plan(Stored::Settings(ABI_VERSION), resize.clone())
                .check(dir)
                .unwrap(),
            None
        );
        // Another version is refused even when every geometry matches.
        let other = ABI_VERSION + 1;
        let e = plan(Stored::Marker(other), vec![(map::FLOWS, Verdict::Keep)])
            .check(dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("map layout {other}")), "{e}");
        assert!(e.contains(&format!("uses layout {ABI_VERSION}")), "{e}");
        assert!(e.contains("mwan stop --teardown"), "{e}");
        assert!(e.contains("Nothing was changed"), "{e}");
        // Same version, but a map differs: refused, naming the map.
        let e = plan(Stored::Marker(ABI_VERSION), bad.clone())
            .check(dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SETTINGS is array, key 4 B, value 56 B"), "{e}");
        // No version: accepted only when every layout matches, with a
        // warning; refused otherwise.
        let warn = plan(Stored::Unknown, resize).check(dir).unwrap();
        assert!(warn.is_some_and(|w| w.contains("no layout version")));
        let e = plan(Stored::Unknown, bad)
            .check(dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("carry no layout version"), "{e}");
        // Nothing pinned: a fresh start.
        let fresh = plan(
            Stored::Unknown,
            vec![(map::ABI, Verdict::Missing), (map::FLOWS, Verdict::Missing)],
        );
        assert!(!fresh.inherited());
        assert_eq!(fresh.check(dir).unwrap(), None);
        // …also beside a stray marker of another version.
        let stray = plan(
            Stored::Marker(other),
            vec![(map::ABI, Verdict::Keep), (map::FLOWS, Verdict::Missing)],
        );
        assert_eq!(stray.check(dir).unwrap(), None);
    }

    #[test]
    fn a_flow_pinned_anew_after_the_swap_gets_its_first_wan_back() {
        let bytes = |v: &FlowValue| {
            unsafe {
                std::slice::from_raw_parts(
                    v as *const FlowValue as *const u8,
                    size_of::<FlowValue>(),
                )
            }
            .to_vec()
        };
        let old = FlowValue {
            first_seen_ns: 100,
            last_seen_ns: 200,
            packets: 5,
            bytes: 500,
            wan: 1,
            policy: 0,
            moved_from: WAN_NONE,
            flags: 0,
            _pad: [0; 4],
        };
        let new = FlowValue {
            first_seen_ns: 300,
            last_seen_ns: 310,
            packets: 2,
            bytes: 80,
            wan: 2,
            ..old
        };
        let merged = merge_flow(&bytes(&old), &bytes(&new)).expect("merged");
        let m: FlowValue = unsafe { std::ptr::read_unaligned(merged.as_ptr() as *const FlowValue) };
        assert_eq!((m.wan, m.first_seen_ns, m.last_seen_ns), (1, 100, 310));
        assert_eq!((m.packets, m.bytes), (7, 580));
        // The same pin copied before the swap: left alone.
        assert_eq!(merge_flow(&bytes(&old), &bytes(&old)), None);
    }
}
