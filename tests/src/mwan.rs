//! Running the real `mwan` binary in a lab's router namespace.
//!
//! ```no_run
//! use lab::{Lab, mwan::{Mwan, config}};
//! let lab = Lab::builder().isps(2).build()?;
//! let mwan = Mwan::start(&lab, &config(&lab, ""))?;
//! mwan.wait_all_up(std::time::Duration::from_secs(5))?;
//! # anyhow::Ok(())
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
pub use mwan::control::{FlowRecord, MapMigration, Status, WanStatus};

use crate::client::Endpoint;
use crate::ns::Netns;
use crate::proc::Proc;
use crate::topology::{Lab, RouterKind, PROBE_TARGETS, TUNNEL_IFACE};
use crate::wait_until;

/// The mwan binary under test: `$MWAN_BIN`, else the workspace's release
/// build, else its debug build (`cargo xtask test` sets `MWAN_BIN`). A
/// relative `MWAN_BIN` is taken from the workspace root (cargo runs test
/// binaries in their package's directory, not where it was started).
pub fn binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(p) = std::env::var_os("MWAN_BIN") {
        let p = PathBuf::from(p);
        return if p.is_relative() { root.join(p) } else { p };
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("mwan");
        if p.is_file() {
            return p;
        }
    }
    panic!("no mwan binary: run `cargo xtask build` (or set MWAN_BIN)");
}

/// A config for `lab`: every ISP as a WAN (`isp1`, `isp2`, … on `wan1`, …
/// with fixed gateways, weight 1), the LAN bridges, the lab's pin and state
/// directories, ICMP probes to the internet's probe targets (the IPv6 ones
/// too in a dual-stack lab), and `extra` appended (more top-level keys must
/// go *before* the WANs: use [`config_with`]).
pub fn config(lab: &Lab, extra: &str) -> String {
    config_with(lab, "", &|_| String::new(), extra)
}

/// Like [`config`], with `top` inserted at the top level and `per_wan(i)`
/// inserted into the table of WAN `i` (1-based).
pub fn config_with(lab: &Lab, top: &str, per_wan: &dyn Fn(usize) -> String, extra: &str) -> String {
    let mut lans = vec!["\"lan0\""];
    if lab.has_second_lan() {
        lans.push("\"lan1\"");
    }
    let tunnel = format!("\"{TUNNEL_IFACE}\"");
    if lab.tunnel_host().is_some() {
        lans.push(&tunnel);
    }
    let mut targets: Vec<String> = PROBE_TARGETS.iter().map(|t| format!("\"{t}\"")).collect();
    if lab.is_dual_stack() {
        targets.extend(crate::PROBE_TARGETS6.iter().map(|t| format!("\"{t}\"")));
    }
    let mut text = format!(
        "lan_interfaces = [{}]\npin_dir = \"{}\"\nstate_dir = \"{}\"\nprobe_targets = [{}]\n{top}\n",
        lans.join(", "),
        lab.pin_dir().display(),
        lab.state_dir().display(),
        targets.join(", "),
    );
    for i in 1..=lab.isp_count() {
        text += &format!(
            "\n[[wan]]\nname = \"isp{i}\"\ninterface = \"wan{i}\"\ngateway = \"{}\"\n{}\n",
            lab.isp(i).gateway(),
            per_wan(i)
        );
    }
    text + extra
}

/// The IPv6 keys of WAN `i` in a dual-stack lab, for [`config_with`]'s
/// `per_wan`: `ipv6 = mode` and `gateway6` (`"auto"`, from the ISP's RAs,
/// on a DHCP router; the ISP's global address on the others). For `"npt"`
/// also `lan_prefix6` (the LAN's ULA /64) and `prefix6`, the first /64 of
/// the ISP's delegated prefix ([`npt_prefix`]).
pub fn wan6(lab: &Lab, i: usize, mode: &str) -> String {
    let isp = lab.isp(i);
    let gateway6 = match lab.router_kind() {
        RouterKind::Dhcp => "auto".to_string(),
        _ => isp.gateway6().to_string(),
    };
    let mut text = format!("gateway6 = \"{gateway6}\"\nipv6 = \"{mode}\"\n");
    if mode == "npt" {
        text += &format!(
            "prefix6 = \"{}\"\nlan_prefix6 = \"{}\"\n",
            npt_prefix(lab, i),
            crate::LAN0_6
        );
    }
    text
}

