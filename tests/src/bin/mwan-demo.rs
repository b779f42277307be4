//! `cargo xtask demo [--keep]`: a lab router with three ISPs of different
//! speeds, mwan balancing a LAN's connections over them, one ISP failing
//! silently and coming back — shown live in the terminal. Needs root; only
//! network namespaces are created, and they are removed at the end (also on
//! Ctrl-C).

#[path = "../bench/sig.rs"]
mod sig;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lab::mwan::{Mwan, Status};
use lab::{Host, IspSpec, Lab, Stream, PROBE_TARGETS, STREAM, STREAM_PACE, TCP_WHOAMI};

/// The three ISPs: name, line speed (Mbit/s, both ways), weight.
const ISPS: [(&str, u32, u32); 3] = [("fibre", 100, 10), ("cable", 50, 5), ("dsl", 20, 2)];
const HOSTS: usize = 4;
const STREAMS: usize = 6;
/// How the demo wants its downloads spread over the lines.
const DOWNLOADS_PER_ISP: [usize; 3] = [3, 2, 1];
/// Each LAN host opens a short connection this often.
const CONN_EVERY: Duration = Duration::from_millis(100);
const CONN_TIMEOUT: Duration = Duration::from_millis(800);
/// Shares of new connections are shown over this window.
const SHARE_WINDOW: Duration = Duration::from_secs(5);
/// A download without data for this long counts as stalled.
const STALL: Duration = Duration::from_secs(2);
/// Upper bound of any traffic loop (the scripted part takes about a minute;
/// with --keep the lab may stay up this long before traffic stops).
const MAX_TRAFFIC: Duration = Duration::from_secs(3600);

const USAGE: &str = "usage: mwan-demo [--keep]

Builds a lab (network namespaces: a router, 4 LAN hosts, three ISPs of
different speeds and an internet), runs mwan in it and shows it balancing,
failing over and recovering. About a minute. Everything is removed at the
end, also on Ctrl-C.

  --keep   after the scripted part, leave the lab and mwan running, print
           commands to try by hand, and wait for Ctrl-C

Runs as root. MWAN_BIN selects the mwan binary (cargo xtask demo sets it).";

