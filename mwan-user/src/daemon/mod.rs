//! The daemon: brings the host to the state the config describes, then keeps
//! it there while health, links, admin commands and config change.
//!
//! Every change goes through a few idempotent `sync_*` steps (routes, rules,
//! nftables, policies), so start, reload and events share one code path.

mod host;
mod status;
mod wan;

use host::{create_dirs, remove_created_dirs};
pub use host::{teardown, HostState};

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use mwan_common::{FlowValue, WanEntry, MAX_WANS, WAN_NONE};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::config::{AllDown, Config, Failback, Family, Gateway6, Ipv6Mode};
use crate::control::{Event, Request, Response};
use crate::datapath::{self, AnyFlowKey, Datapath, Tuple5};
use crate::health::{RoundReport, State, Transition};
use crate::hooks::{run_hook, HookEvent};
use crate::logfield::{millis, shown};
use crate::policy::{self, CompiledRules};
use crate::routing::{self, Net, NetEvent, Nexthop};
use crate::web::Web;
use crate::{conntrack, nft, nudge, sysctl};
use wan::{assign_ids, fam, id_capacity, LinkInfo, WanRt};

const MAX_EVENTS: usize = 100;
/// Only TCP connections active this recently are nudged when their WAN
/// dies (older pins are mostly finished connections).
const NUDGE_RECENT_NS: u64 = 600_000_000_000;
const MAX_NUDGES: usize = 65_536;

pub struct RunOptions {
    pub config: PathBuf,
    /// Leave the datapath running on SIGTERM/SIGINT (restart, upgrade).
    pub keep: bool,
}

/// `mwan run`: runs until SIGTERM/SIGINT or `mwan stop`.
pub fn run(opts: RunOptions) -> Result<()> {
    let cfg = Config::load(&opts.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let daemon = Daemon::start(cfg, opts).await?;
        daemon.serve().await
    })
}

struct Daemon {
    cfg: Config,
    opts: RunOptions,
    dp: Datapath,
    net: Net,
    host: HostState,
    wans: Vec<WanRt>,
    rules_written: Option<CompiledRules>,
    /// The default policy's members when something last took new flows,
    /// per family (indexed by `wan::fam`).
    last_default: [Vec<(u8, u32)>; 2],
    balance_written: Option<(Vec<(Nexthop, u32)>, bool)>,
    balance6_written: Option<(Vec<(Nexthop, u32)>, bool)>,
    /// Per family: no WAN takes new flows.
    all_down: [bool; 2],
    /// `refusing()` as the rules and nftables were last written for.
    refusing_written: bool,
    bypass_written: Vec<Ipv4Net>,
    bypass6_written: Vec<Ipv6Net>,
    /// With `ha_address`: whether this router holds it (is the HA pair's
    /// active router), from the addresses seen at the last refresh.
    ha_active: Option<bool>,
    events: VecDeque<Event>,
    rounds_tx: mpsc::Sender<RoundReport>,
    rounds_rx: Option<mpsc::Receiver<RoundReport>>,
    started: Instant,
    flow_counts: status::FlowCounts,
    /// The metrics and status page listener (`metrics_listen`).
    web: Option<Web>,
    /// Something changed that the listener's snapshot should show now.
    web_dirty: bool,
    started_wall: SystemTime,
    reloads_ok: u64,
    reloads_failed: u64,
    /// The DNS relay of rules by domain name, while a rule has domains.
    relay: Option<crate::dns::relay::Relay>,
    /// The nftables divert of LAN DNS queries to `relay`.
    divert: Option<nft::Divert>,
    _lock: std::fs::File,
}

/// How the main loop ends.
enum Exit {
    Keep,
    Teardown,
}

impl Daemon {
    async fn start(cfg: Config, opts: RunOptions) -> Result<Daemon> {
        let net = Net::connect().await.context("opening rtnetlink")?;
        let links = net.links().await.context("listing interfaces")?;
        for w in cfg.check_system(&|n| links.iter().any(|l| l.name == n))? {
            warn!("{w}");
        }
        let web = match cfg.metrics_listen {
            Some(addr) => Some(Web::start(addr).await?),
            None => None,
        };
        // Nothing has been changed on the host up to here.
        let created = create_dirs(&cfg.state_dir)
            .with_context(|| format!("creating state_dir {}", cfg.state_dir.display()))?;
        let prepared = (|| {
            let mounted = datapath::ensure_bpffs(&cfg.pin_dir)?;
            std::fs::create_dir_all(&cfg.pin_dir)
                .with_context(|| format!("creating pin_dir {}", cfg.pin_dir.display()))?;
            let lock = datapath::lock_pin_dir(&cfg.pin_dir)?;
            let mut host = HostState::load(&cfg.state_file())?.unwrap_or_default();
            if mounted.is_some() {
                host.bpffs_mount = mounted;
            }
            host.note_created(created.clone());
            host.pin_dir = cfg.pin_dir.clone();
            host.table_base = cfg.table_base;
            let mut dp = Datapath::load(&cfg.pin_dir, cfg.max_flows, cfg.max_hosts)?;
            // Learned destinations of domain rules are owned by the daemon
            // that learned them (expiry, rule indexes): none is inherited.
            dp.maps.clear_domain_dst()?;
            Ok::<_, anyhow::Error>((lock, host, dp))
        })();
        let (lock, host, dp) = match prepared {
            Ok(p) => p,
            Err(e) => {
                // Not even started: leave no empty state_dir behind.
                remove_created_dirs(&created);
                return Err(e);
            }
        };
        let inherited = dp.inherited;
        let (rounds_tx, rounds_rx) = mpsc::channel(256);
        let mut d = Daemon {
            flow_counts: status::FlowCounts::new(cfg.pin_dir.clone()),
            cfg,
            opts,
            dp,
            net,
            host,
            wans: Vec::new(),
            rules_written: None,
            last_default: [Vec::new(), Vec::new()],
            balance_written: None,
            balance6_written: None,
            all_down: [false; 2],
            refusing_written: false,
            bypass_written: Vec::new(),
            bypass6_written: Vec::new(),
            ha_active: None,
            events: VecDeque::new(),
            rounds_tx,
            rounds_rx: Some(rounds_rx),
            started: Instant::now(),
            web,
            web_dirty: true,
            started_wall: SystemTime::now(),
            reloads_ok: 0,
            reloads_failed: 0,
            relay: None,
            divert: None,
            _lock: lock,
        };
        match d.bring_up().await {
            Ok(()) => Ok(d),
            Err(e) => {
                if inherited {
                    d.dp.abort_migration();
                    error!("start failed; the inherited datapath is left running as it was");
                } else {
                    error!("start failed; removing what was set up");
                    for te in teardown(&d.cfg, &d.host, &d.net).await {
                        warn!(error = %te, "cleanup after failed start");
                    }
                }
                Err(e)
            }
        }
    }

