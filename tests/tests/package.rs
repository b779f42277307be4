//! The Debian package and the unit it ships (issue 22).
//!
//! * `the_daemon_works_in_its_units_sandbox`: mwan started with
//!   mwan.service's own capability set and mount restrictions (read from
//!   the unit file and applied by hand: no systemd PID 1 here, see
//!   `lab::unit`) attaches, probes, balances, serves its metrics, fails
//!   over and tears down; without any one of the unit's capabilities it
//!   does not.
//! * `the_package_builds_passes_lintian_and_installs`: `cargo xtask deb`
//!   builds the package of the binary under test; its contents and lintian
//!   are checked; it is installed with dpkg into a scratch root (an overlay
//!   of this machine's root, in the lab router's namespaces: nothing is
//!   written to the machine's own /usr or /etc and no network but the
//!   lab's is touched), where the installed `mwan check` accepts the
//!   example config, the installed daemon forwards, a reinstall (the
//!   upgrade path) keeps it running, `dpkg -r` tears everything down and
//!   `dpkg -P` removes the config and state.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use lab::mwan::{config_with, router_snapshot, Mwan};
use lab::unit::UnitSandbox;
use lab::*;

const UNIT: &str = include_str!("../../mwan-user/packaging/mwan.service");
const UP: Duration = Duration::from_secs(10);
const METRICS: &str = "127.0.0.1:9849";

/// The unit's writable paths, where a lab keeps them.
fn lab_paths(lab: &Lab) -> impl Fn(&Path) -> PathBuf + '_ {
    move |p: &Path| match p.to_str() {
        Some("/sys/fs/bpf") => lab.pin_dir().parent().expect("pins in a bpffs").into(),
        Some("/run/mwan") | Some("/var/lib/mwan") => lab.state_dir(),
        _ => p.to_path_buf(),
    }
}

fn sandboxed_config(lab: &Lab) -> String {
    config_with(
        lab,
        &format!("metrics_listen = \"{METRICS}\""),
        &|_| String::new(),
        "",
    )
}

/// New TCP connections from every LAN host: the ISP of each.
fn connection_isps(lab: &Lab, per_host: usize) -> Vec<usize> {
    let mut isps = Vec::new();
    for h in lab.hosts() {
        for r in many_tcp_whoami(h, TCP_WHOAMI, per_host, 16) {
            let seen = r.expect("a connection through mwan");
            isps.push(lab.wan_of(*seen.ip()).unwrap_or(0));
        }
    }
    isps
}

