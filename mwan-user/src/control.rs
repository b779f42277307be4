//! The control protocol between the `mwan` CLI and the daemon: one JSON
//! request per line on a unix stream socket (`<state_dir>/mwan.sock`), one
//! JSON response line back. The response types are also the stable `--json`
//! output of the CLI (documented in docs/CLI.md).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    SetWeight {
        wan: String,
        weight: u32,
    },
    /// No new flows for the WAN; existing flows stay.
    Drain {
        wan: String,
    },
    /// Clears `drain` and `disable`.
    Enable {
        wan: String,
    },
    /// The WAN takes no flows at all: its flows move away.
    Disable {
        wan: String,
    },
    Reload,
    /// The addresses learned for rules by domain name; only those of names
    /// at or under `name`, if given.
    Domains {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Exit; `teardown` removes the datapath, otherwise it keeps running.
    Stop {
        teardown: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domains: Option<Vec<crate::dns::relay::LearnedEntry>>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Response {
        Response {
            ok: true,
            error: None,
            message: Some(message.into()),
            status: None,
            domains: None,
        }
    }
    pub fn error(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            message: None,
            status: None,
            domains: None,
        }
    }
}

/// `mwan status --json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub config: String,
    /// Seconds since the daemon started.
    pub uptime_secs: f64,
    pub sticky: String,
    /// No WAN takes new IPv4 flows (the `all_down` policy applies).
    pub all_down: bool,
    /// No WAN takes new IPv6 flows (while some WAN carries IPv6).
    #[serde(default)]
    pub all_down6: bool,
    /// With `ha_address`: `active` while this router holds the pair's
    /// gateway address (VRRP master), `standby` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha_role: Option<String>,
    pub wans: Vec<WanStatus>,
    /// Pinned flows in the flow map (all WANs), as of `flows_counted_secs_ago`.
    pub flows_total: u64,
    pub flows_counted_secs_ago: Option<f64>,
    /// The most flows the flow map holds (`max_flows` when the map was
    /// created; a restart with another `max_flows` resizes it).
    #[serde(default)]
    pub flow_capacity: u32,
    /// Datapath counters (packets, hits, new flows, re-pins, …).
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Most recent state changes, newest last.
    pub events: Vec<Event>,
    /// How this daemon started.
    #[serde(default)]
    pub start: StartFacts,
    #[serde(default)]
    pub reloads: ReloadFacts,
    /// The LAN interfaces the classifier is attached to.
    #[serde(default)]
    pub lans: Vec<LanStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayStatus>,
    /// The rules, whether each matches now (its schedule).
    #[serde(default)]
    pub rules: Vec<RuleStatus>,
    /// The local time schedules and billing cycles follow.
    #[serde(default)]
    pub clock: ClockStatus,
}

/// A rule and its schedule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStatus {
    pub name: String,
    /// Its `schedule`, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Whether it matches new flows now (always, without a schedule).
    pub active: bool,
    /// When its schedule next turns it on or off (local time, RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_change: Option<String>,
}

/// The daemon's local time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockStatus {
    /// Now, in the daemon's time zone (RFC 3339 with its offset).
    pub local_time: String,
    /// The next moment a rule or weight schedule changes, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_change: Option<String>,
}

/// A WAN's usage in its billing cycle, and its allowance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageStatus {
    /// The cycle: its start and when it resets (local time, RFC 3339, and
    /// seconds since the epoch).
    pub cycle_start: String,
    pub next_reset: String,
    pub cycle_start_epoch: i64,
    pub next_reset_epoch: i64,
    /// Bytes on the link this cycle: received, sent, both.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub bytes: u64,
    pub ipv4: ByteCounts,
    pub ipv6: ByteCounts,
    /// The allowance (`quota`), and how much of it is used (percent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_pct: Option<f64>,
    /// The warning levels, and those reached this cycle (100: used up).
    #[serde(default)]
    pub warn_pct: Vec<u8>,
    #[serde(default)]
    pub reached_pct: Vec<u8>,
    /// `quota_action`: backup, off or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The allowance is used up for this cycle.
    pub exhausted: bool,
    /// Its allowance keeps it from new flows now.
    pub held_back: bool,
    /// What mwan does about it, in words.
    pub effect: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_cycle: Option<PastCycle>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteCounts {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// A closed billing cycle.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PastCycle {
    pub start: String,
    pub end: String,
    pub bytes: u64,
}

/// How the daemon started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartFacts {
    /// It took over a running datapath (pinned maps and filters of a
    /// previous daemon), keeping every connection.
    pub took_over: bool,
    /// Connections older than mwan's nftables table whose WAN it recorded
    /// in conntrack.
    pub adopted_connections: u64,
    /// Inherited maps it replaced or repaired (see `datapath::migrate`).
    #[serde(default)]
    pub maps: Vec<MapMigration>,
    /// What it warned of (the config against the system, the pins).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// How the datapath reads a connection's recorded WAN: `kfuncs` (the
    /// classifier asks conntrack itself, for the flows it does not know)
    /// or `nftables` (a kernel without the kfuncs: nftables restores every
    /// LAN packet's mark).
    #[serde(default)]
    pub conntrack: String,
}

