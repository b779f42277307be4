//! Long-running processes inside a namespace (the mwan daemon, typically).

use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ns::Netns;
use crate::{lock, sys, wait_until};

/// How long a process gets between SIGTERM and SIGKILL when it is ended by
/// the lab.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// A process started by [`Netns::spawn`]. Its stdout and stderr go to files
/// in the lab's log directory. It is ended (SIGTERM, then SIGKILL after 5 s)
/// when this handle or the lab is dropped.
pub struct Proc {
    inner: Arc<ProcInner>,
}

pub(crate) struct ProcInner {
    child: Mutex<Child>,
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// What a process printed so far.
#[derive(Debug, Clone, Default)]
pub struct ProcOutput {
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for ProcOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "--- stdout ---\n{}--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

impl Netns {
    /// Starts `program args…` in this namespace (through `ip netns exec`, so
    /// `/sys` shows the namespace's interfaces) with `env` added to the
    /// environment and stdin closed.
    pub fn spawn(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let base = Path::new(program)
            .file_name()
            .map_or(program.into(), |n| n.to_string_lossy());
        let stem = format!("{}-{}-{}", self.name(), base, self.ctx.next_seq());
        let stdout = self.ctx.log_dir.join(format!("{stem}.stdout"));
        let stderr = self.ctx.log_dir.join(format!("{stem}.stderr"));
        let child = Command::new("ip")
            .args(["netns", "exec", self.name(), program])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("spawning {program} in {}", self.name()))?;
        let inner = Arc::new(ProcInner {
            pid: child.id(),
            child: Mutex::new(child),
            stdout,
            stderr,
        });
        self.ctx.register_proc(inner.clone());
        Ok(Proc { inner })
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// Sends `sig` (e.g. `libc::SIGHUP`).
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        sys::kill(self.inner.pid, sig)
            .with_context(|| format!("signal {sig} to {}", self.inner.pid))
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.inner.try_wait();
            status.is_some()
        });
        status
    }

    pub fn is_running(&self) -> bool {
        self.inner.is_running()
    }

    /// Everything the process wrote to stdout and stderr until now.
    pub fn output_so_far(&self) -> ProcOutput {
        let read = |p: &Path| {
            fs::read(p)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        ProcOutput {
            stdout: read(&self.inner.stdout),
            stderr: read(&self.inner.stderr),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.inner.terminate();
    }
}

impl ProcInner {
    fn try_wait(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    pub(crate) fn is_running(&self) -> bool {
        self.try_wait().is_none()
    }

    /// SIGTERM, then SIGKILL if it is still there after [`TERM_GRACE`];
    /// reaps it. Does nothing for a process that already exited.
    pub(crate) fn terminate(&self) {
        if !self.is_running() {
            return;
        }
        let _ = sys::kill(self.pid, libc::SIGTERM);
        if !wait_until(TERM_GRACE, || !self.is_running()) {
            let mut child = lock(&self.child);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
