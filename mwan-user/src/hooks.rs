//! `on_change` hooks: a command run through `sh -c` on every WAN state
//! change, off the caller's path.
//!
//! The command gets the change in its environment (`MWAN_EVENT`: `state`
//! for a health change, `quota` for a WAN's allowance; `MWAN_WAN`,
//! `MWAN_INTERFACE`, `MWAN_FAMILY` (`ipv4` or `ipv6`), `MWAN_OLD_STATE`, `MWAN_NEW_STATE`, `MWAN_REASON`,
//! `MWAN_LOSS` in percent, `MWAN_RTT_MS` (empty when unknown), `MWAN_TIME`
//! in RFC 3339 UTC). A quota event has the WAN's state as both states and
//! also `MWAN_QUOTA_PCT` (the level reached: a warning level, 100 when
//! used up, 0 for a new cycle), `MWAN_USAGE_BYTES` and `MWAN_QUOTA_BYTES`. Its output goes to the daemon's. It runs in its own
//! process group, which is killed when the command outlives its timeout.
//!
//! The hooks of one WAN run one at a time, in the order of the changes (a
//! "down" hook never races the "up" hook that follows it); hooks of
//! different WANs run concurrently. At most [`MAX_QUEUED`] hooks of a WAN
//! wait behind the running one; further ones are skipped with a warning.

use std::collections::HashMap;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::process::Command;
use tokio::sync::mpsc::{self, error::TrySendError};
use tracing::{info, warn};

/// Hooks of one WAN that may wait while one runs.
pub const MAX_QUEUED: usize = 8;

/// A WAN state change, as handed to the hook.
#[derive(Clone, Debug)]
pub struct HookEvent {
    /// `state` or `quota` (`MWAN_EVENT`).
    pub event: &'static str,
    pub wan: String,
    pub interface: String,
    /// `ipv4` or `ipv6`: whose health changed.
    pub family: String,
    pub old: String,
    pub new: String,
    pub reason: String,
    pub loss_pct: f64,
    pub rtt_ms: Option<f64>,
    pub time: SystemTime,
    /// More variables of this kind of event (`MWAN_QUOTA_PCT`, …).
    pub extra: Vec<(&'static str, String)>,
}

impl HookEvent {
    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("MWAN_EVENT", self.event.to_string()),
            ("MWAN_WAN", self.wan.clone()),
            ("MWAN_INTERFACE", self.interface.clone()),
            ("MWAN_FAMILY", self.family.clone()),
            ("MWAN_OLD_STATE", self.old.clone()),
            ("MWAN_NEW_STATE", self.new.clone()),
            ("MWAN_REASON", self.reason.clone()),
            ("MWAN_LOSS", format!("{:.1}", self.loss_pct)),
            (
                "MWAN_RTT_MS",
                self.rtt_ms.map(|r| format!("{r:.1}")).unwrap_or_default(),
            ),
            (
                "MWAN_TIME",
                humantime::format_rfc3339_millis(self.time).to_string(),
            ),
        ];
        env.extend(self.extra.iter().cloned());
        env
    }
}

/// A hook waiting to run.
struct Job {
    command: String,
    event: HookEvent,
    timeout: Duration,
}

/// How a hook ended.
#[derive(Debug)]
enum Outcome {
    Exited(ExitStatus),
    /// Killed (with its process group) after the timeout.
    TimedOut,
    /// It could not be started.
    Failed(std::io::Error),
}

/// Hooks that ended (whatever the outcome), and those that failed (non-zero
/// exit, killed at the timeout, or not started): the `mwan_hook_*` metrics.
static RUNS: AtomicU64 = AtomicU64::new(0);
static FAILURES: AtomicU64 = AtomicU64::new(0);

/// (hooks run, hooks failed) since the daemon started.
pub fn counts() -> (u64, u64) {
    (
        RUNS.load(Ordering::Relaxed),
        FAILURES.load(Ordering::Relaxed),
    )
}

/// The queue of each WAN's hooks (its worker task holds the receiver).
static QUEUES: Mutex<Option<HashMap<String, mpsc::Sender<Job>>>> = Mutex::new(None);

/// Runs `command` for `event` in the background (within a tokio runtime),
/// after the WAN's earlier hooks; returns at once. The outcome is logged.
pub fn run_hook(command: &str, event: &HookEvent, timeout: Duration) {
    let job = Job {
        command: command.to_string(),
        event: event.clone(),
        timeout,
    };
    let mut queues = QUEUES.lock().unwrap_or_else(PoisonError::into_inner);
    let queues = queues.get_or_insert_with(HashMap::new);
    let job = match queues.get(&event.wan) {
        None => job,
        Some(queue) => match queue.try_send(job) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => {
                warn!(wan = %event.wan, new = %event.new, "{MAX_QUEUED} on_change hooks already waiting; skipping this one");
                return;
            }
            // Its worker's runtime is gone.
            Err(TrySendError::Closed(job)) => job,
        },
    };
    let (tx, rx) = mpsc::channel(MAX_QUEUED);
    tx.try_send(job).expect("a new queue has room");
    tokio::spawn(worker(rx));
    queues.insert(event.wan.clone(), tx);
}