/// `/proc/PID/status` field `key` of the daemon.
fn proc_status(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The capability mask of setpriv names `caps`.
fn cap_mask(caps: &[String]) -> u64 {
    caps.iter()
        .map(|c| {
            let bit = match c.as_str() {
                "net_admin" => 12,
                "net_raw" => 13,
                "sys_admin" => 21,
                "perfmon" => 38,
                "bpf" => 39,
                "net_bind_service" => 10,
                other => panic!("no bit known for capability {other}"),
            };
            1u64 << bit
        })
        .sum()
}

#[test]
fn the_daemon_works_in_its_units_sandbox() {
    let sandbox = UnitSandbox::parse(UNIT).unwrap();
    let lab = Lab::builder().lan_hosts(2).isps(2).build().unwrap();
    // mwan must write this sysctl itself, through the unit's writable
    // /proc/sys/net, and restore it at teardown.
    lab.router()
        .sysctls(&[("net.ipv4.ip_forward", "0")])
        .unwrap();
    let before = router_snapshot(&lab);
    let wrapper = sandbox.wrapper(&lab_paths(&lab));
    let mut mwan = Mwan::start_via(&lab, &sandboxed_config(&lab), &wrapper).unwrap();
    mwan.wait_all_up(UP).expect("probes work in the sandbox");

    // The sandbox is in force: exactly the unit's capabilities, no new
    // privileges, a read-only root in a mount namespace of its own.
    let pid = mwan.pid().expect("running");
    let bounding = u64::from_str_radix(&proc_status(pid, "CapBnd"), 16).unwrap();
    assert_eq!(bounding, cap_mask(&sandbox.caps), "CapBnd of the daemon");
    assert_eq!(proc_status(pid, "CapEff"), proc_status(pid, "CapBnd"));
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .expect("a root mount");
    assert!(root.split(' ').nth(5).unwrap().starts_with("ro"), "{root}");

    // Attached, and forwarding with the sysctl it set.
    let tc = lab.router().sh("tc filter show dev lan0 ingress").unwrap();
    assert!(tc.contains("bpf"), "no classifier on lan0: {tc}");
    let forward = lab.router().sh("sysctl -n net.ipv4.ip_forward").unwrap();
    assert_eq!(forward.trim(), "1");

    // Balanced: 1000 connections at weights 1:1; one standard deviation of
    // a share is 1.6 points, the bound 6.
    let isps = connection_isps(&lab, 500);
    let got = shares_of(&isps);
    for i in [1, 2] {
        let share = got.get(&i).copied().unwrap_or(0.0);
        assert!((share - 0.5).abs() <= 0.06, "shares {got:?}");
    }
    let metrics = lab
        .router()
        .http_get(METRICS.parse::<SocketAddr>().unwrap(), "/metrics")
        .unwrap();
    assert!(
        metrics.text().contains("mwan_wan_up{"),
        "{}",
        metrics.text()
    );

    // Fails over: ISP 1 goes silent; every new connection uses ISP 2.
    lab.isp(1).set_blackhole(true).unwrap();
    mwan.wait_state("isp1", "down", UP).unwrap();
    let isps: BTreeSet<usize> = connection_isps(&lab, 20).into_iter().collect();
    assert_eq!(isps, BTreeSet::from([2]), "after ISP 1 died");
    lab.isp(1).set_blackhole(false).unwrap();
    mwan.wait_state("isp1", "up", UP).unwrap();

    // `systemctl stop` (SIGTERM) tears down from inside the sandbox.
    let log = mwan.stop_with(libc::SIGTERM).unwrap();
    assert!(log.contains("everything mwan added was removed"), "{log}");
    assert_eq!(
        before,
        router_snapshot(&lab),
        "the sandboxed teardown left changes"
    );

    // Each capability of the unit is needed: without it mwan does not
    // come up and forward.
    for cap in &sandbox.caps {
        let works = runs_and_forwards(&lab, &sandbox.without_cap(cap));
        // Whatever it managed to add goes, with every capability.
        let out = lab
            .router()
            .exec_status(&[
                lab::mwan::binary().to_str().unwrap(),
                "--config",
                lab.dir().join("mwan.toml").to_str().unwrap(),
                "stop",
                "--teardown",
            ])
            .unwrap();
        assert!(out.status.success(), "teardown after CAP_{cap}: {out:?}");
        assert!(
            !works,
            "mwan came up and forwarded without CAP_{}: the unit's other capabilities cover it, \
             so it grants more than mwan needs",
            cap.to_uppercase()
        );
        assert_eq!(
            before,
            router_snapshot(&lab),
            "left behind without CAP_{cap}"
        );
    }
}

fn shares_of(isps: &[usize]) -> std::collections::BTreeMap<usize, f64> {
    let mut m = std::collections::BTreeMap::new();
    for i in isps {
        *m.entry(*i).or_insert(0.0) += 1.0 / isps.len() as f64;
    }
    m
}

/// Whether mwan in `sandbox` starts, has every WAN up and forwards a
/// connection from a LAN host within bounds.
fn runs_and_forwards(lab: &Lab, sandbox: &UnitSandbox) -> bool {
    let wrapper = sandbox.wrapper(&lab_paths(lab));
    let mut mwan = match Mwan::start_via(lab, &sandboxed_config(lab), &wrapper) {
        Ok(m) => m,
        Err(e) => {
            println!("without {:?}: {e:#}", sandbox.caps);
            return false;
        }
    };
    let works = mwan.wait_all_up(Duration::from_secs(5)).is_ok()
        && lab
            .host(0)
            .tcp_whoami_within(TCP_WHOAMI, Duration::from_secs(2))
            .is_ok();
    let log = mwan.stop_with(libc::SIGTERM).unwrap_or_default();
    if !works {
        let notable: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains(" INFO "))
            .take(8)
            .collect();
        println!(
            "with only {:?}: not up and forwarding:\n{}",
            sandbox.caps,
            notable.join("\n")
        );
    }
    works
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A scratch root: an overlay on this machine's root whose changes go to
/// the lab directory, with its own /proc, /dev, /run, /tmp and bpffs, in a
/// mount namespace held by a process in the lab's router namespace.
/// Commands run chrooted in it, in the router's network namespace.
struct ScratchRoot<'l> {
    lab: &'l Lab,
    holder: Proc,
    root: PathBuf,
}

