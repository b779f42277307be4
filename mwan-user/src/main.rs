//! The `mwan` command: the daemon (`mwan run`) and the tools that talk to it.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use mwan::cli::{exit, Cli, Cmd, FlowSort};
use mwan::config::Config;
use mwan::control::{self, FlowRecord, HostRecord, Request, Response};
use mwan::{datapath, output};
use mwan_common::{map, HostKey, HostValue, WAN_NONE};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(matches!(cli.cmd, Cmd::Run { .. }));
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("mwan: {e:#}");
            let code = if e.downcast_ref::<NotRunning>().is_some() {
                exit::NOT_RUNNING
            } else if e.downcast_ref::<Denied>().is_some() {
                exit::DENIED
            } else {
                exit::FAILURE
            };
            ExitCode::from(code)
        }
    }
}

fn init_logging(daemon: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MWAN_LOG")
        .unwrap_or_else(|_| EnvFilter::new(if daemon { "info" } else { "warn" }));
    // journald stamps lines itself.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    if under_journald {
        b.without_time().init();
    } else {
        b.init();
    }
}

#[derive(Debug)]
struct NotRunning(String);
impl std::fmt::Display for NotRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for NotRunning {}

fn socket_of(cli: &Cli) -> Result<PathBuf> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    Ok(Config::load(&cli.config)?.control_socket())
}

/// This user may not use the control socket (exit code 6): a daemon may be
/// running, so nothing may be concluded from it.
#[derive(Debug)]
struct Denied(String);
impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Denied {}

/// Why the daemon on `socket` cannot be asked (`reach` is not `Connected`),
/// `more` appended to the message.
fn unreachable(socket: &Path, reach: control::Reach, more: &str) -> anyhow::Error {
    use control::Reach;
    let at = socket.display();
    match reach {
        // (Never called with `Connected`.)
        Reach::NoSocket | Reach::Connected(_) => {
            NotRunning(format!("the mwan daemon is not running (no socket at {at}){more}")).into()
        }
        Reach::Stale => NotRunning(format!(
            "the mwan daemon is not running (a stale socket at {at}: it crashed or was killed){more}"
        ))
        .into(),
        Reach::Denied(_) => {
            use std::os::unix::fs::MetadataExt;
            let who = match std::fs::metadata(socket) {
                Ok(m) => format!(
                    "the control socket is open to uid {} only, mode {:04o}",
                    m.uid(),
                    m.mode() & 0o7777
                ),
                Err(_) => "its directory is closed to this user".into(),
            };
            Denied(format!("permission denied on {at}: run as root ({who}){more}")).into()
        }
        Reach::Unknown(e) => {
            NotRunning(format!("the mwan daemon does not answer on {at}: {e}{more}")).into()
        }
    }
}

fn call(cli: &Cli, req: Request) -> Result<Response> {
    let socket = socket_of(cli)?;
    let stream = match control::reach(&socket) {
        control::Reach::Connected(s) => s,
        other => return Err(unreachable(&socket, other, "")),
    };
    let resp = control::call_on(stream, &socket, &req, Duration::from_secs(30))
        .map_err(|e| NotRunning(format!("{e:#}")))?;
    if !resp.ok {
        return Err(anyhow!(resp
            .error
            .unwrap_or_else(|| "the daemon refused".into())));
    }
    Ok(resp)
}

