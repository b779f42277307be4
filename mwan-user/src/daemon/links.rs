//! Reading the daemon's inputs from netlink: each WAN's link, addresses and
//! next hops, the host's addresses and the LAN links. A change of a WAN's
//! link is fed to its health machines here (an unusable link takes the
//! WAN down at once; a new address renews a WAN its probes took down); the
//! rest is left to the next `desired`/`apply`.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::Instant;

use anyhow::Result;
use ipnet::IpNet;
use mwan_common::MAX_WANS;
use tracing::info;

use super::desired::{Host, LanLink};
use super::wan::{LinkInfo, WanRt};
use super::Daemon;
use crate::config::{self, Config, Gateway, Gateway6, Ipv6Mode};
use crate::family::{Family, PerFamily};
use crate::logfield::shown;
use crate::routing::{Net, Nexthop};

/// What the kernel says of WAN `cfg`'s link now.
async fn read_link(net: &Net, cfg: &config::Wan, exclude: RangeInclusive<u32>) -> Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let Some(l) = net.link(&cfg.interface).await? else {
        return Ok(info);
    };
    info.ifindex = Some(l.index);
    info.admin_up = l.admin_up;
    info.carrier = l.carrier;
    info.addrs[Family::Ipv4] = net
        .ipv4_addrs(l.index)
        .await?
        .into_iter()
        .next()
        .map(IpNet::V4)
        .into_iter()
        .collect();
    info.nexthop[Family::Ipv4] = match cfg.gateway {
        Gateway::Fixed(gw) => Some(Nexthop {
            gateway: Some(gw.into()),
            ifindex: l.index,
        }),
        Gateway::Auto => {
            net.learned_default(Family::Ipv4, l.index, exclude.clone())
                .await?
        }
        Gateway::None => None,
    };
    if cfg.ipv6 != Ipv6Mode::Off {
        info.addrs[Family::Ipv6] = net
            .ipv6_addrs(l.index)
            .await?
            .into_iter()
            .map(IpNet::V6)
            .collect();
        info.nexthop[Family::Ipv6] = match cfg.gateway6 {
            Some(Gateway6::Fixed(gw)) => Some(Nexthop {
                gateway: Some(gw.into()),
                ifindex: l.index,
            }),
            Some(Gateway6::Auto) => net.learned_default(Family::Ipv6, l.index, exclude).await?,
            None => None,
        };
    }
    Ok(info)
}

/// The host's addresses and the configured LAN interfaces that exist.
async fn read_host(net: &Net, cfg: &Config) -> Result<Host> {
    let v4 = net.all_ipv4_addrs().await?;
    let v6 = net.all_ipv6_addrs().await?;
    let addrs = PerFamily::new(|f| match f {
        Family::Ipv4 => v4.iter().map(|(_, a)| IpNet::V4(*a)).collect(),
        Family::Ipv6 => v6.iter().map(|(_, a)| IpNet::V6(*a)).collect(),
    });
    let mut lans = BTreeMap::new();
    for name in &cfg.lan_interfaces {
        if let Some(l) = net.link(name).await? {
            let link = LanLink {
                ifindex: l.index,
                l2: l.l2,
            };
            lans.insert(name.clone(), link);
        }
    }
    Ok(Host { addrs, lans })
}

impl Daemon {
    /// Re-reads every WAN's link and the host from the kernel. `first`
    /// (start, reload): every WAN's machines learn whether its link is
    /// usable, and nothing is logged as a change.
    pub(super) async fn observe(&mut self, first: bool) -> Result<()> {
        let exclude = self.cfg.table_base..=self.cfg.table_base + MAX_WANS;
        for i in 0..self.wans.len() {
            let info = read_link(&self.net, &self.wans[i].cfg, exclude.clone()).await?;
            let old = std::mem::replace(&mut self.wans[i].link, info);
            self.link_changed(i, &old, first);
        }
        self.host_view = read_host(&self.net, &self.cfg).await?;
        self.follow_ha_role();
        Ok(())
    }

    /// Logs what changed on WAN `i`'s link since `old` and feeds it to the
    /// WAN's machines.
    fn link_changed(&mut self, i: usize, old: &LinkInfo, first: bool) {
        let w = &self.wans[i];
        let new = &w.link;
        let mut renewed = Vec::new();
        if !first {
            log_changes(w, old);
        }
        if new.addrs[Family::Ipv6]
            .iter()
            .any(|a| !old.addrs[Family::Ipv6].contains(a))
        {
            renewed.push((Family::Ipv6, "a new IPv6 address"));
        }
        if !old.addrs[Family::Ipv4].is_empty()
            && !new.addrs[Family::Ipv4].is_empty()
            && old.addrs[Family::Ipv4] != new.addrs[Family::Ipv4]
        {
            renewed.push((Family::Ipv4, "a new address"));
        }
        let reason = new.unusable_reason(&w.cfg);
        let was_usable = old.unusable_reason(&w.cfg).is_none() && old.ifindex.is_some();
        let usable = reason.is_none();
        let now = Instant::now();
        if first || usable != was_usable {
            let reason = reason.unwrap_or_else(|| format!("interface {} usable", w.cfg.interface));
            let ts = self.wans[i].on_link(usable, &reason, now);
            self.record(i, ts);
        }
        if !first {
            // Failures seen before a new address say nothing of it.
            for (f, why) in renewed {
                let ts = self.wans[i].renew(f, why, now);
                self.record(i, ts);
            }
        }
    }

    /// An HA pair's role follows keepalived: the router holding the
    /// gateway address (`ha_address`) is the active one. Address events
    /// bring every change here; the role is logged and shown by `mwan
    /// status`. Nothing else depends on it: the standby keeps probing, its
    /// tables and rules route nothing while the LAN's gateway is elsewhere,
    /// and it never touches the virtual addresses.
    fn follow_ha_role(&mut self) {
        let Some(vip) = self.cfg.ha_address else {
            self.ha_active = None;
            return;
        };
        let active = self.host_view.addrs[Family::Ipv4]
            .iter()
            .any(|a| a.addr() == vip);
        if self.ha_active != Some(active) {
            let role = if active { "active" } else { "standby" };
            info!(role, ha_address = %vip, "HA role");
            self.ha_active = Some(active);
            self.report.dirty = true;
        }
    }
}

fn log_changes(w: &WanRt, old: &LinkInfo) {
    let new = &w.link;
    let name = &w.cfg.name;
    if old.nexthop[Family::Ipv4] != new.nexthop[Family::Ipv4] {
        info!(wan = %name, gateway = shown(new.gateway_text(&w.cfg)), "gateway changed");
    }
    if old.nexthop[Family::Ipv6] != new.nexthop[Family::Ipv6] {
        info!(wan = %name, gateway6 = shown(new.nexthop[Family::Ipv6].and_then(|n| n.gateway)), "IPv6 gateway changed");
    }
    if old.addrs[Family::Ipv6] != new.addrs[Family::Ipv6] {
        info!(wan = %name, addresses6 = ?new.addrs[Family::Ipv6], "IPv6 addresses changed");
    }
    if old.nat6(&w.cfg) != new.nat6(&w.cfg) {
        info!(wan = %name, prefix6 = shown(new.prefix6(&w.cfg)), "IPv6 prefix changed");
    }
    if old.addrs[Family::Ipv4] != new.addrs[Family::Ipv4] {
        info!(wan = %name, address = shown(new.addrs[Family::Ipv4].first()), "address changed");
    }
}
