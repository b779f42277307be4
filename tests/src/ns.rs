//! Named network namespaces (`/run/netns/NAME`) and running things in them.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use crate::ctx::LabCtx;
use crate::sys;

/// Every lab object name (namespaces, lab directories) starts with this,
/// followed by the pid of the creating process and `x`.
pub(crate) const PREFIX: &str = "mwl";

/// The pid encoded in a lab object name (`mwl{pid}x…`), if it is one.
pub(crate) fn lab_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split_once('x')?.0.parse().ok()
}

/// Whether the process that created lab object `name` is gone, which makes
/// the object a leftover of a test that could not clean up.
pub(crate) fn is_leftover(name: &str) -> bool {
    lab_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// A network namespace created by the lab. Deleted (after killing every
/// process still inside) when dropped.
pub struct Netns {
    name: String,
    pub(crate) ctx: Arc<LabCtx>,
}

impl Netns {
    /// Creates namespace `name` with reverse-path filtering off by default
    /// and IPv6 disabled, or, in a dual-stack lab, enabled without
    /// duplicate address detection (addresses are usable at once).
    pub(crate) fn create(name: String, ctx: Arc<LabCtx>) -> Result<Netns> {
        run_cmd(Command::new("ip").args(["netns", "add", &name]), None)?;
        let disable_ipv6 = if ctx.dual_stack { "0" } else { "1" };
        let ns = Netns { name, ctx };
        ns.sysctls(&[
            ("net.ipv6.conf.all.disable_ipv6", disable_ipv6),
            ("net.ipv6.conf.default.disable_ipv6", disable_ipv6),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ])?;
        if ns.ctx.dual_stack {
            ns.sysctls(&[
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ])?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Moves the calling thread into this namespace. Only for threads the
    /// lab created itself.
    pub(crate) fn enter(&self) -> Result<()> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        sys::setns_net(&file).with_context(|| format!("setns into {}", self.name))
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its
    /// result; sockets created by `f` belong to the namespace. A panic in
    /// `f` is propagated.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        std::thread::scope(|s| {
            let thread = s.spawn(|| {
                self.enter().unwrap_or_else(|e| panic!("{e:#}"));
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `argv` in this namespace (`ip netns exec`); fails with its stderr
    /// if it exits non-zero.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        self.exec_input(argv, None)
    }

    /// Runs `argv` in this namespace and returns its output whatever its
    /// exit status (for commands whose exit code is the point).
    pub fn exec_status(&self, argv: &[&str]) -> Result<Output> {
        let what = format!("{argv:?} in {}", self.name);
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {what}"))
    }

    /// Like [`Netns::exec`], feeding `input` on stdin.
    pub fn exec_input(&self, argv: &[&str], input: Option<&str>) -> Result<Output> {
        run_cmd(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
            input,
        )
    }

    /// Runs a `sh -c` script in this namespace and returns its stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = self.exec(&["sh", "-c", script])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip` commands (one per line, as for `ip -batch`) here.
    pub fn ip(&self, batch: &str) -> Result<()> {
        run_cmd(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            Some(batch),
        )
        .map(drop)
    }

    /// Applies an nftables script (`nft -f -`) here.
    pub(crate) fn nft(&self, script: &str) -> Result<()> {
        self.exec_input(&["nft", "-f", "-"], Some(script)).map(drop)
    }

    /// Sets sysctls of this namespace, e.g. `("net.ipv4.ip_forward", "1")`.
    pub fn sysctls(&self, values: &[(&str, &str)]) -> Result<()> {
        self.run(|| {
            for (key, value) in values {
                let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                fs::write(&path, value)
                    .with_context(|| format!("sysctl {key}={value} in {}", self.name))?;
            }
            Ok(())
        })
    }
}

impl Netns {
    /// SIGKILLs every process in this namespace, as a power cut would (the
    /// lab's [`crate::Proc`] handles of them see the processes gone).
    pub fn kill_all(&self) {
        kill_all(&self.name);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.name) {
            eprintln!("lab: deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// Runs a command, feeding `input`, and fails with its stderr if it exits
/// non-zero.
pub(crate) fn run_cmd(cmd: &mut Command, input: Option<&str>) -> Result<Output> {
    let what = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("writing to {what}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {what}"))?;
    if !out.status.success() {
        let input = input.map(|i| format!("\ninput:\n{i}")).unwrap_or_default();
        bail!(
            "{what} failed ({}): {}{input}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Kills every process inside namespace `name` and deletes it.
fn destroy(name: &str) -> Result<()> {
    kill_all(name);
    run_cmd(Command::new("ip").args(["netns", "del", name]), None).map(drop)
}

/// SIGKILLs every process inside namespace `name` (but this one). Best
/// effort: a namespace that cannot be inspected is left as it is.
fn kill_all(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        let me = std::process::id();
        let pids = String::from_utf8_lossy(&out.stdout);
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p != me)
        {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
    }
}

/// Deletes the namespaces left behind by lab processes that died without
/// cleaning up (SIGKILLed tests).
pub(crate) fn sweep_leftovers() -> Result<()> {
    let entries = match fs::read_dir("/run/netns") {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow!(e).context("listing /run/netns")),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if is_leftover(&name) {
            // Another lab may be sweeping the same leftover concurrently.
            let _ = destroy(&name);
        }
    }
    Ok(())
}