/// The /64 of ISP `i`'s delegated prefix that [`wan6`] maps the LAN onto
/// with NPT (its first).
pub fn npt_prefix(lab: &Lab, i: usize) -> ipnet::Ipv6Net {
    let d = lab.isp(i).delegation6();
    ipnet::Ipv6Net::new_assert(d.network(), 64)
}

/// `text` (a config made by [`config`] or [`config_with`]) with `state_dir`
/// moved to `dir`: a directory mwan itself creates when `dir` does not exist.
pub fn with_state_dir(lab: &Lab, text: &str, dir: &Path) -> String {
    let lab_dir = format!("state_dir = \"{}\"", lab.state_dir().display());
    assert!(text.contains(&lab_dir), "no {lab_dir} in the config");
    text.replace(&lab_dir, &format!("state_dir = \"{}\"", dir.display()))
}

/// `text` (from [`config`] or [`config_with`]) for router `k` of an HA
/// pair: its own pin and state directories ([`Lab::ha_pin_dir`],
/// [`Lab::ha_state_dir`]); everything else is the same on both routers.
pub fn for_ha_router(lab: &Lab, text: &str, k: usize) -> String {
    let pins = format!("pin_dir = \"{}\"", lab.pin_dir().display());
    let state = format!("state_dir = \"{}\"", lab.state_dir().display());
    assert!(
        text.contains(&pins) && text.contains(&state),
        "not a lab config"
    );
    text.replace(
        &pins,
        &format!("pin_dir = \"{}\"", lab.ha_pin_dir(k).display()),
    )
    .replace(
        &state,
        &format!("state_dir = \"{}\"", lab.ha_state_dir(k).display()),
    )
}

/// The mwan daemon of a lab. Ended with SIGTERM (full teardown) when
/// dropped, unless already stopped.
pub struct Mwan<'l> {
    lab: &'l Lab,
    /// The router it runs on (0, or 1 for an HA pair's second router).
    node: usize,
    pub config: PathBuf,
    proc: Option<Proc>,
    /// Extra environment of the daemon (besides `MWAN_LOG`).
    env: Vec<(String, String)>,
    /// A command the daemon is started through (its argv comes after).
    via: Vec<String>,
    /// The mwan binary run for the daemon and the CLI ([`binary`] unless
    /// [`Mwan::start_bin`] named another).
    bin: PathBuf,
}