impl<'l> ScratchRoot<'l> {
    fn new(lab: &'l Lab, bind: &Path) -> ScratchRoot<'l> {
        let dir = lab.dir().join("scratch");
        let (root, upper, work) = (dir.join("root"), dir.join("upper"), dir.join("work"));
        for d in [&root, &upper, &work] {
            std::fs::create_dir_all(d).unwrap();
        }
        let ready = dir.join("ready");
        let script = format!(
            "set -e
             r={root}
             mount -n -t overlay overlay -o lowerdir=/,upperdir={upper},workdir={work} $r
             mount -n -t proc proc $r/proc
             mount -n --rbind /sys $r/sys
             mount -n -t bpf bpf $r/sys/fs/bpf
             mount -n --rbind /dev $r/dev
             for d in run tmp; do mount -n -t tmpfs tmpfs $r/$d; done
             mkdir -p $r/deb && mount -n --bind {bind} $r/deb
             touch {ready}
             exec sleep 600",
            root = root.display(),
            upper = upper.display(),
            work = work.display(),
            bind = bind.display(),
            ready = ready.display()
        );
        let holder = lab
            .router()
            .spawn(
                "unshare",
                &["--mount", "--propagation", "private", "sh", "-c", &script],
                &[],
            )
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || ready.exists()
                || !holder.is_running()),
            "the scratch root is not ready"
        );
        assert!(
            holder.is_running(),
            "scratch root: {}",
            holder.output_so_far()
        );
        ScratchRoot { lab, holder, root }
    }

    /// `argv` chrooted in the scratch root (`nsenter` into its mounts).
    fn argv(&self, argv: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "nsenter",
            "-t",
            &self.holder.pid().to_string(),
            "-m",
            "chroot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(self.root.display().to_string());
        v.extend(argv.iter().map(|s| s.to_string()));
        v
    }

    fn exec(&self, argv: &[&str]) -> Output {
        let argv = self.argv(argv);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.lab.router().exec_status(&argv).unwrap()
    }

    fn ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(out.status.success(), "{argv:?}: {}", text(&out));
        text(&out)
    }

    /// Whether `path` exists in the scratch root.
    fn exists(&self, path: &str) -> bool {
        self.exec(&["test", "-e", path]).status.success()
    }
}

