//! `cargo xtask`: build, test, run, demo, bench and install mwan.
//!
//! The only task that needs more than cargo is building the eBPF datapath:
//! `build` finds a BPF toolchain the way mwan-user's build script does, and
//! on a Debian-family machine without one installs it (apt packages and
//! bpf-linker), saying what it does and how long it took.

#[path = "../../mwan-user/build_support/bpf_toolchain.rs"]
#[allow(dead_code)]
mod bpf_toolchain;
mod deb;
mod demo;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  build            build target/release/mwan (provisions the BPF toolchain when missing)
  test [ARGS..]    build, then run every unit and namespace end-to-end test (root);
                   ARGS go to the test binaries (e.g. a test name filter)
  run -- ARGS      build, then run target/release/mwan ARGS
  demo [--keep]    build, start a lab with three ISPs and show mwan balancing and failing over (root);
                   --keep leaves the lab running afterwards to try mwan's commands by hand
  bench [--quick]  measure mwan against plain routing, multipath and an nftables balancer; writes
                   BENCHMARKS.md (root; about 8 minutes, --quick about 2 and writes target/BENCHMARKS-quick.md)
  install [--prefix DIR]  install the binary, the systemd unit and an example config
  deb [--bin MWAN] [--out DIR] [--no-lintian]
                   build target/debian/mwan_<version>_<arch>.deb (and check it with lintian);
                   --bin packages that binary instead of building one
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("build") => build().map(|_| ()),
        Some("test") => test(&args[1..]),
        Some("run") => run(&args[1..]),
        Some("demo") => build().and_then(|bin| demo::demo(&root(), &bin, &args[1..])),
        Some("bench") => ensure_tools(&HA_TOOLS)
            .and_then(|()| ensure_tools(&DUAL_STACK_TOOLS))
            .and_then(|()| ensure_tools(&DNS_LOAD_TOOLS))
            .and_then(|()| build())
            .and_then(|bin| demo::bench(&root(), &bin, &args[1..])),
        Some("install") => build().and_then(|bin| install(&bin, &args[1..])),
        Some("deb") => deb(&args[1..]),
        Some("-h") | Some("--help") | Some("help") | None => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow!("unknown command `{other}`\n\n{USAGE}")),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn debian_family() -> bool {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    Path::new("/usr/bin/apt-get").exists()
        && os.lines().any(|l| {
            (l.starts_with("ID=") || l.starts_with("ID_LIKE="))
                && (l.contains("debian") || l.contains("ubuntu"))
        })
}

