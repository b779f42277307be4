//! Makes the kernel (and the helpers mwan runs) match a [`Desired`] state.
//!
//! [`Applied`] is what was last applied, part by part: each part is
//! written only when it differs, and recorded once its write succeeded, so
//! a failure leaves an exact record and the next apply retries the rest.
//! The order is the datapath's: names, rules and settings; sysctls; the DNS
//! relay (its ports go into the nftables table); table routes; ip rules;
//! nftables (its first install adopts the connections older than it); the
//! bypass tries; per family the `alive` flags and policies — a WAN coming
//! back is alive before a policy hands it new flows (else a flow pinned in
//! between is re-pinned on its second packet), a dying WAN leaves the
//! policies before its pins are invalidated (else a new flow could still be
//! pinned to it); the balance routes; the LAN filters; the probers.
//!
//! What the kernel may change behind mwan's back is checked when the apply
//! is asked to verify (netlink events and the periodic tick): a WAN table's
//! route, which the kernel deletes without a notification when its
//! interface goes down or loses its last address. The balance route is
//! rewritten after [`Applied::forget_balance`].

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use ipnet::IpNet;
use mwan_common::{Policy, Settings, WanEntry, WanIface, MAX_WANS};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::desired::{
    Balance, Desired, LanLink, NftSpec, ProberSpec, RelaySpec, SysctlSpec, TableRoute, WanConns,
};
use super::host::HostState;
use crate::config::Config;
use crate::datapath::{Datapath, DomainMaps};
use crate::dns::relay::Relay;
use crate::family::{Family, PerFamily};
use crate::health::{Prober, RoundReport};
use crate::policy::CompiledRules;
use crate::routing::{self, Net, RuleSpec};
use crate::{nft, sysctl};

/// What the apply needs to reach.
pub struct Kernel<'a> {
    pub cfg: &'a Config,
    pub dp: &'a mut Datapath,
    pub net: &'a Net,
    pub host: &'a mut HostState,
    pub rounds: &'a mpsc::Sender<RoundReport>,
}

/// What was last applied, and what runs because of it.
pub struct Applied {
    names: Vec<Option<String>>,
    wans: PerFamily<Vec<WanEntry>>,
    policies: PerFamily<Option<Vec<Policy>>>,
    bypass: PerFamily<Option<Vec<IpNet>>>,
    balance: PerFamily<Option<Balance>>,
    all_down: PerFamily<bool>,
    rules: Option<(CompiledRules, Settings, BTreeMap<String, u32>)>,
    tables: BTreeMap<(Family, u32), TableRoute>,
    ip_rules: Option<Vec<RuleSpec>>,
    nft: Option<(NftSpec, Option<nft::Divert>)>,
    sysctls: Option<SysctlSpec>,
    relay: Option<(RelaySpec, Relay<DomainMaps>)>,
    probers: BTreeMap<(u8, Family), (ProberSpec, Prober)>,
    lans: BTreeMap<String, LanLink>,
    wan_filters: BTreeMap<String, (u32, WanIface)>,
    conns: BTreeMap<u8, WanConns>,
    host_saved: Option<HostState>,
}

/// What an apply changed that the daemon acts on.
#[derive(Debug, Default)]
pub struct Effects {
    /// WANs whose pins of a family were invalidated: their connections of
    /// that family are cleaned up (both families: `None`).
    pub died: Vec<(Option<Family>, WanConns)>,
    /// WANs alive again in a family, by id.
    pub revived: Vec<(Family, u8)>,
    /// Families whose "no WAN takes new flows" changed, with the new value.
    pub all_down: Vec<(Family, bool)>,
    /// The nftables table was installed for the first time and the
    /// connections older than it adopted: how many.
    pub adopted: Option<u64>,
}

impl Applied {
    /// The state of a daemon starting on `dp`: the WAN names and `alive`
    /// flags as the datapath holds them (a previous daemon's, or zeros),
    /// nothing else.
    pub fn inherited(dp: &Datapath) -> Result<Applied> {
        let wans = PerFamily::new(|f| {
            (0..MAX_WANS as u8)
                .map(|id| dp.maps.wan(f, id))
                .collect::<Result<Vec<_>>>()
        });
        let [v4, v6] = [wans[Family::Ipv4].as_ref(), wans[Family::Ipv6].as_ref()];
        if let Err(e) = v4.and(v6) {
            return Err(anyhow!("reading WANS: {e:#}"));
        }
        Ok(Applied {
            names: dp.maps.names()?,
            wans: wans.map(|_, w| w.expect("checked")),
            policies: PerFamily::default(),
            bypass: PerFamily::default(),
            balance: PerFamily::default(),
            all_down: PerFamily::default(),
            rules: None,
            tables: BTreeMap::new(),
            ip_rules: None,
            nft: None,
            sysctls: None,
            relay: None,
            probers: BTreeMap::new(),
            lans: BTreeMap::new(),
            wan_filters: BTreeMap::new(),
            conns: BTreeMap::new(),
            host_saved: None,
        })
    }