/// The lab's config with the daemon's default pin and state directories,
/// which the scratch root has (its own bpffs and /run).
fn installed_config(lab: &Lab) -> String {
    config_with(lab, "", &|_| String::new(), "")
        .lines()
        .filter(|l| !l.starts_with("pin_dir") && !l.starts_with("state_dir"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_package_builds_passes_lintian_and_installs() {
    let lab = Lab::builder().lan_hosts(1).isps(2).build().unwrap();
    let deb = &lab::deb::build(&lab);
    let out_dir = deb.parent().unwrap().to_path_buf();
    let name = deb.file_name().unwrap().to_str().unwrap().to_string();
    check_contents(deb);
    check_lintian(deb);
    install_and_remove(&lab, &out_dir, &name);
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = std::process::Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .unwrap();
    assert!(out.status.success(), "dpkg-deb {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The files, the man page of every subcommand clap declares, the
/// completions, the conffile, the dependencies and the scripts.
fn check_contents(deb: &Path) {
    let listing = dpkg_deb(&["--contents"], deb);
    println!("{listing}");
    let files: BTreeSet<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    let mut want = vec![
        "/usr/sbin/mwan".to_string(),
        "/etc/mwan/mwan.toml".into(),
        "/usr/lib/mwan/mwan-ha-notify".into(),
        "/usr/lib/mwan/mwan-ha-check".into(),
        "/usr/share/doc/mwan/copyright".into(),
        "/usr/share/doc/mwan/changelog.gz".into(),
        "/usr/share/bash-completion/completions/mwan".into(),
        "/usr/share/zsh/vendor-completions/_mwan".into(),
        "/usr/share/fish/vendor_completions.d/mwan.fish".into(),
        "/usr/share/man/man8/mwan.8.gz".into(),
    ];
    for ex in [
        "keepalived.conf",
        "conntrackd.conf",
        "mwan-ha.toml",
        "mwan.toml",
    ] {
        want.push(format!("/usr/share/doc/mwan/examples/{ex}"));
    }
    use clap::CommandFactory;
    let cli = ::mwan::cli::Cli::command();
    let subcommands: Vec<String> = cli
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    assert!(subcommands.len() > 10, "{subcommands:?}");
    for sub in &subcommands {
        want.push(format!("/usr/share/man/man8/mwan-{sub}.8.gz"));
    }
    for f in &want {
        assert!(files.contains(f), "the package lacks {f}");
    }
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("/systemd/system/mwan.service")),
        "no unit: {files:?}"
    );
    let mode = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(".{path}")))
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .unwrap()
    };
    assert_eq!(mode("/usr/sbin/mwan"), "-rwxr-xr-x root/root");
    assert_eq!(mode("/etc/mwan/mwan.toml"), "-rw-r--r-- root/root");
    let conffiles = dpkg_deb(&["--info"], deb);
    assert!(conffiles.contains("conffiles"), "{conffiles}");
    let depends = dpkg_deb(&["--field"], deb);
    for dep in ["libc6 (>=", "nftables", "iproute2"] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }
    for script in ["postinst", "prerm", "postrm"] {
        assert!(conffiles.contains(script), "no {script}: {conffiles}");
    }
}

/// lintian: no error and no warning; every override carries its reason
/// (a comment right above it).
fn check_lintian(deb: &Path) {
    let overrides = include_str!("../../mwan-user/packaging/debian/lintian-overrides");
    let mut reason = false;
    for line in overrides.lines() {
        if line.starts_with('#') {
            reason = true;
        } else if line.trim().is_empty() {
            reason = false;
        } else {
            assert!(reason, "lintian override without a reason: {line}");
        }
    }
    let out = std::process::Command::new("lintian")
        .args(["--display-level", ">=pedantic", "--show-overrides"])
        .arg(deb)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("lintian:\n{said}");
    let bad: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(
        out.status.success() && bad.is_empty(),
        "lintian: {said}{}",
        text(&out)
    );
}

