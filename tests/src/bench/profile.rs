//! Where the kernel spends its time per forwarded packet: `perf record -a
//! -g -e cpu-clock` (a software clock: no hardware counters needed) for a
//! few seconds of a traffic test, then every sample of the bench's own
//! threads (the senders, in whose context the whole forwarding path runs:
//! veth hands each packet to the next namespace's backlog, processed on
//! the way out of the same system call) sorted into one component by the
//! functions on its call stack. A component's time per packet is its
//! samples divided by the sampling rate and by the packets counted in the
//! internet meanwhile.
//!
//! The components do not overlap: a sample goes to the first of
//! [`COMPONENTS`] whose functions are on its stack (nftables before NAT,
//! whose chains run inside the NAT hook; the classifier before the rest of
//! tc ingress).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::sig;
use super::traffic::Window;
use super::variants::Variant;

static KEPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Samples per second and CPU.
pub const FREQ: u32 = 4000;
/// How long a profile records.
const RECORD: Duration = Duration::from_secs(3);

/// The variants profiled in section 1c.
pub const PROFILED: [Variant; 8] = [
    Variant::Plain,
    Variant::NftCtMark,
    Variant::Mwan,
    Variant::PlainRuled,
    Variant::Rules,
    Variant::NftTable,
    Variant::Classifier,
    Variant::NoNft,
];

/// Profiles of each variant, interleaved; the median of each figure is
/// kept.
pub const REPEATS: usize = 3;

/// A component of the forwarding path and the functions whose presence on
/// a sample's call stack puts the sample there (a prefix match for
/// `bpf_prog_`: the JIT's symbol carries the program's tag and name).
pub struct Component {
    pub name: &'static str,
    pub functions: &'static [&'static str],
}

pub const COMPONENTS: [Component; 9] = [
    Component {
        name: "mwan's classifier (BPF program and its helpers)",
        functions: &["bpf_prog_*"],
    },
    Component {
        name: "tc ingress hook, without the classifier",
        functions: &["tcf_classify"],
    },
    Component {
        name: "nftables chains (all base chains)",
        functions: &["nft_do_chain"],
    },
    Component {
        name: "conntrack (lookup, new entries, confirm)",
        functions: &["nf_conntrack_in", "nf_confirm", "__nf_conntrack_confirm"],
    },
    Component {
        name: "NAT (translation, outside its chains)",
        functions: &[
            "nf_nat_inet_fn",
            "nf_nat_ipv4_pre_routing",
            "nf_nat_ipv4_out",
        ],
    },
    Component {
        name: "route lookup: reverse-path check (fib_validate_source)",
        functions: &["fib_validate_source"],
    },
    Component {
        name: "route lookup: through the ip rules (fib_rules_lookup)",
        functions: &["fib_rules_lookup", "fib6_rule_lookup"],
    },
    Component {
        name: "route lookup: the rest (tables without rules, dst)",
        functions: &["ip_route_input_noref", "ip6_route_input"],
    },
    Component {
        name: "everything else (sockets, veth, IP, the other namespaces)",
        functions: &[],
    },
];

/// One profile: per component, nanoseconds per packet.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Indexed like [`COMPONENTS`].
    pub ns: Vec<f64>,
    /// All the bench's samples, per packet.
    pub total_ns: f64,
    /// Packets forwarded while recording.
    pub packets: f64,
    /// The bench's samples (of every CPU's).
    pub samples: u64,
    /// Samples of other processes (other load on the machine).
    pub foreign_samples: u64,
}

impl Profile {
    /// The median of each figure over `profiles`.
    pub fn median(profiles: &[Profile]) -> Profile {
        let med = |f: &dyn Fn(&Profile) -> f64| {
            super::stats::summary(&profiles.iter().map(f).collect::<Vec<_>>()).median
        };
        Profile {
            ns: (0..COMPONENTS.len()).map(|i| med(&|p| p.ns[i])).collect(),
            total_ns: med(&|p| p.total_ns),
            packets: med(&|p| p.packets),
            samples: med(&|p| p.samples as f64) as u64,
            foreign_samples: med(&|p| p.foreign_samples as f64) as u64,
        }
    }

    /// One line for the log.
    pub fn brief(&self) -> String {
        let short = [
            "bpf", "tc", "nft", "ct", "nat", "rpf", "rules", "route", "rest",
        ];
        let mut s = format!("{:.0} ns/packet:", self.total_ns);
        for (name, ns) in short.iter().zip(&self.ns) {
            s += &format!(" {name} {ns:.0}");
        }
        s
    }
}

