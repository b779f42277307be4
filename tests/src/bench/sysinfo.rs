//! The machine and the moment, for the report.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    pub virt: Option<String>,
    pub mwan_version: String,
    pub nft_version: String,
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn command(argv: &[&str]) -> Option<String> {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

pub fn machine(mwan_bin: &Path) -> Machine {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into());
    Machine {
        cpu,
        cpus,
        memory_gib,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        os,
        virt: command(&["systemd-detect-virt"]).filter(|v| v != "none"),
        mwan_version: command(&[&mwan_bin.display().to_string(), "--version"])
            .unwrap_or_else(|| "mwan (unknown version)".into()),
        nft_version: command(&["nft", "--version"]).unwrap_or_default(),
    }
}

/// Now, as "YYYY-MM-DD HH:MM UTC".
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// CPU counters of the whole machine and of this process, to tell how
/// much else ran during the benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSample {
    /// user + nice of all CPUs, in clock ticks.
    pub machine_user: u64,
    /// All ticks of all CPUs.
    pub machine_total: u64,
    /// This process's user time, in clock ticks.
    pub self_user: u64,
}

pub fn cpu_sample() -> CpuSample {
    let stat = read("/proc/stat");
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let me = read("/proc/self/stat");
    let self_user = me
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().nth(11)?.parse().ok())
        .unwrap_or(0);
    CpuSample {
        machine_user: v.first().copied().unwrap_or(0) + v.get(1).copied().unwrap_or(0),
        machine_total: v.iter().take(8).sum(),
        self_user,
    }
}

/// User CPU time of other processes between two samples, as a share of
/// the machine (0..=1): compilers and the like competing with the lab.
pub fn background_share(a: CpuSample, b: CpuSample) -> f64 {
    let total = b.machine_total.saturating_sub(a.machine_total).max(1);
    let others = b
        .machine_user
        .saturating_sub(a.machine_user)
        .saturating_sub(b.self_user.saturating_sub(a.self_user));
    others as f64 / total as f64
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    read("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
