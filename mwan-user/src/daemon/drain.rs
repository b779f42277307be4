//! Moving flows off backup and metered WANs: `failback = "drain"` (a
//! returning WAN, stable for `failback_after`, takes back the flows that
//! went to a backup or metered WAN while it was down) and
//! `max_backup_flow_age` (a flow stays on a WAN its policy no longer
//! offers at most this long).
//!
//! A flow is moved as `failback = "reset"` moves it: its pin is pointed at
//! the WAN it goes to and its conntrack entry deleted, so its next packet
//! leaves through that WAN with a new NAT binding; a TCP server answers
//! with a reset and the application reconnects (a TCP client is nudged so
//! that it sends at once, as when its WAN dies), a UDP flow goes on from
//! the new address. The moves are spread over `failback_spread`, a batch
//! at a time, so applications reconnect gradually. Flows of a LAN host
//! pinned (`sticky = "host"`) to a WAN that is still up stay, unless
//! `drain_pinned_hosts`: moving one would split the host across WANs.
//! Which flows go is decided by pure functions ([`drains`], [`expired`]);
//! the moves run off the event loop and are recorded in the WANs' facts.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use mwan_common::{
    map, FlowValue, HostKey, HostValue, Policy, DEFAULT_POLICY, HOST_KEY_IPV4, HOST_KEY_IPV6,
    HOST_KEY_MAC, SLOTS, WAN_NONE,
};
use tracing::{info, warn};

use super::cleanup::Facts;
use super::status::rfc3339;
use crate::config::StickyKey;
use crate::datapath::{self, AnyFlowKey};
use crate::family::{Family, PerFamily};
use crate::{conntrack, datapath::Tuple5, nudge};

/// The WANs each policy offers new flows now, by policy id (bit *i*: WAN
/// *i*): its slots' WANs, or the default policy's when it has none (the
/// datapath falls back to it).
pub fn offered(policies: &[Policy]) -> Vec<u64> {
    let default = policies
        .get(DEFAULT_POLICY as usize)
        .filter(|p| p.active != 0)
        .map_or(0, |p| p.wan_mask);
    policies
        .iter()
        .map(|p| if p.active != 0 { p.wan_mask } else { default })
        .collect()
}

fn offers(offered: &[u64], policy: u8, wan: u8) -> bool {
    wan < 64
        && offered
            .get(policy as usize)
            .is_some_and(|m| m & (1 << wan) != 0)
}

/// A drain of WAN `id`'s family `family`, due now.
#[derive(Clone, Debug)]
pub struct DrainSpec {
    pub id: u8,
    pub name: String,
    pub family: Family,
    /// The outage, `bpf_ktime` ns: from when the WAN died to when it came
    /// back.
    pub window: (u64, u64),
    /// The WANs flows are drained from: a higher tier than this WAN's, or
    /// metered (a quota).
    pub backups: BTreeSet<u8>,
    /// What each policy offers now (see [`offered`]).
    pub offered: Vec<u64>,
}

/// Whether a drain takes the flow `v`: it is on one of the backups, its
/// policy offers the returning WAN, and it went there because the WAN was
/// down: it moved away from it, or it started during the outage.
pub fn drains(spec: &DrainSpec, v: &FlowValue) -> bool {
    let (down, up) = spec.window;
    spec.backups.contains(&v.wan)
        && offers(&spec.offered, v.policy, spec.id)
        && (v.moved_from == spec.id || (down..=up).contains(&v.first_seen_ns))
}

/// Whether the flow `v` has stayed too long on a WAN its policy no longer
/// offers (`max_age`: by WAN id, the WANs with `max_backup_flow_age`), and
/// if so the WAN it goes to: one its policy offers, picked from the
/// policy's slots by `hash` (a weighted choice, as the datapath's).
pub fn expired(
    max_age: &BTreeMap<u8, u64>,
    policies: &[Policy],
    offered: &[u64],
    now: u64,
    hash: u64,
    v: &FlowValue,
) -> Option<u8> {
    let age = *max_age.get(&v.wan)?;
    if now.saturating_sub(v.first_seen_ns) < age || offers(offered, v.policy, v.wan) {
        return None;
    }
    let p = policies
        .get(v.policy as usize)
        .filter(|p| p.active != 0)
        .or_else(|| policies.first().filter(|p| p.active != 0))?;
    let slot = p.slots[(hash as usize) % SLOTS];
    (slot != WAN_NONE && slot != v.wan).then_some(slot)
}