/// dpkg in the scratch root: install (nothing enabled or started; the
/// example config checks; man and bash find their files), the installed
/// daemon forwarding, a reinstall (the upgrade path) that keeps it
/// running, removal that tears everything down, purge.
fn install_and_remove(lab: &Lab, debs: &Path, name: &str) {
    // The example config's interfaces, so that its check can pass.
    lab.router()
        .ip("link add eth0 type veth peer name eth1\nlink add eth2 type veth peer name eth3")
        .unwrap();
    let scratch = ScratchRoot::new(lab, debs);
    let deb = format!("/deb/{name}");
    let said = scratch.ok(&["dpkg", "-i", &deb]);
    assert!(said.contains("systemctl enable --now mwan"), "{said}");
    assert!(scratch.exists("/usr/sbin/mwan"));
    assert!(
        !scratch.exists("/etc/systemd/system/multi-user.target.wants/mwan.service"),
        "installing enabled the unit"
    );
    let conffiles = scratch.ok(&["dpkg-query", "-W", "-f=${Conffiles}", "mwan"]);
    assert!(conffiles.contains("/etc/mwan/mwan.toml"), "{conffiles}");
    let check = scratch.ok(&["mwan", "check"]);
    assert!(check.contains("/etc/mwan/mwan.toml: ok"), "{check}");
    let page = scratch.ok(&["man", "-w", "mwan-stop"]);
    assert!(page.trim().ends_with("/man8/mwan-stop.8.gz"), "{page}");
    let completion = scratch.ok(&[
        "bash",
        "-c",
        ". /usr/share/bash-completion/completions/mwan && complete -p mwan",
    ]);
    assert!(completion.contains(" mwan"), "{completion}");

    // The installed daemon, on this router's config.
    let before = router_snapshot(lab);
    let write = scratch.argv(&["sh", "-c", "cat > /etc/mwan/mwan.toml"]);
    let write: Vec<&str> = write.iter().map(String::as_str).collect();
    let out = lab
        .router()
        .exec_input(&write, Some(&installed_config(lab)))
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let run = scratch.argv(&["/usr/sbin/mwan", "run"]);
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let daemon = lab.router().spawn(run[0], &run[1..], &[]).unwrap();
    let all_up = || scratch.exec(&["mwan", "status"]).status.code() == Some(0);
    assert!(
        wait_until(UP, all_up),
        "the installed daemon: {}",
        daemon.output_so_far()
    );
    lab.host(0).tcp_whoami(TCP_WHOAMI).unwrap();

    // The upgrade path (prerm upgrade, postinst configure VERSION): the
    // daemon goes on; the admin's config stays.
    scratch.ok(&["dpkg", "-i", &deb]);
    assert!(daemon.is_running(), "reinstalling stopped mwan");
    assert!(all_up());
    let config = scratch.ok(&["cat", "/etc/mwan/mwan.toml"]);
    assert!(config.contains("wan1"), "the admin's config was replaced");
    lab.host(0).tcp_whoami(TCP_WHOAMI).unwrap();

    // Removal leaves the network as it was; the config stays.
    scratch.ok(&[
        "cp",
        "/usr/share/doc/mwan/examples/mwan-ha.toml",
        "/etc/mwan/",
    ]);
    scratch.ok(&["dpkg", "-r", "mwan"]);
    assert!(
        daemon.wait_timeout(Duration::from_secs(10)).is_some(),
        "mwan still runs after dpkg -r"
    );
    assert_eq!(before, router_snapshot(lab), "dpkg -r left changes");
    assert!(!scratch.exists("/sys/fs/bpf/mwan"), "pins left");
    assert!(!scratch.exists("/usr/sbin/mwan"));
    assert!(scratch.exists("/etc/mwan/mwan.toml"));

    // Purge: config and state go: also a file dpkg does not know (the HA
    // example the admin copied) and systemd's preserved RuntimeDirectory.
    scratch.ok(&["mkdir", "-p", "/run/mwan"]);
    scratch.ok(&["dpkg", "-P", "mwan"]);
    assert!(!scratch.exists("/etc/mwan"), "purge left /etc/mwan");
    assert!(!scratch.exists("/run/mwan"), "purge left /run/mwan");
    let status = scratch.exec(&["dpkg-query", "-W", "-f=${Status}", "mwan"]);
    assert!(!text(&status).contains("installed ok"), "{}", text(&status));
}

/// The unit's exposure as systemd rates it (`systemd-analyze security`,
/// offline: no systemd running needed): at most 4.0, "OK". The unpacked
/// unit of before issue 22 scored 9.6 ("UNSAFE").
#[test]
fn systemd_analyze_rates_the_unit_at_most_4() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mwan-user/packaging/mwan.service");
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let said = text(&out);
    println!("{said}");
    let score: f64 = said
        .lines()
        .find_map(|l| l.split("Overall exposure level for mwan.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level: {said}"));
    assert!(score <= 4.0, "exposure {score} > 4.0:\n{said}");
}