    async fn bring_up(&mut self) -> Result<()> {
        let inherited = self.dp.inherited;
        let pinned_names = self.dp.maps.names()?;
        let names: Vec<&str> = self.cfg.wans.iter().map(|w| w.name.as_str()).collect();
        let fixed: Vec<Option<u8>> = self.cfg.wans.iter().map(|w| w.id).collect();
        let ids = assign_ids(
            &names,
            &fixed,
            &pinned_names,
            id_capacity(self.cfg.mark_mask),
        );
        if inherited {
            // The last default policies keep balancing continuous.
            for f in Family::BOTH {
                let p = match f {
                    Family::Ipv4 => self.dp.maps.policy(0)?,
                    Family::Ipv6 => self.dp.maps.policy6(0)?,
                };
                self.last_default[fam(f)] = policy::shares(&p)
                    .into_iter()
                    .map(|(id, s)| (id, ((s * 1000.0).round() as u32).max(1)))
                    .collect();
            }
        }
        for (w, id) in self.cfg.wans.clone().into_iter().zip(ids) {
            // Each family starts as the previous daemon left it.
            let mut initial = [State::Unknown; 2];
            for f in Family::BOTH {
                if inherited {
                    initial[fam(f)] = if self.read_alive(f, id)? {
                        State::Up
                    } else {
                        State::Down
                    };
                }
            }
            let mark = self.cfg.wan_mark(id);
            let mut rt = WanRt::new(w, id, mark, self.cfg.table_base, initial);
            for f in Family::BOTH {
                rt.family_mut(f).alive = initial[fam(f)] == State::Up;
            }
            self.wans.push(rt);
        }
        info!(
            inherited,
            wans = self.wans.len(),
            pin_dir = %self.cfg.pin_dir.display(),
            "{}",
            if inherited { "taking over the running datapath" } else { "starting" }
        );
        // Ids nobody uses any more: their flows move on their next packet.
        let used: HashSet<u8> = self.wans.iter().map(|w| w.id).collect();
        for id in 0..MAX_WANS as u8 {
            if !used.contains(&id) {
                self.dp.maps.write_name(id, None)?;
                for f in Family::BOTH {
                    self.write_alive(f, id, WanEntry::default())?;
                }
            }
        }
        for i in 0..self.wans.len() {
            let (id, name, mark) = {
                let w = &self.wans[i];
                (w.id, w.cfg.name.clone(), w.mark)
            };
            self.dp.maps.write_name(id, Some(&name))?;
            for f in Family::BOTH {
                let alive = self.wans[i].family(f).alive as u32;
                self.write_alive(f, id, WanEntry { mark, alive })?;
            }
        }
        self.sync_settings_and_rules()?;
        self.apply_sysctls()?;
        self.host.lan_interfaces = self.cfg.lan_interfaces.clone();
        self.host.save(&self.cfg.state_file())?;
        // A daemon killed without cleanup left its DNS divert (which failed
        // open): UDP flows it diverted still point at its dead relay.
        for port in nft::divert_ports().await.unwrap_or_default() {
            forget_diverted(port);
        }
        self.sync_relay()?;
        self.refresh_links(true).await?;
        self.sync_nft().await?;
        self.adopt_connections().await;
        self.attach_lans().await?;
        // The old program is gone from every LAN: the maps it used and this
        // start replaced (another size) can go.
        self.dp.finish_migration();
        self.start_probers();
        Ok(())
    }

    /// Connections older than mwan's nftables table (made before mwan
    /// started, by the main table's routes) carry no WAN in their ct mark:
    /// record the WAN whose address they use (the masqueraded source of a
    /// LAN connection, the router's own source, the destination of an
    /// inbound one), so that they keep that WAN whatever happens to the
    /// pins (see `nft`). Connections whose ct mark names a WAN already are
    /// left alone.
    async fn adopt_connections(&self) {
        let mask = self.cfg.mark_mask;
        let wans: Vec<(WanAddrs, u32)> = self
            .wans
            .iter()
            .map(|w| (WanAddrs::of(w), w.mark))
            .filter(|(a, _)| !a.is_empty())
            .collect();
        if wans.is_empty() {
            return;
        }
        let res = tokio::task::spawn_blocking(move || {
            conntrack::mark_where(mask, |e| {
                if e.mark & mask != 0 {
                    return None;
                }
                wans.iter().find(|(a, _)| a.used_by(e)).map(|(_, m)| *m)
            })
        })
        .await;
        match res {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(
                connections = n,
                "existing connections adopted: their WAN recorded in conntrack"
            ),
            Ok(Err(e)) => warn!(error = %e, "recording the WAN of existing connections"),
            Err(e) => warn!(error = %e, "recording the WAN of existing connections"),
        }
    }

    fn apply_sysctls(&mut self) -> Result<()> {
        let ifaces: Vec<String> = self.cfg.wans.iter().map(|w| w.interface.clone()).collect();
        let ipv6 = |ra_only: bool| -> Vec<String> {
            self.cfg
                .wans
                .iter()
                .filter(|w| w.ipv6 != Ipv6Mode::Off)
                .filter(|w| !ra_only || w.gateway6 == Some(Gateway6::Auto))
                .map(|w| w.interface.clone())
                .collect()
        };
        let (ifaces6, ra_ifaces) = (ipv6(false), ipv6(true));
        let mut per_iface: HashSet<String> = ifaces
            .iter()
            .flat_map(|i| {
                sysctl::WAN_IFACE_SETTINGS
                    .iter()
                    .map(move |(name, _)| sysctl::iface_key(i, name))
            })
            .collect();
        per_iface.extend(ra_ifaces.iter().map(|i| sysctl::iface_key6(i, "accept_ra")));
        if !ifaces6.is_empty() && !sysctl::ipv6_forwarding().unwrap_or(true) {
            warn!(
                wans = ?ifaces6,
                "IPv6 forwarding is off (net.ipv6.conf.all.forwarding = 0): the LAN's IPv6 is not routed through the WANs with IPv6; enabling it is the admin's choice"
            );
        }
        let settings = sysctl::router_settings(&ifaces)
            .into_iter()
            .chain(sysctl::ipv6_settings(&ifaces6, &ra_ifaces));
        for (k, v) in settings {
            if let Err(e) = sysctl::set(&mut self.host.sysctls, &k, &v) {
                if per_iface.contains(&k) {
                    // A WAN interface that does not exist yet gets its
                    // setting when it appears.
                    warn!(key = %k, error = %e, "sysctl not set (interface missing?)");
                } else {
                    return Err(e.context(format!("setting {k}={v}")));
                }
            }
        }
        Ok(())
    }

    /// Writes SETTINGS and, when they changed, the rule maps.
    fn sync_settings_and_rules(&mut self) -> Result<()> {
        let ids = policy::assign_rule_policies(&self.cfg.rules, &self.host.rule_policies);
        self.host.rule_policies = self
            .cfg
            .rules
            .iter()
            .zip(&ids)
            .map(|(r, id)| (r.name.clone(), *id))
            .collect();
        let rules = policy::compile_rules(&self.cfg.rules, &ids);
        let indexes = self.ifindexes();
        self.dp.maps.write_rules_and_settings(
            &self.cfg,
            &rules,
            self.rules_written.as_ref(),
            &|n| indexes.get(n).copied(),
        )?;
        self.rules_written = Some(rules);
        Ok(())
    }

    fn ifindexes(&self) -> BTreeMap<String, u32> {
        self.cfg
            .lan_interfaces
            .iter()
            .filter_map(|n| datapath::ifindex(n).map(|i| (n.clone(), i)))
            .collect()
    }

    async fn attach_lans(&mut self) -> Result<()> {
        for lan in self.cfg.lan_interfaces.clone() {
            let link = self
                .net
                .link(&lan)
                .await?
                .ok_or_else(|| anyhow!("LAN interface {lan} does not exist"))?;
            if self.dp.attach(&lan, link.l2)? && !self.host.clsact_added.contains(&lan) {
                self.host.clsact_added.push(lan.clone());
                self.host.save(&self.cfg.state_file())?;
            }
            info!(interface = %lan, l2 = link.l2, "classifier attached");
        }
        Ok(())
    }

