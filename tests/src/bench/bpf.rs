//! The kernel's own numbers on mwan's datapath: BPF run-time statistics of
//! the classifier and the flow map's size.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use lab::Lab;
use mwan_common::{map, FlowKey, FlowValue, PROG_LAN_ETH};

/// BPF run-time statistics, enabled with `BPF_ENABLE_STATS` for as long as
/// this value lives (fd-scoped: no sysctl is changed, and the kernel stops
/// counting when the last such fd is closed).
pub struct RunStats {
    _fd: OwnedFd,
}

impl RunStats {
    pub fn enable() -> Result<RunStats> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| anyhow!("BPF_ENABLE_STATS: {e}"))?;
        Ok(RunStats { _fd: fd })
    }
}

/// The id of the classifier mwan attached to `lan0` in the lab's router.
pub fn lan_prog_id(lab: &Lab) -> Result<u32> {
    let out = lab
        .router()
        .exec(&["tc", "-j", "filter", "show", "dev", "lan0", "ingress"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("tc -j output")?;
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.get("options")?.get("prog"))
        .filter(|p| p.get("name").and_then(|n| n.as_str()) == Some(PROG_LAN_ETH))
        .find_map(|p| p.get("id")?.as_u64())
        .map(|id| id as u32)
        .ok_or_else(|| anyhow!("no {PROG_LAN_ETH} filter on lan0: {v}"))
}

/// (run_time_ns, run_cnt) of program `id` (BPF_OBJ_GET_INFO_BY_FD).
pub fn prog_counters(id: u32) -> Result<(u64, u64)> {
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(|e| anyhow!("listing BPF programs: {e}"))?;
        if info.id() == id {
            return Ok((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    Err(anyhow!("BPF program {id} is gone"))
}

/// Nanoseconds per run of program `id` while `work` runs (stats enabled
/// only for that time). Returns (ns per run, runs).
pub fn cost_during<T>(id: u32, work: impl FnOnce() -> Result<T>) -> Result<(f64, u64, T)> {
    let _stats = RunStats::enable()?;
    let (ns0, n0) = prog_counters(id)?;
    let out = work()?;
    let (ns1, n1) = prog_counters(id)?;
    let runs = n1.saturating_sub(n0);
    Ok((
        ns1.saturating_sub(ns0) as f64 / runs.max(1) as f64,
        runs,
        out,
    ))
}

/// Flow map facts from the kernel: max_entries and memlock (bytes), from
/// /proc/self/fdinfo of the pinned map.
pub struct MapFacts {
    pub max_entries: u64,
    pub memlock: u64,
}

pub fn flow_map_facts(pin_dir: &Path) -> Result<MapFacts> {
    let map = mwan::datapath::open_pinned_map(pin_dir, map::FLOWS)?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let field = |name: &str| -> Result<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} in fdinfo:\n{info}"))
    };
    Ok(MapFacts {
        max_entries: field("max_entries:")?,
        memlock: field("memlock:")?,
    })
}

/// Entries in the pinned flow map (batched reads).
pub fn count_flows(pin_dir: &Path) -> Result<u64> {
    let map = mwan::datapath::open_pinned_map(pin_dir, map::FLOWS)?;
    let mut n = 0u64;
    mwan::datapath::read_hash_batched::<FlowKey, FlowValue>(&map, 8192, |_, _| {
        n += 1;
        true
    })?;
    Ok(n)
}
