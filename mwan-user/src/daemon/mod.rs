//! The daemon: keeps the host in the state the config, the WANs' health
//! and the admin's commands describe.
//!
//! One direction of flow. Start, reload, netlink events, probe rounds and
//! CLI commands only change the daemon's inputs (the config, each WAN's
//! link and health machines and overrides, what netlink says of the host);
//! then [`Daemon::reconcile`] computes the whole [`desired::Desired`] state
//! from them (a pure function) and [`apply::Applied`] makes the kernel match
//! it, writing only what differs, in the order the datapath needs. What the
//! apply changed that concerns connections (a WAN died or came back, the
//! table appeared) is acted on last ([`cleanup`]).
//!
//! Inputs that follow time: the local time (rules and weights by
//! schedule: the daemon wakes at the next boundary, and re-reads the clock
//! every few seconds, so a clock jump is followed too), each WAN's usage in
//! its billing cycle (`meter`: what its allowance still allows) and the
//! outages of returning WANs (`failback`: when their flows are drained
//! back). Schedules and allowances only change what new flows get; moving
//! existing ones is an action on connections (`drain`, `cleanup`), recorded
//! in the facts `mwan status` shows.
//!
//! Modules: `wan` (one WAN's inputs), `links` (reading netlink into the
//! inputs), `meter` (usage and allowances), `failback` (drains due),
//! `passive` (the handshake counters read into the health machines),
//! `desired` (inputs → desired state), `apply` (desired state →
//! kernel), `cleanup` (connections of dead and returning WANs), `drain`
//! (flows moved off backup and metered WANs), `reload`,
//! `commands` (the control socket), `status` (`mwan status`, metrics), `host`
//! (what mwan changed on the host, and the teardown).

mod apply;
mod cleanup;
mod commands;
mod desired;
mod drain;
mod failback;
mod host;
mod links;
mod meter;
mod passive;
mod reload;
mod status;
mod timed;
mod wan;

use host::{create_dirs, remove_created_dirs};
pub use host::{teardown, HostState};

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use mwan_common::MAX_WANS;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::clock::{self, LocalTime};
use crate::config::{AllDown, Config, Failback};
use crate::control::{Event, Request};
use crate::datapath::{self, Datapath};
use crate::family::{Family, PerFamily};
use crate::health::{RoundReport, State, Transition};
use crate::hooks::{run_hook, HookEvent};
use crate::logfield::millis;
use crate::nft;
use crate::policy;
use crate::routing::{Net, NetEvent};
use crate::web::Web;
use apply::{Applied, Effects, Kernel};
use cleanup::Facts;
use desired::{desired, Host, Inputs};
use wan::{assign_ids, id_capacity, WanRt};

const MAX_EVENTS: usize = 100;

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
    // The inputs.
    cfg: Config,
    opts: RunOptions,
    wans: Vec<WanRt>,
    /// What netlink says of the host beyond the WANs.
    host_view: Host,
    /// Per family, the default policy's members when some WAN last took
    /// new flows (`all_down = "last"` keeps them).
    last_default: PerFamily<Vec<(u8, u32)>>,
    // What is applied, and the handles to apply it.
    dp: Datapath,
    net: Net,
    host: HostState,
    applied: Applied,
    rounds_tx: mpsc::Sender<RoundReport>,
    rounds_rx: Option<mpsc::Receiver<RoundReport>>,
    /// The WANs' usage per billing cycle.
    meter: meter::Meter,
    /// Outages of WANs whose flows are drained back when they return.
    outages: failback::Failback,
    /// The local time of the last computation (schedules), and what the
    /// schedules gave then.
    clock: LocalTime,
    seen: timed::Seen,
    // What the daemon reports.
    facts: Facts,
    /// With `ha_address`: whether this router holds it (is the HA pair's
    /// active router), from the addresses seen last.
    ha_active: Option<bool>,
    events: VecDeque<Event>,
    report: status::Report,
    _lock: std::fs::File,
}

/// How the main loop ends.
enum Exit {
    Keep,
    Teardown,
}