/// Runs one WAN's hooks in order.
async fn worker(mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.recv().await {
        let (wan, new) = (&job.event.wan, &job.event.new);
        let outcome = execute(&job.command, &job.event, job.timeout).await;
        RUNS.fetch_add(1, Ordering::Relaxed);
        if !matches!(&outcome, Outcome::Exited(s) if s.success()) {
            FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        match outcome {
            Outcome::Exited(s) if s.success() => {
                info!(wan = %wan, new = %new, "on_change hook done")
            }
            Outcome::Exited(s) => warn!(wan = %wan, new = %new, "on_change hook failed: {s}"),
            Outcome::TimedOut => warn!(
                wan = %wan,
                new = %new,
                "on_change hook still running after {}; killed",
                humantime::format_duration(job.timeout)
            ),
            Outcome::Failed(e) => {
                warn!(wan = %wan, new = %new, "on_change hook could not start: {e}")
            }
        }
    }
}

/// Runs the hook to its end, or kills its process group at the timeout.
async fn execute(command: &str, event: &HookEvent, timeout: Duration) -> Outcome {
    let mut child = match Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(event.env())
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e),
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => Outcome::Exited(status),
        Ok(Err(e)) => Outcome::Failed(e),
        Err(_) => {
            if let Some(pid) = child.id() {
                // The child leads its own group (process_group(0)).
                // SAFETY: kill(2) with a negative pid signals that group.
                unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            }
            // Reap it; SIGKILL cannot be ignored.
            let _ = child.wait().await;
            Outcome::TimedOut
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    fn event(wan: &str, new: &str) -> HookEvent {
        HookEvent {
            event: "state",
            wan: wan.into(),
            interface: "wan1".into(),
            family: "ipv4".into(),
            old: "up".into(),
            new: new.into(),
            reason: "4 consecutive failed rounds".into(),
            loss_pct: 12.5,
            rtt_ms: Some(23.26),
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            extra: Vec::new(),
        }
    }

    /// A fresh directory for one test's files.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("mwan-hooks-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Waits (bounded) until `path` holds `lines` lines; returns them.
    async fn wait_lines(path: &Path, lines: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let got: Vec<String> = text.lines().map(str::to_string).collect();
            if got.len() >= lines {
                return got;
            }
            assert!(Instant::now() < deadline, "{} has {got:?}", path.display());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn environment_describes_the_change() {
        let dir = TempDir::new("env");
        let out = dir.0.join("env");
        let cmd = format!(
            "echo \"$MWAN_EVENT|$MWAN_WAN|$MWAN_INTERFACE|$MWAN_OLD_STATE|$MWAN_NEW_STATE|$MWAN_REASON|$MWAN_LOSS|$MWAN_RTT_MS|$MWAN_TIME\" > {}.tmp && mv {0}.tmp {0}",
            out.display()
        );
        let start = Instant::now();
        run_hook(&cmd, &event("env-test", "down"), Duration::from_secs(5));
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "run_hook must not wait"
        );
        let got = wait_lines(&out, 1).await;
        assert_eq!(
            got[0],
            "state|env-test|wan1|up|down|4 consecutive failed rounds|12.5|23.3|2023-11-14T22:13:20.000Z"
        );
    }

    #[tokio::test]
    async fn unknown_rtt_is_empty() {
        let dir = TempDir::new("rtt");
        let out = dir.0.join("rtt");
        let mut ev = event("rtt-test", "down");
        ev.rtt_ms = None;
        let cmd = format!("echo \"[$MWAN_RTT_MS]\" >> {}", out.display());
        assert!(
            matches!(execute(&cmd, &ev, Duration::from_secs(5)).await, Outcome::Exited(s) if s.success())
        );
        assert_eq!(wait_lines(&out, 1).await, vec!["[]"]);
    }

    #[tokio::test]
    async fn hooks_of_a_wan_run_in_order() {
        let dir = TempDir::new("order");
        let out = dir.0.join("order");
        // Each hook is slower than the next would be: only serial execution
        // keeps the order.
        for (i, new) in ["down", "up", "degraded"].iter().enumerate() {
            let delay = 0.3 - 0.1 * i as f64;
            let cmd = format!("sleep {delay}; echo $MWAN_NEW_STATE >> {}", out.display());
            run_hook(&cmd, &event("order-test", new), Duration::from_secs(5));
        }
        assert_eq!(wait_lines(&out, 3).await, vec!["down", "up", "degraded"]);
    }

    #[tokio::test]
    async fn exit_status_is_reported() {
        let ev = event("status-test", "up");
        let o = execute("exit 3", &ev, Duration::from_secs(5)).await;
        assert!(
            matches!(o, Outcome::Exited(s) if s.code() == Some(3)),
            "{o:?}"
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let dir = TempDir::new("timeout");
        let pid_file = dir.0.join("pid");
        // A background child of the hook must die with it.
        let cmd = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let start = Instant::now();
        let o = execute(
            &cmd,
            &event("timeout-test", "down"),
            Duration::from_millis(500),
        )
        .await;
        assert!(matches!(o, Outcome::TimedOut), "{o:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let pid: u32 = wait_lines(&pid_file, 1).await[0].parse().unwrap();
        // Killed: gone, or a zombie waiting for its new parent to reap it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => break,
                Ok(stat)
                    if stat
                        .rsplit(')')
                        .next()
                        .unwrap()
                        .trim_start()
                        .starts_with('Z') =>
                {
                    break
                }
                Ok(stat) => assert!(Instant::now() < deadline, "sleep still alive: {stat}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