/// The LAN hosts pinned to a WAN that is still up, whose flows stay.
pub struct PinnedHosts {
    pub sticky_key: StickyKey,
    /// The LAN's neighbours (IP → MAC), for hosts pinned by MAC.
    pub neighbours: HashMap<IpAddr, [u8; 6]>,
    /// WANs alive in the family (bit *i*: WAN *i*).
    pub alive: u64,
    pub ttl_ns: u64,
}

impl PinnedHosts {
    /// The pin key of the host with address `src`: its MAC when known and
    /// hosts are pinned by MAC, else its address (IPv6: its /64).
    fn key(&self, src: IpAddr) -> HostKey {
        let mut k = HostKey::default();
        match (self.sticky_key, self.neighbours.get(&src), src) {
            (StickyKey::Mac, Some(mac), _) => {
                k.kind = HOST_KEY_MAC;
                k.bytes[..6].copy_from_slice(mac);
            }
            (_, _, IpAddr::V4(a)) => {
                k.kind = HOST_KEY_IPV4;
                k.bytes[..4].copy_from_slice(&a.octets());
            }
            (_, _, IpAddr::V6(a)) => {
                k.kind = HOST_KEY_IPV6;
                k.bytes[..8].copy_from_slice(&a.octets()[..8]);
            }
        }
        k
    }

    /// Whether the host of `src` is pinned (fresh) to a WAN other than
    /// `to` that is still alive: its flow stays.
    pub fn keeps(&self, pins: &HashMap<HostKey, HostValue>, now: u64, src: IpAddr, to: u8) -> bool {
        pins.get(&self.key(src)).is_some_and(|h| {
            now.saturating_sub(h.last_seen_ns) < self.ttl_ns
                && h.wan != to
                && h.wan < 64
                && self.alive & (1 << h.wan) != 0
        })
    }
}

/// A flow to move, and where.
struct Move {
    key: AnyFlowKey,
    value: FlowValue,
    to: u8,
}

/// What a batch of moves did.
#[derive(Default)]
struct Moved {
    flows: u64,
    kept_pinned: u64,
}

/// `failback = "drain"` of one WAN's family: selects the flows (see
/// [`drains`]) and moves them back over `spread`. `pinned`: the hosts
/// whose flows stay (`None`: `drain_pinned_hosts`, or no host pins).
pub fn drain(
    facts: &Facts,
    pin_dir: PathBuf,
    spec: DrainSpec,
    pinned: Option<PinnedHosts>,
    spread: Duration,
) {
    let facts = facts.clone();
    tokio::task::spawn_blocking(move || {
        let res = select_and_move(&pin_dir, pinned.as_ref(), spread, |k, v| {
            (k.family() == spec.family && drains(&spec, v)).then_some(spec.id)
        });
        match res {
            Ok(m) => {
                info!(wan = %spec.name, family = %spec.family, flows = m.flows, kept_pinned = m.kept_pinned, "failback: flows drained back from backup and metered WANs");
                facts.update(&spec.name, |f| {
                    f.failback_drains += 1;
                    f.failback_drained_flows += m.flows;
                    f.failback_kept_pinned += m.kept_pinned;
                    f.last_failback_drain = Some(rfc3339(SystemTime::now()));
                });
            }
            Err(e) => warn!(wan = %spec.name, error = %format!("{e:#}"), "failback drain"),
        }
    });
}