    /// Family `f`'s `alive` flag of WAN `id`, as applied.
    pub fn alive(&self, f: Family, id: u8) -> bool {
        self.wans[f].get(id as usize).is_some_and(|e| e.alive != 0)
    }

    /// Whether no WAN took new flows of family `f` at the last apply.
    pub fn all_down(&self, f: Family) -> bool {
        self.all_down[f]
    }

    /// Family `f`'s default policy as applied (for the shares).
    pub fn default_policy(&self, f: Family) -> Option<&Policy> {
        self.policies[f].as_ref().and_then(|p| p.first())
    }

    /// Family `f`'s policies as applied, by id.
    pub fn policies(&self, f: Family) -> Option<&Vec<Policy>> {
        self.policies[f].as_ref()
    }

    /// Whether rule `name` of `cfg` matched new flows at the last apply
    /// (its schedule); `None` before the first.
    pub fn rule_active(&self, name: &str, cfg: &Config) -> Option<bool> {
        let i = cfg.rules.iter().position(|r| r.name == name)?;
        self.rules.as_ref()?.0.active.get(i).copied()
    }

    /// The LAN interfaces the classifier is attached to.
    pub fn lans(&self) -> Vec<crate::control::LanStatus> {
        self.lans
            .iter()
            .map(|(name, l)| crate::control::LanStatus {
                interface: name.clone(),
                l2: l.l2,
            })
            .collect()
    }

    pub fn relay(&self) -> Option<&Relay<DomainMaps>> {
        self.relay.as_ref().map(|(_, r)| r)
    }

    /// The balance routes are rewritten at the next apply: the kernel drops
    /// a single-nexthop route on a quick down/up of its link without
    /// telling.
    pub fn forget_balance(&mut self) {
        self.balance = PerFamily::default();
    }

    /// Stops what runs (probers, relay) and drops the DNS divert from the
    /// table, leaving the rest in the kernel (`mwan stop`: the datapath
    /// keeps forwarding). Returns the relay's UDP port, if one ran.
    pub async fn stop_helpers(&mut self) -> Result<Option<u16>> {
        self.probers.clear();
        let Some((spec, divert)) = self.nft.take() else {
            self.relay = None;
            return Ok(None);
        };
        let port = divert.as_ref().map(|d| d.port);
        if divert.is_some() {
            // Without the relay, diverted queries would be lost: the LAN's
            // DNS goes direct (unlearned) until the next daemon diverts it.
            nft::apply(&table(&spec, None)).await?;
        }
        self.relay = None;
        Ok(port)
    }

    /// Applies `d`. `verify`: also check what the kernel may have changed
    /// behind mwan's back (see the module documentation).
    pub async fn apply(
        &mut self,
        k: &mut Kernel<'_>,
        d: &Desired,
        verify: bool,
    ) -> Result<Effects> {
        let mut fx = Effects::default();
        self.apply_names(k, d)?;
        self.apply_rules(k, d)?;
        self.apply_sysctls(k, &d.sysctls);
        self.apply_relay(k, d)?;
        self.apply_tables(k, d, verify).await?;
        if self.ip_rules.as_ref() != Some(&d.ip_rules) {
            k.net
                .sync_rules(&d.ip_rules)
                .await
                .context("installing ip rules")?;
            self.ip_rules = Some(d.ip_rules.clone());
        }
        // Before the table: a table that no longer restores marks relies
        // on the WAN-side program for what arrives on the WANs.
        self.apply_wan_filters(k, d)?;
        if self.apply_nft(d).await? {
            // Before the classifier is attached: an old UDP flow must not
            // be pinned afresh before its WAN is recorded.
            let conns = d.conns.values().cloned().collect();
            fx.adopted = Some(super::cleanup::adopt_connections(k.cfg.mark_mask, conns).await);
        }
        for f in Family::BOTH {
            let want = &d.families[f].bypass;
            if self.bypass[f].as_ref() != Some(want) {
                k.dp.maps.write_bypass(f, want)?;
                self.bypass[f] = Some(want.clone());
            }
        }
        for f in Family::BOTH {
            self.apply_family(k, d, f, &mut fx)?;
        }
        self.apply_balance(k, d).await?;
        self.apply_lans(k, d)?;
        self.apply_probers(k, d);
        self.conns = d.conns.clone();
        if self.host_saved.as_ref() != Some(&*k.host) {
            k.host.save(&k.cfg.state_file())?;
            self.host_saved = Some(k.host.clone());
        }
        Ok(fx)
    }

