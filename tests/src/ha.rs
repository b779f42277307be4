//! An HA pair's daemons in the lab: the real keepalived (VRRP) and
//! conntrackd from Debian, one of each per router of a
//! [`LabBuilder::ha_pair`](crate::LabBuilder::ha_pair), with configs,
//! pid files, sockets and logs in the lab directory, and mwan's packaged
//! notify and track scripts (`mwan-user/packaging/ha/`).
//!
//! ```no_run
//! use lab::{Lab, ha::{HaDaemons, HaSpec}};
//! let lab = Lab::builder().ha_pair().build()?;
//! let spec = HaSpec::default();
//! let a = HaDaemons::start(&lab, 0, &spec, None)?;
//! let b = HaDaemons::start(&lab, 1, &spec, None)?;
//! assert!(a.wait_master(std::time::Duration::from_secs(5)));
//! # anyhow::Ok(())
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::proc::Proc;
use crate::topology::{ha_lan_addr, ha_sync_addr, ha_wan_addr, Lab, LAN0, LAN0_ROUTER};
use crate::{sys, wait_until};

/// The pair's VRRP instance id on the LAN.
const VRID: u8 = 51;
/// conntrackd's UDP port on the sync link.
const SYNC_PORT: u16 = 3780;

/// How the pair is configured.
#[derive(Debug, Clone)]
pub struct HaSpec {
    /// VRRPv3 advertisement interval; the standby takes over about three
    /// intervals after the last advertisement.
    pub advert_int: Duration,
    /// Whether router 0 (the higher priority) takes the addresses back
    /// when it returns (`false`: `nopreempt`, it stays standby), after
    /// `preempt_delay` (time for conntrackd's resync).
    pub preempt: bool,
    pub preempt_delay: Duration,
}

impl Default for HaSpec {
    fn default() -> Self {
        HaSpec {
            advert_int: Duration::from_millis(300),
            preempt: false,
            preempt_delay: Duration::from_secs(3),
        }
    }
}

/// A packaged HA script (`mwan-user/packaging/ha/NAME`).
pub fn packaged_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mwan-user/packaging/ha")
        .join(name)
}

/// keepalived and conntrackd of router `k`. Ended (with every process
/// they started) when dropped, or with the lab.
pub struct HaDaemons<'l> {
    lab: &'l Lab,
    k: usize,
    dir: PathBuf,
    conntrackd: Option<Proc>,
    keepalived: Option<Proc>,
}