fn apt_install(packages: &[&str]) -> Result<()> {
    if !is_root() {
        bail!(
            "installing {} needs root: run as root, or run: sudo apt-get install -y {}",
            packages.join(" "),
            packages.join(" ")
        );
    }
    let t = Instant::now();
    println!("xtask: apt-get install {}", packages.join(" "));
    status(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    println!("xtask: apt-get done in {:.0}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// Finds a BPF toolchain, installing one on Debian-family machines.
fn ensure_bpf_toolchain() -> Result<()> {
    let missing = match bpf_toolchain::find() {
        Ok(t) => {
            println!(
                "xtask: BPF toolchain: {:?}, {}",
                t.route,
                t.bpf_linker.display()
            );
            return Ok(());
        }
        Err(m) => m,
    };
    if !debian_family() {
        bail!(
            "{missing}.\nOn this system install a nightly Rust with rust-src and bpf-linker:\n  \
             rustup toolchain install nightly --component rust-src\n  cargo install bpf-linker"
        );
    }
    println!("xtask: no BPF toolchain found ({missing}); provisioning it (this takes a few minutes, once)");
    let t = Instant::now();
    apt_install(bpf_toolchain::DEBIAN_PACKAGES)?;
    if bpf_toolchain::find_bpf_linker().is_none() {
        let t = Instant::now();
        println!(
            "xtask: cargo {}",
            bpf_toolchain::BPF_LINKER_INSTALL.join(" ")
        );
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![PathBuf::from(bpf_toolchain::LLVM_BIN_DIR)];
        paths.extend(std::env::split_paths(&path));
        status(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args(bpf_toolchain::BPF_LINKER_INSTALL)
                .env("PATH", std::env::join_paths(paths)?),
        )?;
        println!(
            "xtask: bpf-linker built in {:.0}s",
            t.elapsed().as_secs_f64()
        );
    }
    let tc = bpf_toolchain::find().map_err(|m| anyhow!("still {m} after provisioning"))?;
    println!(
        "xtask: BPF toolchain ready ({:?}) after {:.0}s",
        tc.route,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runtime tools the daemon and the lab use.
/// Programs the lab needs (tests, demo, bench), with the Debian packages
/// that have them.
const LAB_TOOLS: [(&str, &str); 3] = [("nft", "nftables"), ("ip", "iproute2"), ("tc", "iproute2")];

/// Programs only the tests need: Prometheus (`promtool` and the server) and
/// Chromium, for the metrics endpoint and status page tests; dnsmasq (the
/// binary alone, `dnsmasq-base`: no service) as the resolver of the domain
/// rules test and the ISPs' Router Advertisement server in dual-stack labs;
/// `systemd-analyze`, which rates the unit's sandbox (no systemd needs to
/// run), `setpriv`, which applies the unit's capabilities by hand, and
/// `systemd-nspawn` and `mmdebstrap`, which boot a fresh Debian in a
/// container to run the package's unit under a real systemd.
const TEST_TOOLS: [(&str, &str); 8] = [
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("chromium", "chromium"),
    ("dnsmasq", "dnsmasq-base"),
    ("systemd-analyze", "systemd"),
    ("setpriv", "util-linux"),
    ("systemd-nspawn", "systemd-container"),
    ("mmdebstrap", "mmdebstrap"),
];

/// The DNS load tool and the resolver it loads, for the bench's DNS relay
/// section and the relay's flood test.
const DNS_LOAD_TOOLS: [(&str, &str); 2] = [("dnsperf", "dnsperf"), ("dnsmasq", "dnsmasq-base")];

/// The dual-stack lab's RA server, for the bench's IPv6 section.
const DUAL_STACK_TOOLS: [(&str, &str); 1] = [("dnsmasq", "dnsmasq-base")];

/// An HA pair's daemons, for its tests and the bench's router failover.
const HA_TOOLS: [(&str, &str); 3] = [
    ("keepalived", "keepalived"),
    ("conntrackd", "conntrackd"),
    ("conntrack", "conntrack"),
];

/// Packages whose system service the tests must not have running: they
/// start their own instances inside lab namespaces.
const TEST_SERVICES: [(&str, &str); 3] = [
    ("prometheus", "prometheus.service"),
    ("keepalived", "keepalived.service"),
    ("conntrackd", "conntrackd.service"),
];

fn ensure_runtime_tools() -> Result<()> {
    ensure_tools(&LAB_TOOLS)
}

/// Installs the Debian packages of the `tools` (program, package) that are
/// not found, on a Debian-family machine; elsewhere says what to install.
fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| {
            !["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(bin).exists())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    missing.dedup();
    if !debian_family() {
        bail!("missing runtime tools: install {}", missing.join(" "));
    }
    without_service_starts(|| apt_install(&missing))?;
    for (pkg, service) in TEST_SERVICES {
        if missing.contains(&pkg) && Path::new("/run/systemd/system").exists() {
            // The package enables its service for the next boot; the tests
            // start their own instances in lab namespaces.
            println!("xtask: disabling {service} (installed for the tests only)");
            let _ = Command::new("systemctl")
                .args(["disable", "--now", "--quiet", service])
                .status();
        }
    }
    Ok(())
}

/// Runs `install` with Debian's service starts refused (a `policy-rc.d`
/// that says no, unless the machine has one already): the prometheus
/// package would otherwise start a Prometheus server on the host, and
/// installing must work without systemd too.
fn without_service_starts(install: impl FnOnce() -> Result<()>) -> Result<()> {
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask: no service starts while it installs test tools\nexit 101\n",
        )
        .with_context(|| format!("writing {}", policy.display()))?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let res = install();
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    res
}

/// Builds target/release/mwan and returns its path.
fn build() -> Result<PathBuf> {
    ensure_bpf_toolchain()?;
    let t = Instant::now();
    status(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "mwan-user",
        "--bin",
        "mwan",
    ]))?;
    let bin = root().join("target/release/mwan");
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    println!(
        "xtask: built {} ({:.1} MB, eBPF datapath embedded) in {:.0}s",
        bin.display(),
        size as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(bin)
}

/// The suites that run once more for each further kind of router the lab
/// models (`MWAN_LAB_ROUTER`, see the lab's `RouterKind`): the first pass
/// runs everything on a DHCP-like router.
const CORE_SUITES: [&str; 8] = [
    "balance",
    "failover",
    "policy",
    "lifecycle",
    "ipv6",
    "metered",
    "passive",
    "domains",
];
const MORE_ROUTER_KINDS: [&str; 1] = ["static"];

fn test(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the end-to-end tests build network namespaces: run `cargo xtask test` as root");
    }
    ensure_runtime_tools()?;
    ensure_tools(&TEST_TOOLS)?;
    ensure_tools(&DNS_LOAD_TOOLS)?;
    ensure_tools(&HA_TOOLS)?;
    ensure_tools(&deb::DEB_TOOLS)?;
    let bin = build()?;
    let t = Instant::now();
    let mut total = Counts::default();
    let mut failures = Vec::new();
    let mut passes: Vec<(String, Vec<String>)> = vec![("dhcp".into(), vec!["--workspace".into()])];
    for kind in MORE_ROUTER_KINDS {
        let mut sel = vec!["-p".to_string(), "mwan-tests".to_string()];
        for suite in CORE_SUITES {
            sel.extend(["--test".to_string(), suite.to_string()]);
        }
        passes.push((kind.to_string(), sel));
    }
    for (kind, selection) in passes {
        println!(
            "xtask: router kind `{kind}`: cargo test {}",
            selection.join(" ")
        );
        let (counts, ok) = cargo_test(&selection, args, &bin, &kind)?;
        total.passed += counts.passed;
        total.failed += counts.failed;
        if !ok || counts.failed > 0 {
            failures.push(format!("router kind `{kind}`: {} failed", counts.failed));
        }
    }
    println!(
        "xtask: {} tests passed, {} failed, in {:.0}s",
        total.passed,
        total.failed,
        t.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        bail!("the test run failed ({})", failures.join("; "));
    }
    if total.passed == 0 {
        bail!("no test ran: treating that as a failure");
    }
    Ok(())
}

#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
}

/// Runs `cargo test` on `selection` with the lab's router kind `kind`,
/// echoing its output while counting the tests; returns the counts and
/// whether cargo succeeded.
fn cargo_test(
    selection: &[String],
    args: &[String],
    bin: &Path,
    kind: &str,
) -> Result<(Counts, bool)> {
    let mut child = cargo()
        .args(["test", "--release", "--locked", "--no-fail-fast"])
        .args(selection)
        .arg("--")
        .args(args)
        .env("MWAN_BIN", bin)
        // The package test builds the package with this xtask.
        .env("MWAN_XTASK", std::env::current_exe()?)
        .env("MWAN_LAB_ROUTER", kind)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    let mut counts = Counts::default();
    use std::io::BufRead;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 12 passed; 0 failed; 1 ignored; ..."
            let num = |word: &str| {
                rest.split(['.', ';'])
                    .find_map(|p| p.trim().strip_suffix(word)?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            counts.passed += num("passed");
            counts.failed += num("failed");
        }
    }
    let st = child.wait()?;
    Ok((counts, st.success()))
}

fn deb(args: &[String]) -> Result<()> {
    let o = deb::Options::parse(&root(), args)?;
    let tools: Vec<(&str, &str)> = deb::DEB_TOOLS
        .into_iter()
        .filter(|(bin, _)| o.lintian || *bin != "lintian")
        .collect();
    ensure_tools(&tools)?;
    let bin = match &o.bin {
        Some(b) => b.clone(),
        None => build()?,
    };
    deb::build(&root(), &bin, &o).map(|_| ())
}

fn run(args: &[String]) -> Result<()> {
    let bin = build()?;
    let args: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    let st = Command::new(&bin).args(args).status()?;
    if !st.success() {
        bail!("mwan exited with {st}");
    }
    Ok(())
}

fn install(bin: &Path, args: &[String]) -> Result<()> {
    let mut prefix = PathBuf::from("/");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--prefix" => {
                prefix = PathBuf::from(
                    it.next()
                        .ok_or_else(|| anyhow!("--prefix needs a directory"))?,
                )
            }
            other => bail!("install: unknown argument `{other}`"),
        }
    }
    status(Command::new(bin).arg("install").arg("--root").arg(&prefix))
}