/// Whether `perf` can be run.
pub fn available() -> bool {
    Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Profiles the system while `work` runs a traffic test over the window
/// it is given (`w`'s warm-up, then long enough to record [`RECORD`]);
/// `packets` counts the packets forwarded so far.
pub fn during<T: Send>(
    w: Window,
    packets: &(dyn Fn() -> Result<u64> + Sync),
    work: impl FnOnce(Window) -> Result<T> + Send,
) -> Result<Profile> {
    let w = Window {
        warmup: w.warmup,
        measure: RECORD + Duration::from_millis(500),
    };
    let file = std::env::temp_dir().join(format!("mwan-bench-{}.perf", std::process::id()));
    let recorded = thread::scope(|s| {
        let traffic = s.spawn(move || work(w));
        let r = (|| -> Result<(u64, f64)> {
            sig::sleep(w.warmup)?;
            let (p0, t0) = (packets()?, Instant::now());
            record(&file)?;
            let (p1, t1) = (packets()?, Instant::now());
            Ok((p1.saturating_sub(p0), (t1 - t0).as_secs_f64()))
        })();
        let t = traffic.join().expect("traffic thread");
        let r = r?;
        t?;
        Ok::<_, anyhow::Error>(r)
    });
    let result = recorded.and_then(|(packets, secs)| analyse(&file, packets as f64 / secs));
    match std::env::var_os("MWAN_BENCH_PERF_KEEP") {
        // For a closer look (`perf report -i FILE`): kept under this name.
        Some(dir) => {
            let n = KEPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = std::fs::rename(&file, PathBuf::from(dir).join(format!("profile-{n}.perf")));
        }
        None => {
            let _ = std::fs::remove_file(&file);
        }
    }
    result
}

fn record(file: &PathBuf) -> Result<()> {
    let out = Command::new("perf")
        .args(["record", "-a", "-g", "-e", "cpu-clock", "-F"])
        .arg(FREQ.to_string())
        .arg("-o")
        .arg(file)
        .args(["--", "sleep"])
        .arg(format!("{}", RECORD.as_secs_f64()))
        .stdout(Stdio::null())
        .output()
        .context("running perf record")?;
    if !out.status.success() {
        bail!(
            "perf record failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Sorts the samples of `file` into components; `pps` is the packet rate
/// while it was recorded.
fn analyse(file: &PathBuf, pps: f64) -> Result<Profile> {
    let out = Command::new("perf")
        .args(["script", "-F", "pid,ip,sym", "-i"])
        .arg(file)
        .stderr(Stdio::null())
        .output()
        .context("running perf script")?;
    if !out.status.success() {
        bail!("perf script failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let me = std::process::id();
    let (mut counts, mut ours, mut foreign, mut all) = (BTreeMap::new(), 0u64, 0u64, 0u64);
    for sample in text.split("\n\n") {
        let mut lines = sample.lines().filter(|l| !l.trim().is_empty());
        let Some(head) = lines.next() else { continue };
        all += 1;
        let pid: u32 = head.trim().parse().unwrap_or(0);
        if pid != me {
            foreign += u64::from(pid != 0);
            continue;
        }
        ours += 1;
        let stack: Vec<&str> = lines.filter_map(|l| l.split_whitespace().nth(1)).collect();
        *counts.entry(component_of(&stack)).or_insert(0u64) += 1;
    }
    if ours == 0 {
        bail!("perf recorded no sample of the bench ({all} samples in all)");
    }
    // Every CPU is sampled FREQ times a second, idle or not.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let secs = all as f64 / (f64::from(FREQ) * cpus);
    let packets = pps * secs;
    let per_packet = |n: u64| n as f64 / f64::from(FREQ) / packets * 1e9;
    Ok(Profile {
        ns: (0..COMPONENTS.len())
            .map(|i| per_packet(counts.get(&i).copied().unwrap_or(0)))
            .collect(),
        total_ns: per_packet(ours),
        packets,
        samples: ours,
        foreign_samples: foreign,
    })
}

/// The index in [`COMPONENTS`] of a sample with call stack `stack`
/// (function names, innermost first).
fn component_of(stack: &[&str]) -> usize {
    let hit = |f: &str| {
        stack.iter().any(|s| {
            let s = s.split('+').next().unwrap_or(s);
            match f.split_once('*') {
                Some((prefix, part)) => s.starts_with(prefix) && s.contains(part),
                None => s == f,
            }
        })
    };
    COMPONENTS
        .iter()
        .position(|c| c.functions.iter().any(|f| hit(f)))
        .unwrap_or(COMPONENTS.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_go_to_the_first_component_on_their_stack() {
        let bpf = [
            "htab_lru_map_lookup_elem",
            "bpf_prog_645ac86d8136a60a_F",
            "tcf_classify",
        ];
        assert_eq!(component_of(&bpf), 0);
        assert_eq!(component_of(&["tcf_classify", "ip_rcv"]), 1);
        let nat_chain = ["nft_do_chain", "nf_nat_inet_fn", "nf_hook_slow"];
        assert_eq!(component_of(&nat_chain), 2);
        assert_eq!(component_of(&["nf_nat_packet", "nf_nat_inet_fn"]), 4);
        let rpf = [
            "fib_table_lookup",
            "fib_rules_lookup",
            "__fib_validate_source",
            "fib_validate_source",
        ];
        assert_eq!(component_of(&rpf), 5);
        assert_eq!(component_of(&["veth_xmit"]), COMPONENTS.len() - 1);
    }
}