fn dispatch(cli: Cli) -> Result<u8> {
    match &cli.cmd {
        Cmd::Run { keep } => {
            mwan::daemon::run(mwan::daemon::RunOptions {
                config: cli.config.clone(),
                keep: *keep,
            })?;
            Ok(0)
        }
        Cmd::Check => check(&cli.config),
        Cmd::Status { json } => {
            let s = call(&cli, Request::Status)?
                .status
                .ok_or_else(|| anyhow!("empty status"))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", output::status(&s));
            }
            let enabled: Vec<_> = s.wans.iter().filter(|w| w.enabled).collect();
            Ok(if s.all_down {
                exit::ALL_DOWN
            } else if enabled.iter().any(|w| w.state != "up") {
                exit::SOME_DOWN
            } else {
                0
            })
        }
        Cmd::Flows {
            json,
            wan,
            host,
            limit,
            sort,
        } => {
            let pin_dir = Config::load(&cli.config)?.pin_dir;
            let mut flows = read_flows(&pin_dir, wan.as_deref(), *host)?;
            match sort {
                FlowSort::Recent => flows.sort_by(|a, b| a.idle_secs.total_cmp(&b.idle_secs)),
                FlowSort::Bytes => flows.sort_by_key(|f| std::cmp::Reverse(f.bytes)),
                FlowSort::Age => flows.sort_by(|a, b| b.age_secs.total_cmp(&a.age_secs)),
            }
            if let Some(n) = limit {
                flows.truncate(*n);
            }
            let out = std::io::stdout();
            let mut out = std::io::BufWriter::new(out.lock());
            if *json {
                serde_json::to_writer(&mut out, &flows)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", output::flows(&flows))?;
            }
            Ok(0)
        }
        Cmd::Hosts { json } => {
            let cfg = Config::load(&cli.config)?;
            let hosts = read_hosts(&cfg)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&hosts)?);
            } else {
                print!("{}", output::hosts(&hosts));
            }
            Ok(0)
        }
        Cmd::Domains { json, name } => {
            let r = call(&cli, Request::Domains { name: name.clone() })?;
            let entries = r.domains.unwrap_or_default();
            if *json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                println!("{}", r.message.unwrap_or_default());
            } else {
                print!("{}", output::domains(&entries));
            }
            Ok(0)
        }
        Cmd::SetWeight { wan, weight } => message(call(
            &cli,
            Request::SetWeight {
                wan: wan.clone(),
                weight: *weight,
            },
        )?),
        Cmd::Drain { wan } => message(call(&cli, Request::Drain { wan: wan.clone() })?),
        Cmd::Enable { wan } => message(call(&cli, Request::Enable { wan: wan.clone() })?),
        Cmd::Disable { wan } => message(call(&cli, Request::Disable { wan: wan.clone() })?),
        Cmd::Reload => message(call(&cli, Request::Reload)?),
        Cmd::Stop { teardown } => stop(&cli, *teardown),
        Cmd::Install { root, ha } => install(root, *ha),
    }
}

const UNIT: &str = include_str!("../packaging/mwan.service");
const EXAMPLE_CONFIG: &str = include_str!("../packaging/mwan.example.toml");

/// The packaged files name the Debian package's paths; a source install
/// (`mwan install`) puts the binary and the hooks under /usr/local instead,
/// and its copies of the unit and the HA configs say so.
const LOCAL_PATHS: [(&str, &str); 2] = [
    ("/usr/sbin/mwan", "/usr/local/sbin/mwan"),
    ("/usr/lib/mwan/", "/usr/local/lib/mwan/"),
];

fn local_paths(text: &str) -> String {
    LOCAL_PATHS
        .iter()
        .fold(text.to_string(), |t, (package, local)| {
            t.replace(package, local)
        })
}

/// `install --ha`: the HA pair's files (docs/HA.md), as (path under the
/// root, text, mode); configs are kept when they exist (the example goes
/// beside them as `NAME.mwan-example`).
const HA_SCRIPTS: [(&str, &str); 2] = [
    (
        "usr/local/lib/mwan/mwan-ha-notify",
        include_str!("../packaging/ha/mwan-ha-notify"),
    ),
    (
        "usr/local/lib/mwan/mwan-ha-check",
        include_str!("../packaging/ha/mwan-ha-check"),
    ),
];
const HA_CONFIGS: [(&str, &str); 3] = [
    (
        "etc/keepalived/keepalived.conf",
        include_str!("../packaging/ha/keepalived.conf"),
    ),
    (
        "etc/conntrackd/conntrackd.conf",
        include_str!("../packaging/ha/conntrackd.conf"),
    ),
    (
        "etc/mwan/mwan-ha.example.toml",
        include_str!("../packaging/ha/mwan.toml"),
    ),
];