impl<'l> HaDaemons<'l> {
    /// Writes the configs of router `k` into `<lab>/ha-k/` and starts
    /// conntrackd, then keepalived. `mwan_config`: the router's mwan config
    /// file, for the track script (`None`: VRRP does not watch mwan).
    pub fn start(
        lab: &'l Lab,
        k: usize,
        spec: &HaSpec,
        mwan_config: Option<&Path>,
    ) -> Result<HaDaemons<'l>> {
        let dir = lab.dir().join(format!("ha-{k}"));
        std::fs::create_dir_all(&dir)?;
        let mut d = HaDaemons {
            lab,
            k,
            dir,
            conntrackd: None,
            keepalived: None,
        };
        std::fs::write(d.conntrackd_conf(), conntrackd_conf(lab, k, &d.dir))?;
        std::fs::write(
            d.dir.join("keepalived.conf"),
            keepalived_conf(lab, k, spec, &d.conntrackd_conf(), mwan_config),
        )?;
        d.start_conntrackd()?;
        d.start_keepalived()?;
        Ok(d)
    }

    fn conntrackd_conf(&self) -> PathBuf {
        self.dir.join("conntrackd.conf")
    }

    fn start_conntrackd(&mut self) -> Result<()> {
        let conf = self.conntrackd_conf();
        let conf = conf.to_str().expect("utf-8 path");
        let proc = self
            .lab
            .ha_router(self.k)
            .spawn("conntrackd", &["-C", conf], &[])?;
        // Ready once it answers on its socket.
        let ready = wait_until(Duration::from_secs(10), || {
            !proc.is_running() || self.conntrackd_cmd(&["-s", "runtime"]).is_ok()
        });
        anyhow::ensure!(
            ready && proc.is_running(),
            "conntrackd did not start in router {}:\n{}",
            self.k,
            proc.output_so_far()
        );
        self.conntrackd = Some(proc);
        Ok(())
    }

    fn start_keepalived(&mut self) -> Result<()> {
        let path = |f: &str| self.dir.join(f).display().to_string();
        let args = [
            "--dont-fork".to_string(),
            "--log-console".into(),
            "--log-detail".into(),
            "--no-syslog".into(),
            "--vrrp".into(),
            format!("--use-file={}", path("keepalived.conf")),
            format!("--pid={}", path("keepalived.pid")),
            format!("--vrrp_pid={}", path("vrrp.pid")),
            format!("--checkers_pid={}", path("checkers.pid")),
            format!("--config-id=mwan-lab-{}", self.k),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = self.lab.ha_router(self.k).spawn("keepalived", &args, &[])?;
        let started = wait_until(Duration::from_secs(10), || {
            !proc.is_running() || self.dir.join("vrrp.pid").exists()
        });
        anyhow::ensure!(
            started && proc.is_running(),
            "keepalived did not start in router {}:\n{}",
            self.k,
            proc.output_so_far()
        );
        self.keepalived = Some(proc);
        Ok(())
    }

    /// Runs `conntrackd -C <conf> ARGS` (a client command) in the router.
    pub fn conntrackd_cmd(&self, args: &[&str]) -> Result<String> {
        let conf = self.conntrackd_conf();
        let mut argv = vec!["conntrackd", "-C", conf.to_str().expect("utf-8 path")];
        argv.extend_from_slice(args);
        let out = self.lab.ha_router(self.k).exec(&argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether this router holds the pair's gateway address now.
    pub fn is_master(&self) -> bool {
        holds_gateway(self.lab, self.k)
    }

    /// Waits until this router holds the gateway address.
    pub fn wait_master(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.is_master())
    }

    /// The VRRP state keepalived last reported entering (`MASTER`,
    /// `BACKUP`, `FAULT`), from its log.
    pub fn vrrp_state(&self) -> Option<String> {
        let out = self.keepalived.as_ref()?.output_so_far();
        let text = format!("{}{}", out.stdout, out.stderr);
        text.lines()
            .filter_map(|l| l.split("Entering ").nth(1))
            .filter_map(|l| l.strip_suffix(" STATE"))
            .next_back()
            .map(str::to_string)
    }

    /// Waits until keepalived is in `state`. A standby can take over only
    /// once it is `BACKUP`: after a start it is in `FAULT` until mwan's
    /// track script has succeeded `rise` times.
    pub fn wait_state(&self, state: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.vrrp_state().as_deref() == Some(state))
    }

    /// What keepalived and conntrackd printed so far.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (name, p) in [
            ("keepalived", &self.keepalived),
            ("conntrackd", &self.conntrackd),
        ] {
            if let Some(p) = p {
                let _ = write!(
                    s,
                    "=== {name} of router {}\n{}\n",
                    self.k,
                    p.output_so_far()
                );
            }
        }
        let log = std::fs::read_to_string(self.dir.join("conntrackd.log")).unwrap_or_default();
        let _ = write!(s, "=== conntrackd.log\n{log}");
        s
    }

    /// A power cut: every process of the router dies at once (mwan,
    /// keepalived, conntrackd) and its links go down. The kernel state
    /// (addresses, conntrack, mwan's datapath) stays until [`Self::boot`].
    pub fn power_off(&mut self) -> Result<()> {
        let r = self.lab.ha_router(self.k);
        r.ip(&links(self.lab, "down"))?;
        r.kill_all();
        self.keepalived = None;
        self.conntrackd = None;
        Ok(())
    }

    /// The router comes back as after a reboot: what a reboot clears is
    /// cleared (the virtual addresses keepalived left, the conntrack
    /// table; the caller tears mwan's state down with `mwan stop
    /// --teardown` before), its links come up with the main table's
    /// default routes of the lab's router kind, and conntrackd and
    /// keepalived start again.
    pub fn boot(&mut self, spec: &HaSpec, mwan_config: Option<&Path>) -> Result<()> {
        let r = self.lab.ha_router(self.k);
        for (addr, dev) in virtual_addresses(self.lab) {
            // Only those a dead keepalived left behind.
            let _ = r.ip(&format!("addr del {addr} dev {dev}"));
        }
        r.run(sys::flush_conntrack).context("flushing conntrack")?;
        r.ip(&links(self.lab, "up"))?;
        // The main-table routes the links took with them, as the
        // router's DHCP client or network config sets them up at boot.
        for i in 1..=self.lab.isp_count() {
            let route = self
                .lab
                .ctx()
                .kind
                .default_route(i, self.lab.isp(i).gateway());
            if !route.is_empty() {
                r.ip(&route)?;
            }
        }
        std::fs::write(
            self.dir.join("keepalived.conf"),
            keepalived_conf(self.lab, self.k, spec, &self.conntrackd_conf(), mwan_config),
        )?;
        for f in [
            "keepalived.pid",
            "vrrp.pid",
            "checkers.pid",
            "conntrackd.lock",
            "conntrackd.ctl",
        ] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        self.start_conntrackd()?;
        self.start_keepalived()
    }
}