fn main() -> ExitCode {
    sig::install();
    let mut keep = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--keep" => keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("mwan-demo: unknown argument `{other}`\n\n{USAGE}");
                return ExitCode::FAILURE;
            }
        }
    }
    match run(keep) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if sig::stopped() {
                println!("\nStopped (Ctrl-C); the lab has been removed.");
                ExitCode::from(130)
            } else {
                eprintln!("\nmwan-demo: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Terminal output: a live block redrawn in place (on a terminal), with
/// event lines printed above it.
struct Screen {
    tty: bool,
    drawn: usize,
    last_plain: Option<Instant>,
    start: Instant,
}

impl Screen {
    fn new() -> Screen {
        Screen {
            tty: std::io::stdout().is_terminal(),
            drawn: 0,
            last_plain: None,
            start: Instant::now(),
        }
    }

    fn clear_live(&mut self) {
        if self.tty && self.drawn > 0 {
            print!("\x1b[{}A\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    /// Prints a line above the live block.
    fn say(&mut self, line: &str) {
        self.clear_live();
        println!("{line}");
        let _ = std::io::stdout().flush();
    }

    /// A timestamped event line.
    fn event(&mut self, line: &str) {
        let t = self.start.elapsed().as_secs_f64();
        self.say(&format!("[{t:5.1} s] {line}"));
    }

    /// Replaces the live block (on a terminal), or prints it every few
    /// seconds (into a pipe or file).
    fn live(&mut self, lines: &[String]) {
        if self.tty {
            self.clear_live();
            let width = terminal_width();
            for l in lines {
                println!("{}", fit(l, width));
            }
            self.drawn = lines.len();
        } else if self
            .last_plain
            // The first block after 2 s, once there are rates to show.
            .get_or_insert_with(|| Instant::now() - Duration::from_secs(2))
            .elapsed()
            >= Duration::from_secs(4)
        {
            self.last_plain = Some(Instant::now());
            for l in lines {
                println!("{l}");
            }
            println!();
        }
        let _ = std::io::stdout().flush();
    }

    /// Leaves the current live block on screen.
    fn freeze(&mut self) {
        self.drawn = 0;
    }

    fn color(&self, code: &str, s: &str) -> String {
        if self.tty {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

/// Columns of the terminal on stdout (80 if unknown).
fn terminal_width() -> usize {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        80
    }
}

/// `line` cut to fewer than `width` visible characters (escape sequences
/// do not count), so that a redrawn line never wraps.
fn fit(line: &str, width: usize) -> String {
    let mut out = String::new();
    let mut visible = 0;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            out.push(c);
            for c in chars.by_ref() {
                out.push(c);
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        if visible + 1 >= width {
            out.push_str("\x1b[0m");
            break;
        }
        out.push(c);
        visible += 1;
    }
    out
}

/// One short connection a LAN host made.
#[derive(Clone, Copy)]
struct Conn {
    started: Instant,
    /// ISP (1-based) the server saw it come from; `None`: it failed.
    isp: Option<usize>,
}

/// A long download and what the demo knows about it.
struct Download {
    n: usize,
    host: usize,
    stream: Stream,
    isp: usize,
    last_bytes: u64,
    last_change: Instant,
    rate_mbit: f64,
    moved_from: Option<usize>,
}

fn run(keep: bool) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces: run it as root (sudo cargo xtask demo)");
    }
    let mut scr = Screen::new();
    println!(
        "{}\n",
        scr.color(
            "1",
            "mwan demo: one LAN, three internet lines, one of them failing"
        )
    );
    println!(
        "Building a lab out of network namespaces (nothing on this machine's own network is touched):\n  \
         a router running mwan, {HOSTS} LAN hosts on its LAN (lan0), and three ISPs:"
    );
    for (i, (name, mbit, _)) in ISPS.iter().enumerate() {
        println!(
            "    ISP {} \"{name}\": {mbit} Mbit/s, on the router's interface wan{}",
            i + 1,
            i + 1
        );
    }
    let mut builder = Lab::builder().lan_hosts(HOSTS);
    for (_, mbit, _) in ISPS {
        builder = builder.isp(IspSpec::default().rate_mbit(mbit));
    }
    let lab = builder.build()?;
    sig::check()?;
    let config = demo_config(&lab);
    let saved = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/mwan-demo.toml");
    let saved = match std::fs::write(&saved, &config) {
        Ok(()) => Some(saved.canonicalize().unwrap_or(saved)),
        Err(_) => None,
    };
    println!(
        "\nThe config mwan runs with{}:\n",
        saved
            .as_ref()
            .map(|p| format!(" (a copy is saved as {})", p.display()))
            .unwrap_or_default()
    );
    for line in config.lines() {
        println!("  {}", scr.color("36", line));
    }
    println!();

    let t = Instant::now();
    let mwan = Mwan::start(&lab, &config)?;
    mwan.wait_all_up(Duration::from_secs(15))?;
    scr.event(&format!(
        "mwan started; all three WANs are up after {:.1} s (their probes answer)",
        t.elapsed().as_secs_f64()
    ));

    let conns: Mutex<Vec<Conn>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let result = thread::scope(|s| -> Result<()> {
        for host in lab.hosts() {
            let (conns, stop) = (&conns, &stop);
            s.spawn(move || connect_loop(host, conns, stop, CONN_EVERY));
        }
        let r = script(&lab, &mwan, &conns, &mut scr);
        stop.store(true, Ordering::SeqCst);
        r
    });
    if let Err(e) = result {
        scr.clear_live();
        return Err(e);
    }

    if keep {
        keep_running(&lab, &mwan, &conns, saved, &mut scr)?;
    } else {
        println!(
            "\nTo keep the lab and mwan running afterwards and try mwan's commands yourself:\n  \
             cargo xtask demo --keep"
        );
    }
    print!("\nStopping mwan and removing the lab... ");
    let _ = std::io::stdout().flush();
    drop(mwan);
    drop(lab);
    println!("done.");
    Ok(())
}

/// The config, generated from the lab, commented like the example config.
fn demo_config(lab: &Lab) -> String {
    let targets: Vec<String> = PROBE_TARGETS.iter().map(|t| format!("\"{t}\"")).collect();
    let total: u32 = ISPS.iter().map(|i| i.2).sum();
    let mut c = format!(
        "# mwan config generated by `cargo xtask demo` for its lab. On a real router\n\
         # this is /etc/mwan/mwan.toml; every key is explained in docs/CONFIG.md and\n\
         # mwan-user/packaging/mwan.example.toml. Check one with: mwan --config FILE check\n\
         \n\
         # Forwarded traffic arriving on these interfaces is balanced: the LAN bridge.\n\
         lan_interfaces = [\"lan0\"]\n\
         \n\
         # Where mwan pins its eBPF maps and puts its control socket. A real router\n\
         # leaves both out (defaults /sys/fs/bpf/mwan and /run/mwan); the lab uses its\n\
         # own directories so that nothing outside it is touched.\n\
         pin_dir = \"{}\"\n\
         state_dir = \"{}\"\n\
         \n\
         # Health checks for every WAN: several targets beyond the ISP, probed through\n\
         # each WAN. Here they are addresses in the lab's \"internet\"; at home you would\n\
         # use e.g. [\"1.1.1.1\", \"9.9.9.9\", \"dns:8.8.8.8\"].\n\
         probe_targets = [{}]\n\
         # The defaults, spelled out: a probe round every 100 ms, answers within 400 ms,\n\
         # down after 4 failed rounds (a dead line is noticed within 0.8 s), up after 5\n\
         # good rounds and no sooner than 5 s after it went down.\n\
         # probe_interval = \"100ms\"\n\
         # probe_timeout = \"400ms\"\n\
         # down_after = 4\n\
         # up_after = 5\n\
         # hold_down = \"5s\"\n\
         \n\
         # Every connection stays on the WAN it started on (the default).\n\
         sticky = \"connection\"\n\
         # A failed WAN that comes back gets new connections; connections that moved\n\
         # away stay where they are (the default).\n\
         failback = \"keep\"\n",
        lab.pin_dir().display(),
        lab.state_dir().display(),
        targets.join(", ")
    );
    for (i, (name, mbit, weight)) in ISPS.iter().enumerate() {
        let isp = lab.isp(i + 1);
        let _ = write!(
            c,
            "\n# ISP {}: a {mbit} Mbit/s line.\n\
             [[wan]]\n\
             name = \"{name}\"\n\
             interface = \"{}\"\n\
             {:<24}# or \"auto\": learned from the DHCP client's route\n\
             {:<24}# {weight} of every {total} new connections\n",
            i + 1,
            isp.wan_interface(),
            format!("gateway = \"{}\"", isp.gateway()),
            format!("weight = {weight}"),
        );
    }
    c
}

/// A LAN host opening a short connection every `every` (bounded by time
/// and by `stop`), recording where each went.
fn connect_loop(host: &Host, conns: &Mutex<Vec<Conn>>, stop: &AtomicBool, every: Duration) {
    let deadline = Instant::now() + MAX_TRAFFIC;
    let mut next = Instant::now();
    host.run(|| {
        while !stop.load(Ordering::SeqCst) && !sig::stopped() && Instant::now() < deadline {
            let started = Instant::now();
            let isp = whoami(TCP_WHOAMI, CONN_TIMEOUT)
                .ok()
                .and_then(|a| isp_of(*a.ip()));
            lock(conns).push(Conn { started, isp });
            next += every;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The ISP (1-based) whose link subnet 100.64.I.0/24 holds `ip` (the lab
/// never renumbers in the demo).
fn isp_of(ip: std::net::Ipv4Addr) -> Option<usize> {
    let o = ip.octets();
    (o[0] == 100 && o[1] == 64 && (1..=ISPS.len()).contains(&(o[2] as usize)))
        .then_some(o[2] as usize)
}

fn whoami(addr: SocketAddrV4, timeout: Duration) -> Result<SocketAddrV4> {
    let mut c = TcpStream::connect_timeout(&addr.into(), timeout)?;
    c.set_read_timeout(Some(timeout))?;
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    s.trim()
        .parse()
        .with_context(|| format!("bad whoami answer {s:?}"))
}

fn status(mwan: &Mwan) -> Result<Status> {
    let out = mwan.cli(&["status", "--json"])?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow!(
            "mwan status: {e}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

fn name(isp: usize) -> &'static str {
    ISPS[isp - 1].0
}

/// What the live block shows, and the counters behind its rates.
struct View {
    last_rx: BTreeMap<String, (u64, Instant)>,
    rate: BTreeMap<String, f64>,
}

impl View {
    fn new() -> View {
        View {
            last_rx: BTreeMap::new(),
            rate: BTreeMap::new(),
        }
    }

    fn lines(
        &mut self,
        scr: &Screen,
        st: &Status,
        conns: &Mutex<Vec<Conn>>,
        downloads: &[Download],
    ) -> Vec<String> {
        let now = Instant::now();
        let recent: Vec<Conn> = lock(conns)
            .iter()
            .filter(|c| now.duration_since(c.started) <= SHARE_WINDOW)
            .copied()
            .collect();
        let ok = recent.iter().filter(|c| c.isp.is_some()).count().max(1);
        let failed = recent.iter().filter(|c| c.isp.is_none()).count();
        let mut lines = vec![format!(
            "  {:<6} {:>9}  {:<8} {:>6}  {:<29} {:>13}  {:>6}",
            "WAN", "line", "state", "weight", "new connections (last 5 s)", "download", "pinned"
        )];
        for (i, (nm, mbit, _)) in ISPS.iter().enumerate() {
            let Some(w) = st.wans.iter().find(|w| w.name == *nm) else {
                continue;
            };
            let now_rx = (w.rx_bytes, now);
            if let Some((b, t)) = self.last_rx.insert(w.name.clone(), now_rx) {
                let dt = now.duration_since(t).as_secs_f64();
                if dt > 0.2 {
                    self.rate.insert(
                        w.name.clone(),
                        w.rx_bytes.saturating_sub(b) as f64 * 8.0 / dt / 1e6,
                    );
                } else {
                    self.last_rx.insert(w.name.clone(), (b, t));
                }
            }
            let share = recent.iter().filter(|c| c.isp == Some(i + 1)).count() as f64 / ok as f64;
            let bar_len = (share * 20.0).round() as usize;
            let state = match w.state.as_str() {
                "up" => scr.color("32", &format!("{:<8}", w.state)),
                "down" => scr.color("1;31", &format!("{:<8}", w.state)),
                _ => scr.color("33", &format!("{:<8}", w.state)),
            };
            lines.push(format!(
                "  {:<6} {:>4} Mbit/s  {state} {:>6}  {:>3.0} % {:<22} {:>7.1} Mbit/s  {:>6}",
                nm,
                mbit,
                w.weight,
                share * 100.0,
                "█".repeat(bar_len),
                self.rate.get(&w.name).copied().unwrap_or(0.0),
                w.flows
            ));
        }
        lines.push(format!(
            "  new connections in the last 5 s: {} answered, {} failed",
            recent.len() - failed,
            if failed > 0 {
                scr.color("1;31", &failed.to_string())
            } else {
                "0".into()
            }
        ));
        let mut d = String::from("  downloads:");
        for dl in downloads {
            let stalled = dl.last_change.elapsed() >= STALL;
            let item = format!(
                " #{} {} {:.1}",
                dl.n,
                name(dl.isp),
                if stalled { 0.0 } else { dl.rate_mbit }
            );
            d += &if stalled {
                scr.color("1;31", &format!("{item} (stalled)"))
            } else {
                item
            };
        }
        d += "  (Mbit/s)";
        lines.push(d);
        lines
    }
}

/// Samples the downloads' byte counters (called every tick).
fn sample_downloads(downloads: &mut [Download]) {
    for dl in downloads.iter_mut() {
        let b = dl.stream.bytes();
        let el = dl.last_change.elapsed().as_secs_f64();
        if b != dl.last_bytes {
            if el > 0.0 {
                let inst = (b - dl.last_bytes) as f64 * 8.0 / el / 1e6;
                dl.rate_mbit = if dl.rate_mbit == 0.0 {
                    inst
                } else {
                    0.6 * dl.rate_mbit + 0.4 * inst
                };
            }
            dl.last_bytes = b;
            dl.last_change = Instant::now();
        }
    }
}

fn open_download(lab: &Lab, n: usize, host: usize) -> Result<Download> {
    let stream = lab.host(host).open_stream(STREAM)?;
    let isp = isp_of(*stream.source().ip())
        .ok_or_else(|| anyhow!("download from unexpected address {}", stream.source()))?;
    Ok(Download {
        n,
        host,
        isp,
        last_bytes: stream.bytes(),
        last_change: Instant::now(),
        rate_mbit: 0.0,
        stream,
        moved_from: None,
    })
}

/// mwan's status is polled this often (state changes are timed with it);
/// the live block is redrawn every `REDRAW`.
const POLL: Duration = Duration::from_millis(100);
const REDRAW: Duration = Duration::from_millis(500);

/// Runs the live view for at most `dur`, calling `each` after every status
/// poll; `each` returning true ends the phase early.
fn live_for(
    dur: Duration,
    scr: &mut Screen,
    view: &mut View,
    mwan: &Mwan,
    conns: &Mutex<Vec<Conn>>,
    downloads: &mut [Download],
    mut each: impl FnMut(&mut Screen, &Status, &mut [Download]) -> Result<bool>,
) -> Result<()> {
    let end = Instant::now() + dur;
    let mut drawn: Option<Instant> = None;
    while Instant::now() < end {
        sig::check()?;
        let st = status(mwan)?;
        if drawn.is_none_or(|t| t.elapsed() >= REDRAW) {
            drawn = Some(Instant::now());
            sample_downloads(downloads);
            let lines = view.lines(scr, &st, conns, downloads);
            scr.live(&lines);
        }
        if each(scr, &st, downloads)? {
            break;
        }
        sig::sleep(POLL)?;
    }
    Ok(())
}

fn script(lab: &Lab, mwan: &Mwan, conns: &Mutex<Vec<Conn>>, scr: &mut Screen) -> Result<()> {
    let mut view = View::new();
    let mut downloads = Vec::new();
    // mwan picks each download's line at random by weight; so that every
    // line carries some (3 on fibre, 2 on cable, 1 on dsl), downloads that
    // land on a line that already has its share are closed and opened
    // again (a bounded number of times).
    let mut want = DOWNLOADS_PER_ISP;
    let mut tries = 0;
    while downloads.len() < STREAMS && tries < 60 {
        sig::check()?;
        tries += 1;
        let n = downloads.len();
        let d = open_download(lab, n + 1, (n + tries) % HOSTS)?;
        if want[d.isp - 1] > 0 || tries >= 40 {
            want[d.isp - 1] = want[d.isp - 1].saturating_sub(1);
            downloads.push(d);
        } else {
            d.stream.close();
        }
    }
    // Past the servers' initial burst before rates are shown.
    sig::sleep(Duration::from_millis(700))?;
    sample_downloads(&mut downloads);
    let weights: Vec<String> = ISPS.iter().map(|i| i.2.to_string()).collect();
    let total: u32 = ISPS.iter().map(|i| i.2).sum();
    let expected: Vec<String> = ISPS
        .iter()
        .map(|i| format!("{} {:.0} %", i.0, i.2 as f64 * 100.0 / total as f64))
        .collect();
    scr.event(&format!(
        "traffic: {HOSTS} LAN hosts each open a short connection every {} ms, and {STREAMS} long downloads run \
         ({:.1} Mbit/s each; the demo reopened a few until every line had some)",
        CONN_EVERY.as_millis(),
        STREAM_PACE as f64 * 8.0 / 1e6
    ));
    scr.event(&format!(
        "1. Balancing. mwan spreads new connections by weight ({}: {}); each connection stays on its line.",
        weights.join(":"),
        expected.join(", ")
    ));
    let phase1 = Instant::now();
    live_for(
        Duration::from_secs(12),
        scr,
        &mut view,
        mwan,
        conns,
        &mut downloads,
        |_, _, _| Ok(false),
    )?;
    let counts = count_conns(conns, phase1, Instant::now());
    scr.freeze();
    scr.event(&format!(
        "   {} new connections in {:.0} s went: {}",
        counts.values().sum::<usize>(),
        phase1.elapsed().as_secs_f64(),
        share_text(&counts)
    ));

    // 2. ISP 1 fails silently.
    scr.event(&format!(
        "2. ISP 1 ({}) fails silently: its upstream drops everything, while the line, its carrier \
         and the gateway stay up. Nothing on the router's own interface changes.",
        name(1)
    ));
    for d in &downloads {
        d.stream.reset_max_gap();
    }
    let t0 = Instant::now();
    lab.isp(1).set_blackhole(true)?;
    let mut detected: Option<Duration> = None;
    live_for(
        Duration::from_secs(15),
        scr,
        &mut view,
        mwan,
        conns,
        &mut downloads,
        |scr, st, downloads| {
            if detected.is_none()
                && st
                    .wans
                    .iter()
                    .any(|w| w.name == name(1) && w.state == "down")
            {
                let d = t0.elapsed();
                detected = Some(d);
                scr.event(&format!(
                    "   mwan marked {} down {:.2} s after the failure (its probes through it went unanswered); \
                     new connections now go to {} and {} only",
                    name(1),
                    d.as_secs_f64(),
                    name(2),
                    name(3)
                ));
            }
            #[allow(clippy::needless_range_loop)] // downloads[i] is replaced
            for i in 0..downloads.len() {
                let ended = downloads[i].stream.end().is_some();
                if (ended || downloads[i].last_change.elapsed() >= STALL) && detected.is_some() {
                    let (n, host, from) = (downloads[i].n, downloads[i].host, downloads[i].isp);
                    let mut new = open_download(lab, n, host)?;
                    new.moved_from = Some(from);
                    let what = if ended {
                        "was reset"
                    } else {
                        "stalled (no data for 2 s)"
                    };
                    scr.event(&format!(
                        "   download #{n} was on {} and {what}: its ISP is dead. The application reconnects: now on {}",
                        name(from),
                        name(new.isp)
                    ));
                    let old = std::mem::replace(&mut downloads[i], new);
                    old.stream.close();
                }
            }
            // Repair 4 s after the failure was noticed: within hold_down.
            Ok(detected.is_some_and(|d| t0.elapsed() >= d + Duration::from_secs(4)))
        },
    )?;
    let Some(detected) = detected else {
        bail!("mwan did not mark {} down within 15 s", name(1));
    };
    scr.freeze();
    let failed: Vec<Conn> = lock(conns)
        .iter()
        .filter(|c| c.started >= t0 && c.isp.is_none())
        .copied()
        .collect();
    let last_failed = failed.iter().map(|c| c.started - t0).max();
    scr.event(&format!(
        "   new connections that failed after the failure: {}{}",
        failed.len(),
        last_failed
            .map(|d| format!(
                " (sent to {} before mwan noticed; the last one started {:.2} s after the failure)",
                name(1),
                d.as_secs_f64()
            ))
            .unwrap_or_default()
    ));
    let others: Vec<String> = downloads
        .iter()
        .filter(|d| d.moved_from.is_none() && d.isp != 1)
        .map(|d| {
            format!(
                "#{} on {}: longest pause {:.2} s",
                d.n,
                name(d.isp),
                d.stream.max_gap().as_secs_f64()
            )
        })
        .collect();
    if !others.is_empty() {
        scr.event(&format!(
            "   downloads on the other lines never stopped: {}",
            others.join(", ")
        ));
    }

    // 3. ISP 1 returns.
    scr.event(&format!(
        "3. ISP 1 ({}) is repaired. mwan's probes see it answer again at once, but it trusts the \
         line only once it has been down for hold_down (5 s): a flapping line cannot flap the network.",
        name(1)
    ));
    let t1 = Instant::now();
    lab.isp(1).set_blackhole(false)?;
    let mut back: Option<Duration> = None;
    live_for(
        Duration::from_secs(14),
        scr,
        &mut view,
        mwan,
        conns,
        &mut downloads,
        |scr, st, _| {
            if back.is_none() && st.wans.iter().any(|w| w.name == name(1) && w.state == "up") {
                let d = t1.elapsed();
                back = Some(d);
                scr.event(&format!(
                    "   mwan marked {} up {:.2} s after the repair, {:.2} s after it had gone down; new connections use it again. \
                     Downloads that moved stay where they are (failback = \"keep\").",
                    name(1),
                    d.as_secs_f64(),
                    (t1 + d - t0 - detected).as_secs_f64()
                ));
            }
            Ok(back.is_some_and(|b| t1.elapsed() > b + Duration::from_secs(7)))
        },
    )?;
    let Some(back) = back else {
        bail!("mwan did not bring {} back within 14 s", name(1));
    };
    scr.freeze();
    let counts = count_conns(conns, t1 + back, Instant::now());
    scr.event(&format!(
        "   since then, new connections went: {}",
        share_text(&counts)
    ));
    for d in downloads {
        d.stream.close();
    }
    println!(
        "\n{}\n  silent failure noticed, new connections moved: {:.2} s after the failure \
         (state seen by polling mwan status every {} ms)\n  \
         connections on the healthy lines: never interrupted\n  \
         repaired line back in use: {:.2} s after the repair (hold_down: not before 5 s after it went down)",
        scr.color("1", "Summary"),
        detected.as_secs_f64(),
        POLL.as_millis(),
        back.as_secs_f64()
    );
    Ok(())
}

fn count_conns(conns: &Mutex<Vec<Conn>>, from: Instant, to: Instant) -> BTreeMap<usize, usize> {
    let mut m = BTreeMap::new();
    for c in lock(conns).iter() {
        if c.started >= from && c.started <= to {
            *m.entry(c.isp.unwrap_or(0)).or_insert(0) += 1;
        }
    }
    m
}

fn share_text(counts: &BTreeMap<usize, usize>) -> String {
    let total: usize = counts.values().sum::<usize>().max(1);
    let mut parts: Vec<String> = (1..=ISPS.len())
        .map(|i| {
            format!(
                "{} {:.0} %",
                name(i),
                counts.get(&i).copied().unwrap_or(0) as f64 * 100.0 / total as f64
            )
        })
        .collect();
    if let Some(f) = counts.get(&0) {
        parts.push(format!("failed {f}"));
    }
    parts.join(", ")
}

/// `--keep`: the lab stays up with a trickle of connections; print what to
/// try and wait for Ctrl-C.
fn keep_running(
    lab: &Lab,
    mwan: &Mwan,
    conns: &Mutex<Vec<Conn>>,
    saved: Option<PathBuf>,
    scr: &mut Screen,
) -> Result<()> {
    let bin = lab::mwan::binary();
    let bin = bin.canonicalize().unwrap_or(bin);
    let m = format!(
        "ip netns exec {} {} --config {}",
        lab.router().name(),
        bin.display(),
        mwan.config.display()
    );
    let host = lab.host(0);
    println!(
        "\n{}\n\nThe lab and mwan keep running; each LAN host now opens a connection every 2 s.\n\
         In another terminal, as root:\n\n  \
         M=\"{m}\"\n\n  \
         $M status                  # WAN states, shares, health, counters\n  \
         $M flows --limit 20        # pinned connections (works even without the daemon)\n  \
         $M set-weight dsl 10       # more new connections through dsl, at once\n  \
         $M drain cable             # no new connections through cable; existing ones stay\n  \
         $M enable cable            # undo drain\n  \
         $M disable fibre           # take fibre out: its connections move now\n\n  \
         ip netns exec {} bash -c 'cat < /dev/tcp/{}/{}'   # a LAN host asks the internet which address it sees\n  \
         ip -n {} link set dev down down     # unplug ISP 1's line (carrier loss); `... up` plugs it back\n\n\
         The config is {}{}.\nPress Ctrl-C to stop mwan and remove the lab.",
        scr.color("1", "--keep"),
        host.name(),
        TCP_WHOAMI.ip(),
        TCP_WHOAMI.port(),
        lab.isp(1).ns().name(),
        mwan.config.display(),
        saved
            .map(|p| format!(" (copy: {})", p.display()))
            .unwrap_or_default()
    );
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        for h in lab.hosts() {
            let stop = &stop;
            s.spawn(move || connect_loop(h, conns, stop, Duration::from_secs(2)));
        }
        while !sig::stopped() {
            thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::SeqCst);
    });
    Ok(())
}
