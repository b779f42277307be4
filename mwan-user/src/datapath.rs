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
//!
//! Which maps there are comes from mwan-common's registry
//! (`for_each_map!`): the typed handles ([`Maps`], a [`FamilyMaps`] per
//! address family), the pins made and removed, the sizes the loader sets.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::MapData;
use aya::programs::links::Link;
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use mwan_common::*;

use crate::config::{Config, Sticky, StickyKey};
use crate::policy::CompiledRules;
pub use kfunc::ConntrackAccess;

pub mod kfunc;
mod maps;
mod migrate;
mod raw;
pub use maps::{DomainMaps, FamilyMaps, FlowMap, MapFamily, Maps, Named, TrieNet};
pub use migrate::{pinned_geometry, Geometry};

/// The datapath object, built from `mwan-ebpf` by build.rs.
static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mwan.bpf.o"));

/// The embedded datapath object as built (its kfunc calls marked, not
/// resolved: see [`object_for_this_kernel`]).
pub fn object() -> &'static [u8] {
    EBPF_OBJ
}

/// The embedded object resolved for the running kernel (see [`kfunc`]),
/// and how its classifier reads conntrack. The environment variable
/// `MWAN_CONNTRACK_ACCESS=nftables` forces the way of a kernel without the
/// kfuncs (for tests). Why the kfuncs are not used goes to `warnings`.
pub fn object_for_this_kernel(warnings: &mut Vec<String>) -> Result<(Vec<u8>, ConntrackAccess)> {
    let forced = std::env::var("MWAN_CONNTRACK_ACCESS").is_ok_and(|v| v == "nftables");
    let support = if forced {
        Err("MWAN_CONNTRACK_ACCESS=nftables".to_string())
    } else {
        kfunc::kernel_support(Path::new("/sys/kernel/btf/vmlinux"))
    };
    match support {
        Ok(s) => Ok((kfunc::resolve(EBPF_OBJ, Some(&s))?, ConntrackAccess::Kfuncs)),
        Err(why) => {
            let w = format!(
                "the datapath cannot read conntrack itself ({why}): nftables restores each LAN packet's WAN instead, at some cost per packet"
            );
            tracing::info!("{w}");
            warnings.push(w);
            Ok((kfunc::resolve(EBPF_OBJ, None)?, ConntrackAccess::Nftables))
        }
    }
}

