//! Network-namespace test lab for mwan.
//!
//! A [`Lab`] is a router namespace with LAN host namespaces on bridges, N
//! ISP namespaces (each behind a `wanI` veth of the router) and an internet
//! namespace with servers. The lab itself does no NAT and no policy
//! routing: mwan (or [`Lab::plain_routing_via`]) provides those. Each ISP
//! can be impaired at runtime (carrier, blackhole, loss, delay, rate,
//! renumbering). Everything is torn down when the `Lab` is dropped, also
//! while a failing test unwinds; leftovers of killed test processes are
//! swept when the next lab is built.
//!
//! ```no_run
//! use lab::{Lab, TCP_WHOAMI};
//! let lab = Lab::builder().lan_hosts(2).isps(2).build()?;
//! lab.plain_routing_via(2)?;
//! let seen = lab.host(0).tcp_whoami(TCP_WHOAMI)?;
//! assert_eq!(lab.wan_of(*seen.ip()), Some(2));
//! # anyhow::Ok(())
//! ```

mod client;
pub mod container;
mod ctx;
pub mod deb;
mod dns;
pub mod dnsperf;
mod dual;
pub mod ha;
pub mod http;
mod impair;
mod isp;
mod labdir;
pub mod mwan;
mod ns;
mod ping;
mod plain;
mod proc;
mod relay;
mod servers;
mod stop;
mod sys;
mod topology;
pub mod unit;

use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use client::{
    discard_late_answers, many_tcp_whoami, Endpoint, Stream, StreamEnd, StreamReport, UdpFlow,
    CLIENT_TIMEOUT,
};
pub use dns::DnsReply;
pub use dual::{
    iid, in_net, initial_delegation6, other_delegation6, other_link6, BULK6, DNS6, DNS_SERVER6,
    LAN0_6, LAN0_ROUTER6, PROBE_TARGETS6, SERVER6, SERVER6_2, SERVER6_NET2, STREAM6, TCP_PROBE6,
    TCP_WHOAMI6, UDP_WHOAMI6,
};
pub use ipnet::{Ipv4Net, Ipv6Net};
pub use isp::Isp;
pub use ns::Netns;
pub use ping::{ping, PingStats};
pub use proc::{Proc, ProcOutput};
pub use servers::ServerHandle;
pub use topology::*;

/// Runs `attempt` once every 10 ms from `t0` until `window` after it, at
/// most 300 times (a failover's new connections, say); returns each result
/// with when it started and ended, measured from `t0`.
pub fn paced_attempts<T>(
    t0: Instant,
    window: Duration,
    mut attempt: impl FnMut() -> T,
) -> Vec<(Duration, Duration, T)> {
    let mut out = Vec::new();
    let mut next = t0;
    while t0.elapsed() < window && out.len() < 300 {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        next += Duration::from_millis(10);
        let started = t0.elapsed();
        let result = attempt();
        out.push((started, t0.elapsed(), result));
    }
    out
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it
/// held. Polls every few milliseconds at first, then every 50 ms.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Locks `mutex`, ignoring poisoning: lab state stays usable (and
/// droppable) after a panic in another test thread.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