    fn start_probers(&mut self) {
        for w in self.wans.iter_mut() {
            w.start_probers(&self.rounds_tx, false);
        }
    }

    /// A WAN's `alive` flag of family `f` as the datapath holds it.
    fn read_alive(&self, f: Family, id: u8) -> Result<bool> {
        let e = match f {
            Family::Ipv4 => self.dp.maps.wan(id)?,
            Family::Ipv6 => self.dp.maps.wan6(id)?,
        };
        Ok(e.alive != 0)
    }

    /// Writes a WAN's entry of family `f` (`WANS` or `WANS6`).
    fn write_alive(&mut self, f: Family, id: u8, entry: WanEntry) -> Result<()> {
        match f {
            Family::Ipv4 => self.dp.maps.write_wan(id, entry),
            Family::Ipv6 => self.dp.maps.write_wan6(id, entry),
        }
    }

    /// Re-reads every WAN's link, address and gateway from the kernel and
    /// applies what changed. `force` rewrites routes and rules regardless.
    async fn refresh_links(&mut self, force: bool) -> Result<()> {
        let exclude = self.cfg.table_base..=self.cfg.table_base + MAX_WANS;
        let mut rules_dirty = force;
        let mut nft_dirty = false;
        for i in 0..self.wans.len() {
            let iface = self.wans[i].cfg.interface.clone();
            let mut info = LinkInfo::default();
            if let Some(l) = self.net.link(&iface).await? {
                info.ifindex = Some(l.index);
                info.admin_up = l.admin_up;
                info.carrier = l.carrier;
                info.addr = self.net.ipv4_addrs(l.index).await?.into_iter().next();
                info.nexthop = match self.wans[i].cfg.gateway {
                    crate::config::Gateway::Fixed(gw) => Some(Nexthop {
                        gateway: Some(gw.into()),
                        ifindex: l.index,
                    }),
                    crate::config::Gateway::Auto => {
                        self.net.learned_default(l.index, exclude.clone()).await?
                    }
                    crate::config::Gateway::None => None,
                };
                if self.wans[i].cfg.ipv6 != Ipv6Mode::Off {
                    info.addrs6 = self.net.ipv6_addrs(l.index).await?;
                    info.nexthop6 = match self.wans[i].cfg.gateway6 {
                        Some(Gateway6::Fixed(gw)) => Some(Nexthop {
                            gateway: Some(gw.into()),
                            ifindex: l.index,
                        }),
                        Some(Gateway6::Auto) => {
                            self.net
                                .learned_default_of(Family::Ipv6, l.index, exclude.clone())
                                .await?
                        }
                        None => None,
                    };
                }
            }
            let old = std::mem::replace(&mut self.wans[i].link, info.clone());
            let w = &self.wans[i];
            let usable_now = info.unusable_reason(&w.cfg).is_none();
            let changed = self
                .sync_table_route(i, Family::Ipv4, old.nexthop, usable_now, force)
                .await?;
            if changed && !force {
                info!(wan = %w.cfg.name, gateway = shown(info.gateway_text(&w.cfg)), "gateway changed");
            }
            let usable6 = usable_now && info.ipv6_ready(&w.cfg);
            let changed6 = self
                .sync_table_route(i, Family::Ipv6, old.nexthop6, usable6, force)
                .await?;
            let w = &self.wans[i];
            if changed6 && !force {
                info!(wan = %w.cfg.name, gateway6 = shown(info.nexthop6.and_then(|n| n.gateway)), "IPv6 gateway changed");
            }
            let mut renewed = Vec::new();
            if old.addrs6 != info.addrs6 {
                rules_dirty = true;
                if !force {
                    info!(wan = %w.cfg.name, addresses6 = ?info.addrs6, "IPv6 addresses changed");
                }
                if info.addrs6.iter().any(|a| !old.addrs6.contains(a)) {
                    renewed.push((Family::Ipv6, "a new IPv6 address"));
                }
            }
            if old.nat6(&w.cfg) != info.nat6(&w.cfg) {
                nft_dirty = true;
                if !force {
                    info!(wan = %w.cfg.name, prefix6 = shown(info.prefix6(&w.cfg)), "IPv6 prefix changed");
                }
            }
            if old.addr != info.addr {
                rules_dirty = true;
                if !force {
                    info!(wan = %w.cfg.name, address = shown(info.addr), "address changed");
                }
                if old.addr.is_some() && info.addr.is_some() {
                    renewed.push((Family::Ipv4, "a new address"));
                }
            }
            if info.ifindex.is_some() && old.ifindex != info.ifindex {
                if old.ifindex.is_some() {
                    // The interface was re-created (PPP redial): sockets
                    // bound to the old one are dead.
                    self.wans[i].start_probers(&self.rounds_tx, true);
                }
                if !force {
                    // A new interface needs its sysctls (rp_filter).
                    self.apply_sysctls()?;
                }
            }
            let reason = info.unusable_reason(&self.wans[i].cfg);
            let was_usable =
                old.unusable_reason(&self.wans[i].cfg).is_none() && old.ifindex.is_some();
            let usable = reason.is_none();
            if force || usable != was_usable {
                let reason = reason.unwrap_or_else(|| format!("interface {iface} usable"));
                let ts = self.wans[i].on_link(usable, &reason, Instant::now());
                self.record(i, ts);
            }
            if !force {
                // Failures seen before a new address say nothing of it.
                for (f, why) in renewed {
                    let ts = self.wans[i].renew(f, why, Instant::now());
                    self.record(i, ts);
                }
            }
        }
        if rules_dirty {
            self.sync_rules().await?;
        }
        if nft_dirty && !force {
            // (start and reload apply the table after this.)
            self.sync_nft().await?;
        }
        self.sync_bypass().await?;
        self.sync_policies().await
    }

    /// Puts WAN `i`'s default route of `family` in its table (the link's
    /// next hop of that family, as just read), or empties the table when it
    /// has none; `old`: the next hop before. Returns whether the next hop
    /// changed. The kernel deletes the table's route, without a
    /// notification, when the interface goes administratively down or
    /// loses its last address, and refuses it meanwhile: while the link is
    /// `usable`, the route is checked and put back if it is gone.
    async fn sync_table_route(
        &self,
        i: usize,
        family: Family,
        old: Option<Nexthop>,
        usable: bool,
        force: bool,
    ) -> Result<bool> {
        let w = &self.wans[i];
        let nexthop = match family {
            Family::Ipv4 => w.link.nexthop,
            Family::Ipv6 => w.link.nexthop6,
        };
        let changed = old != nexthop;
        let mut install = force || changed;
        if !install && usable && nexthop.is_some() {
            install = self.net.table_default_of(family, w.table).await? != nexthop;
            if install {
                info!(wan = %w.cfg.name, table = w.table, ?family, "the WAN's table route was gone (interface set down, address removed?); putting it back");
            }
        }
        if !install {
            return Ok(false);
        }
        match nexthop {
            Some(nh) => match self.net.set_table_default(w.table, nh).await {
                Err(e) if !usable => {
                    warn!(wan = %w.cfg.name, ?family, error = %format!("{e:#}"), "table route not set while the link is unusable; set when it is usable")
                }
                // A WAN's IPv6 never stops its IPv4: the route is tried
                // again at the next check.
                Err(e) if family == Family::Ipv6 => {
                    error!(wan = %w.cfg.name, error = %format!("{e:#}"), "IPv6 table route not set (gateway6 unreachable?); IPv4 is not affected");
                }
                r => r.with_context(|| {
                    format!("WAN {}: setting table {} ({family:?})", w.cfg.name, w.table)
                })?,
            },
            None => self.net.flush_table_of(family, w.table).await?,
        }
        Ok(changed)
    }

