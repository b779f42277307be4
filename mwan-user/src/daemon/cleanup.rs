//! What happens to connections when their WAN changes: the conntrack
//! entries of a dead WAN deleted and its TCP clients nudged, the flows of
//! a returning WAN reset to it (`failback = "reset"`), connections older
//! than mwan adopted, and the DNS divert's leftovers forgotten. Each runs
//! off the event loop (blocking netlink and map reads) and records what it
//! did in [`Facts`], which `mwan status` shows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::Result;
use mwan_common::{FlowValue, WAN_NONE};
use tracing::{info, warn};

use super::desired::WanConns;
use super::status::rfc3339;
use crate::control::WanFacts;
use crate::datapath::{self, AnyFlowKey, Tuple5};
use crate::family::Family;
use crate::{conntrack, nudge};

/// Only TCP connections active this recently are nudged when their WAN
/// dies (older pins are mostly finished connections).
const NUDGE_RECENT_NS: u64 = 600_000_000_000;
const MAX_NUDGES: usize = 65_536;

/// What the cleanups did, per WAN name (shared with their tasks).
#[derive(Clone, Default)]
pub struct Facts(Arc<Mutex<BTreeMap<String, WanFacts>>>);

impl Facts {
    pub(super) fn update(&self, wan: &str, f: impl FnOnce(&mut WanFacts)) {
        let mut m = self.0.lock().expect("not poisoned");
        f(m.entry(wan.to_string()).or_default());
    }

    /// What was done for `wan` so far.
    pub fn of(&self, wan: &str) -> WanFacts {
        let m = self.0.lock().expect("not poisoned");
        m.get(wan).cloned().unwrap_or_default()
    }
}

impl WanConns {
    fn is_ours(&self, a: &IpAddr) -> bool {
        self.addrs.contains(a)
            || matches!((a, self.prefix6), (IpAddr::V6(a), Some(p)) if p.contains(a))
    }

    /// The reply comes back to the WAN: a connection masqueraded (or
    /// NPT-mapped) to it, or one made to it from outside.
    fn reply_to(&self, e: &conntrack::CtEntry) -> bool {
        self.is_ours(&e.reply.dst)
    }

    /// Any address of the connection is the WAN's (adoption at start).
    fn used_by(&self, e: &conntrack::CtEntry) -> bool {
        [e.orig.src, e.orig.dst, e.reply.src, e.reply.dst]
            .iter()
            .any(|a| self.is_ours(a))
    }
}

/// Deletes the conntrack entries of family `only` (both: `None`) of a dead
/// WAN's connections, and only those, so applications see a reset at once
/// instead of hanging on a NAT binding to a dead link: those whose ct mark
/// records the WAN (all but a few; the kernel flushes them in one request,
/// `conntrack::flush_marked`), then, from a dump, connections
/// masqueraded (or NPT-mapped) to its addresses, inbound ones it marked,
/// and every flow pinned to it (`id`). Then nudges its TCP clients that
/// were active lately, so the server's reset reaches them now (see
/// `nudge`). A WAN whose IPv6 died keeps its IPv4 connections, and the
/// reverse.
pub fn flush_conntrack(
    facts: &Facts,
    pin_dir: PathBuf,
    mask: u32,
    w: WanConns,
    only: Option<Family>,
) {
    let facts = facts.clone();
    let id = w.id;
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        // The WAN's connections by their record, in one request the kernel
        // carries out itself; then what the record may miss (connections
        // without a mark, pinned flows), from a dump.
        if let Err(e) = conntrack::flush_marked(only, w.mark, mask) {
            warn!(wan = %w.name, error = %e, "flushing the conntrack entries of the dead WAN");
        }
        let flushed_ms = started.elapsed().as_millis() as u64;
        let tuples = match pinned_flows(&pin_dir, |_, v| v.wan == id || v.moved_from == id) {
            Ok(t) => t,
            Err(e) => {
                warn!(wan = %w.name, error = %e, "reading flows for conntrack cleanup");
                HashMap::new()
            }
        };
        let result = conntrack::delete_where(|e| {
            let family = if e.is_ipv6() {
                Family::Ipv6
            } else {
                Family::Ipv4
            };
            only.is_none_or(|f| f == family)
                && (w.reply_to(e)
                    || (e.mark & mask) == w.mark
                    || tuples.contains_key(&tuple_of(&e.orig)))
        });
        match result {
            Ok(n) => {
                info!(wan = %w.name, flushed_ms, deleted = n, pinned_flows = tuples.len(), ms = started.elapsed().as_millis() as u64, "conntrack entries of the dead WAN deleted");
                facts.update(&w.name, |f| {
                    f.cleanups += 1;
                    f.conntrack_deleted += n as u64;
                    f.last_cleanup = Some(rfc3339(SystemTime::now()));
                });
            }
            Err(e) => warn!(wan = %w.name, error = %e, "deleting conntrack entries"),
        }
        let now = datapath::ktime_now_ns();
        let conns: Vec<nudge::Conn> = tuples
            .iter()
            .filter(|((proto, ..), seen)| {
                *proto == 6 && now.saturating_sub(**seen) < NUDGE_RECENT_NS
            })
            .filter(|((_, src, ..), _)| only.is_none_or(|f| f == Family::of(src)))
            .map(|((_, src, dst, sport, dport), _)| nudge::conn(*src, *sport, *dst, *dport))
            .take(MAX_NUDGES)
            .collect();
        match nudge::nudge(&conns) {
            Ok(0) => {}
            Ok(n) => {
                info!(wan = %w.name, connections = n, "TCP clients of the dead WAN nudged to reconnect");
                facts.update(&w.name, |f| f.nudged += n as u64);
            }
            Err(e) => warn!(wan = %w.name, error = %e, "nudging TCP clients"),
        }
    });
}

