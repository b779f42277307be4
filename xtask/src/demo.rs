//! `cargo xtask demo` and `cargo xtask bench`: both run a program of the
//! test crate (`mwan-tests`: `mwan-demo`, `mwan-bench`) against the mwan
//! binary just built. xtask itself depends on neither crate, so that it
//! compiles before the BPF toolchain is provisioned.
//!
//! Ctrl-C reaches the program directly (same process group); it removes
//! its lab and exits, while xtask waits for it instead of dying first.
//! SIGTERM sent to xtask alone is passed on to the program.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Context, Result};

pub fn demo(root: &Path, bin: &Path, args: &[String]) -> Result<()> {
    run_tool(root, bin, "mwan-demo", args)
}

pub fn bench(root: &Path, bin: &Path, args: &[String]) -> Result<()> {
    let mut args = args.to_vec();
    if !args.iter().any(|a| a == "--out") && !args.iter().any(|a| a == "--quick") {
        args.push("--out".into());
        args.push(root.join("BENCHMARKS.md").display().to_string());
    }
    run_tool(root, bin, "mwan-bench", &args)
}

/// The child's pid, for the SIGTERM forwarder.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_term(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        unsafe { libc::kill(pid, sig) };
    }
}

fn set_handler(sig: libc::c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    unsafe { libc::signal(sig, handler) }
}

fn run_tool(root: &Path, bin: &Path, name: &str, args: &[String]) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`{name}` builds network namespaces: run `cargo xtask {}` as root",
            &name[5..]
        );
    }
    crate::ensure_runtime_tools()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .current_dir(root)
        .args([
            "run",
            "--release",
            "--locked",
            "-p",
            "mwan-tests",
            "--bin",
            name,
            "--",
        ])
        .args(args)
        .env("MWAN_BIN", bin)
        .spawn()
        .with_context(|| format!("running {name}"))?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    // While the program runs, Ctrl-C is its business (it cleans up and
    // exits); SIGTERM and SIGHUP to xtask are passed on to it.
    let old_int = set_handler(libc::SIGINT, libc::SIG_IGN);
    let fwd = forward_term as extern "C" fn(libc::c_int) as libc::sighandler_t;
    let old_term = set_handler(libc::SIGTERM, fwd);
    let old_hup = set_handler(libc::SIGHUP, fwd);
    let status = child.wait();
    set_handler(libc::SIGINT, old_int);
    set_handler(libc::SIGTERM, old_term);
    set_handler(libc::SIGHUP, old_hup);
    CHILD.store(0, Ordering::SeqCst);
    let status = status.with_context(|| format!("waiting for {name}"))?;
    if status.code() == Some(130) {
        // Interrupted; the program said so and cleaned up.
        std::process::exit(130);
    }
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}