    /// Every WAN is down and `all_down = "unreachable"`: new connections
    /// are refused (an `unreachable` route and rule, and a reset or ICMP
    /// error from nftables for the LAN's).
    fn refusing(&self) -> bool {
        self.all_down[fam(Family::Ipv4)] && self.cfg.all_down == AllDown::Unreachable
    }

    /// Starts, restarts or stops the DNS relay of rules by domain name (the
    /// nftables divert follows `self.divert` in `sync_nft`). What was
    /// learned is forgotten: its masks index the rules as they were.
    fn sync_relay(&mut self) -> Result<()> {
        self.relay = None;
        if let Some(d) = self.divert.take() {
            forget_diverted(d.port);
        }
        self.dp.maps.clear_domain_dst()?;
        if !self.cfg.has_domain_rules() {
            return Ok(());
        }
        let relay = crate::dns::relay::Relay::start(
            &self.cfg.pin_dir,
            self.cfg.domain_matcher(),
            self.cfg.domain_ttl_floor,
            self.cfg.domain_ttl_grace,
        )?;
        self.divert = Some(nft::Divert {
            lans: self.cfg.lan_interfaces.clone(),
            port: relay.port,
            tcp_port: relay.tcp_port,
        });
        self.relay = Some(relay);
        Ok(())
    }

    async fn sync_rules(&mut self) -> Result<()> {
        let wans: Vec<(u8, u32, Option<Ipv4Addr>)> = self
            .wans
            .iter()
            .map(|w| (w.id, w.mark, w.link.address()))
            .collect();
        let refuse = self.refusing();
        let mut want = routing::wanted_rules(
            self.cfg.rule_priority,
            self.cfg.table_base,
            self.cfg.mark_mask,
            &wans,
            refuse,
        );
        let wans6: Vec<(u8, u32, Vec<std::net::Ipv6Addr>)> = self
            .wans
            .iter()
            .filter(|w| w.cfg.ipv6 != Ipv6Mode::Off)
            .map(|w| {
                (
                    w.id,
                    w.mark,
                    w.link.addrs6.iter().map(|a| a.addr()).collect(),
                )
            })
            .collect();
        want.extend(routing::wanted_rules6(
            self.cfg.rule_priority,
            self.cfg.table_base,
            self.cfg.mark_mask,
            &wans6,
            refuse,
        ));

        self.net
            .sync_rules(&want)
            .await
            .context("installing ip rules")
    }

    async fn sync_nft(&mut self) -> Result<()> {
        let wans: Vec<nft::NftWan> = self
            .wans
            .iter()
            .map(|w| nft::NftWan {
                name: w.cfg.name.clone(),
                interface: w.cfg.interface.clone(),
                mark: w.mark,
                nat: w.cfg.nat,
                snat: w.cfg.snat_address,
                nat6: w.link.nat6(&w.cfg),
            })
            .collect();
        let refuse: &[String] = if self.refusing() {
            &self.cfg.lan_interfaces
        } else {
            &[]
        };
        nft::apply(&wans, self.cfg.mark_mask, refuse, self.divert.as_ref())
            .await
            .context("applying nftables table inet mwan")
    }

    /// An HA pair's role follows keepalived: the router holding the
    /// gateway address (`ha_address`) is the active one. Address events
    /// bring every change here (see `sync_bypass`); the role is logged and
    /// shown by `mwan status`. Nothing else depends on it: the standby
    /// keeps probing, its tables and rules route nothing while the LAN's
    /// gateway is elsewhere, and it never touches the virtual addresses.
    fn follow_ha_role(&mut self, addrs: &[(u32, Ipv4Net)]) {
        let Some(vip) = self.cfg.ha_address else {
            self.ha_active = None;
            return;
        };
        let active = addrs.iter().any(|(_, a)| a.addr() == vip);
        if self.ha_active != Some(active) {
            let role = if active { "active" } else { "standby" };
            info!(role, ha_address = %vip, "HA role");
            self.ha_active = Some(active);
            self.web_dirty = true;
        }
    }

    /// Local addresses and connected prefixes: never pinned to a WAN.
    async fn sync_bypass(&mut self) -> Result<()> {
        let addrs = self.net.all_ipv4_addrs().await?;
        self.follow_ha_role(&addrs);
        let mut prefixes: Vec<Ipv4Net> = addrs
            .into_iter()
            .flat_map(|(_, a)| {
                [
                    a.trunc(),
                    Ipv4Net::new(a.addr(), 32).expect("32 is a valid prefix"),
                ]
            })
            .filter(|n| n.prefix_len() > 0)
            .collect();
        prefixes.push("127.0.0.0/8".parse().expect("valid"));
        prefixes.sort();
        prefixes.dedup();
        if prefixes != self.bypass_written {
            self.dp.maps.write_bypass(&prefixes)?;
            self.bypass_written = prefixes;
        }
        // IPv6: the router's own addresses and on-link prefixes, loopback,
        // link-local and multicast never leave through a WAN.
        let mut prefixes6: Vec<Ipv6Net> = self
            .net
            .all_ipv6_addrs()
            .await?
            .into_iter()
            .flat_map(|(_, a)| {
                [
                    a.trunc(),
                    Ipv6Net::new(a.addr(), 128).expect("128 is a valid prefix"),
                ]
            })
            .filter(|n| n.prefix_len() > 0)
            .collect();
        for fixed in ["::1/128", "fe80::/10", "ff00::/8"] {
            prefixes6.push(fixed.parse().expect("valid"));
        }
        prefixes6.sort();
        prefixes6.dedup();
        if prefixes6 != self.bypass6_written {
            self.dp.maps.write_bypass6(&prefixes6)?;
            self.bypass6_written = prefixes6;
        }
        Ok(())
    }

    /// Recomputes who takes new flows and which pins stay valid, per
    /// family, and writes it all: policies, `alive` flags, the balance
    /// route. Deletes conntrack entries of WANs that died.
    async fn sync_policies(&mut self) -> Result<()> {
        let started = self
            .wans
            .iter()
            .any(|w| Family::BOTH.iter().any(|f| w.state(*f) != State::Unknown));
        let mut died = Vec::new();
        let mut revived = Vec::new();
        let mut compiled = Vec::new();
        for f in Family::BOTH {
            let c = self.sync_family(f, &mut died, &mut revived)?;
            let was_down = std::mem::replace(&mut self.all_down[fam(f)], c.all_down);
            if c.all_down != was_down && started {
                self.log_all_down(f, &c);
            }
            compiled.push(c);
        }
        let c = &compiled[fam(Family::Ipv4)];
        if self.refusing() != self.refusing_written {
            self.refusing_written = self.refusing();
            self.sync_rules().await?;
            self.sync_nft().await?;
        }
        let nexthops: Vec<(Nexthop, u32)> = c
            .default_members
            .iter()
            .filter_map(|(id, weight)| {
                let w = self.wans.iter().find(|w| w.id == *id)?;
                Some((w.link.nexthop?, *weight))
            })
            .collect();
        let want = (nexthops, self.refusing());
        if self.balance_written.as_ref() != Some(&want) {
            self.net
                .set_balance(self.cfg.table_base + MAX_WANS, &want.0, want.1)
                .await
                .context("setting the balance route")?;
            self.balance_written = Some(want);
        }
        // The router's own IPv6: the IPv6 default policy's WANs.
        let nexthops6: Vec<(Nexthop, u32)> = compiled[fam(Family::Ipv6)]
            .default_members
            .iter()
            .filter_map(|(id, weight)| {
                let w = self.wans.iter().find(|w| w.id == *id)?;
                Some((w.link.nexthop6?, *weight))
            })
            .collect();
        let has_ipv6 = self.wans.iter().any(|w| w.cfg.ipv6 != Ipv6Mode::Off);
        let want6 = (nexthops6, self.refusing() && has_ipv6);
        if self.balance6_written.as_ref() != Some(&want6) {
            self.net
                .set_balance_of(
                    Family::Ipv6,
                    self.cfg.table_base + MAX_WANS,
                    &want6.0,
                    want6.1,
                )
                .await
                .context("setting the IPv6 balance route")?;
            self.balance6_written = Some(want6);
        }
        for (f, id) in died {
            self.flush_conntrack(id, f);
        }
        if self.cfg.failback == Failback::Reset {
            for (f, id) in revived {
                self.reset_moved_flows(id, f);
            }
        }
        Ok(())
    }

