//! The classifier's time per packet of an established flow, IPv4 and IPv6,
//! measured by the kernel over many `BPF_PROG_TEST_RUN`s of an object
//! loaded on its own (the embedded one, or `MWAN_COST_BASE_OBJ`, an object
//! built from another revision, for a before/after comparison of IPv4).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use aya::maps::{Array, HashMap, MapData};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader, Pod, TestRun, TestRunOptions};
use mwan_common::*;

use crate::packet::*;

const MARK: u32 = 0x0001_0000;
const REPEAT: u32 = 1_000_000;
/// Rounds per measurement: the fastest is kept (other processes share the
/// CPUs).
const ROUNDS: usize = 5;

/// Loads `obj` with its maps pinned in `pin_dir` and one WAN up, every
/// policy slot on it, in both families where the object has IPv6 maps.
fn load(obj: &[u8], pin_dir: &Path) -> Result<Ebpf> {
    std::fs::create_dir_all(pin_dir)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(obj)
        .context("loading the object")?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROG_LAN_ETH)
        .ok_or_else(|| anyhow!("no {PROG_LAN_ETH}"))?
        .try_into()?;
    prog.load()?;
    let mut settings: Array<_, Settings> = Array::try_from(ebpf.map_mut(map::SETTINGS).unwrap())?;
    settings.set(
        0,
        Settings {
            abi_version: ABI_VERSION,
            mark_mask: 0x00ff_0000,
            ..Default::default()
        },
        0,
    )?;
    let policy = Policy {
        kind: POLICY_BALANCE,
        active: 1,
        wan_mask: 1,
        slots: [0; SLOTS],
    };
    for (wans, policies) in [(map::WANS, map::POLICIES), (map::WANS6, map::POLICIES6)] {
        let Some(m) = ebpf.map_mut(wans) else {
            continue;
        };
        let mut w: Array<_, WanEntry> = Array::try_from(m)?;
        w.set(
            0,
            WanEntry {
                mark: MARK,
                alive: 1,
            },
            0,
        )?;
        let mut p: Array<_, Policy> = Array::try_from(ebpf.map_mut(policies).unwrap())?;
        p.set(DEFAULT_POLICY, policy, 0)?;
    }
    Ok(ebpf)
}

fn clear<K: Pod>(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    if let Some(m) = ebpf.map_mut(name) {
        let mut flows: HashMap<&mut MapData, K, FlowValue> = HashMap::try_from(m)?;
        let keys: Vec<K> = flows.keys().collect::<Result<_, _>>()?;
        for k in keys {
            flows.remove(&k)?;
        }
    }
    Ok(())
}

/// ns per packet of `ack` after `syn` pinned its flow.
fn per_packet(ebpf: &mut Ebpf, syn: &[u8], ack: &[u8]) -> Result<f64> {
    clear::<FlowKey>(ebpf, map::FLOWS)?;
    clear::<FlowKey6>(ebpf, map::FLOWS6)?;
    let prog: &SchedClassifier = ebpf.program(PROG_LAN_ETH).unwrap().try_into()?;
    let run = |frame: &[u8], repeat: u32| {
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })
        .map_err(|e| anyhow!("BPF_PROG_TEST_RUN: {e:?}"))
    };
    run(syn, 1)?;
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        best = best.min(run(ack, REPEAT)?.duration.as_nanos() as f64);
    }
    Ok(best)
}

/// (IPv4 ns, IPv6 ns if the object has IPv6) per established packet.
pub fn measure(obj: &[u8], pin_dir: &Path) -> Result<(f64, Option<f64>)> {
    let obj = mwan::datapath::kfunc::resolve_for_this_kernel(obj)?;
    let mut ebpf = load(&obj, pin_dir)?;
    let frame = |b: Body| b.frame();
    let v4 = per_packet(
        &mut ebpf,
        &frame(Pkt::tcp(HOST, 40000, lab::SERVER, 443, SYN).into()),
        &frame(
            Pkt::tcp(HOST, 40000, lab::SERVER, 443, ACK)
                .payload(1000)
                .into(),
        ),
    )?;
    let v6 = match ebpf.map(map::FLOWS6) {
        None => None,
        Some(_) => Some(per_packet(
            &mut ebpf,
            &frame(Pkt6::tcp(HOST6, 40000, SERVER6, 443, SYN).into()),
            &frame(
                Pkt6::tcp(HOST6, 40000, SERVER6, 443, ACK)
                    .payload(1000)
                    .into(),
            ),
        )?),
    };
    drop(ebpf);
    for e in std::fs::read_dir(pin_dir)? {
        std::fs::remove_file(e?.path())?;
    }
    std::fs::remove_dir(pin_dir)?;
    Ok((v4, v6))
}