fn install(root: &Path, ha: bool) -> Result<u8> {
    use std::os::unix::fs::PermissionsExt;
    let put = |rel: &str, bytes: &[u8], mode: u32| -> Result<PathBuf> {
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        // Write next to it and rename: a running binary can be replaced.
        let tmp = p.with_extension("mwan-new");
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("installing {}", p.display()))?;
        println!("installed {}", p.display());
        Ok(p)
    };
    let exe = std::fs::read(std::env::current_exe()?).context("reading this binary")?;
    put("usr/local/sbin/mwan", &exe, 0o755)?;
    put(
        "etc/systemd/system/mwan.service",
        local_paths(UNIT).as_bytes(),
        0o644,
    )?;
    let config = root.join("etc/mwan/mwan.toml");
    if config.exists() {
        put(
            "etc/mwan/mwan.toml.example",
            EXAMPLE_CONFIG.as_bytes(),
            0o644,
        )?;
        println!("kept the existing {}", config.display());
    } else {
        put("etc/mwan/mwan.toml", EXAMPLE_CONFIG.as_bytes(), 0o644)?;
    }
    if ha {
        for (rel, text) in HA_SCRIPTS {
            put(rel, local_paths(text).as_bytes(), 0o755)?;
        }
        for (rel, text) in HA_CONFIGS {
            let p = root.join(rel);
            let text = local_paths(text);
            if p.exists() {
                put(&format!("{rel}.mwan-example"), text.as_bytes(), 0o644)?;
                println!("kept the existing {}", p.display());
            } else {
                put(rel, text.as_bytes(), 0o644)?;
            }
        }
        println!(
            "\nHA pair: adapt the addresses in the keepalived and conntrackd configs (router B: priority, router_id, sync addresses),\nadd ha_address and snat_address to mwan.toml as in {}, see docs/HA.md",
            root.join("etc/mwan/mwan-ha.example.toml").display()
        );
    }
    println!(
        "\nnext: edit {} for your interfaces, then\n  mwan --config {} check\n  systemctl daemon-reload && systemctl enable --now mwan",
        config.display(),
        config.display()
    );
    Ok(0)
}

fn message(r: Response) -> Result<u8> {
    if let Some(m) = r.message {
        println!("{m}");
    }
    Ok(0)
}

fn check(path: &Path) -> Result<u8> {
    let cfg = Config::load(path)?;
    let names = interface_names();
    for w in cfg.check_system(&|n| names.iter().any(|x| x == n))? {
        println!("warning: {w}");
    }
    println!(
        "{}: ok ({} WANs, {} rules, {} LAN interfaces)",
        path.display(),
        cfg.wans.len(),
        cfg.rules.len(),
        cfg.lan_interfaces.len()
    );
    Ok(0)
}

fn interface_names() -> Vec<String> {
    std::fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .collect()
}

fn stop(cli: &Cli, teardown: bool) -> Result<u8> {
    let socket = socket_of(cli)?;
    // Connecting tells a live daemon from a stale socket (a crashed one's).
    let reach = control::reach(&socket);
    if let control::Reach::Connected(stream) = reach {
        let answer = control::call_on(
            stream,
            &socket,
            &Request::Stop { teardown },
            Duration::from_secs(60),
        );
        // Wait until the daemon has finished (it removes its socket last).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while socket.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        return match answer {
            Ok(r) => message(r),
            // The request went out; the daemon is gone: it stopped.
            Err(_) if !socket.exists() => {
                println!("stopped");
                Ok(0)
            }
            Err(e) => Err(e.context("stopping the daemon")),
        };
    }
    // Only a missing or refusing socket proves that no daemon runs: a
    // teardown beside a running daemon would pull its datapath away.
    if !teardown {
        return Err(unreachable(&socket, reach, ""));
    }
    if !reach.no_daemon() {
        return Err(unreachable(
            &socket,
            reach,
            "; nothing was torn down (a daemon may be running)",
        ));
    }
    // No daemon: remove what a previous one left behind.
    let cfg = Config::load(&cli.config)?;
    // A running daemon holds the pin_dir lock, also one whose socket was
    // removed. The lock is let go at once: a bpffs mwan mounted there
    // cannot be unmounted while it is held open.
    if cfg.pin_dir.is_dir() {
        let lock = datapath::lock_pin_dir(&cfg.pin_dir)
            .map_err(|e| anyhow!("{e:#}; nothing was torn down"))?;
        drop(lock);
    }
    let host = mwan::daemon::HostState::load(&cfg.state_file())?.unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let errors = rt.block_on(async {
        let net = mwan::routing::Net::connect().await?;
        Ok::<_, anyhow::Error>(mwan::daemon::teardown(&cfg, &host, &net).await)
    })?;
    for e in &errors {
        eprintln!("mwan: {e:#}");
    }
    if errors.is_empty() {
        println!("removed everything mwan had added");
        Ok(0)
    } else {
        Ok(exit::FAILURE)
    }
}

