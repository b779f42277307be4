//! Relays between tun devices, run by threads of the test process.
//!
//! * Delay emulation without netem ([`DelayRelay`]): packets routed into a
//!   tun device are read, held for the configured delay and written back
//!   unchanged, so the kernel receives them on the tun device and routes
//!   them on.
//! * Point-to-point links ([`TunWire`]): two tun devices, in two
//!   namespaces, joined back to back, as a PPP session or a tunnel joins
//!   two hosts: no Ethernet header, no ARP, no gateway.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::ns::Netns;
use crate::stop::{Stopper, Wake};
use crate::sys;

/// Packets held at once; more are dropped (a full queue, as in a router).
const MAX_QUEUE: usize = 20_000;

/// A running relay on one tun device. Stops (and closes the tun device,
/// which removes it) when dropped.
pub(crate) struct DelayRelay {
    delay_ns: Arc<AtomicU64>,
    stop: Arc<Stopper>,
    thread: Option<JoinHandle<()>>,
}

impl DelayRelay {
    /// Starts relaying `tun` (a non-blocking tun fd) with no delay.
    pub(crate) fn start(tun: File, name: &str, stop: Arc<Stopper>) -> Result<DelayRelay> {
        let delay_ns = Arc::new(AtomicU64::new(0));
        let thread = thread::Builder::new()
            .name(format!("delay-{name}"))
            .spawn({
                let (delay_ns, stop) = (delay_ns.clone(), stop.clone());
                move || {
                    if let Err(e) = relay(tun, &delay_ns, &stop) {
                        eprintln!("lab: delay relay failed: {e}");
                    }
                }
            })?;
        Ok(DelayRelay {
            delay_ns,
            stop,
            thread: Some(thread),
        })
    }

    /// Delay for packets read from now on.
    pub(crate) fn set_delay(&self, delay: Duration) {
        self.delay_ns.store(
            delay.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads packets as they come, writes each back once its release time
/// (arrival + delay) has come. Release times only grow while the delay is
/// constant, so a FIFO is ordered by release time; after the delay is
/// lowered, newer packets wait behind older ones rather than overtake them.
fn relay(mut tun: File, delay_ns: &AtomicU64, stop: &Stopper) -> io::Result<()> {
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let now = Instant::now();
        while queue.front().is_some_and(|(release, _)| *release <= now) {
            let (_, packet) = queue.pop_front().expect("front exists");
            // A write fails only if the device cannot take the packet:
            // that packet is lost, as on a real link.
            let _ = tun.write(&packet);
        }
        let timeout = queue
            .front()
            .map(|(release, _)| release.saturating_duration_since(now));
        match stop.wait_readable(tun.as_raw_fd(), timeout)? {
            Wake::Stopped => return Ok(()),
            Wake::TimedOut => continue,
            Wake::Readable => {}
        }
        loop {
            match tun.read(&mut buf) {
                Ok(len) => {
                    let release =
                        Instant::now() + Duration::from_nanos(delay_ns.load(Ordering::Relaxed));
                    if queue.len() < MAX_QUEUE {
                        queue.push_back((release, buf[..len].to_vec()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Two tun devices joined back to back: what the kernel sends into one
/// comes out of the other. Stops (and closes both devices, which removes
/// them) when dropped.
pub(crate) struct TunWire {
    stop: Arc<Stopper>,
    thread: Option<JoinHandle<()>>,
}

impl TunWire {
    /// Starts carrying packets between `a` and `b` (non-blocking tun fds).
    pub(crate) fn start(a: File, b: File, name: &str, stop: Arc<Stopper>) -> Result<TunWire> {
        let thread = thread::Builder::new().name(format!("wire-{name}")).spawn({
            let stop = stop.clone();
            move || {
                if let Err(e) = wire(a, b, &stop) {
                    eprintln!("lab: point-to-point wire failed: {e}");
                }
            }
        })?;
        Ok(TunWire {
            stop,
            thread: Some(thread),
        })
    }
}

impl TunWire {
    /// Creates tun device `a_name` in `a` and `b_name` in `b` (down, no
    /// addresses) and joins them.
    pub(crate) fn between(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<TunWire> {
        let ta = a.run(|| sys::open_tun(a_name))?;
        let tb = b.run(|| sys::open_tun(b_name))?;
        TunWire::start(ta, tb, a_name, a.ctx.stopper()?)
    }
}

impl Drop for TunWire {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn wire(mut a: File, mut b: File, stop: &Stopper) -> io::Result<()> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Some(ready) = stop.wait_any(&[a.as_raw_fd(), b.as_raw_fd()], None)? else {
            return Ok(());
        };
        if ready[0] {
            pump(&mut a, &mut b, &mut buf)?;
        }
        if ready[1] {
            pump(&mut b, &mut a, &mut buf)?;
        }
    }
}

/// Moves every packet waiting on `from` to `to`; a packet `to` cannot take
/// is lost, as on a real link.
fn pump(from: &mut File, to: &mut File, buf: &mut [u8]) -> io::Result<()> {
    loop {
        match from.read(buf) {
            Ok(len) => {
                let _ = to.write(&buf[..len]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