impl<'l> Mwan<'l> {
    /// Writes `config_text` to the lab directory and starts `mwan run` in
    /// the router namespace; returns once the control socket answers.
    pub fn start(lab: &'l Lab, config_text: &str) -> Result<Mwan<'l>> {
        Self::start_with(lab, config_text, &[])
    }

    /// Like [`Mwan::start`] with extra `run` arguments (e.g. `--keep`).
    pub fn start_with(lab: &'l Lab, config_text: &str, run_args: &[&str]) -> Result<Mwan<'l>> {
        Self::start_env(lab, config_text, run_args, &[])
    }

    /// Like [`Mwan::start_with`], with `env` added to the daemon's
    /// environment (also for later [`Mwan::launch`]es).
    pub fn start_env(
        lab: &'l Lab,
        config_text: &str,
        run_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Mwan<'l>> {
        Self::start_on(lab, 0, config_text, run_args, env)
    }

    /// Like [`Mwan::start_with`] with the binary `bin` (another build, for
    /// an A/B comparison) for the daemon and its CLI.
    pub fn start_bin(
        lab: &'l Lab,
        bin: &Path,
        config_text: &str,
        run_args: &[&str],
    ) -> Result<Mwan<'l>> {
        Self::start_full(lab, 0, bin.to_path_buf(), config_text, run_args, &[])
    }

    /// Like [`Mwan::start_env`] on router `node` of an HA pair (config
    /// from [`for_ha_router`]), with the config file `mwan-{node}.toml`.
    pub fn start_on(
        lab: &'l Lab,
        node: usize,
        config_text: &str,
        run_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Mwan<'l>> {
        Self::start_full(lab, node, binary(), config_text, run_args, env)
    }

    fn start_full(
        lab: &'l Lab,
        node: usize,
        bin: PathBuf,
        config_text: &str,
        run_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Mwan<'l>> {
        let file = match node {
            0 => "mwan.toml".to_string(),
            k => format!("mwan-{k}.toml"),
        };
        let config = lab.dir().join(file);
        std::fs::write(&config, config_text)?;
        let mut m = Mwan {
            lab,
            node,
            config,
            proc: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            via: Vec::new(),
            bin,
        };
        m.launch(run_args)?;
        Ok(m)
    }

    /// Like [`Mwan::start`], the daemon started through the command `via`
    /// (e.g. [`crate::unit::UnitSandbox::wrapper`]), also on later
    /// [`Mwan::launch`]es. It runs a copy of the binary in the lab's
    /// directory: the unit's sandbox hides /tmp, /home and /root, where a
    /// checkout and its build may well be (an installed mwan is in
    /// /usr/sbin), and shows /run, where the lab's directory is.
    pub fn start_via(lab: &'l Lab, config_text: &str, via: &[String]) -> Result<Mwan<'l>> {
        let config = lab.dir().join("mwan.toml");
        std::fs::write(&config, config_text)?;
        let bin = lab.dir().join("mwan");
        std::fs::copy(binary(), &bin)
            .with_context(|| format!("copying {} to {}", binary().display(), bin.display()))?;
        let mut m = Mwan {
            lab,
            node: 0,
            config,
            proc: None,
            env: Vec::new(),
            via: via.to_vec(),
            bin,
        };
        m.launch(&[])?;
        Ok(m)
    }

    /// Starts another daemon on the same config (after a keep-mode stop).
    pub fn launch(&mut self, run_args: &[&str]) -> Result<()> {
        let bin = self.bin.clone();
        let config = self.config.display().to_string();
        let mut argv: Vec<&str> = self.via.iter().map(String::as_str).collect();
        argv.extend([
            bin.to_str().expect("utf-8 path"),
            "--config",
            &config,
            "run",
        ]);
        argv.extend_from_slice(run_args);
        let mut env = vec![("MWAN_LOG", "info")];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let proc = self.router().spawn(argv[0], &argv[1..], &env)?;
        let socket = self.socket();
        let ready = wait_until(Duration::from_secs(15), || {
            !proc.is_running() || (socket.exists() && self.try_status().is_ok())
        });
        if !proc.is_running() || !ready {
            bail!("mwan did not start:\n{}", proc.output_so_far());
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// The daemon's control socket (in the config's `state_dir`).
    pub fn socket(&self) -> PathBuf {
        mwan::config::Config::load(&self.config)
            .map(|c| c.control_socket())
            .unwrap_or_else(|_| self.lab.ha_state_dir(self.node).join("mwan.sock"))
    }

    /// The router namespace the daemon runs in.
    pub fn router(&self) -> &'l Netns {
        if self.node == 0 {
            self.lab.router()
        } else {
            self.lab.ha_router(self.node)
        }
    }

    /// Runs `mwan --config <config> ARGS` in the router namespace.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.cli_via(&[], args)
    }

    /// Like [`Mwan::cli`], as the unprivileged user nobody (uid and gid
    /// 65534, no supplementary groups).
    pub fn cli_unprivileged(&self, args: &[&str]) -> Result<Output> {
        let user = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ];
        self.cli_via(&user, args)
    }

    /// `mwan --config <config> ARGS` run through the command `via`.
    fn cli_via(&self, via: &[&str], args: &[&str]) -> Result<Output> {
        let bin = &self.bin;
        let config = self.config.display().to_string();
        let mut argv = via.to_vec();
        argv.extend([bin.to_str().expect("utf-8 path"), "--config", &config]);
        argv.extend_from_slice(args);
        self.router().exec_status(&argv)
    }

    /// `cli` that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            bail!(
                "mwan {args:?} failed ({}): {}{}\ndaemon running: {}; the end of its log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.is_running(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The daemon's status (asked on its socket: the config file may be
    /// one a test broke on purpose).
    fn try_status(&self) -> Result<Status> {
        let socket = self.socket();
        let socket = socket.to_string_lossy();
        let out = self.cli(&["--socket", &socket, "status", "--json"])?;
        // Exit codes 4 and 5 report WANs down; the JSON is still printed.
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "mwan status --json ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    pub fn status(&self) -> Status {
        self.try_status().expect("mwan status")
    }

    pub fn wan(&self, name: &str) -> WanStatus {
        self.status()
            .wans
            .into_iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no WAN {name} in status"))
    }

    /// What this daemon's start did with the inherited map `map` (see
    /// `datapath::migrate`), if anything.
    pub fn migration(&self, map: &str) -> Option<MapMigration> {
        self.status().start.maps.into_iter().find(|m| m.map == map)
    }

    /// Waits until WAN `name` is in `state`.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Result<()> {
        self.wait_wans(&format!("WAN {name} not {state}"), timeout, |w| {
            w.iter().any(|w| w.name == name && w.state == state)
        })
    }