fn wan_names(pin_dir: &Path) -> Result<Vec<Option<String>>> {
    datapath::Maps::open_pinned(pin_dir)?.names()
}

fn name_of(names: &[Option<String>], id: u8) -> String {
    if id == WAN_NONE {
        return "main".into();
    }
    names
        .get(id as usize)
        .cloned()
        .flatten()
        .unwrap_or_else(|| format!("#{id}"))
}

fn read_flows(pin_dir: &Path, wan: Option<&str>, host: Option<IpAddr>) -> Result<Vec<FlowRecord>> {
    let names = wan_names(pin_dir)?;
    let wan_id = match wan {
        None => None,
        Some("main") => Some(WAN_NONE),
        Some(n) => Some(
            names
                .iter()
                .position(|x| x.as_deref() == Some(n))
                .ok_or_else(|| anyhow!("no WAN is named `{n}`"))? as u8,
        ),
    };
    let now = datapath::ktime_now_ns();
    let mut out = Vec::new();
    // IPv4 flows first, then IPv6 (before sorting).
    datapath::read_flows(pin_dir, 8192, |k, v| {
        if wan_id.is_some_and(|w| w != v.wan) || host.is_some_and(|h| h != k.src()) {
            return true;
        }
        out.push(FlowRecord {
            proto: match k.proto() {
                6 => "tcp".into(),
                17 => "udp".into(),
                1 => "icmp".into(),
                58 => "icmpv6".into(),
                p => p.to_string(),
            },
            src: k.src().to_string(),
            sport: k.src_port(),
            dst: k.dst().to_string(),
            dport: k.dst_port(),
            wan: name_of(&names, v.wan),
            moved_from: (v.moved_from != WAN_NONE).then(|| name_of(&names, v.moved_from)),
            age_secs: now.saturating_sub(v.first_seen_ns) as f64 / 1e9,
            idle_secs: now.saturating_sub(v.last_seen_ns) as f64 / 1e9,
            packets: v.packets,
            bytes: v.bytes,
        });
        true
    })
    .context("reading the flow map")?;
    Ok(out)
}

fn read_hosts(cfg: &Config) -> Result<Vec<HostRecord>> {
    let names = wan_names(&cfg.pin_dir)?;
    let now = datapath::ktime_now_ns();
    let ttl = cfg.host_ttl.as_secs_f64();
    let map = datapath::open_pinned_map(&cfg.pin_dir, map::HOST_PINS)?;
    let mut out = Vec::new();
    datapath::read_hash_batched::<HostKey, HostValue>(&map, 4096, |k, v| {
        let idle = now.saturating_sub(v.last_seen_ns) as f64 / 1e9;
        out.push(HostRecord {
            host: datapath::host_name(k),
            wan: name_of(&names, v.wan),
            idle_secs: idle,
            expires_in_secs: (ttl - idle).max(0.0),
        });
        true
    })
    .context("reading the host map")?;
    out.sort_by(|a, b| a.idle_secs.total_cmp(&b.idle_secs));
    Ok(out)
}