impl Drop for HaDaemons<'_> {
    fn drop(&mut self) {
        // keepalived first: it removes the virtual addresses it added.
        drop(self.keepalived.take());
        drop(self.conntrackd.take());
    }
}

/// The pair's mwan config for router `k`: [`crate::mwan::config_with`]'s
/// lab config with `ha_address` (the LAN gateway), every WAN's forwarded
/// connections leaving from the ISP's single public address, the VRRP
/// address on that WAN (`snat_address`), and fixed WAN ids, in reverse
/// order (ISP I has id N − I) so that they differ from the ones mwan
/// would choose itself.
pub fn mwan_config(lab: &Lab, k: usize) -> String {
    let n = lab.isp_count();
    let text = crate::mwan::config_with(
        lab,
        &format!("ha_address = \"{LAN0_ROUTER}\""),
        &|i| {
            format!(
                "snat_address = \"{}\"\nid = {}",
                lab.isp(i).router_addr().addr(),
                n - i
            )
        },
        "",
    );
    crate::mwan::for_ha_router(lab, &text, k)
}

/// Router `k`'s established TCP conntrack entries to port `dport`, one
/// `conntrack -L` line each.
pub fn established_to(lab: &Lab, k: usize, dport: u16) -> Vec<String> {
    let out = lab
        .ha_router(k)
        .exec(&[
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "--dport",
            &dport.to_string(),
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter(|l| l.contains("ESTABLISHED"))
        .map(str::to_string)
        .collect()
}

/// Whether router `k` has the gateway address on `lan0`.
pub fn holds_gateway(lab: &Lab, k: usize) -> bool {
    lab.ha_router(k)
        .exec(&["ip", "-4", "-o", "addr", "show", "dev", "lan0"])
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {LAN0_ROUTER}/")))
        .unwrap_or(false)
}

/// `ip` commands setting every link of a router up or down.
fn links(lab: &Lab, state: &str) -> String {
    let mut devs = vec!["lan0".to_string(), "sync".to_string()];
    devs.extend((1..=lab.isp_count()).map(|i| format!("wan{i}")));
    devs.iter()
        .map(|d| format!("link set dev {d} {state}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The pair's virtual addresses and their devices: the LAN gateway and
/// each ISP's single public address.
pub fn virtual_addresses(lab: &Lab) -> Vec<(String, String)> {
    let mut v = vec![(
        format!("{LAN0_ROUTER}/{}", LAN0.prefix_len()),
        "lan0".to_string(),
    )];
    for i in 1..=lab.isp_count() {
        v.push((
            format!("{}/32", lab.isp(i).router_addr().addr()),
            format!("wan{i}"),
        ));
    }
    v
}

/// keepalived.conf of router `k`: one VRRPv3 instance on the LAN holding
/// every virtual address, both routers starting as BACKUP (the higher
/// priority wins the election), mwan's notify hook and track script.
fn keepalived_conf(
    lab: &Lab,
    k: usize,
    spec: &HaSpec,
    conntrackd_conf: &Path,
    mwan_config: Option<&Path>,
) -> String {
    let advert = spec.advert_int.as_secs_f64();
    let priority = 200 - 50 * k;
    let mut s = format!(
        "global_defs {{\n  router_id mwan-lab-{k}\n  script_user root\n  vrrp_version 3\n}}\n"
    );
    if let Some(cfg) = mwan_config {
        let _ = write!(
            s,
            "vrrp_script mwan {{\n  script \"{} {} {}\"\n  interval 1\n  fall 2\n  rise 2\n}}\n",
            packaged_script("mwan-ha-check").display(),
            crate::mwan::binary().display(),
            cfg.display()
        );
    }
    let _ = write!(
        s,
        "vrrp_instance gateway {{\n  state BACKUP\n  interface lan0\n  virtual_router_id {VRID}\n  priority {priority}\n  advert_int {advert:.2}\n{}  virtual_ipaddress {{\n",
        if spec.preempt {
            format!("  preempt_delay {}\n", spec.preempt_delay.as_secs())
        } else {
            "  nopreempt\n".to_string()
        }
    );
    for (addr, dev) in virtual_addresses(lab) {
        let _ = writeln!(s, "    {addr} dev {dev}");
    }
    s += "  }\n";
    if mwan_config.is_some() {
        s += "  track_script {\n    mwan\n  }\n";
    }
    let _ = write!(
        s,
        "  notify \"{} {}\"\n}}\n",
        packaged_script("mwan-ha-notify").display(),
        conntrackd_conf.display()
    );
    s
}

/// conntrackd.conf of router `k`: FTFW over UDP on the sync link, entries
/// injected straight into the kernel table (no external cache), the
/// routers' own addresses not synchronised.
fn conntrackd_conf(lab: &Lab, k: usize, dir: &Path) -> String {
    let mut ignore = vec!["127.0.0.1".to_string()];
    for r in 0..2 {
        ignore.push(ha_lan_addr(r).to_string());
        ignore.push(ha_sync_addr(r).to_string());
        for i in 1..=lab.isp_count() {
            ignore.push(ha_wan_addr(i, r).addr().to_string());
        }
    }
    let ignore: String = ignore
        .iter()
        .map(|a| format!("      IPv4_address {a}\n"))
        .collect();
    format!(
        "Sync {{
  Mode FTFW {{
    DisableExternalCache On
  }}
  UDP {{
    IPv4_address {me}
    IPv4_Destination_Address {peer}
    Port {SYNC_PORT}
    Interface sync
    SndSocketBuffer 1249280
    RcvSocketBuffer 1249280
    Checksum on
  }}
}}
General {{
  HashSize 8192
  HashLimit 65536
  LogFile {dir}/conntrackd.log
  Syslog off
  LockFile {dir}/conntrackd.lock
  UNIX {{
    Path {dir}/conntrackd.ctl
  }}
  NetlinkBufferSize 2097152
  NetlinkBufferSizeMaxGrowth 8388608
  Filter From Userspace {{
    Protocol Accept {{
      TCP
      UDP
      ICMP
    }}
    Address Ignore {{
{ignore}    }}
  }}
}}
",
        me = ha_sync_addr(k),
        peer = ha_sync_addr(1 - k),
        dir = dir.display(),
    )
}