/// Loading reads the kernel's BTF twice (the kfuncs here, the loader's
/// relocations in aya), several megabytes each, freed at once; glibc's
/// allocator then raises its threshold for mapping large blocks and keeps
/// the freed heap (10 MiB of a 26 MiB daemon, measured by the bench's
/// footprint section). Give it back.
fn release_load_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The two tc priorities mwan alternates between when it replaces its filter.
pub const TC_PRIORITIES: [u16; 2] = [0x6d00, 0x6d01];
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
    /// What the load warned of (pins without a layout version, kfuncs
    /// the kernel lacks).
    pub warnings: Vec<String>,
    /// How the classifier reads a connection's recorded WAN.
    pub conntrack: ConntrackAccess,
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
        let loaded = Self::load_for_kernel(pin_dir, max_flows, max_hosts, &mut warnings).and_then(
            |(ebpf, maps, conntrack)| {
                migration.copy()?;
                migrate::write_marker(pin_dir)?;
                Ok((ebpf, maps, conntrack))
            },
        );
        let (ebpf, maps, conntrack) = match loaded {
            Ok(l) => l,
            Err(e) => {
                migration.abort();
                return Err(e);
            }
        };
        let flow_capacity = pinned_geometry(&pin_dir.join(map::FLOWS))?
            .map(|g| g.max_entries)
            .unwrap_or(max_flows);
        release_load_memory();
        Ok(Datapath {
            ebpf,
            maps,
            inherited,
            flow_capacity,
            migration,
            warnings,
            conntrack,
        })
    }

    /// Loads the object resolved for this kernel: with the conntrack
    /// kfuncs where it has them (and verifies them), else without.
    fn load_for_kernel(
        pin_dir: &Path,
        max_flows: u32,
        max_hosts: u32,
        warnings: &mut Vec<String>,
    ) -> Result<(Ebpf, Maps, ConntrackAccess)> {
        let (obj, access) = object_for_this_kernel(warnings)?;
        match Self::load_object(&obj, pin_dir, max_flows, max_hosts) {
            Err(e) if access == ConntrackAccess::Kfuncs => {
                let w = format!(
                    "the datapath with conntrack kfuncs did not load ({e:#}); nftables restores each LAN packet's WAN instead"
                );
                tracing::warn!("{w}");
                warnings.push(w);
                let obj = kfunc::resolve(EBPF_OBJ, None)?;
                let (ebpf, maps) = Self::load_object(&obj, pin_dir, max_flows, max_hosts)?;
                Ok((ebpf, maps, ConntrackAccess::Nftables))
            }
            r => r.map(|(ebpf, maps)| (ebpf, maps, access)),
        }
    }

    fn load_object(
        obj: &[u8],
        pin_dir: &Path,
        max_flows: u32,
        max_hosts: u32,
    ) -> Result<(Ebpf, Maps)> {
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for (name, size) in map_sizes(max_flows, max_hosts) {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(obj).with_context(|| {
            format!("loading the eBPF datapath (maps in {})", pin_dir.display())
        })?;
        for name in [PROG_LAN_ETH, PROG_LAN_L3, PROG_WAN] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        let maps = Maps::take_from(&mut ebpf)?;
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
        self.attach_program(iface, if l2 { PROG_LAN_ETH } else { PROG_LAN_L3 })
    }

    /// Attaches the WAN-side program at tc ingress of WAN interface
    /// `iface`, like [`Datapath::attach`].
    pub fn attach_wan(&mut self, iface: &str) -> Result<bool> {
        self.attach_program(iface, PROG_WAN)
    }

    fn attach_program(&mut self, iface: &str, name: &str) -> Result<bool> {
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

/// The maps sized from the config (`max_flows`, `max_hosts`), with their
/// sizes.
fn map_sizes(max_flows: u32, max_hosts: u32) -> Vec<(&'static str, u32)> {
    MAPS.iter()
        .filter_map(|m| {
            let size = match m.sized_by? {
                Sizing::MaxFlows => max_flows,
                Sizing::MaxHosts => max_hosts,
            };
            Some((m.name, size))
        })
        .collect()
}

/// Deletes mwan's pins in `pin_dir` (maps are freed when no program uses
/// them any more) and the directory when it is empty. Anything else there
/// (other programs' pins, the kernel's `maps.debug` in a bpffs root) stays.
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    for name in MAPS.iter().map(|m| m.name).chain(map::LEGACY) {
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
pub fn read_hash_batched<K: aya::Pod, V: aya::Pod>(
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
    fn read<F: MapFamily>(
        pin_dir: &Path,
        chunk: u32,
        each: &mut impl FnMut(AnyFlowKey, &FlowValue) -> bool,
    ) -> Result<bool> {
        let name = map::names::<F>().flows;
        if maps::predates(pin_dir, name) {
            return Ok(true);
        }
        let mut go_on = true;
        read_hash_batched::<F::FlowKey, FlowValue>(
            &open_pinned_map(pin_dir, name)?,
            chunk,
            |k, v| {
                go_on = each(F::any_flow(*k), v);
                go_on
            },
        )?;
        Ok(go_on)
    }
    if read::<V4>(pin_dir, chunk, &mut each)? {
        read::<V6>(pin_dir, chunk, &mut each)?;
    }
    Ok(())
}

/// The pinned flow maps of both families, to rewrite pins from outside
/// the datapath.
pub struct FlowMaps {
    v4: FlowMap<V4>,
    v6: Option<FlowMap<V6>>,
}

impl FlowMaps {
    pub fn open(pin_dir: &Path) -> Result<FlowMaps> {
        Ok(FlowMaps {
            v4: maps::open_flows::<V4>(pin_dir)?
                .ok_or_else(|| anyhow!("{} is not pinned", map::FLOWS))?,
            v6: maps::open_flows::<V6>(pin_dir)?,
        })
    }

    pub fn insert(&mut self, key: &AnyFlowKey, value: FlowValue) -> Result<()> {
        match key {
            AnyFlowKey::V4(k) => self.v4.insert(k, value, 0)?,
            AnyFlowKey::V6(k) => self
                .v6
                .as_mut()
                .ok_or_else(|| anyhow!("{} is not pinned", map::FLOWS6))?
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