/// What a start did with one inherited map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapMigration {
    pub map: String,
    /// `resized` (another size: a new map, entries copied), `reset`
    /// (counters of another layout: counting from zero), `put back` (a
    /// start that died while replacing it left only its old pin), `merged`
    /// (it left both: the old entries were copied into the new map),
    /// `adopted` (the pre-IPv6 `HOSTS` copied into `HOST_PINS`).
    pub action: String,
    /// The old and new number of entries (`resized`, `reset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u32>,
    /// Entries copied before the filter swap, entries that found no room.
    pub migrated: u64,
    pub dropped: u64,
    /// Entries the old datapath wrote during the takeover, copied after
    /// the filter swap.
    pub caught_up: u64,
}

/// Reloads since the start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadFacts {
    pub ok: u64,
    pub failed: u64,
    /// Why the last refused reload was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A LAN interface the classifier is attached to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanStatus {
    pub interface: String,
    /// The Ethernet program (`mwan_lan_eth`), or the L3 one (tun, PPP).
    pub l2: bool,
}

/// The DNS relay of rules by domain name, while it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    pub port: u16,
    pub tcp_port: u16,
}

/// What mwan did to a WAN's connections since the daemon started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WanFacts {
    /// Times its connections were cleaned up when it died (a family, or
    /// both when the WAN was removed).
    pub cleanups: u64,
    /// Conntrack entries those cleanups deleted one by one (the entries
    /// recording the WAN in their ct mark go first, in one flush the
    /// kernel does not count).
    pub conntrack_deleted: u64,
    /// TCP clients nudged to reconnect.
    pub nudged: u64,
    /// RFC 3339 time of the last cleanup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cleanup: Option<String>,
    /// `failback = "reset"`: times the flows that had moved away were
    /// reset to it when it came back, and how many flows in all.
    pub failback_resets: u64,
    pub failback_flows: u64,
    /// `failback = "drain"`: times the flows that went to backup and
    /// metered WANs while it was down were drained back to it, how many
    /// flows in all, how many stayed because their host is pinned to a
    /// WAN that is still up, and when the last drain ran (RFC 3339).
    #[serde(default)]
    pub failback_drains: u64,
    #[serde(default)]
    pub failback_drained_flows: u64,
    #[serde(default)]
    pub failback_kept_pinned: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failback_drain: Option<String>,
    /// Flows moved off it after `max_backup_flow_age` on it as a backup.
    #[serde(default)]
    pub backup_age_resets: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WanStatus {
    pub name: String,
    pub id: u8,
    pub interface: String,
    /// unknown, up, degraded, down, disabled
    pub state: String,
    /// RFC 3339 time the state began, and its age in seconds.
    pub since: String,
    pub since_secs: f64,
    pub tier: u32,
    pub weight: u32,
    /// Share of new flows under the default policy (0..=1).
    pub share: f64,
    pub drained: bool,
    pub enabled: bool,
    /// Pins to this WAN are valid (false: its flows move on their next packet).
    pub alive: bool,
    pub address: Option<String>,
    pub gateway: Option<String>,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    pub loss_pct: f64,
    /// Flows pinned to this WAN in the flow map.
    pub flows: u64,
    /// Flows pinned to this WAN since the datapath was created.
    pub new_flows: u64,
    /// LAN traffic balanced to this WAN (datapath counters).
    pub lan_packets: u64,
    pub lan_bytes: u64,
    /// Interface counters (all traffic on the link).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// What mwan did to its connections.
    #[serde(default)]
    pub connections: WanFacts,
    /// The WAN's IPv6 side, when it carries IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<FamilyStatus>,
    /// Where `weight` is from: `config`, `schedule` (a weight schedule,
    /// `weight_schedule`) or `set-weight`.
    #[serde(default)]
    pub weight_source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_schedule: Option<String>,
    /// Its usage in the billing cycle and its allowance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageStatus>,
    /// `failback`: keep, reset or drain; with drain, the seconds until
    /// the pending drain is due.
    #[serde(default)]
    pub failback: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback_due_secs: Option<f64>,
    /// Passive health: the IPv4 handshakes through the WAN.
    #[serde(default)]
    pub passive: PassiveStatus,
}

/// The passive signals of one WAN and family: the LAN's TCP handshakes
/// through it over the last 2 s.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PassiveStatus {
    /// `passive` in the WAN's config.
    pub enabled: bool,
    /// Handshakes answered and SYNs sent in the last 2 s.
    pub handshakes: u64,
    pub syns: u64,
    /// Their mean time (SYN to the client's ACK) and the SYN
    /// retransmissions in percent, once 20 handshakes were answered.
    pub handshake_ms: Option<f64>,
    pub retransmit_pct: Option<f64>,
    /// The time a SYN may wait before it counts as unanswered now
    /// (`passive_timeout`, or twice the usual handshake time).
    pub answer_timeout_ms: f64,
    /// A suspicion's burst of probes is out: new flows avoid the WAN
    /// meanwhile.
    #[serde(default)]
    pub suspected: bool,
}