/// `failback = "reset"`: flows of family `f` that moved away from WAN `id`
/// when it died are pinned back to it and their conntrack entries deleted,
/// so they reconnect through it.
pub fn reset_moved_flows(facts: &Facts, pin_dir: PathBuf, id: u8, name: String, f: Family) {
    let facts = facts.clone();
    tokio::task::spawn_blocking(move || {
        let res = (|| -> Result<(usize, usize)> {
            let mut moved = Vec::new();
            datapath::read_flows(&pin_dir, 4096, |k, v| {
                if v.moved_from == id && k.family() == f {
                    moved.push((k, *v));
                }
                true
            })?;
            let mut flows = datapath::FlowMaps::open(&pin_dir)?;
            let mut tuples = HashSet::new();
            for (k, mut v) in moved {
                v.wan = id;
                v.moved_from = WAN_NONE;
                flows.insert(&k, v)?;
                tuples.insert(k.tuple());
            }
            let deleted = conntrack::delete_where(|e| tuples.contains(&tuple_of(&e.orig)))?;
            Ok((tuples.len(), deleted))
        })();
        match res {
            Ok((n, deleted)) => {
                info!(wan = %name, family = %f, flows = n, conntrack_deleted = deleted, "failback: moved flows reset to their WAN");
                facts.update(&name, |w| {
                    w.failback_resets += 1;
                    w.failback_flows += n as u64;
                });
            }
            Err(e) => warn!(wan = %name, error = %e, "failback reset"),
        }
    });
}

/// Connections older than mwan's nftables table (made before mwan
/// started, by the main table's routes) carry no WAN in their ct mark:
/// records the WAN whose address they use (the masqueraded source of a LAN
/// connection, the router's own source, the destination of an inbound
/// one), so that they keep that WAN whatever happens to the pins (see
/// `nft`). Connections whose ct mark names a WAN already are left alone.
/// Returns how many were adopted.
pub async fn adopt_connections(mask: u32, wans: Vec<WanConns>) -> u64 {
    let wans: Vec<WanConns> = wans
        .into_iter()
        .filter(|w| !w.addrs.is_empty() || w.prefix6.is_some())
        .collect();
    if wans.is_empty() {
        return 0;
    }
    let res = tokio::task::spawn_blocking(move || {
        conntrack::mark_where(mask, |e| {
            if e.mark & mask != 0 {
                return None;
            }
            wans.iter().find(|w| w.used_by(e)).map(|w| w.mark)
        })
    })
    .await;
    match res {
        Ok(Ok(n)) => {
            if n > 0 {
                info!(
                    connections = n,
                    "existing connections adopted: their WAN recorded in conntrack"
                );
            }
            n as u64
        }
        Ok(Err(e)) => {
            warn!(error = %e, "recording the WAN of existing connections");
            0
        }
        Err(e) => {
            warn!(error = %e, "recording the WAN of existing connections");
            0
        }
    }
}

/// Deletes the conntrack entries of DNS queries redirected to the relay
/// port `port`: a client that sends its next query from the same port
/// would otherwise still be redirected there (a closed port: "connection
/// refused") until the entry times out.
pub fn forget_diverted(port: u16) {
    let res = conntrack::delete_where(|e| {
        e.orig.proto == 17 && e.orig.dport == 53 && e.reply.sport == port
    });
    if let Err(e) = res {
        warn!(error = %format!("{e:#}"), "forgetting the redirected DNS queries");
    }
}

fn tuple_of(t: &conntrack::CtTuple) -> Tuple5 {
    (t.proto, t.src, t.dst, t.sport, t.dport)
}

/// Flows of both families' flow maps that `pred` selects, with their last
/// activity (`bpf_ktime` ns).
fn pinned_flows(
    pin_dir: &Path,
    pred: impl Fn(&AnyFlowKey, &FlowValue) -> bool,
) -> Result<HashMap<Tuple5, u64>> {
    let mut out = HashMap::new();
    datapath::read_flows(pin_dir, 4096, |k, v| {
        if pred(&k, v) {
            out.insert(k.tuple(), v.last_seen_ns);
        }
        true
    })?;
    Ok(out)
}
