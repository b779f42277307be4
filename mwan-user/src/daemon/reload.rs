//! `mwan reload` and SIGHUP: a changed config becomes the new input. WANs
//! that stay keep their id, health and connections; removed ones leave
//! (the apply invalidates their pins, cleans up their connections and
//! empties their tables); new ones start `unknown`. Refused, with the
//! running config unchanged, when the new one is invalid or changes what
//! needs a restart.

use std::time::Instant;

use anyhow::{bail, Result};
use tracing::info;

use super::wan::{assign_ids, id_capacity, WanRt};
use super::{rule_policies, Daemon};
use crate::config::{self, Config};
use crate::family::PerFamily;
use crate::health::State;

impl Daemon {
    pub(super) async fn reload(&mut self) -> Result<String> {
        let r = self.apply_reload().await;
        match &r {
            Ok(_) => self.report.reloads.ok += 1,
            Err(e) => {
                self.report.reloads.failed += 1;
                self.report.reloads.last_error = Some(format!("{e:#}"));
            }
        }
        self.report.dirty = true;
        r
    }

    async fn apply_reload(&mut self) -> Result<String> {
        let new = Config::load(&self.opts.config)?;
        let links = self.net.links().await?;
        for w in new.check_system(&|n| links.iter().any(|l| l.name == n))? {
            tracing::warn!("{w}");
        }
        refuse_restart_keys(&self.cfg, &new)?;
        let ids = self.ids_for(&new)?;
        let mut summary = Vec::new();
        self.rebuild_wans(&new, ids, &mut summary);
        if new.rules != self.cfg.rules {
            summary.push("rules changed".into());
        }
        for l in self
            .cfg
            .lan_interfaces
            .iter()
            .filter(|l| !new.lan_interfaces.contains(l))
        {
            summary.push(format!("detached {l}"));
        }
        self.cfg = new;
        self.host.rule_policies = rule_policies(&self.cfg, &self.host);
        // Usage per WAN: new WANs start a cycle, a changed reset day moves
        // the cycle's end; outages only matter to WANs that drain.
        let notices = self
            .meter
            .configure(&self.cfg, &crate::clock::LocalTime::now());
        self.on_notices(notices);
        self.meter.save(true);
        let draining: Vec<u8> = self
            .wans
            .iter()
            .filter(|w| w.cfg.failback == crate::config::Failback::Drain)
            .map(|w| w.id)
            .collect();
        self.outages.retain(|id| draining.contains(&id));
        self.observe(true).await?;
        self.reconcile(true).await?;
        let msg = if summary.is_empty() {
            "reloaded: nothing changed".to_string()
        } else {
            format!("reloaded: {}", summary.join(", "))
        };
        info!("{msg}");
        Ok(msg)
    }

    /// The ids of `new`'s WANs: those that stay keep theirs, new ones
    /// avoid every id in use (the running WANs' and the pinned names'). A
    /// configured id that would renumber a running WAN (its flows' and
    /// connections' mark) needs a restart.
    fn ids_for(&self, new: &Config) -> Result<Vec<u8>> {
        let mut current: Vec<Option<String>> = self.dp.maps.names()?;
        for w in &self.wans {
            current[w.id as usize] = Some(w.cfg.name.clone());
        }
        let names: Vec<&str> = new.wans.iter().map(|w| w.name.as_str()).collect();
        for nw in &new.wans {
            let Some(id) = nw.id else { continue };
            if let Some(w) = self.wans.iter().find(|w| {
                (w.cfg.name == nw.name && w.id != id)
                    || (w.id == id && w.cfg.name != nw.name && names.contains(&w.cfg.name.as_str()))
            }) {
                bail!(
                    "wan {}: id {id} would renumber running WAN {} (id {}): restart mwan to apply it (the running config is unchanged)",
                    nw.name,
                    w.cfg.name,
                    w.id
                );
            }
        }
        let fixed: Vec<Option<u8>> = new.wans.iter().map(|w| w.id).collect();
        Ok(assign_ids(
            &names,
            &fixed,
            &current,
            id_capacity(new.mark_mask),
        ))
    }

    /// The WANs of `new` with their `ids`: the ones that stay keep their
    /// machines (with the new thresholds) and links, overrides go back to
    /// the config, an `enabled` change enables or disables.
    fn rebuild_wans(&mut self, new: &Config, ids: Vec<u8>, summary: &mut Vec<String>) {
        let mut old: Vec<WanRt> = std::mem::take(&mut self.wans);
        for w in old.iter().filter(|w| new.wan(&w.cfg.name).is_none()) {
            summary.push(format!("removed {}", w.cfg.name));
            info!(wan = %w.cfg.name, "WAN removed by reload; its flows move");
        }
        for (wcfg, id) in new.wans.iter().cloned().zip(ids) {
            let Some(p) = old.iter().position(|w| w.cfg.name == wcfg.name) else {
                summary.push(format!("added {}", wcfg.name));
                let mark = new.wan_mark(id);
                let initial = PerFamily::both(State::Unknown);
                self.wans
                    .push(WanRt::new(wcfg, id, mark, new.table_base, initial));
                continue;
            };
            let mut w = old.swap_remove(p);
            if w.cfg != wcfg {
                summary.push(format!("changed {}", wcfg.name));
            }
            let ts = update_wan(&mut w, wcfg);
            self.wans.push(w);
            self.record(self.wans.len() - 1, ts);
        }
        self.wans.sort_by_key(|w| w.id);
    }
}

/// A kept WAN takes its new config: thresholds, weight (the runtime
/// override is dropped), not drained; enabled or disabled when `enabled`
/// changed. Returns the transitions.
fn update_wan(
    w: &mut WanRt,
    wcfg: config::Wan,
) -> Vec<(crate::family::Family, crate::health::Transition)> {
    let enabled_changed = w.cfg.enabled != wcfg.enabled;
    w.set_health_config(&wcfg.health);
    w.weight_override = None;
    w.drained = false;
    w.cfg = wcfg;
    if enabled_changed {
        w.set_disabled(!w.cfg.enabled, Instant::now())
    } else {
        Vec::new()
    }
}

/// Settings a running daemon cannot change.
fn refuse_restart_keys(cur: &Config, new: &Config) -> Result<()> {
    let fixed: [(&str, bool); 9] = [
        ("pin_dir", new.pin_dir != cur.pin_dir),
        ("state_dir", new.state_dir != cur.state_dir),
        ("usage_file", new.usage_file != cur.usage_file),
        ("mark_mask", new.mark_mask != cur.mark_mask),
        ("table_base", new.table_base != cur.table_base),
        ("rule_priority", new.rule_priority != cur.rule_priority),
        ("max_flows", new.max_flows != cur.max_flows),
        ("max_hosts", new.max_hosts != cur.max_hosts),
        ("metrics_listen", new.metrics_listen != cur.metrics_listen),
    ];
    if let Some((k, _)) = fixed.iter().find(|(_, changed)| *changed) {
        let how = if k.starts_with("max_") {
            " (`mwan stop`, then `mwan run`: the map is resized, no connection moves)"
        } else {
            ""
        };
        bail!("{k} changed: restart mwan to apply it{how} (the running config is unchanged)");
    }
    Ok(())
}