/// One family's health and place in balancing (IPv6 beside the IPv4 of
/// the [`WanStatus`] fields).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FamilyStatus {
    pub state: String,
    pub since: String,
    pub since_secs: f64,
    /// Which family's probe targets judge it: itself, or (without targets
    /// of its own) the other family.
    pub judged_by: String,
    pub alive: bool,
    pub share: f64,
    pub address: Option<String>,
    pub gateway: Option<String>,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    pub loss_pct: f64,
    /// Passive health: this family's handshakes through the WAN.
    #[serde(default)]
    pub passive: PassiveStatus,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339 UTC.
    pub time: String,
    /// `state` (a health change: `from` and `to` are states), `quota`
    /// (`to` is the share of the allowance reached: `75%`, `100%`; `0%`
    /// for a new cycle) or `schedule` (a rule or weight schedule turned
    /// on or off: `wan` is the rule or WAN).
    #[serde(default = "state_kind")]
    pub kind: String,
    pub wan: String,
    /// `ipv4` or `ipv6`: whose health changed.
    #[serde(default = "ipv4")]
    pub family: String,
    pub from: String,
    pub to: String,
    pub reason: String,
}

fn state_kind() -> String {
    "state".to_string()
}

fn ipv4() -> String {
    "ipv4".to_string()
}

/// One pinned flow, as `mwan flows --json` prints it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FlowRecord {
    pub proto: String,
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    /// WAN name, or "main" for flows the policy left to the main table.
    pub wan: String,
    /// The WAN it was first pinned to, when it moved because that WAN died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_from: Option<String>,
    pub age_secs: f64,
    pub idle_secs: f64,
    pub packets: u64,
    pub bytes: u64,
}

/// One per-host pin, as `mwan hosts --json` prints it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostRecord {
    pub host: String,
    pub wan: String,
    pub idle_secs: f64,
    /// Seconds until the pin expires (0 when expired).
    pub expires_in_secs: f64,
}

/// What connecting to the control socket tells about the daemon.
#[derive(Debug)]
pub enum Reach {
    /// A daemon listens: the connection to send a request on.
    Connected(UnixStream),
    /// No socket (ENOENT): no daemon runs with this config.
    NoSocket,
    /// A socket nobody listens on (ECONNREFUSED): its daemon crashed or was
    /// killed.
    Stale,
    /// EACCES/EPERM: this user may not use the socket (or its directory). A
    /// daemon may well be running.
    Denied(std::io::Error),
    /// Any other error (a full backlog, …): whether a daemon runs is unknown.
    Unknown(std::io::Error),
}

impl Reach {
    /// Only a missing or refusing socket proves that no daemon runs; every
    /// other answer means one runs or may run.
    pub fn no_daemon(&self) -> bool {
        matches!(self, Reach::NoSocket | Reach::Stale)
    }
}

/// Connects to the control socket and classifies the outcome.
pub fn reach(socket: &Path) -> Reach {
    use std::io::ErrorKind;
    match UnixStream::connect(socket) {
        Ok(s) => Reach::Connected(s),
        Err(e) => match e.kind() {
            ErrorKind::NotFound => Reach::NoSocket,
            ErrorKind::ConnectionRefused => Reach::Stale,
            // std maps both EACCES and EPERM here.
            ErrorKind::PermissionDenied => Reach::Denied(e),
            _ => Reach::Unknown(e),
        },
    }
}

/// Sends one request and waits for the response.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response> {
    let s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the mwan daemon at {} (is `mwan run` running with this config?)",
            socket.display()
        )
    })?;
    call_on(s, socket, req, timeout)
}

/// Sends one request on a connection made by [`reach`] and waits for the
/// response.
pub fn call_on(
    mut s: UnixStream,
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(s);
    let mut resp = String::new();
    reader
        .read_line(&mut resp)
        .with_context(|| format!("reading the daemon's answer on {}", socket.display()))?;
    if resp.is_empty() {
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&resp).context("decoding the daemon's answer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_stable() {
        let r = Request::SetWeight {
            wan: "isp1".into(),
            weight: 3,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"cmd":"set-weight","wan":"isp1","weight":3}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        let back: Request = serde_json::from_str(r#"{"cmd":"stop","teardown":true}"#).unwrap();
        assert_eq!(back, Request::Stop { teardown: true });
    }

    #[test]
    fn only_a_missing_or_refusing_socket_means_no_daemon() {
        let dir = std::env::temp_dir().join(format!("mwan-reach-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let socket = dir.join("mwan.sock");
        assert!(matches!(reach(&socket), Reach::NoSocket));
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let r = reach(&socket);
        assert!(matches!(r, Reach::Connected(_)) && !r.no_daemon(), "{r:?}");
        drop(listener);
        // The socket file outlives its listener: a crashed daemon's.
        let r = reach(&socket);
        assert!(matches!(r, Reach::Stale) && r.no_daemon(), "{r:?}");
        assert!(!Reach::Denied(std::io::Error::from_raw_os_error(libc::EACCES)).no_daemon());
        assert!(!Reach::Unknown(std::io::Error::from_raw_os_error(libc::EAGAIN)).no_daemon());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