/// `max_backup_flow_age`: moves the flows that stayed longer than their
/// WAN's age on a WAN their policy no longer offers (see [`expired`]).
/// `names`: WAN names by id, for the facts.
pub fn expire(
    facts: &Facts,
    pin_dir: PathBuf,
    max_age: BTreeMap<u8, u64>,
    policies: PerFamily<Vec<Policy>>,
    names: BTreeMap<u8, String>,
    pinned: Option<PinnedHosts>,
    spread: Duration,
) {
    let facts = facts.clone();
    tokio::task::spawn_blocking(move || {
        let offered = policies.clone().map(|_, p| offered(&p));
        let now = datapath::ktime_now_ns();
        let mut from: BTreeMap<u8, u64> = BTreeMap::new();
        let res = select_and_move(&pin_dir, pinned.as_ref(), spread, |k, v| {
            let f = k.family();
            let hash = tuple_hash(&k.tuple());
            let to = expired(&max_age, &policies[f], &offered[f], now, hash, v)?;
            *from.entry(v.wan).or_default() += 1;
            Some(to)
        });
        match res {
            Ok(m) if m.flows > 0 => {
                info!(
                    flows = m.flows,
                    kept_pinned = m.kept_pinned,
                    "flows past max_backup_flow_age moved off their backup WANs"
                );
                for (id, n) in from {
                    let Some(name) = names.get(&id) else { continue };
                    facts.update(name, |f| f.backup_age_resets += n);
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "max_backup_flow_age"),
        }
    });
}

/// Reads the flows, moves those `pick` gives a WAN to (unless their host
/// is pinned elsewhere), in batches spread over `spread`.
fn select_and_move(
    pin_dir: &std::path::Path,
    pinned: Option<&PinnedHosts>,
    spread: Duration,
    mut pick: impl FnMut(&AnyFlowKey, &FlowValue) -> Option<u8>,
) -> Result<Moved> {
    let mut moves = Vec::new();
    datapath::read_flows(pin_dir, 4096, |key, v| {
        if let Some(to) = pick(&key, v) {
            moves.push(Move { key, value: *v, to });
        }
        true
    })?;
    let mut out = Moved::default();
    if let Some(p) = pinned {
        let pins = host_pins(pin_dir)?;
        let now = datapath::ktime_now_ns();
        let before = moves.len();
        moves.retain(|m| !p.keeps(&pins, now, m.key.src(), m.to));
        out.kept_pinned = (before - moves.len()) as u64;
    }
    out.flows = move_spread(pin_dir, moves, spread)?;
    Ok(out)
}

fn host_pins(pin_dir: &std::path::Path) -> Result<HashMap<HostKey, HostValue>> {
    let mut pins = HashMap::new();
    if !pin_dir.join(map::HOST_PINS).exists() {
        return Ok(pins);
    }
    datapath::read_hash_batched::<HostKey, HostValue>(
        &datapath::open_pinned_map(pin_dir, map::HOST_PINS)?,
        4096,
        |k, v| {
            pins.insert(*k, *v);
            true
        },
    )?;
    Ok(pins)
}

/// At most this many batches: a drain of a few flows is one batch.
const MAX_BATCHES: usize = 10;

/// Points each flow's pin at its new WAN and deletes its conntrack entry,
/// in up to [`MAX_BATCHES`] batches `spread` apart in all. Returns how
/// many flows were moved.
fn move_spread(pin_dir: &std::path::Path, moves: Vec<Move>, spread: Duration) -> Result<u64> {
    if moves.is_empty() {
        return Ok(0);
    }
    let batches = moves.len().clamp(1, MAX_BATCHES);
    let per = moves.len().div_ceil(batches);
    let pause = spread / batches as u32;
    let mut flows = datapath::FlowMaps::open(pin_dir)?;
    let mut moved = 0;
    for (i, batch) in moves.chunks(per).enumerate() {
        if i > 0 {
            std::thread::sleep(pause);
        }
        let mut tuples: HashSet<Tuple5> = HashSet::new();
        for m in batch {
            let mut v = m.value;
            v.wan = m.to;
            v.moved_from = WAN_NONE;
            flows.insert(&m.key, v)?;
            tuples.insert(m.key.tuple());
        }
        conntrack::delete_where(|e| {
            tuples.contains(&(
                e.orig.proto,
                e.orig.src,
                e.orig.dst,
                e.orig.sport,
                e.orig.dport,
            ))
        })?;
        // A TCP client that only receives (a download) would send nothing:
        // the server's next segment finds no NAT binding and dies at the
        // router. Nudged, the client answers through its new WAN and gets
        // the server's reset (see `nudge`).
        let tcp: Vec<nudge::Conn> = batch
            .iter()
            .filter(|m| m.key.proto() == mwan_common::PROTO_TCP)
            .map(|m| nudge::conn(m.key.src(), m.key.src_port(), m.key.dst(), m.key.dst_port()))
            .collect();
        if let Err(e) = nudge::nudge(&tcp) {
            warn!(error = %e, "nudging the TCP clients of drained flows");
        }
        moved += batch.len() as u64;
    }
    Ok(moved)
}

/// A hash of a flow's 5-tuple, to pick its new WAN's slot.
fn tuple_hash(t: &Tuple5) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::slots_for;

    fn flow(wan: u8, policy: u8, moved_from: u8, first_seen_ns: u64) -> FlowValue {
        FlowValue {
            first_seen_ns,
            last_seen_ns: first_seen_ns,
            wan,
            policy,
            moved_from,
            ..FlowValue::default()
        }
    }

    fn policy(members: &[(u8, u32)]) -> Policy {
        let mut p = Policy::EMPTY;
        if !members.is_empty() {
            p.active = 1;
            p.slots = slots_for(members);
            p.wan_mask = members.iter().fold(0, |m, (id, _)| m | (1 << id));
        }
        p
    }

    /// WAN 0 (fibre) was down from t=100 to t=200; WAN 1 is metered, WAN 2
    /// is a plain WAN of the same tier.
    #[test]
    fn a_drain_takes_what_went_to_a_backup_because_the_wan_was_down() {
        // Policy 0 offers 0 and 1 again; policy 1 (a rule) only WAN 1;
        // policy 2 is inactive (falls back to the default).
        let policies = vec![policy(&[(0, 1), (1, 1)]), policy(&[(1, 1)]), policy(&[])];
        let spec = DrainSpec {
            id: 0,
            name: "fibre".into(),
            family: Family::Ipv4,
            window: (100, 200),
            backups: [1].into(),
            offered: offered(&policies),
        };
        assert!(
            drains(&spec, &flow(1, 0, 0, 50)),
            "moved away from the fibre"
        );
        assert!(
            drains(&spec, &flow(1, 0, WAN_NONE, 150)),
            "started during the outage"
        );
        assert!(
            drains(&spec, &flow(1, 2, WAN_NONE, 150)),
            "its rule fell back to the default"
        );
        assert!(
            !drains(&spec, &flow(1, 0, WAN_NONE, 50)),
            "started before, while the fibre was up"
        );
        assert!(
            !drains(&spec, &flow(1, 0, WAN_NONE, 250)),
            "started after it came back"
        );
        assert!(
            !drains(&spec, &flow(1, 1, WAN_NONE, 150)),
            "its rule wants the metered line"
        );
        assert!(
            !drains(&spec, &flow(2, 0, 0, 150)),
            "not on a backup or metered WAN"
        );
        assert!(
            !drains(&spec, &flow(0, 0, WAN_NONE, 150)),
            "on the fibre already"
        );
    }

    #[test]
    fn flows_past_their_age_on_a_wan_their_policy_no_longer_offers_move() {
        // The default policy offers only WAN 0 (the primary is back).
        let policies = vec![policy(&[(0, 1)]), policy(&[(1, 1)])];
        let off = offered(&policies);
        let ages: BTreeMap<u8, u64> = [(1, 1000)].into();
        assert_eq!(
            expired(&ages, &policies, &off, 5000, 7, &flow(1, 0, WAN_NONE, 3000)),
            Some(0)
        );
        assert_eq!(
            expired(&ages, &policies, &off, 5000, 7, &flow(1, 0, WAN_NONE, 4500)),
            None,
            "young"
        );
        assert_eq!(
            expired(&ages, &policies, &off, 5000, 7, &flow(1, 1, WAN_NONE, 0)),
            None,
            "its rule offers it"
        );
        assert_eq!(
            expired(&ages, &policies, &off, 5000, 7, &flow(2, 0, WAN_NONE, 0)),
            None,
            "no age for WAN 2"
        );
        let none = vec![policy(&[]), policy(&[(1, 1)])];
        assert_eq!(
            expired(
                &ages,
                &none,
                &offered(&none),
                5000,
                7,
                &flow(1, 0, WAN_NONE, 0)
            ),
            None,
            "nowhere to go"
        );
    }

    #[test]
    fn hosts_pinned_to_a_live_wan_keep_their_flows() {
        let mac = [2, 0, 0, 0, 0, 10];
        let src: IpAddr = "192.0.2.10".parse().unwrap();
        let p = PinnedHosts {
            sticky_key: StickyKey::Mac,
            neighbours: [(src, mac)].into(),
            alive: 0b11,
            ttl_ns: 1000,
        };
        let key = p.key(src);
        assert_eq!((key.kind, &key.bytes[..6]), (HOST_KEY_MAC, &mac[..]));
        let pin = |wan, last_seen_ns| {
            [(
                key,
                HostValue {
                    last_seen_ns,
                    wan,
                    _pad: [0; 7],
                },
            )]
            .into()
        };
        assert!(
            p.keeps(&pin(1, 900), 1000, src, 0),
            "pinned to WAN 1, alive"
        );
        assert!(
            !p.keeps(&pin(0, 900), 1000, src, 0),
            "pinned to where it goes"
        );
        assert!(!p.keeps(&pin(1, 0), 1000, src, 0), "expired pin");
        assert!(!p.keeps(&pin(2, 900), 1000, src, 0), "pinned to a dead WAN");
        assert!(!p.keeps(&HashMap::new(), 1000, src, 0), "no pin");
        // By address: the IPv6 /64.
        let v6 = PinnedHosts {
            sticky_key: StickyKey::Address,
            ..p
        };
        let k = v6.key("2001:db8:1:2::99".parse().unwrap());
        assert_eq!(
            (k.kind, &k.bytes[..8]),
            (HOST_KEY_IPV6, &[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2][..])
        );
    }
}