    /// Compiles family `f`'s policies from its health and writes them with
    /// the WANs' `alive` flags of that family, in the order the datapath
    /// needs: a WAN coming back is alive before a policy hands it new flows
    /// (else a flow pinned in between is re-pinned on its second packet); a
    /// dying WAN leaves the policies before its pins are invalidated (else
    /// a new flow could still be pinned to it). Adds the WANs that died or
    /// came back to `died` and `revived`.
    fn sync_family(
        &mut self,
        f: Family,
        died: &mut Vec<(Family, u8)>,
        revived: &mut Vec<(Family, u8)>,
    ) -> Result<policy::Compiled> {
        let views: Vec<_> = self.wans.iter().map(|w| w.view(f)).collect();
        let ids: Vec<u8> = self
            .cfg
            .rules
            .iter()
            .map(|r| self.host.rule_policies[&r.name])
            .collect();
        let c = policy::compile(
            &views,
            &self.cfg.rules,
            &ids,
            self.cfg.all_down,
            &self.last_default[fam(f)],
        );
        if !c.all_down {
            self.last_default[fam(f)] = c.default_members.clone();
        }
        let changed: Vec<(usize, bool)> = c
            .alive
            .iter()
            .filter_map(|(id, alive)| {
                let i = self
                    .wans
                    .iter()
                    .position(|w| w.id == *id)
                    .expect("view of a WAN");
                (self.wans[i].family(f).alive != *alive).then_some((i, *alive))
            })
            .collect();
        let mut write_alive = |d: &mut Daemon, i: usize, alive: bool| {
            let (id, mark) = (d.wans[i].id, d.wans[i].mark);
            d.wans[i].family_mut(f).alive = alive;
            let entry = WanEntry {
                mark,
                alive: alive as u32,
            };
            (if alive { &mut *revived } else { &mut *died }).push((f, id));
            d.write_alive(f, id, entry)
        };
        for &(i, _) in changed.iter().filter(|(_, alive)| *alive) {
            write_alive(self, i, true)?;
        }
        match f {
            Family::Ipv4 => self.dp.maps.write_policies(&c.policies)?,
            Family::Ipv6 => self.dp.maps.write_policies6(&c.policies)?,
        }
        for &(i, _) in changed.iter().filter(|(_, alive)| !*alive) {
            write_alive(self, i, false)?;
        }
        Ok(c)
    }

    fn log_all_down(&self, f: Family, c: &policy::Compiled) {
        if c.all_down {
            error!(
                family = %f,
                policy = ?self.cfg.all_down,
                kept = ?c.default_members.iter().map(|(id, _)| self.wan_name(*id)).collect::<Vec<_>>(),
                "ALL WANs ARE DOWN for {f}: {}",
                match self.cfg.all_down {
                    AllDown::Last => "new connections keep using the WANs that were up last",
                    AllDown::Unreachable => "new connections are refused (unreachable)",
                }
            );
        } else {
            info!(family = %f, "a WAN is up again for {f}; traffic is balanced normally");
        }
    }

    fn wan_name(&self, id: u8) -> String {
        self.wans
            .iter()
            .find(|w| w.id == id)
            .map(|w| w.cfg.name.clone())
            .unwrap_or_else(|| format!("#{id}"))
    }

    /// Deletes the conntrack entries of family `f` of a dead WAN's
    /// connections (and only those), so applications see a reset at once
    /// instead of hanging on a NAT binding to a dead link: those whose ct
    /// mark records the WAN (all but a few; the kernel flushes them in one
    /// request, `conntrack::flush_marked`), then, from a dump, connections
    /// masqueraded (or NPT-mapped) to its addresses, inbound ones it
    /// marked, and every flow pinned to it. A WAN whose IPv6 died keeps its
    /// IPv4 connections, and the reverse.
    fn flush_conntrack(&self, id: u8, f: Family) {
        if let Some(w) = self.wans.iter().find(|w| w.id == id) {
            self.flush_conntrack_of(w, Some(f))
        }
    }