    fn apply_names(&mut self, k: &mut Kernel<'_>, d: &Desired) -> Result<()> {
        for (id, name) in d.names.iter().enumerate() {
            if self.names.get(id) != Some(name) {
                k.dp.maps.write_name(id as u8, name.as_deref())?;
                self.names[id] = name.clone();
            }
        }
        Ok(())
    }

    /// The rule maps and `SETTINGS` (rules written with matching off, then
    /// switched on: a half-written rule set is never used).
    fn apply_rules(&mut self, k: &mut Kernel<'_>, d: &Desired) -> Result<()> {
        let want = (d.rules.clone(), d.settings, d.rule_ifaces.clone());
        if self.rules.as_ref() == Some(&want) {
            return Ok(());
        }
        let previous = self
            .rules
            .as_ref()
            .filter(|(_, _, ifaces)| *ifaces == d.rule_ifaces)
            .map(|(r, _, _)| r);
        k.dp.maps
            .write_rules_and_settings(k.cfg, &d.rules, previous, &|n| {
                d.rule_ifaces.get(n).copied()
            })?;
        self.rules = Some(want);
        Ok(())
    }

    /// A WAN interface that does not exist yet (PPP) gets its settings when
    /// it appears: a failure to set one of its keys is a warning.
    fn apply_sysctls(&mut self, k: &mut Kernel<'_>, want: &SysctlSpec) {
        if self.sysctls.as_ref() == Some(want) {
            return;
        }
        let ipv6_new = self
            .sysctls
            .as_ref()
            .is_none_or(|s| s.ipv6_interfaces != want.ipv6_interfaces);
        if ipv6_new
            && !want.ipv6_interfaces.is_empty()
            && !sysctl::ipv6_forwarding().unwrap_or(true)
        {
            warn!(
                wans = ?want.ipv6_interfaces,
                "IPv6 forwarding is off (net.ipv6.conf.all.forwarding = 0): the LAN's IPv6 is not routed through the WANs with IPv6; enabling it is the admin's choice"
            );
        }
        for (key, value) in &want.settings {
            if let Err(e) = sysctl::set(&mut k.host.sysctls, key, value) {
                if want.per_interface.contains(key) {
                    warn!(key = %key, error = %e, "sysctl not set (interface missing?)");
                } else {
                    // The host's own keys (forwarding, hashing): mwan cannot
                    // route without them.
                    error!(key = %key, value = %value, error = %format!("{e:#}"), "sysctl not set");
                }
            }
        }
        self.sysctls = Some(want.clone());
    }

    /// Starts, restarts or stops the DNS relay. What a relay learned is
    /// forgotten with it: its masks index the rules as they were.
    fn apply_relay(&mut self, k: &mut Kernel<'_>, d: &Desired) -> Result<()> {
        if self.relay.as_ref().map(|(s, _)| s) == d.relay.as_ref() {
            return Ok(());
        }
        if let Some((_, relay)) = self.relay.take() {
            let port = relay.port;
            k.dp.maps.give_back_domain_dst(relay.stop());
            super::cleanup::forget_diverted(port);
        }
        k.dp.maps.clear_domain_dst()?;
        let Some(spec) = &d.relay else {
            return Ok(());
        };
        let matcher = crate::dns::DomainMatcher::from_rules(spec.domains.iter());
        let sink = k.dp.maps.lend_domain_dst(&k.cfg.pin_dir)?;
        let relay = match Relay::start(sink, matcher, spec.ttl_floor, spec.ttl_grace) {
            Ok(r) => r,
            Err(e) => {
                k.dp.maps.give_back_domain_dst(e.sink);
                return Err(e.error);
            }
        };
        self.relay = Some((spec.clone(), relay));
        Ok(())
    }

