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

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HostState {
    /// Original values of the sysctls mwan changed.
    pub sysctls: SavedSysctls,
    /// A bpffs mwan mounted itself.
    pub bpffs_mount: Option<PathBuf>,
    /// LAN interfaces that carry mwan's tc filter.
    pub lan_interfaces: Vec<String>,
    /// LAN interfaces on which mwan added the `clsact` qdisc.
    #[serde(default)]
    pub clsact_added: Vec<String>,
    pub pin_dir: PathBuf,
    pub table_base: u32,
    /// The policy id of each rule, by name (see
    /// `policy::assign_rule_policies`): pins record it, so it must outlive
    /// a restart.
    #[serde(default)]
    pub rule_policies: BTreeMap<String, u8>,
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
        .chain(host.lan_interfaces.iter())
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
        errors.push(e.context("deleting nftables table ip mwan"));
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
    for p in [cfg.state_file(), cfg.control_socket()] {
        let _ = std::fs::remove_file(p);
    }
    errors
}
