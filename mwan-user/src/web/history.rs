//! The last hour of every WAN for the status page's graphs: one sample per
//! second per WAN (state, RTT, loss, throughput) in a ring allocated once,
//! 32 bytes a sample, 115 KB per WAN.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::control::WanStatus;

/// One hour at one sample per second.
pub const CAPACITY: usize = 3600;

/// State names in sample order (an index is stored per sample).
const STATES: [&str; 5] = ["unknown", "up", "degraded", "down", "disabled"];

#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Unix time in seconds.
    t: f64,
    state: u8,
    /// NaN: no probe answered in the window.
    rtt_ms: f32,
    loss_pct: f32,
    rx_bytes_per_sec: f32,
    tx_bytes_per_sec: f32,
}

impl Sample {
    const EMPTY: Sample = Sample {
        t: 0.0,
        state: 0,
        rtt_ms: f32::NAN,
        loss_pct: 0.0,
        rx_bytes_per_sec: 0.0,
        tx_bytes_per_sec: 0.0,
    };
}

struct Ring {
    name: String,
    interface: String,
    samples: VecDeque<Sample>,
    /// The previous sample's time and interface byte counters.
    last: Option<(f64, u64, u64)>,
}

pub struct History {
    capacity: usize,
    wans: Vec<Ring>,
}

/// `/api/history`: per WAN, one array per quantity (oldest first).
#[derive(Serialize)]
pub struct HistoryJson {
    pub interval_secs: f64,
    pub capacity: usize,
    pub wans: Vec<WanSeries>,
}

#[derive(Serialize)]
pub struct WanSeries {
    pub name: String,
    pub interface: String,
    /// Unix time, seconds.
    pub t: Vec<f64>,
    pub state: Vec<&'static str>,
    pub rtt_ms: Vec<Option<f32>>,
    pub loss_pct: Vec<f32>,
    pub rx_bytes_per_sec: Vec<f32>,
    pub tx_bytes_per_sec: Vec<f32>,
}

pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            capacity,
            wans: Vec::new(),
        }
    }

    /// Appends one sample per WAN taken at `now`. WANs that are gone (reload)
    /// lose their history; new ones start one.
    pub fn record(&mut self, now: SystemTime, wans: &[WanStatus]) {
        let t = unix_secs(now);
        self.wans.retain(|r| wans.iter().any(|w| w.name == r.name));
        for w in wans {
            let i = match self.wans.iter().position(|r| r.name == w.name) {
                Some(i) => i,
                None => {
                    // Written once in full, so the ring's memory is resident
                    // (a fixed cost) from the start rather than growing for
                    // an hour.
                    let mut samples = VecDeque::with_capacity(self.capacity);
                    samples.resize(self.capacity, Sample::EMPTY);
                    samples.clear();
                    self.wans.push(Ring {
                        name: w.name.clone(),
                        interface: w.interface.clone(),
                        samples,
                        last: None,
                    });
                    self.wans.len() - 1
                }
            };
            let ring = &mut self.wans[i];
            ring.interface.clone_from(&w.interface);
            // Bytes per second since the previous sample; 0 when a counter
            // went back (the interface was re-created).
            let rate = |before: u64, now: u64, dt: f64| {
                if dt > 0.0 && now >= before {
                    ((now - before) as f64 / dt) as f32
                } else {
                    0.0
                }
            };
            let (rx, tx) = match ring.last {
                Some((t0, rx0, tx0)) => {
                    (rate(rx0, w.rx_bytes, t - t0), rate(tx0, w.tx_bytes, t - t0))
                }
                None => (0.0, 0.0),
            };
            ring.last = Some((t, w.rx_bytes, w.tx_bytes));
            if ring.samples.len() == self.capacity {
                ring.samples.pop_front();
            }
            ring.samples.push_back(Sample {
                t,
                state: STATES.iter().position(|s| *s == w.state).unwrap_or(0) as u8,
                rtt_ms: w.rtt_ms.map_or(f32::NAN, |r| r as f32),
                loss_pct: w.loss_pct as f32,
                rx_bytes_per_sec: rx,
                tx_bytes_per_sec: tx,
            });
        }
    }

    /// The samples newer than `since` (unix seconds), or all. A copy, so
    /// that it is serialized without holding the history.
    pub fn json(&self, since: Option<f64>) -> HistoryJson {
        let wans = self
            .wans
            .iter()
            .map(|r| {
                let s: Vec<&Sample> = r
                    .samples
                    .iter()
                    .filter(|s| since.is_none_or(|since| s.t > since))
                    .collect();
                WanSeries {
                    name: r.name.clone(),
                    interface: r.interface.clone(),
                    t: s.iter().map(|s| (s.t * 1000.0).round() / 1000.0).collect(),
                    state: s.iter().map(|s| STATES[s.state as usize]).collect(),
                    rtt_ms: s
                        .iter()
                        .map(|s| (!s.rtt_ms.is_nan()).then_some(s.rtt_ms))
                        .collect(),
                    loss_pct: s.iter().map(|s| s.loss_pct).collect(),
                    rx_bytes_per_sec: s.iter().map(|s| s.rx_bytes_per_sec).collect(),
                    tx_bytes_per_sec: s.iter().map(|s| s.tx_bytes_per_sec).collect(),
                }
            })
            .collect();
        HistoryJson {
            interval_secs: 1.0,
            capacity: self.capacity,
            wans,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use crate::control::WanStatus;

    /// A WAN's status with `rx` bytes received.
    pub(crate) fn wan(name: &str, state: &str, rx: u64) -> WanStatus {
        WanStatus {
            ipv6: None,
            name: name.into(),
            id: 0,
            interface: format!("if-{name}"),
            state: state.into(),
            since: String::new(),
            since_secs: 0.0,
            tier: 1,
            weight: 1,
            share: 0.5,
            drained: false,
            enabled: true,
            alive: true,
            address: None,
            gateway: None,
            rtt_ms: Some(12.5),
            jitter_ms: None,
            loss_pct: 0.0,
            flows: 0,
            new_flows: 0,
            lan_packets: 0,
            lan_bytes: 0,
            rx_bytes: rx,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
            connections: Default::default(),
            weight_source: "config".into(),
            failback: "keep".into(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::wan;
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_ring_keeps_a_fixed_number_of_samples_and_computes_rates() {
        let mut h = History::new(3);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..5u64 {
            let t = t0 + Duration::from_secs(i);
            h.record(t, &[wan("a", if i < 4 { "up" } else { "down" }, 1000 * i)]);
        }
        let j = h.json(None);
        assert_eq!(j.wans.len(), 1);
        let a = &j.wans[0];
        assert_eq!(a.t, vec![1_000_002.0, 1_000_003.0, 1_000_004.0]);
        assert_eq!(a.rx_bytes_per_sec, vec![1000.0; 3]);
        assert_eq!(a.state, vec!["up", "up", "down"]);
        assert_eq!(a.rtt_ms[0], Some(12.5));
        assert_eq!(h.wans[0].samples.capacity(), 3);
        let newer = h.json(Some(1_000_003.0));
        assert_eq!(newer.wans[0].t, vec![1_000_004.0]);
    }

    #[test]
    fn removed_wans_are_forgotten_and_counter_resets_read_as_zero() {
        let mut h = History::new(10);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        h.record(t0, &[wan("a", "up", 5000), wan("b", "up", 0)]);
        h.record(t0 + Duration::from_secs(1), &[wan("a", "up", 10)]);
        let j = h.json(None);
        assert_eq!(
            j.wans.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            vec!["a"]
        );
        assert_eq!(j.wans[0].rx_bytes_per_sec, vec![0.0, 0.0]);
    }
}