    /// Puts each WAN table's default route of each family in place (the
    /// link's next hop), or empties the table when it has none. While the
    /// link is unusable the kernel may refuse the route: that is a
    /// warning, and the verification puts it in once the link is usable.
    /// A WAN's IPv6 never stops its IPv4.
    async fn apply_tables(&mut self, k: &mut Kernel<'_>, d: &Desired, verify: bool) -> Result<()> {
        let gone: Vec<(Family, u32)> = self
            .tables
            .keys()
            .filter(|key| !d.tables.contains_key(key))
            .copied()
            .collect();
        for (f, table) in gone {
            k.net.flush_table(f, table).await?;
            self.tables.remove(&(f, table));
        }
        for (&(f, table), want) in &d.tables {
            let changed = self.tables.get(&(f, table)).map(|r| r.nexthop) != Some(want.nexthop);
            let mut install = changed;
            if !install && verify && want.usable && want.nexthop.is_some() {
                install = k.net.table_default(f, table).await? != want.nexthop;
                if install {
                    info!(table, family = %f, "a WAN's table route was gone (interface set down, address removed?); putting it back");
                }
            }
            if !install {
                self.tables.insert((f, table), *want);
                continue;
            }
            match want.nexthop {
                Some(nh) => match k.net.set_table_default(table, nh).await {
                    Err(e) if !want.usable => {
                        warn!(table, family = %f, error = %format!("{e:#}"), "table route not set while the link is unusable; set when it is usable")
                    }
                    Err(e) if f == Family::Ipv6 => {
                        error!(table, error = %format!("{e:#}"), "IPv6 table route not set (gateway6 unreachable?); IPv4 is not affected")
                    }
                    r => r.with_context(|| format!("setting table {table} ({f})"))?,
                },
                None => k.net.flush_table(f, table).await?,
            }
            self.tables.insert((f, table), *want);
        }
        Ok(())
    }

    /// Returns whether the table was installed for the first time.
    async fn apply_nft(&mut self, d: &Desired) -> Result<bool> {
        let divert = match (&d.nft.divert_from, self.relay()) {
            (Some(lans), Some(relay)) => Some(nft::Divert {
                lans: lans.clone(),
                port: relay.port,
                tcp_port: relay.tcp_port,
            }),
            _ => None,
        };
        let want = (d.nft.clone(), divert);
        if self.nft.as_ref() == Some(&want) {
            return Ok(false);
        }
        nft::apply(&table(&want.0, want.1.as_ref()))
            .await
            .context("applying nftables table inet mwan")?;
        let first = self.nft.is_none();
        self.nft = Some(want);
        Ok(first)
    }

    /// Family `f`'s `alive` flags and policies, in the datapath's order.
    fn apply_family(
        &mut self,
        k: &mut Kernel<'_>,
        d: &Desired,
        f: Family,
        fx: &mut Effects,
    ) -> Result<()> {
        let want = &d.families[f];
        let changed: Vec<u8> = (0..MAX_WANS as u8)
            .filter(|id| self.wans[f][*id as usize] != want.wans[*id as usize])
            .collect();
        let (ups, downs): (Vec<u8>, Vec<u8>) = changed
            .into_iter()
            .partition(|id| want.wans[*id as usize].alive != 0);
        for &id in &ups {
            let was_alive = self.alive(f, id);
            self.write_wan(k, f, id, want.wans[id as usize])?;
            if !was_alive {
                fx.revived.push((f, id));
            }
        }
        if self.policies[f].as_ref() != Some(&want.policies) {
            k.dp.maps.write_policies(f, &want.policies)?;
            self.policies[f] = Some(want.policies.clone());
        }
        for &id in &downs {
            let was_alive = self.alive(f, id);
            self.write_wan(k, f, id, want.wans[id as usize])?;
            if was_alive {
                let conns = d.conns.get(&id).or_else(|| self.conns.get(&id));
                if let Some(c) = conns {
                    push_died(&mut fx.died, f, c.clone());
                }
            }
        }
        if self.all_down[f] != want.all_down {
            self.all_down[f] = want.all_down;
            fx.all_down.push((f, want.all_down));
        }
        Ok(())
    }

    fn write_wan(&mut self, k: &mut Kernel<'_>, f: Family, id: u8, e: WanEntry) -> Result<()> {
        k.dp.maps.write_wan(f, id, e)?;
        self.wans[f][id as usize] = e;
        Ok(())
    }

    async fn apply_balance(&mut self, k: &mut Kernel<'_>, d: &Desired) -> Result<()> {
        let table = routing::balance_table(k.cfg.table_base);
        for f in Family::BOTH {
            let want = &d.families[f].balance;
            if self.balance[f].as_ref() == Some(want) {
                continue;
            }
            k.net
                .set_balance(f, table, &want.nexthops, want.unreachable)
                .await
                .with_context(|| format!("setting the {f} balance route"))?;
            self.balance[f] = Some(want.clone());
        }
        Ok(())
    }

