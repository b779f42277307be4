//! A fresh Debian of this machine's release, booted with systemd in a
//! container (`systemd-nspawn --boot --private-network`: its own network,
//! mount, PID and UTS namespaces), to install a package and run its unit
//! under the real systemd, seccomp filters and all.
//!
//! The root file system is made once by `mmdebstrap` (a minimal system
//! with `packages`) and kept as a tarball in the target directory; each
//! container unpacks it into the lab directory. Commands run inside with
//! `nsenter` into the container's init. The container powers off when
//! dropped (nspawn kills it if the test dies).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::proc::Proc;
use crate::topology::Lab;
use crate::wait_until;

pub struct Container {
    nspawn: Option<Proc>,
    leader: u32,
    root: PathBuf,
}

/// This machine's Debian release (`VERSION_CODENAME`).
fn codename() -> Result<String> {
    let os = std::fs::read_to_string("/etc/os-release")?;
    os.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
        .context("no VERSION_CODENAME in /etc/os-release")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The tarball of a minimal Debian with `packages`, made when missing.
fn rootfs(packages: &[&str]) -> Result<PathBuf> {
    let suite = codename()?;
    let list = packages.join(",");
    let key = list.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let dir = target_dir().join("debian");
    std::fs::create_dir_all(&dir)?;
    let tar = dir.join(format!("rootfs-{suite}-{key:016x}.tar"));
    if tar.is_file() {
        return Ok(tar);
    }
    // mmdebstrap picks the format by the extension.
    let tmp = tar.with_extension("part.tar");
    let out = Command::new("mmdebstrap")
        .args(["--variant=apt", "--quiet"])
        .arg(format!("--include={list}"))
        .arg(&suite)
        .arg(&tmp)
        .output()
        .context("running mmdebstrap")?;
    if !out.status.success() {
        bail!(
            "mmdebstrap {suite} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&tmp, &tar)?;
    Ok(tar)
}

impl Container {
    /// Boots a container named `name` on a fresh root file system (in the
    /// lab directory) with `packages`, `files` copied into it (path in the
    /// container, source) and the extra capabilities `caps`; returns once
    /// systemd has finished booting.
    pub fn boot(
        lab: &Lab,
        name: &str,
        packages: &[&str],
        files: &[(&str, &Path)],
        caps: &[&str],
    ) -> Result<Container> {
        let tar = rootfs(packages)?;
        let root = lab.dir().join(format!("container-{name}"));
        std::fs::create_dir_all(&root)?;
        let st = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-xf")
            .arg(&tar)
            .status()?;
        if !st.success() {
            bail!("unpacking {}", tar.display());
        }
        std::fs::write(root.join("etc/hostname"), format!("{name}\n"))?;
        for (to, from) in files {
            let dest = root.join(to.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().expect("a file"))?;
            std::fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
        }
        let caps = format!("--capability={}", caps.join(","));
        let dir = format!("--directory={}", root.display());
        let machine = format!("--machine={name}");
        let args = [
            dir.as_str(),
            "--boot",
            "--private-network",
            "--register=no",
            "--keep-unit",
            "--console=passive",
            &caps,
            // The container's own filter would refuse bpf() to mwan.
            "--system-call-filter=bpf",
            &machine,
        ];
        // Started from the lab's router namespace (nothing of the
        // container's network is ever in the machine's own), back in this
        // process's mount namespace: `ip netns exec` mounts a /sys without
        // the cgroup hierarchies nspawn needs.
        let mounts = format!("--mount=/proc/{}/ns/mnt", std::process::id());
        let mut argv = vec![mounts.as_str(), "systemd-nspawn"];
        argv.extend(args);
        let nspawn = lab.router().spawn("nsenter", &argv, &[])?;
        let mut leader = None;
        let found = wait_until(Duration::from_secs(20), || {
            // nspawn's helper children come and go; the container's init
            // is the child that runs systemd.
            leader = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", nspawn.pid()))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .find(|c| {
                    std::fs::read_to_string(format!("/proc/{c}/comm"))
                        .is_ok_and(|comm| comm.trim() == "systemd")
                });
            leader.is_some() || !nspawn.is_running()
        });
        let Some(leader) = leader.filter(|_| found) else {
            bail!("systemd-nspawn did not start:\n{}", nspawn.output_so_far());
        };
        let c = Container {
            nspawn: Some(nspawn),
            leader,
            root,
        };
        let mut state = String::new();
        let booted = wait_until(Duration::from_secs(60), || {
            state = match c.sh("systemctl is-system-running") {
                Ok(o) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout).trim(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => format!("{e:#}"),
            };
            state == "running" || state == "degraded"
        });
        if !booted {
            let out = c.nspawn.as_ref().map(|p| p.output_so_far().to_string());
            bail!(
                "the container did not boot (init {leader}, systemd: {state}):\n{}",
                out.unwrap_or_default()
            );
        }
        Ok(c)
    }

    /// Runs `script` with sh inside the container.
    pub fn sh(&self, script: &str) -> Result<Output> {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "sh", "-c", script])
            .output()
            .context("nsenter into the container")
    }

    /// `sh` that must succeed; returns stdout and stderr.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script).expect("nsenter");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "in the container: {script}\n{text}");
        text
    }

    /// The container's root directory, seen from outside.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.sh("systemctl poweroff");
        if let Some(p) = self.nspawn.take() {
            // Dropping the Proc sends SIGTERM, then SIGKILL.
            p.wait_timeout(Duration::from_secs(20));
        }
    }
}