    pub fn wait_all_up(&self, timeout: Duration) -> Result<()> {
        self.wait_wans("WANs not up", timeout, |w| {
            w.iter().all(|w| w.state == "up" || w.state == "disabled")
        })
    }

    /// Waits until every WAN's IPv6 side is up too (a dual-stack lab).
    pub fn wait_all_up6(&self, timeout: Duration) -> Result<()> {
        self.wait_wans("WANs' IPv6 not up", timeout, |w| {
            w.iter()
                .all(|w| w.ipv6.as_ref().is_some_and(|f| f.state == "up"))
        })
    }

    /// Waits until `cond` holds for the WANs of `mwan status`; on timeout
    /// the error shows the states and the daemon's log.
    fn wait_wans(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[WanStatus]) -> bool,
    ) -> Result<()> {
        if wait_until(timeout, || self.try_status().is_ok_and(|s| cond(&s.wans))) {
            return Ok(());
        }
        let states = self.try_status().map(|s| {
            s.wans
                .into_iter()
                .map(|w| (w.name, w.state))
                .collect::<Vec<_>>()
        });
        Err(anyhow!(
            "{what} within {timeout:?}: {states:?}\nlog:\n{}",
            self.log()
        ))
    }

    /// `mwan flows --json` with extra arguments.
    pub fn flows(&self, args: &[&str]) -> Vec<FlowRecord> {
        let mut a = vec!["flows", "--json"];
        a.extend_from_slice(args);
        let out = self.cli_ok(&a).expect("mwan flows");
        serde_json::from_str(&out).expect("flows JSON")
    }

    /// What the daemon logged so far.
    /// Deletes every pin from the datapath's flow map behind the daemon's
    /// back, as an admin with bpftool could and as an LRU eviction does;
    /// returns how many there were.
    pub fn delete_pins(&self) -> Result<usize> {
        use mwan_common::{map, FlowKey, FlowValue};
        let data = mwan::datapath::open_pinned_map(&self.lab.ha_pin_dir(self.node), map::FLOWS)?;
        let mut map: aya::maps::HashMap<_, FlowKey, FlowValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data)?)?;
        let keys: Vec<FlowKey> = map.keys().collect::<Result<_, _>>()?;
        for k in &keys {
            // A pin the datapath replaced meanwhile is gone already.
            let _ = map.remove(k);
        }
        Ok(keys.len())
    }

    pub fn log(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.output_so_far().to_string())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    /// Sends `sig` and waits for the daemon to exit; returns its log.
    pub fn stop_with(&mut self, sig: libc::c_int) -> Result<String> {
        let proc = self
            .proc
            .take()
            .ok_or_else(|| anyhow!("mwan is not running"))?;
        proc.signal(sig)?;
        let status = proc
            .wait_timeout(Duration::from_secs(20))
            .ok_or_else(|| anyhow!("mwan did not exit after signal {sig}"))?;
        let log = proc.output_so_far().to_string();
        if !status.success() {
            bail!("mwan exited with {status}:\n{log}");
        }
        Ok(log)
    }

    /// Whether the daemon process is alive.
    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(|p| p.is_running())
    }

    /// Forgets the process (after `mwan stop` made it exit).
    pub fn forget(&mut self) -> Option<Proc> {
        self.proc.take()
    }
}