    /// Attaches the classifier to each LAN interface (again when the
    /// interface was re-created), detaches it from LAN interfaces the
    /// config no longer has.
    fn apply_lans(&mut self, k: &mut Kernel<'_>, d: &Desired) -> Result<()> {
        let removed: Vec<String> = self
            .lans
            .keys()
            .filter(|l| !d.lans.contains_key(*l))
            .cloned()
            .collect();
        for l in removed {
            crate::datapath::detach(&l);
            info!(interface = %l, "classifier detached");
            self.lans.remove(&l);
        }
        for (name, link) in &d.lans {
            let Some(link) = link else {
                if self.lans.remove(name).is_some() {
                    warn!(interface = %name, "LAN interface gone; the classifier is attached again when it returns");
                    continue;
                }
                return Err(anyhow!("LAN interface {name} does not exist"));
            };
            if self.lans.get(name) == Some(link) {
                continue;
            }
            if k.dp.attach(name, link.l2)? && !k.host.clsact_added.contains(name) {
                k.host.clsact_added.push(name.clone());
            }
            info!(interface = %name, l2 = link.l2, "classifier attached");
            self.lans.insert(name.clone(), *link);
        }
        k.host.lan_interfaces = d.lans.keys().cloned().collect();
        Ok(())
    }

    /// The WAN-side program on each WAN interface (again when the interface
    /// was re-created) and its `WAN_IFACES` entry; off interfaces the
    /// config no longer has.
    fn apply_wan_filters(&mut self, k: &mut Kernel<'_>, d: &Desired) -> Result<()> {
        let gone: Vec<String> = self
            .wan_filters
            .keys()
            .filter(|w| !d.wan_filters.contains_key(*w))
            .cloned()
            .collect();
        for w in gone {
            let (ifindex, _) = self.wan_filters.remove(&w).expect("listed");
            crate::datapath::detach(&w);
            k.dp.maps.remove_wan_iface(ifindex)?;
        }
        for (name, want) in &d.wan_filters {
            let had = self.wan_filters.get(name).copied();
            if had == Some(*want) {
                continue;
            }
            if let Some((old, _)) = had.filter(|(i, _)| *i != want.0) {
                k.dp.maps.remove_wan_iface(old)?;
            }
            k.dp.maps.write_wan_iface(want.0, want.1)?;
            if had.is_none_or(|(i, _)| i != want.0) {
                if k.dp.attach_wan(name)? && !k.host.clsact_added.contains(name) {
                    k.host.clsact_added.push(name.clone());
                }
                info!(interface = %name, "WAN-side filter attached");
            }
            self.wan_filters.insert(name.clone(), *want);
        }
        k.host.wan_interfaces = d.wan_filters.keys().cloned().collect();
        Ok(())
    }

    /// The running prober of WAN `id` and family `f`.
    pub fn prober(&self, id: u8, f: Family) -> Option<&Prober> {
        self.probers.get(&(id, f)).map(|(_, p)| p)
    }

    /// Starts the probers wanted and not running (or running with another
    /// spec: new targets, a re-created interface); stops the others.
    fn apply_probers(&mut self, k: &mut Kernel<'_>, d: &Desired) {
        self.probers
            .retain(|key, (spec, _)| d.probers.get(key) == Some(spec));
        for (key, spec) in &d.probers {
            if !self.probers.contains_key(key) {
                let p = Prober::spawn(spec.spec.clone(), k.rounds.clone());
                self.probers.insert(*key, (spec.clone(), p));
            }
        }
    }
}

/// The nftables table of `spec`, with the relay's divert.
fn table<'a>(spec: &'a NftSpec, divert: Option<&'a nft::Divert>) -> nft::Table<'a> {
    nft::Table {
        wans: &spec.wans,
        mark_mask: spec.mark_mask,
        refuse_from: &spec.refuse_from,
        divert,
        restore: spec.restore,
    }
}

/// Adds a WAN's family to the connections to clean up; a WAN dying in both
/// families at once (removed) is cleaned up once for both.
fn push_died(died: &mut Vec<(Option<Family>, WanConns)>, f: Family, c: WanConns) {
    if let Some(e) = died.iter_mut().find(|(_, d)| d.id == c.id) {
        if e.0.is_some_and(|g| g != f) {
            e.0 = None;
        }
        return;
    }
    died.push((Some(f), c));
}
