//! What the daemon changed on the host, persisted in `<state_dir>/state.json`
//! so that a later daemon (restart in keep mode) or `mwan stop --teardown`
//! without a daemon can undo it, and the teardown itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::Config;
use crate::routing::Net;
use crate::sysctl::{self, SavedSysctls};
use crate::{datapath, nft};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostState {
    /// Original values of the sysctls mwan changed.
    pub sysctls: SavedSysctls,
    /// A bpffs mwan mounted itself.
    pub bpffs_mount: Option<PathBuf>,
    /// LAN interfaces that carry mwan's tc filter.
    pub lan_interfaces: Vec<String>,
    /// WAN interfaces that carry mwan's WAN-side tc filter.
    #[serde(default)]
    pub wan_interfaces: Vec<String>,
    /// LAN and WAN interfaces on which mwan added the `clsact` qdisc.
    #[serde(default)]
    pub clsact_added: Vec<String>,
    pub pin_dir: PathBuf,
    pub table_base: u32,
    /// The policy id of each rule, by name (see
    /// `policy::assign_rule_policies`): pins record it, so it must outlive
    /// a restart.
    #[serde(default)]
    pub rule_policies: BTreeMap<String, u8>,
    /// Directories mwan created for `state_dir`, outermost first: the
    /// teardown removes them once mwan's files are gone, if nothing else is
    /// in them (a directory the admin made is left alone).
    #[serde(default)]
    pub created_dirs: Vec<PathBuf>,
}

impl HostState {
    pub fn load(path: &Path) -> Result<Option<HostState>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("reading {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Records directories mwan created (see [`create_dirs`]); those a
    /// previous daemon created stay recorded.
    pub fn note_created(&mut self, dirs: Vec<PathBuf>) {
        for d in dirs {
            if !self.created_dirs.contains(&d) {
                self.created_dirs.push(d);
            }
        }
        self.created_dirs.sort_by_key(|d| d.components().count());
    }

    /// Written atomically (temp file + rename): a crash never leaves a
    /// half-written record.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Removes everything mwan added: tc filters, nftables table, rules and
/// routes, pins (and a bpffs it mounted), and restores sysctls. Idempotent and
/// best effort: every step runs; failures are returned.
pub async fn teardown(cfg: &Config, host: &HostState, net: &Net) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    let mut lans: Vec<&String> = cfg
        .lan_interfaces
        .iter()
        .chain(&host.lan_interfaces)
        .chain(cfg.wans.iter().map(|w| &w.interface))
        .chain(&host.wan_interfaces)
        .collect();
    lans.sort();
    lans.dedup();
    for lan in lans {
        if datapath::detach(lan) {
            info!(interface = %lan, "removed tc filter");
        }
        if !host.clsact_added.contains(lan) {
            continue;
        }
        let Some(index) = datapath::ifindex(lan) else {
            continue;
        };
        match net.remove_clsact_if_unused(index).await {
            Ok(true) => info!(interface = %lan, "removed the clsact qdisc mwan had added"),
            Ok(false) => {}
            Err(e) => errors.push(e),
        }
    }
    if let Err(e) = nft::delete().await {
        errors.push(e.context("deleting nftables table inet mwan"));
    }
    let tables = cfg.table_base..=cfg.table_base + mwan_common::MAX_WANS;
    if let Err(e) = net.remove_all_mwan(tables).await {
        errors.push(e.context("removing mwan's rules and routes"));
    }
    for e in sysctl::restore(&host.sysctls) {
        warn!(error = %e, "restoring a sysctl");
    }
    if let Err(e) = datapath::remove_pins(&cfg.pin_dir) {
        errors.push(e);
    }
    if let Some(m) = &host.bpffs_mount {
        if let Err(e) = datapath::unmount(m) {
            errors.push(e);
        }
        // The mount point mwan created, empty now.
        let _ = std::fs::remove_dir(&cfg.pin_dir);
    }
    for p in [
        cfg.state_file(),
        cfg.state_file().with_extension("json.tmp"),
        cfg.control_socket(),
    ] {
        let _ = std::fs::remove_file(p);
    }
    // The usage of metered lines is the admin's record of the ISP's bills:
    // it stays, and so do the directories holding it.
    let usage = cfg.usage_path();
    let _ = std::fs::remove_file(usage.with_extension("json.tmp"));
    let kept = cfg.keeps_usage() && usage.exists();
    if kept {
        info!(file = %usage.display(), "kept the WANs' usage of their billing cycles");
    } else {
        let _ = std::fs::remove_file(&usage);
    }
    let dirs: Vec<PathBuf> = host
        .created_dirs
        .iter()
        .filter(|d| !(kept && usage.starts_with(d)))
        .cloned()
        .collect();
    remove_created_dirs(&dirs);
    errors
}

/// Creates `dir` and its missing parents; returns the directories it
/// created, outermost first, so that mwan removes only what it made.
pub fn create_dirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d {
        if p.as_os_str().is_empty() || std::fs::symlink_metadata(p).is_ok() {
            break;
        }
        missing.push(p.to_path_buf());
        d = p.parent();
    }
    missing.reverse();
    std::fs::create_dir_all(dir)?;
    Ok(missing)
}

/// Removes the directories mwan created, innermost first, each only if it
/// is empty: anything someone else put there keeps it.
pub fn remove_created_dirs(dirs: &[PathBuf]) {
    for d in dirs.iter().rev() {
        match std::fs::remove_dir(d) {
            Ok(()) => info!(dir = %d.display(), "removed the directory mwan had created"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %d.display(), error = %e, "left the directory mwan had created (not empty?)");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_directories_mwan_created_are_removed_and_only_when_empty() {
        let base = std::env::temp_dir().join(format!("mwan-dirs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).unwrap();
        // The admin made `base`; mwan makes `base/a/b`.
        let dir = base.join("a").join("b");
        let created = create_dirs(&dir).unwrap();
        assert_eq!(created, vec![base.join("a"), dir.clone()]);
        assert!(
            create_dirs(&dir).unwrap().is_empty(),
            "existing: nothing created"
        );
        let mut host = HostState::default();
        host.note_created(vec![dir.clone()]);
        host.note_created(created);
        assert_eq!(host.created_dirs, vec![base.join("a"), dir.clone()]);
        // Something not mwan's in `a`: `b` goes, `a` stays.
        std::fs::write(base.join("a").join("admin.txt"), "x").unwrap();
        remove_created_dirs(&host.created_dirs);
        assert!(!dir.exists() && base.join("a").is_dir());
        std::fs::remove_file(base.join("a").join("admin.txt")).unwrap();
        remove_created_dirs(&host.created_dirs);
        assert!(
            !base.join("a").exists() && base.is_dir(),
            "the admin's directory stays"
        );
        std::fs::remove_dir(&base).unwrap();
    }
}