impl Drop for Mwan<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            let _ = p.signal(libc::SIGTERM);
            let _ = p.wait_timeout(Duration::from_secs(10));
        }
    }
}

/// Share of `seen` source addresses per ISP (1-based index → fraction).
pub fn shares<A: Endpoint>(lab: &Lab, seen: &[A]) -> BTreeMap<usize, f64> {
    let mut counts = BTreeMap::new();
    for s in seen {
        let addr: SocketAddr = (*s).into();
        let isp = lab.wan_of(addr.ip()).unwrap_or(0);
        *counts.entry(isp).or_insert(0usize) += 1;
    }
    counts
        .into_iter()
        .map(|(k, v)| (k, v as f64 / seen.len().max(1) as f64))
        .collect()
}

/// Everything on the router that mwan could have touched, as text, to
/// compare before and after: rules, all routes, nftables, tc filters,
/// the sysctls mwan sets, and the pin directory.
pub fn router_snapshot(lab: &Lab) -> String {
    snapshot_of(lab.router(), &lab.pin_dir())
}

/// [`router_snapshot`] of router `k` of an HA pair, with its addresses
/// (the virtual ones must be gone) and the programs running in it.
pub fn ha_router_snapshot(lab: &Lab, k: usize) -> String {
    let r = lab.ha_router(k);
    let mut out = snapshot_of(r, &lab.ha_pin_dir(k));
    let cmd = "ip -4 -o addr show | sed 's/ valid_lft.*//'";
    out += &format!("$ {cmd}\n{}\n", r.sh(cmd).unwrap_or_else(|e| e.to_string()));
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", r.name()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut programs: Vec<String> = pids
        .split_whitespace()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    programs.sort();
    out += &format!("programs: {programs:?}\n");
    out
}

fn snapshot_of(r: &Netns, pin_dir: &Path) -> String {
    let mut out = String::new();
    for cmd in [
        "ip rule show",
        "ip route show table all | grep -v '^local\\|^broadcast\\|table local'",
        "ip -6 rule show",
        "ip -6 route show table all | grep -v '^local\\|^anycast\\|^multicast\\|table local'",
        "nft list ruleset",
        "for d in $(ls /sys/class/net); do echo \"== $d\"; tc qdisc show dev $d; tc filter show dev $d ingress; done",
        "sysctl net.ipv4.ip_forward net.ipv4.fib_multipath_hash_policy net.ipv4.conf.all.rp_filter; for d in $(ls /sys/class/net); do sysctl net.ipv4.conf.$d.rp_filter net.ipv6.conf.$d.accept_ra; done; sysctl net.ipv6.fib_multipath_hash_policy",
    ] {
        out += &format!("$ {cmd}\n{}\n", r.sh(cmd).unwrap_or_else(|e| e.to_string()));
    }
    out += &format!(
        "pins: {:?}\n",
        std::fs::read_dir(pin_dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default()
    );
    out
}