impl Daemon {
    async fn start(cfg: Config, opts: RunOptions) -> Result<Daemon> {
        clock::init();
        let net = Net::connect().await.context("opening rtnetlink")?;
        let links = net.links().await.context("listing interfaces")?;
        let warnings = cfg.check_system(&|n| links.iter().any(|l| l.name == n))?;
        for w in &warnings {
            warn!("{w}");
        }
        let web = match cfg.metrics_listen {
            Some(addr) => Some(Web::start(addr).await?),
            None => None,
        };
        // Nothing has been changed on the host up to here.
        let created = create_dirs(&cfg.state_dir)
            .with_context(|| format!("creating state_dir {}", cfg.state_dir.display()))?;
        let (lock, host, dp, applied) = match prepare(&cfg, created.clone()) {
            Ok(p) => p,
            Err(e) => {
                // Not even started: leave no empty state_dir behind.
                remove_created_dirs(&created);
                return Err(e);
            }
        };
        let inherited = dp.inherited;
        let (rounds_tx, rounds_rx) = mpsc::channel(256);
        let mut report = status::Report::new(&cfg, web, inherited);
        report.start.warnings = warnings;
        report.start.warnings.extend(dp.warnings.iter().cloned());
        report.start.conntrack = match dp.conntrack {
            datapath::ConntrackAccess::Kfuncs => "kfuncs",
            datapath::ConntrackAccess::Nftables => "nftables",
        }
        .to_string();
        let (meter, meter_warning) = meter::Meter::load(&cfg);
        if let Some(w) = meter_warning {
            warn!("{w}");
            report.start.warnings.push(w);
        }
        let mut d = Daemon {
            meter,
            outages: failback::Failback::default(),
            clock: LocalTime::now(),
            seen: timed::Seen::default(),
            report,
            cfg,
            opts,
            wans: Vec::new(),
            host_view: Host::default(),
            last_default: PerFamily::default(),
            dp,
            net,
            host,
            applied,
            rounds_tx,
            rounds_rx: Some(rounds_rx),
            facts: Facts::default(),
            ha_active: None,
            events: VecDeque::new(),
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

    /// The inputs of a start: WAN ids (the pinned names keep them), each
    /// family's state as the previous daemon left it, the links; then the
    /// first apply, and the old program's replaced maps released.
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
                let p = self.dp.maps.policy(f, 0)?;
                self.last_default[f] = policy::shares(&p)
                    .into_iter()
                    .map(|(id, s)| (id, ((s * 1000.0).round() as u32).max(1)))
                    .collect();
            }
        }
        for (w, id) in self.cfg.wans.clone().into_iter().zip(ids) {
            let initial = PerFamily::new(|f| match (inherited, self.applied.alive(f, id)) {
                (false, _) => State::Unknown,
                (true, true) => State::Up,
                (true, false) => {
                    // Down when taken over: its return drains what went to
                    // the backups whenever that was.
                    self.outages.died(id, f, 0);
                    State::Down
                }
            });
            let mark = self.cfg.wan_mark(id);
            self.wans
                .push(WanRt::new(w, id, mark, self.cfg.table_base, initial));
        }
        self.host.rule_policies = rule_policies(&self.cfg, &self.host);
        info!(
            inherited,
            wans = self.wans.len(),
            pin_dir = %self.cfg.pin_dir.display(),
            "{}",
            if inherited { "taking over the running datapath" } else { "starting" }
        );
        // A daemon killed without cleanup left its DNS divert (which failed
        // open): UDP flows it diverted still point at its dead relay.
        for port in nft::divert_ports().await.unwrap_or_default() {
            cleanup::forget_diverted(port);
        }
        let notices = self.meter.configure(&self.cfg, &LocalTime::now());
        self.on_notices(notices);
        self.observe(true).await?;
        self.reconcile(true).await?;
        // The old program is gone from every LAN: the maps it used and this
        // start replaced (another size) can go.
        self.dp.finish_migration();
        self.report.start.maps = self.dp.migrations().to_vec();
        Ok(())
    }

    /// Computes the desired state from the inputs and applies it; then acts
    /// on what changed for connections. `verify`: check what the kernel may
    /// have changed behind mwan's back (see `apply`).
    async fn reconcile(&mut self, verify: bool) -> Result<()> {
        self.clock = LocalTime::now();
        let allowances = self.meter.allowances(&self.wans);
        let d = desired(&Inputs {
            cfg: &self.cfg,
            wans: &self.wans,
            host: &self.host_view,
            rule_policies: &self.host.rule_policies,
            last_default: &self.last_default,
            conntrack: self.dp.conntrack,
            clock: &self.clock,
            allowances: &allowances,
        });
        self.note_schedules(&d);
        for (f, fd) in d.families.iter() {
            if !fd.all_down {
                self.last_default[f] = fd.default_members.clone();
            }
        }
        let mut kernel = Kernel {
            cfg: &self.cfg,
            dp: &mut self.dp,
            net: &self.net,
            host: &mut self.host,
            rounds: &self.rounds_tx,
        };
        let fx = self.applied.apply(&mut kernel, &d, verify).await?;
        self.act_on(fx);
        self.report.dirty = true;
        Ok(())
    }

    /// What an apply changed for connections: a dead WAN's are cleaned up,
    /// a returning WAN takes back the flows that had moved
    /// (`failback = "reset"`) or has a drain due (`"drain"`), and "all WANs
    /// down" is said.
    fn act_on(&mut self, fx: Effects) {
        let started = self
            .wans
            .iter()
            .any(|w| Family::BOTH.iter().any(|f| w.state(*f) != State::Unknown));
        for (f, down) in fx.all_down {
            if started {
                self.log_all_down(f, down);
            }
        }
        let now_ns = datapath::ktime_now_ns();
        for (only, conns) in &fx.died {
            for f in only.map_or(Family::BOTH.to_vec(), |f| vec![f]) {
                self.outages.died(conns.id, f, now_ns);
            }
        }
        for (only, conns) in fx.died {
            cleanup::flush_conntrack(
                &self.facts,
                self.cfg.pin_dir.clone(),
                self.cfg.mark_mask,
                conns,
                only,
            );
        }
        for (f, id) in fx.revived {
            let Some(w) = self.wans.iter().find(|w| w.id == id) else {
                continue;
            };
            match w.cfg.failback {
                Failback::Keep => {}
                Failback::Reset => {
                    let name = w.cfg.name.clone();
                    cleanup::reset_moved_flows(&self.facts, self.cfg.pin_dir.clone(), id, name, f);
                }
                Failback::Drain => {
                    let after = w.cfg.failback_after;
                    if self.outages.revived(id, f, Instant::now(), now_ns, after) {
                        info!(wan = %w.cfg.name, family = %f, after = %humantime::format_duration(after), "back: its flows on backup and metered WANs are drained back once it has been up this long");
                    }
                }
            }
        }
        if let Some(n) = fx.adopted {
            self.report.start.adopted_connections = n;
        }
    }

    fn log_all_down(&self, f: Family, down: bool) {
        if !down {
            info!(family = %f, "a WAN is up again for {f}; traffic is balanced normally");
            return;
        }
        let kept: Vec<String> = self.last_default[f]
            .iter()
            .map(|(id, _)| self.wan_name(*id))
            .collect();
        error!(
            family = %f,
            policy = ?self.cfg.all_down,
            kept = ?kept,
            "ALL WANs ARE DOWN for {f}: {}",
            match self.cfg.all_down {
                AllDown::Last => "new connections keep using the WANs that were up last",
                AllDown::Unreachable => "new connections are refused (unreachable)",
            }
        );
    }

    fn wan_name(&self, id: u8) -> String {
        self.wans
            .iter()
            .find(|w| w.id == id)
            .map(|w| w.cfg.name.clone())
            .unwrap_or_else(|| format!("#{id}"))
    }

    fn record(&mut self, i: usize, ts: Vec<(Family, Transition)>) {
        for (f, t) in ts {
            self.on_transition(i, f, t);
        }
    }

    /// A health transition: logged, kept for `mwan status`, handed to the
    /// `on_change` hook.
    fn on_transition(&mut self, i: usize, f: Family, t: Transition) {
        self.report.dirty = true;
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
        if let Some(cmd) = &self.cfg.on_change {
            run_hook(
                cmd,
                &HookEvent {
                    event: "state",
                    wan: w.cfg.name.clone(),
                    interface: w.cfg.interface.clone(),
                    family: f.to_string(),
                    old: t.from.to_string(),
                    new: t.to.to_string(),
                    reason: t.reason.clone(),
                    loss_pct: m.loss_pct,
                    rtt_ms: m.rtt_ms,
                    time: SystemTime::now(),
                    extra: Vec::new(),
                },
                self.cfg.hook_timeout,
            );
        }
        let e = Event {
            time: status::rfc3339(SystemTime::now()),
            kind: "state".into(),
            wan: w.cfg.name.clone(),
            family: f.to_string(),
            from: t.from.to_string(),
            to: t.to.to_string(),
            reason: t.reason,
        };
        self.push_event(e);
    }

    /// Keeps `e` among the last [`MAX_EVENTS`] events `mwan status` shows.
    fn push_event(&mut self, e: Event) {
        self.events.push_back(e);
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
        let m = &mut self.wans[i].family_mut(r.family).machine;
        let suspected = m.suspected();
        let t = m.on_round(&r, now);
        // An answer ends a suspicion: new flows may come back.
        let cleared = suspected && !m.suspected();
        let changed = t.is_some() || cleared;
        if let Some(t) = t {
            self.on_transition(i, r.family, t);
        }
        if changed {
            self.reconcile(false).await?;
        }
        Ok(())
    }

    async fn serve(mut self) -> Result<()> {
        let socket = self.cfg.control_socket();
        let listener = commands::bind_control(&socket)?;
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<(Request, oneshot::Sender<commands::Reply>)>(16);
        tokio::spawn(commands::accept_loop(listener, ctl_tx));
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
        let web_on = self.report.web.is_some();
        // The passive health counters.
        let mut passive_tick = tokio::time::interval(passive::READ_EVERY);
        passive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The usage counters, once a second.
        let mut meter_tick = tokio::time::interval(std::time::Duration::from_secs(1));
        meter_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    net_dirty = relevant(&ev, &self.cfg);
                    // Take the whole burst before acting once.
                    while let Some(Some(ev)) = futures::FutureExt::now_or_never(net_events.next()) {
                        net_dirty |= relevant(&ev, &self.cfg);
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
                        let _ = reply.send(commands::Reply { resp, written: Some(written_tx) });
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(2),
                            written_rx,
                        )
                        .await;
                        break e;
                    }
                    let _ = reply.send(commands::Reply { resp, written: None });
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
                _ = meter_tick.tick() => self.on_meter_tick().await,
                _ = passive_tick.tick() => self.on_passive_tick().await,
                _ = tokio::time::sleep_until(self.next_wake()) => self.on_wake().await,
                _ = tick.tick() => {
                    self.expire_backup_flows().await;
                    // A safety net for missed netlink events (ENOBUFS),
                    // and for routes the kernel dropped without telling
                    // (a single-nexthop balance route on a quick down/up).
                    net_dirty = true;
                    self.applied.forget_balance();
                    let _ = self.report.flow_counts.refresh_if_stale();
                }
            }
            if net_dirty {
                let res = match self.observe(false).await {
                    Ok(()) => self.reconcile(true).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = res {
                    error!(error = %format!("{e:#}"), "applying a link change");
                }
            }
            if self.report.dirty && web_on {
                self.publish(false);
            }
        };
        status::notify("STOPPING=1");
        // The last second's bytes too.
        let counters = meter::read_counters(&self.wans);
        let notices = self.meter.sample(&self.cfg, &counters, &LocalTime::now());
        self.on_notices(notices);
        self.meter.save(true);
        self.report.web = None;
        let _ = std::fs::remove_file(&socket);
        match exit {
            Exit::Keep => {
                match self.applied.stop_helpers().await {
                    Ok(Some(port)) => cleanup::forget_diverted(port),
                    Ok(None) => {}
                    Err(e) => error!(error = %format!("{e:#}"), "removing the DNS divert"),
                }
                info!(pin_dir = %self.cfg.pin_dir.display(), "stopped; the datapath keeps forwarding (run `mwan run` to take it over, `mwan stop --teardown` to remove it)");
                Ok(())
            }
            Exit::Teardown => {
                drop(self.applied.stop_helpers().await);
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

/// Locks and loads the datapath and reads what a previous daemon left:
/// the host record and the maps' WAN names and `alive` flags.
fn prepare(
    cfg: &Config,
    created: Vec<PathBuf>,
) -> Result<(std::fs::File, HostState, Datapath, Applied)> {
    let mounted = datapath::ensure_bpffs(&cfg.pin_dir)?;
    std::fs::create_dir_all(&cfg.pin_dir)
        .with_context(|| format!("creating pin_dir {}", cfg.pin_dir.display()))?;
    let lock = datapath::lock_pin_dir(&cfg.pin_dir)?;
    let mut host = HostState::load(&cfg.state_file())?.unwrap_or_default();
    if mounted.is_some() {
        host.bpffs_mount = mounted;
    }
    host.note_created(created);
    host.pin_dir = cfg.pin_dir.clone();
    host.table_base = cfg.table_base;
    let mut dp = Datapath::load(&cfg.pin_dir, cfg.max_flows, cfg.max_hosts)?;
    // Learned destinations of domain rules are owned by the daemon that
    // learned them (expiry, rule indexes): none is inherited.
    dp.maps.clear_domain_dst()?;
    let applied = Applied::inherited(&dp)?;
    Ok((lock, host, dp, applied))
}

/// Each rule's policy id: kept by name from the record, new rules get free
/// ids (see `policy::assign_rule_policies`).
fn rule_policies(cfg: &Config, host: &HostState) -> std::collections::BTreeMap<String, u8> {
    let ids = policy::assign_rule_policies(&cfg.rules, &host.rule_policies);
    cfg.rules
        .iter()
        .zip(ids)
        .map(|(r, id)| (r.name.clone(), id))
        .collect()
}

/// Whether a netlink event can matter: one of our WAN or LAN interfaces, an
/// address anywhere (bypass trie), or a default route (gateway = "auto").
fn relevant(ev: &NetEvent, cfg: &Config) -> bool {
    match ev {
        NetEvent::Link(l) => {
            cfg.wans.iter().any(|w| w.interface == l.name) || cfg.lan_interfaces.contains(&l.name)
        }
        NetEvent::LinkRemoved { name, .. } => {
            cfg.wans.iter().any(|w| &w.interface == name) || cfg.lan_interfaces.contains(name)
        }
        NetEvent::Addr { .. } => true,
        NetEvent::Route { table, default, .. } => {
            *default && !(cfg.table_base..=cfg.table_base + MAX_WANS).contains(table)
        }
        // Events were lost: re-read everything.
        NetEvent::Overrun => true,
    }
}