    /// [`Self::flush_conntrack`] for one family (`only`) or both (a WAN
    /// removed by a reload).
    fn flush_conntrack_of(&self, w: &WanRt, only: Option<Family>) {
        let id = w.id;
        let name = w.cfg.name.clone();
        let addrs = WanAddrs::of(w);
        let mark = w.mark;
        let mask = self.cfg.mark_mask;
        let pin_dir = self.cfg.pin_dir.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            // The WAN's connections by their record, in one request the
            // kernel carries out itself; then what the record may miss
            // (connections without a mark, pinned flows).
            if let Err(e) = conntrack::flush_marked(only, mark, mask) {
                warn!(wan = %name, error = %e, "flushing the conntrack entries of the dead WAN");
            }
            let flushed_ms = started.elapsed().as_millis() as u64;
            let tuples = match pinned_flows(&pin_dir, |_, v| v.wan == id || v.moved_from == id) {
                Ok(t) => t,
                Err(e) => {
                    warn!(wan = %name, error = %e, "reading flows for conntrack cleanup");
                    HashMap::new()
                }
            };
            let result = conntrack::delete_where(|e| {
                let family = if e.is_ipv6() {
                    Family::Ipv6
                } else {
                    Family::Ipv4
                };
                only.is_none_or(|f| f == family)
                    && (addrs.reply_to(e)
                        || (e.mark & mask) == mark
                        || tuples.contains_key(&tuple_of(&e.orig)))
            });
            match result {
                Ok(n) => {
                    info!(wan = %name, flushed_ms, deleted = n, pinned_flows = tuples.len(), ms = started.elapsed().as_millis() as u64, "conntrack entries of the dead WAN deleted")
                }
                Err(e) => warn!(wan = %name, error = %e, "deleting conntrack entries"),
            }
            // TCP connections active lately: make their clients speak, so
            // the server's reset reaches them now (see `nudge`).
            let now = datapath::ktime_now_ns();
            let conns: Vec<nudge::Conn> = tuples
                .iter()
                .filter(|((proto, ..), seen)| {
                    *proto == 6 && now.saturating_sub(**seen) < NUDGE_RECENT_NS
                })
                .filter(|((_, src, ..), _)| only.is_none_or(|f| f == Family::of(src)))
                .map(|((_, src, dst, sport, dport), _)| nudge::conn(*src, *sport, *dst, *dport))
                .take(MAX_NUDGES)
                .collect();
            match nudge::nudge(&conns) {
                Ok(0) => {}
                Ok(n) => {
                    info!(wan = %name, connections = n, "TCP clients of the dead WAN nudged to reconnect")
                }
                Err(e) => warn!(wan = %name, error = %e, "nudging TCP clients"),
            }
        });
    }

    /// `failback = "reset"`: flows that moved away from WAN `id` when it died
    /// are pinned back to it and their conntrack entries deleted, so they
    /// reconnect through it.
    fn reset_moved_flows(&self, id: u8, f: Family) {
        let name = self.wan_name(id);
        let pin_dir = self.cfg.pin_dir.clone();
        tokio::task::spawn_blocking(move || {
            let res = (|| -> Result<(usize, usize)> {
                let mut moved = Vec::new();
                datapath::read_flows(&pin_dir, 4096, |k, v| {
                    if v.moved_from == id && k.family() == f {
                        moved.push((k, *v));
                    }
                    true
                })?;
                let mut flows = datapath::FlowMaps::open(&pin_dir)?;
                let mut tuples = HashSet::new();
                for (k, mut v) in moved {
                    v.wan = id;
                    v.moved_from = WAN_NONE;
                    flows.insert(&k, v)?;
                    tuples.insert(k.tuple());
                }
                let deleted = conntrack::delete_where(|e| tuples.contains(&tuple_of(&e.orig)))?;
                Ok((tuples.len(), deleted))
            })();
            match res {
                Ok((n, deleted)) => {
                    info!(wan = %name, family = %f, flows = n, conntrack_deleted = deleted, "failback: moved flows reset to their WAN")
                }
                Err(e) => warn!(wan = %name, error = %e, "failback reset"),
            }
        });
    }

    fn record(&mut self, i: usize, ts: Vec<(Family, Transition)>) {
        for (f, t) in ts {
            self.on_transition(i, f, t);
        }
    }

    fn on_transition(&mut self, i: usize, f: Family, t: Transition) {
        self.web_dirty = true;
        let w = &mut self.wans[i];
        w.family_mut(f).since = SystemTime::now();
        w.stats.on_transition(&t);
        let m = &t.measurements;
        info!(
            wan = %w.cfg.name,
            interface = %w.cfg.interface,
            family = %f,
            from = %t.from,
            to = %t.to,
            reason = %t.reason,
            loss_pct = m.loss_pct,
            rtt_ms = millis(m.rtt_ms),
            jitter_ms = millis(m.jitter_ms),
            failed_targets = (!m.failed_targets.is_empty()).then(|| debug(&m.failed_targets)),
            "wan state changed"
        );
        let ev = Event {
            time: status::rfc3339(SystemTime::now()),
            wan: w.cfg.name.clone(),
            family: f.to_string(),
            from: t.from.to_string(),
            to: t.to.to_string(),
            reason: t.reason.clone(),
        };
        if let Some(cmd) = &self.cfg.on_change {
            run_hook(
                cmd,
                &HookEvent {
                    wan: w.cfg.name.clone(),
                    interface: w.cfg.interface.clone(),
                    family: f.to_string(),
                    old: t.from.to_string(),
                    new: t.to.to_string(),
                    reason: t.reason.clone(),
                    loss_pct: m.loss_pct,
                    rtt_ms: m.rtt_ms,
                    time: SystemTime::now(),
                },
                self.cfg.hook_timeout,
            );
        }
        self.events.push_back(ev);
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    async fn on_round(&mut self, r: RoundReport) -> Result<()> {
        let Some(i) = self.wans.iter().position(|w| w.id as usize == r.wan) else {
            return Ok(());
        };
        self.wans[i].stats.on_round(&r);
        let now = Instant::now();
        if let Some(t) = self.wans[i].family_mut(r.family).machine.on_round(&r, now) {
            self.on_transition(i, r.family, t);
            self.sync_policies().await?;
        }
        Ok(())
    }

    fn wan_index(&self, name: &str) -> Result<usize> {
        self.wans
            .iter()
            .position(|w| w.cfg.name == name)
            .ok_or_else(|| {
                anyhow!(
                    "no WAN is named `{name}` (known: {})",
                    self.wans
                        .iter()
                        .map(|w| w.cfg.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    async fn handle(&mut self, req: Request) -> (Response, Option<Exit>) {
        if let Request::Stop { teardown } = req {
            return if teardown {
                (
                    Response::ok("stopping and removing the datapath"),
                    Some(Exit::Teardown),
                )
            } else {
                (
                    Response::ok("stopping; the datapath keeps forwarding"),
                    Some(Exit::Keep),
                )
            };
        }
        match self.command(req).await {
            Ok(r) => (r, None),
            Err(e) => (Response::error(format!("{e:#}")), None),
        }
    }

    async fn command(&mut self, req: Request) -> Result<Response> {
        Ok(match req {
            Request::Status => {
                let mut r = Response::ok("status");
                r.status = Some(self.status().await?);
                r
            }
            Request::Domains { name } => {
                let rule_names: Vec<String> =
                    self.cfg.rules.iter().map(|r| r.name.clone()).collect();
                let entries = match &self.relay {
                    Some(r) => r.learned(&rule_names, name.as_deref()),
                    None => vec![],
                };
                let mut r = Response::ok(match &self.relay {
                    Some(_) if entries.is_empty() => "nothing learned (yet)",
                    Some(_) => "learned addresses",
                    None => "no rule has domains: nothing is learned",
                });
                r.domains = Some(entries);
                r
            }
            Request::SetWeight { wan, weight } => {
                if !(1..=1000).contains(&weight) {
                    bail!("weight {weight} is out of range 1..=1000");
                }
                let i = self.wan_index(&wan)?;
                let old = std::mem::replace(&mut self.wans[i].weight, weight);
                info!(wan = %wan, old, new = weight, "weight changed");
                self.sync_policies().await?;
                Response::ok(format!("{wan}: weight {old} -> {weight} (new flows only)"))
            }
            Request::Drain { wan } => {
                let i = self.wan_index(&wan)?;
                self.wans[i].drained = true;
                info!(wan = %wan, "drained: no new flows, existing flows stay");
                self.sync_policies().await?;
                Response::ok(format!(
                    "{wan}: drained (no new flows; existing flows stay)"
                ))
            }
            Request::Enable { wan } => {
                let i = self.wan_index(&wan)?;
                self.wans[i].drained = false;
                let ts = self.wans[i].set_disabled(false, Instant::now());
                self.record(i, ts);
                let w = &mut self.wans[i];
                let enabled = std::mem::replace(&mut w.cfg.enabled, true);
                w.start_probers(&self.rounds_tx, false);
                w.cfg.enabled = enabled;
                self.sync_policies().await?;
                Response::ok(format!("{wan}: enabled"))
            }
            Request::Disable { wan } => {
                let i = self.wan_index(&wan)?;
                let ts = self.wans[i].set_disabled(true, Instant::now());
                self.record(i, ts);
                self.wans[i].stop_probers();
                self.sync_policies().await?;
                Response::ok(format!("{wan}: disabled (its flows move to other WANs)"))
            }
            Request::Reload => Response::ok(self.reload().await?),
            Request::Stop { .. } => unreachable!("handled by handle()"),
        })
    }

    /// Applies a changed config file. Refused (old config kept) when the new
    /// one is invalid or changes settings that need a restart.
    async fn reload(&mut self) -> Result<String> {
        let r = self.apply_reload().await;
        match r {
            Ok(_) => self.reloads_ok += 1,
            Err(_) => self.reloads_failed += 1,
        }
        self.web_dirty = true;
        r
    }

    async fn apply_reload(&mut self) -> Result<String> {
        let new = Config::load(&self.opts.config)?;
        let links = self.net.links().await?;
        for w in new.check_system(&|n| links.iter().any(|l| l.name == n))? {
            warn!("{w}");
        }
        let fixed: [(&str, bool); 8] = [
            ("pin_dir", new.pin_dir != self.cfg.pin_dir),
            ("state_dir", new.state_dir != self.cfg.state_dir),
            ("mark_mask", new.mark_mask != self.cfg.mark_mask),
            ("table_base", new.table_base != self.cfg.table_base),
            ("rule_priority", new.rule_priority != self.cfg.rule_priority),
            ("max_flows", new.max_flows != self.cfg.max_flows),
            ("max_hosts", new.max_hosts != self.cfg.max_hosts),
            (
                "metrics_listen",
                new.metrics_listen != self.cfg.metrics_listen,
            ),
        ];
        if let Some((k, _)) = fixed.iter().find(|(_, changed)| *changed) {
            let how = if k.starts_with("max_") {
                " (`mwan stop`, then `mwan run`: the map is resized, no connection moves)"
            } else {
                ""
            };
            bail!("{k} changed: restart mwan to apply it{how} (the running config is unchanged)");
        }
        let pinned = self.dp.maps.names()?;
        // Keep ids of WANs that stay; new ones avoid every id in use.
        let mut current: Vec<Option<String>> = pinned.clone();
        for w in &self.wans {
            current[w.id as usize] = Some(w.cfg.name.clone());
        }
        let names: Vec<&str> = new.wans.iter().map(|w| w.name.as_str()).collect();
        // A running WAN's id is its flows' and connections' mark: a
        // configured id that would change one needs a restart.
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
        let fixed_ids: Vec<Option<u8>> = new.wans.iter().map(|w| w.id).collect();
        let ids = assign_ids(&names, &fixed_ids, &current, id_capacity(new.mark_mask));
        // Removed WANs go first: a new WAN may take a removed one's id (the
        // mark mask numbers only so many), and must not be cleared after.
        let (mut old, removed): (Vec<WanRt>, Vec<WanRt>) = std::mem::take(&mut self.wans)
            .into_iter()
            .partition(|w| names.contains(&w.cfg.name.as_str()));
        let mut summary = Vec::new();
        for w in removed {
            summary.push(format!("removed {}", w.cfg.name));
            info!(wan = %w.cfg.name, "WAN removed by reload; its flows move");
            for f in Family::BOTH {
                self.write_alive(f, w.id, WanEntry::default())?;
            }
            self.dp.maps.write_name(w.id, None)?;
            self.net.flush_table(w.table).await?;
            // Its pins are no longer alive; delete its connections.
            self.flush_conntrack_of(&w, None);
        }
        for (wcfg, id) in new.wans.iter().cloned().zip(ids) {
            let mark = new.wan_mark(id);
            match old.iter().position(|w| w.cfg.name == wcfg.name) {
                Some(p) => {
                    let mut w = old.swap_remove(p);
                    let probe_changed =
                        w.cfg.health != wcfg.health || w.cfg.interface != wcfg.interface;
                    let enabled_changed = w.cfg.enabled != wcfg.enabled;
                    if w.cfg != wcfg {
                        summary.push(format!("changed {}", wcfg.name));
                    }
                    w.set_health_config(&wcfg.health);
                    w.weight = wcfg.weight;
                    w.drained = false;
                    w.cfg = wcfg;
                    let ts = if enabled_changed {
                        w.set_disabled(!w.cfg.enabled, Instant::now())
                    } else {
                        Vec::new()
                    };
                    w.start_probers(&self.rounds_tx, probe_changed);
                    self.wans.push(w);
                    self.record(self.wans.len() - 1, ts);
                }
                None => {
                    summary.push(format!("added {}", wcfg.name));
                    self.dp.maps.write_name(id, Some(&wcfg.name))?;
                    for f in Family::BOTH {
                        self.write_alive(f, id, WanEntry { mark, alive: 0 })?;
                    }
                    let mut w = WanRt::new(wcfg, id, mark, new.table_base, [State::Unknown; 2]);
                    w.start_probers(&self.rounds_tx, false);
                    self.wans.push(w);
                }
            }
        }
        self.wans.sort_by_key(|w| w.id);
        let removed_lans: Vec<String> = self
            .cfg
            .lan_interfaces
            .iter()
            .filter(|l| !new.lan_interfaces.contains(l))
            .cloned()
            .collect();
        if new.rules != self.cfg.rules {
            summary.push("rules changed".into());
        }
        let relay_changed = self
            .cfg
            .rules
            .iter()
            .map(|r| &r.domains)
            .ne(new.rules.iter().map(|r| &r.domains))
            || new.lan_interfaces != self.cfg.lan_interfaces;
        self.cfg = new;
        if relay_changed {
            self.sync_relay()?;
        }
        for l in removed_lans {
            datapath::detach(&l);
            summary.push(format!("detached {l}"));
        }
        self.sync_settings_and_rules()?;
        self.apply_sysctls()?;
        self.host.lan_interfaces = self.cfg.lan_interfaces.clone();
        self.host.save(&self.cfg.state_file())?;
        self.balance_written = None;
        self.balance6_written = None;
        self.refresh_links(true).await?;
        self.sync_nft().await?;
        self.attach_lans().await?;
        let msg = if summary.is_empty() {
            "reloaded: nothing changed".to_string()
        } else {
            format!("reloaded: {}", summary.join(", "))
        };
        info!("{msg}");
        Ok(msg)
    }

    async fn serve(mut self) -> Result<()> {
        let socket = self.cfg.control_socket();
        let listener = bind_control(&socket)?;
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<(Request, oneshot::Sender<Reply>)>(16);
        tokio::spawn(accept_loop(listener, ctl_tx));
        let mut net_events = self.net.events().context("subscribing to netlink events")?;
        let mut rounds = self.rounds_rx.take().expect("serve runs once");
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The listener's snapshot and history: once a second, when enabled.
        let mut web_tick = tokio::time::interval(std::time::Duration::from_secs(1));
        web_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let web_on = self.web.is_some();
        status::notify("READY=1");
        info!(socket = %socket.display(), "ready");
        let exit = loop {
            let mut net_dirty = false;
            tokio::select! {
                Some(r) = rounds.recv() => {
                    if let Err(e) = self.on_round(r).await {
                        error!(error = %format!("{e:#}"), "applying a health change");
                    }
                }
                Some(ev) = net_events.next() => {
                    net_dirty = relevant(&ev, &self);
                    // Take the whole burst before acting once.
                    while let Some(Some(ev)) = futures::FutureExt::now_or_never(net_events.next()) {
                        net_dirty |= relevant(&ev, &self);
                    }
                }
                Some((req, reply)) = ctl_rx.recv() => {
                    let is_reload = req == Request::Reload;
                    let changes = req != Request::Status;
                    if is_reload { status::notify("RELOADING=1"); }
                    let (resp, exit) = self.handle(req).await;
                    if is_reload { status::notify("READY=1"); }
                    if changes && web_on {
                        // Shown by the listener once the command returns.
                        self.publish(false);
                    }
                    if let Some(e) = exit {
                        // `mwan stop`: its answer must reach the CLI before
                        // the runtime (and the connection's task) is gone.
                        let (written_tx, written_rx) = oneshot::channel();
                        let _ = reply.send(Reply { resp, written: Some(written_tx) });
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(2),
                            written_rx,
                        )
                        .await;
                        break e;
                    }
                    let _ = reply.send(Reply { resp, written: None });
                }
                _ = sighup.recv() => {
                    status::notify("RELOADING=1");
                    match self.reload().await {
                        Ok(msg) => info!("SIGHUP: {msg}"),
                        Err(e) => error!(error = %format!("{e:#}"), "SIGHUP: reload refused; the running config is unchanged"),
                    }
                    status::notify("READY=1");
                }
                _ = sigterm.recv() => break if self.opts.keep { Exit::Keep } else { Exit::Teardown },
                _ = sigint.recv() => break if self.opts.keep { Exit::Keep } else { Exit::Teardown },
                _ = web_tick.tick(), if web_on => self.publish(true),
                _ = tick.tick() => {
                    // A safety net for missed netlink events (ENOBUFS),
                    // and for routes the kernel dropped without telling
                    // (a single-nexthop balance route on a quick down/up):
                    // the balance route is rewritten too.
                    net_dirty = true;
                    self.balance_written = None;
                    self.balance6_written = None;
                    let _ = self.flow_counts.refresh_if_stale();
                }
            }
            if net_dirty {
                if let Err(e) = self.refresh_links(false).await {
                    error!(error = %format!("{e:#}"), "applying a link change");
                }
            }
            if self.web_dirty && web_on {
                self.publish(false);
            }
        };
        status::notify("STOPPING=1");
        self.web = None;
        for w in self.wans.iter_mut() {
            w.stop_probers();
        }
        let _ = std::fs::remove_file(&socket);
        match exit {
            Exit::Keep => {
                if let Some(d) = self.divert.take() {
                    // Without the relay, diverted DNS queries would be
                    // lost: the LAN's DNS goes direct (unlearned) until the
                    // next daemon diverts it again.
                    if let Err(e) = self.sync_nft().await {
                        error!(error = %format!("{e:#}"), "removing the DNS divert");
                    }
                    forget_diverted(d.port);
                    self.relay = None;
                }
                info!(pin_dir = %self.cfg.pin_dir.display(), "stopped; the datapath keeps forwarding (run `mwan run` to take it over, `mwan stop --teardown` to remove it)");
                Ok(())
            }
            Exit::Teardown => {
                let errors = teardown(&self.cfg, &self.host, &self.net).await;
                for e in &errors {
                    error!(error = %format!("{e:#}"), "teardown");
                }
                if errors.is_empty() {
                    info!("stopped; everything mwan added was removed");
                    Ok(())
                } else {
                    bail!("teardown finished with {} error(s)", errors.len())
                }
            }
        }
    }
}

/// Whether a netlink event can matter: one of our WAN or LAN interfaces, an
/// address anywhere (bypass trie), or a default route (gateway = "auto").
fn relevant(ev: &NetEvent, d: &Daemon) -> bool {
    match ev {
        NetEvent::Link(l) => {
            d.cfg.wans.iter().any(|w| w.interface == l.name)
                || d.cfg.lan_interfaces.contains(&l.name)
        }
        NetEvent::LinkRemoved { name, .. } => {
            d.cfg.wans.iter().any(|w| &w.interface == name) || d.cfg.lan_interfaces.contains(name)
        }
        NetEvent::Addr { .. } => true,
        NetEvent::Route { table, default, .. } => {
            *default && !(d.cfg.table_base..=d.cfg.table_base + MAX_WANS).contains(table)
        }
        // Events were lost: re-read everything.
        NetEvent::Overrun => true,
    }
}

/// Deletes the conntrack entries of DNS queries redirected to the relay
/// port `port`: a client that sends its next query from the same port
/// would otherwise still be redirected there (a closed port: "connection
/// refused") until the entry times out.
fn forget_diverted(port: u16) {
    let res = conntrack::delete_where(|e| {
        e.orig.proto == 17 && e.orig.dport == 53 && e.reply.sport == port
    });
    if let Err(e) = res {
        warn!(error = %format!("{e:#}"), "forgetting the redirected DNS queries");
    }
}

fn bind_control(socket: &Path) -> Result<UnixListener> {
    if socket.exists() {
        // A live daemon would hold the pin-dir lock, so this is stale.
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let l = UnixListener::bind(socket)
        .with_context(|| format!("binding control socket {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The daemon's answer to one control request; `written` is told once it
/// has been written to the connection.
struct Reply {
    resp: Response,
    written: Option<oneshot::Sender<()>>,
}

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<(Request, oneshot::Sender<Reply>)>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let (rtx, rrx) = oneshot::channel();
                        if tx.send((req, rtx)).await.is_err() {
                            return;
                        }
                        rrx.await.unwrap_or_else(|_| Reply {
                            resp: Response::error("daemon stopping"),
                            written: None,
                        })
                    }
                    Err(e) => Reply {
                        resp: Response::error(format!("bad request: {e}")),
                        written: None,
                    },
                };
                let mut out = serde_json::to_string(&reply.resp).unwrap_or_default();
                out.push('\n');
                let ok = wr.write_all(out.as_bytes()).await.is_ok();
                if let Some(w) = reply.written {
                    let _ = w.send(());
                }
                if !ok {
                    return;
                }
            }
        });
    }
}

/// The addresses by which a WAN's connections are known in conntrack
/// (NAT to its address, inbound to it, NPT to its prefix).
struct WanAddrs {
    addrs: Vec<IpAddr>,
    prefix6: Option<ipnet::Ipv6Net>,
}

impl WanAddrs {
    fn of(w: &WanRt) -> WanAddrs {
        WanAddrs {
            addrs: w.link.own_addresses(),
            prefix6: w.link.prefix6(&w.cfg),
        }
    }

    fn is_empty(&self) -> bool {
        self.addrs.is_empty() && self.prefix6.is_none()
    }

    fn is_ours(&self, a: &IpAddr) -> bool {
        self.addrs.contains(a)
            || matches!((a, self.prefix6), (IpAddr::V6(a), Some(p)) if p.contains(a))
    }

    /// The reply comes back to the WAN: a connection masqueraded (or
    /// NPT-mapped) to it, or one made to it from outside.
    fn reply_to(&self, e: &conntrack::CtEntry) -> bool {
        self.is_ours(&e.reply.dst)
    }

    /// Any address of the connection is the WAN's (adoption at start).
    fn used_by(&self, e: &conntrack::CtEntry) -> bool {
        [e.orig.src, e.orig.dst, e.reply.src, e.reply.dst]
            .iter()
            .any(|a| self.is_ours(a))
    }
}

fn tuple_of(t: &conntrack::CtTuple) -> Tuple5 {
    (t.proto, t.src, t.dst, t.sport, t.dport)
}

/// Flows of both families' flow maps that `pred` selects, with their last
/// activity (`bpf_ktime` ns).
fn pinned_flows(
    pin_dir: &Path,
    pred: impl Fn(&AnyFlowKey, &FlowValue) -> bool,
) -> Result<HashMap<Tuple5, u64>> {
    let mut out = HashMap::new();
    datapath::read_flows(pin_dir, 4096, |k, v| {
        if pred(&k, v) {
            out.insert(k.tuple(), v.last_seen_ns);
        }
        true
    })?;
    Ok(out)
}
