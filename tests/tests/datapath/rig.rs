//! The datapath loaded in the lab's router namespace, configured by the
//! daemon's code, and the checks of one packet against its expectations.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use aya::{TestRun, TestRunOptions};
use ipnet::IpNet;
use lab::{Ipv4Net, LAN0, LAN1, TUNNEL_IFACE, TUNNEL_ROUTER};
use mwan::config::{Config, Sticky, StickyKey};
use mwan::datapath::{self, AnyFlowKey, ConntrackAccess, Datapath};
use mwan::dns::AddressTable;
use mwan::family::Family;
use mwan::policy::{self, CompiledRules, Health, WanView};
use mwan_common::*;

use crate::fixtures::*;
use crate::packet::*;

/// `struct __sk_buff` (uapi) as `BPF_PROG_TEST_RUN` reads and writes it:
/// the kernel accepts `mark`, `priority`, `ingress_ifindex`, `ifindex` (the
/// device the skb comes from), `cb`, `tstamp`, `wire_len`, `gso_*` and
/// `hwtstamp` in `ctx_in`, every other byte must be 0.
const SKB_SIZE: usize = 192;
const SKB_MARK: usize = 8;
const SKB_INGRESS_IFINDEX: usize = 36;
const SKB_IFINDEX: usize = 40;
/// `TC_ACT_UNSPEC`, which both programs return.
const TC_ACT_UNSPEC: u32 = -1i32 as u32;

/// The loaded datapath and the configuration it was given.
pub struct Rig {
    dp: Datapath,
    /// LAN interface name → ifindex in the router namespace.
    ifindex: HashMap<String, u32>,
    cfg: Config,
    health: Vec<Health>,
    last_default: Vec<(u8, u32)>,
    /// The WANs' IPv6 health, compiled into `POLICIES6`/`WANS6`.
    health6: Vec<Health>,
    last_default6: Vec<(u8, u32)>,
    rules_written: Option<CompiledRules>,
    /// Each rule's policy id (see `policy::assign_rule_policies`).
    policy_ids: Vec<u8>,
    /// Addresses learned for domain rules, written into `DOMAIN_DST` with
    /// the daemon's writer; `now_ns` is the fixture's clock for their expiry.
    learned: AddressTable,
    now_ns: u64,
}

impl Rig {
    pub fn load(pin_dir: &Path) -> Result<Rig> {
        let dp = Datapath::load(pin_dir, 4096, 1024).context("loading the datapath")?;
        let ifindex = ["lan0", "lan1", TUNNEL_IFACE]
            .iter()
            .map(|n| {
                datapath::ifindex(n)
                    .map(|i| (n.to_string(), i))
                    .ok_or_else(|| anyhow!("no interface {n} in the router namespace"))
            })
            .collect::<Result<_>>()?;
        Ok(Rig {
            dp,
            ifindex,
            cfg: Config::parse(&config("", TIERED, ""))?,
            health: vec![],
            last_default: vec![],
            health6: vec![],
            last_default6: vec![],
            rules_written: None,
            policy_ids: vec![],
            learned: AddressTable::new(),
            now_ns: 0,
        })
    }

    /// Applies `text` with the daemon's writers (the rule maps change only
    /// where they differ from the previous fixture's, as on a reload), every
    /// WAN up and no last eligible set (a fresh start), and empties the flow
    /// and host maps.
    fn configure(&mut self, text: &str) -> Result<()> {
        self.cfg = Config::parse(text).map_err(|e| anyhow!("fixture config: {e}"))?;
        // Policy ids as a freshly started daemon assigns them.
        self.policy_ids = policy::assign_rule_policies(&self.cfg.rules, &Default::default());
        let active = vec![true; self.cfg.rules.len()];
        let rules = policy::compile_rules(&self.cfg.rules, &self.policy_ids, &active);
        let ifindex = self.ifindex.clone();
        self.dp.maps.write_rules_and_settings(
            &self.cfg,
            &rules,
            self.rules_written.as_ref(),
            &|n| ifindex.get(n).copied(),
        )?;
        self.rules_written = Some(rules);
        for id in self.cfg.wans.len() as u32..MAX_WANS {
            for f in Family::BOTH {
                self.dp.maps.write_wan(f, id as u8, WanEntry::default())?;
            }
        }
        self.health = vec![Health::Good; self.cfg.wans.len()];
        self.health6 = vec![Health::Good; self.cfg.wans.len()];
        // No connection recorded by an earlier fixture.
        let flushed = std::process::Command::new("conntrack").arg("-F").output()?;
        ensure!(flushed.status.success(), "conntrack -F failed");
        self.last_default.clear();
        self.last_default6.clear();
        self.sync_policies()?;
        // The router's connected subnets and addresses, and loopback.
        let bypass: Vec<IpNet> = [
            LAN0,
            LAN1,
            "100.64.1.0/24".parse()?,
            Ipv4Net::new(TUNNEL_ROUTER, 32)?,
            "127.0.0.0/8".parse()?,
        ]
        .map(IpNet::from)
        .to_vec();
        self.dp.maps.write_bypass(Family::Ipv4, &bypass)?;
        self.dp.maps.write_bypass(
            Family::Ipv6,
            &[LAN6.parse()?, "fe80::/10".parse()?, "::1/128".parse()?],
        )?;
        self.dp.maps.clear_flows();
        let hosts: Vec<HostKey> = self.dp.maps.host_pins.keys().collect::<Result<_, _>>()?;
        for h in hosts {
            self.dp.maps.host_pins.remove(&h)?;
        }
        self.learned = AddressTable::new();
        self.now_ns = 0;
        self.dp.maps.clear_domain_dst()?;
        Ok(())
    }

    /// A DNS answer for `chain` (the question, then CNAME targets) giving
    /// `addr` with `ttl`: the rules listing any name of the chain learn it,
    /// written as the relay does.
    fn learn(&mut self, chain: &[&str], addr: Ipv4Addr, ttl: u32) -> Result<()> {
        let mask = self.cfg.domain_matcher().chain_rules(chain);
        ensure!(mask != 0, "no rule lists a name of {chain:?}");
        if let Some(change) = self
            .learned
            .learn(addr.into(), mask, ttl, self.now_ns, chain[0])
        {
            self.dp.maps.write_domain_dst(&[change])?;
        }
        Ok(())
    }

    /// The clock moves on by `secs`; what expired is deleted from the map.
    fn advance(&mut self, secs: u64) -> Result<()> {
        self.now_ns += secs * 1_000_000_000;
        let changes = self.learned.expire(self.now_ns);
        self.dp.maps.write_domain_dst(&changes)
    }

    fn wan_id(&self, name: &str) -> Result<u8> {
        self.cfg
            .wans
            .iter()
            .position(|w| w.name == name)
            .map(|i| i as u8)
            .ok_or_else(|| anyhow!("no WAN {name} in the fixture's config"))
    }

    fn set_health(&mut self, changes: &[(&str, Health)], v6: bool) -> Result<()> {
        for (name, h) in changes {
            let id = self.wan_id(name)?;
            match v6 {
                false => self.health[id as usize] = *h,
                true => self.health6[id as usize] = *h,
            }
        }
        self.sync_policies()
    }

    /// Compiles the policies of each family for its health and writes them
    /// and every WAN's mark and `alive` flag, as the daemon's
    /// `sync_policies` (IPv6: from the WANs' IPv6 health).
    fn sync_policies(&mut self) -> Result<()> {
        for v6 in [false, true] {
            let health = if v6 { &self.health6 } else { &self.health };
            let views: Vec<WanView> = self
                .cfg
                .wans
                .iter()
                .enumerate()
                .map(|(i, w)| WanView {
                    id: i as u8,
                    name: w.name.clone(),
                    weight: w.weight,
                    tier: w.tier,
                    health: health[i],
                    drained: false,
                    allowance: Default::default(),
                })
                .collect();
            let last = if v6 {
                &mut self.last_default6
            } else {
                &mut self.last_default
            };
            let c = policy::compile(
                &views,
                &self.cfg.rules,
                &self.policy_ids,
                self.cfg.all_down,
                last,
            );
            if !c.all_down {
                *last = c.default_members.clone();
            }
            let f = if v6 { Family::Ipv6 } else { Family::Ipv4 };
            self.dp.maps.write_policies(f, &c.policies)?;
            for (id, alive) in c.alive {
                let entry = WanEntry {
                    mark: self.cfg.wan_mark(id),
                    alive: alive as u32,
                };
                self.dp.maps.write_wan(f, id, entry)?;
            }
        }
        Ok(())
    }

    /// Runs the classifier of `input.on` on the frame; returns the mark the
    /// packet leaves with.
    fn run(&self, input: &Input, frame: &[u8]) -> Result<u32> {
        let prog = if input.on == TUNNEL_IFACE {
            PROG_LAN_L3
        } else {
            PROG_LAN_ETH
        };
        let ifindex = self.ifindex[input.on];
        let mut ctx_in = [0u8; SKB_SIZE];
        let mut put = |off: usize, v: u32| ctx_in[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        put(SKB_MARK, input.mark);
        put(SKB_INGRESS_IFINDEX, ifindex);
        put(SKB_IFINDEX, ifindex);
        let mut ctx_out = [0u8; SKB_SIZE];
        // The kernel builds the skb on the device of `ifindex` and hands
        // the program the whole frame, Ethernet header included (also for
        // tun0: see the L3 fixture).
        let res = self
            .dp
            .program(prog)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..Default::default()
            })
            .map_err(|e| anyhow!("BPF_PROG_TEST_RUN of {prog}: {e:?}"))?;
        ensure!(
            res.return_value == TC_ACT_UNSPEC,
            "{prog} returned {} instead of TC_ACT_UNSPEC",
            res.return_value as i32
        );
        let at = |off: usize| u32::from_ne_bytes(ctx_out[off..off + 4].try_into().unwrap());
        ensure!(
            at(SKB_IFINDEX) == ifindex,
            "the packet ran on ifindex {} instead of {} ({})",
            at(SKB_IFINDEX),
            ifindex,
            input.on
        );
        Ok(at(SKB_MARK))
    }

    fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            flows: self.dp.maps.flows()?.into_iter().collect(),
            hosts: self.dp.maps.host_pins.iter().collect::<Result<_, _>>()?,
            counters: self.dp.maps.global_counters()?,
            passive: (0..self.cfg.wans.len() as u8)
                .flat_map(|id| Family::BOTH.map(|f| (f, id)))
                .map(|(f, id)| Ok(((f, id), self.dp.maps.passive_counters(f, id)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// The frame `input` is: an Ethernet frame from the input's source MAC,
    /// or on the point-to-point LAN an IPv6 packet as it is (see the L3
    /// fixture).
    fn frame(&self, input: &Input) -> Vec<u8> {
        match &input.body {
            Body::Ip6(p) if input.on == TUNNEL_IFACE => p.bytes(),
            b => b.frame_between([0x02, 0, 0, 0, 0, 1], input.src_mac()),
        }
    }

    /// The host key the datapath files `input`'s source under
    /// (`sticky = "host"`).
    fn host_key(&self, input: &Input) -> Option<HostKey> {
        if self.cfg.sticky != Sticky::Host {
            return None;
        }
        let mut k = HostKey::default();
        if input.on != TUNNEL_IFACE && self.cfg.sticky_key == StickyKey::Mac {
            k.kind = HOST_KEY_MAC;
            k.bytes[..6].copy_from_slice(&input.src_mac());
            return Some(k);
        }
        match &input.body {
            Body::Ip(p) => {
                k.kind = HOST_KEY_IPV4;
                k.bytes[..4].copy_from_slice(&p.src.octets());
            }
            Body::Ip6(p) => {
                k.kind = HOST_KEY_IPV6;
                k.bytes[..8].copy_from_slice(&p.src.octets()[..8]);
            }
            Body::Other { .. } => return None,
        }
        Some(k)
    }

    fn wan_name(&self, id: u8) -> String {
        match self.cfg.wans.get(id as usize) {
            Some(w) => w.name.clone(),
            None if id == WAN_NONE => "main table".into(),
            None => format!("WAN id {id}"),
        }
    }

    /// Sends one packet and checks everything it must and must not do.
    fn check(&self, input: &Input, want: &Expect) -> Result<()> {
        let frame = self.frame(input);
        let before = self.snapshot()?;
        let mark = self.run(input, &frame)?;
        let after = self.snapshot()?;
        let src = self.host_key(input);
        let resolve = |w: W| -> Result<u8> {
            match w {
                W::Named(n) => self.wan_id(n),
                W::HostPin => src
                    .and_then(|k| after.hosts.get(&k))
                    .map(|h| h.wan)
                    .ok_or_else(|| anyhow!("no host pin for the packet's source")),
            }
        };
        check_counters(&before, &after, &want.counters)?;
        self.check_hosts(&before, &after, src, want.host, &resolve)?;
        let want_mark = match want.mark {
            Mark::Kept => input.mark,
            Mark::Wan(w) => (input.mark & !self.cfg.mark_mask) | self.cfg.wan_mark(resolve(w)?),
        };
        ensure!(
            mark == want_mark,
            "mark {mark:#x}, expected {want_mark:#x} ({:?})",
            want.mark
        );
        self.check_flows(
            &before,
            &after,
            input,
            frame.len() as u64,
            want.flow,
            &resolve,
        )?;
        match &want.passive {
            Some(p) => self.check_passive(&before, &after, input, p, &resolve),
            None => Ok(()),
        }
    }

    /// The packet counted exactly `want` in `PASSIVE` (of its family), its
    /// pin's flags say so, and nothing else changed there.
    fn check_passive(
        &self,
        before: &Snapshot,
        after: &Snapshot,
        input: &Input,
        want: &[(W, Hs)],
        resolve: &dyn Fn(W) -> Result<u8>,
    ) -> Result<()> {
        let family = match &input.body {
            Body::Ip6(_) => Family::Ipv6,
            _ => Family::Ipv4,
        };
        let mut expected: HashMap<(Family, u8), [u64; 3]> = HashMap::new();
        for (w, hs) in want {
            let e = expected.entry((family, resolve(*w)?)).or_default();
            e[*hs as usize] += 1;
        }
        for (key, a) in &after.passive {
            let b = before.passive[key];
            let got = [
                a.syns - b.syns,
                a.answered - b.answered,
                a.retransmits - b.retransmits,
            ];
            let exp = expected.get(key).copied().unwrap_or_default();
            ensure!(
                got == exp,
                "PASSIVE of {} ({}): syns, answered, retransmits +{got:?}, expected +{exp:?}",
                self.wan_name(key.1),
                key.0
            );
            if exp[1] > 0 {
                // Timed unless its SYN was retransmitted.
                let retried = before.flows.values().any(|v| v.flags & FLOW_RETRIED != 0);
                let timed = a.timed - b.timed;
                ensure!(
                    a.answered_dsts != 0
                        && timed == u64::from(!retried)
                        && (timed == 0) == (a.handshake_ns == b.handshake_ns),
                    "an answered handshake: {b:?} became {a:?} (its SYN retransmitted: {retried})"
                );
            } else {
                ensure!(a.timed == b.timed, "a handshake timed: {a:?}");
            }
            if exp[0] > 0 {
                ensure!(a.syn_dsts != 0, "a SYN without its destination: {a:?}");
            }
        }
        let flags = input
            .body
            .key()
            .and_then(|k| after.flows.get(&k))
            .map_or(0, |v| v.flags);
        for (_, hs) in want {
            let bit = match hs {
                Hs::Syn => FLOW_SYN,
                Hs::Answered => FLOW_ANSWERED,
                // (A re-pin clears FLOW_SYN.)
                Hs::Retransmit => continue,
            };
            ensure!(
                flags & bit != 0,
                "pin flags {flags:#x} lack {bit:#x} after {hs:?}"
            );
        }
        Ok(())
    }

    /// Only the expected host pin appears or changes WAN (a refreshed
    /// activity time is no change).
    fn check_hosts(
        &self,
        before: &Snapshot,
        after: &Snapshot,
        src: Option<HostKey>,
        want: HostPin,
        resolve: &dyn Fn(W) -> Result<u8>,
    ) -> Result<()> {
        let changed: Vec<(HostKey, Option<u8>)> = after
            .hosts
            .iter()
            .filter(|(k, v)| before.hosts.get(k).map(|o| o.wan) != Some(v.wan))
            .map(|(k, v)| (*k, Some(v.wan)))
            .chain(
                before
                    .hosts
                    .keys()
                    .filter(|k| !after.hosts.contains_key(k))
                    .map(|k| (*k, None)),
            )
            .collect();
        let show = |v: &[(HostKey, Option<u8>)]| {
            v.iter()
                .map(|(k, w)| {
                    let wan = w.map(|w| self.wan_name(w));
                    format!(
                        "{} -> {}",
                        datapath::host_name(k),
                        wan.unwrap_or("gone".into())
                    )
                })
                .collect::<Vec<_>>()
        };
        let expected = match want {
            HostPin::Unchanged => vec![],
            HostPin::Set(w) => vec![(
                src.ok_or_else(|| anyhow!("a host pin expected without sticky hosts"))?,
                Some(resolve(w)?),
            )],
        };
        ensure!(
            changed == expected,
            "host pins changed: {:?}, expected {:?}",
            show(&changed),
            show(&expected)
        );
        Ok(())
    }

    /// Only the packet's own pin may change, and as expected.
    fn check_flows(
        &self,
        before: &Snapshot,
        after: &Snapshot,
        input: &Input,
        len: u64,
        want: Flow,
        resolve: &dyn Fn(W) -> Result<u8>,
    ) -> Result<()> {
        let changed: Vec<AnyFlowKey> = after
            .flows
            .iter()
            .filter(|(k, v)| before.flows.get(k) != Some(v))
            .map(|(k, _)| *k)
            .chain(
                before
                    .flows
                    .keys()
                    .filter(|k| !after.flows.contains_key(k))
                    .copied(),
            )
            .collect();
        let show = |k: &AnyFlowKey| {
            let v = after.flows.get(k).or_else(|| before.flows.get(k));
            format!(
                "{} {} port {} -> {} port {} on {}",
                k.proto(),
                k.src(),
                k.src_port(),
                k.dst(),
                k.dst_port(),
                v.map(|v| self.wan_name(v.wan)).unwrap_or_default()
            )
        };
        if let Flow::Unchanged = want {
            let all: Vec<String> = changed.iter().map(show).collect();
            ensure!(changed.is_empty(), "pins changed: {all:?}");
            return Ok(());
        }
        let Some(key) = input.body.key() else {
            bail!("a pin expected for a frame that is not IP");
        };
        ensure!(
            changed == vec![key],
            "pins changed: {:?}, expected only {}",
            changed.iter().map(show).collect::<Vec<_>>(),
            show(&key)
        );
        let now = after
            .flows
            .get(&key)
            .ok_or_else(|| anyhow!("the pin {} is gone", show(&key)))?;
        if let Flow::New(w) = want {
            let id = match w {
                Some(w) => resolve(w)?,
                None => WAN_NONE,
            };
            ensure!(
                now.wan == id && now.packets == 1 && now.bytes == len && now.moved_from == WAN_NONE,
                "new pin {}: {now:?}, expected WAN {} with 1 packet of {len} bytes",
                show(&key),
                self.wan_name(id)
            );
            return Ok(());
        }
        let was = before
            .flows
            .get(&key)
            .ok_or_else(|| anyhow!("{} was not pinned before", show(&key)))?;
        let (wan, moved_from) = match want {
            Flow::Moved { to, from } => (resolve(to)?, self.wan_id(from)?),
            _ => (was.wan, was.moved_from),
        };
        ensure!(
            now.packets == was.packets + 1
                && now.bytes == was.bytes + len
                && now.wan == wan
                && now.moved_from == moved_from
                && now.first_seen_ns == was.first_seen_ns,
            "pin {}: {was:?} became {now:?}; expected one more packet of {len} bytes on {} \
             (moved from {})",
            show(&key),
            self.wan_name(wan),
            self.wan_name(moved_from)
        );
        Ok(())
    }

    /// Moves the pin of `p`'s flow `secs` into the past.
    /// Writes a conntrack entry for the connection of `p` with `wan`'s
    /// mark (none: 0), with the `conntrack` tool, in this namespace.
    fn record(&mut self, p: &Body, wan: Option<&str>) -> Result<()> {
        let Some(k) = p.key() else {
            bail!("recording a frame that is not IP");
        };
        let proto = match k.proto() {
            PROTO_TCP => "tcp",
            PROTO_UDP => "udp",
            other => bail!("conntrack entries of protocol {other} are not recorded"),
        };
        let mark = match wan {
            Some(w) => {
                let id = self.wan_id(w)?;
                self.cfg.wan_mark(id)
            }
            None => 0,
        };
        let (src, dst) = (k.src().to_string(), k.dst().to_string());
        let (sport, dport) = (k.src_port().to_string(), k.dst_port().to_string());
        let mut args = vec!["-I", "-p", proto, "-s", &src, "-d", &dst, "--sport", &sport];
        args.extend(["--dport", &dport, "-t", "120"]);
        if proto == "tcp" {
            args.extend(["--state", "ESTABLISHED"]);
        }
        let mark = mark.to_string();
        // The mark last: conntrack-tools 1.4.7 misreads it before `-u`.
        args.extend(["-m", &mark]);
        let out = std::process::Command::new("conntrack")
            .args(&args)
            .output()?;
        ensure!(
            out.status.success(),
            "conntrack {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn age(&mut self, p: &Body, secs: u64) -> Result<()> {
        let back = |mut v: FlowValue| {
            v.last_seen_ns = v.last_seen_ns.saturating_sub(secs * 1_000_000_000);
            v
        };
        let missing = "aging a pin that does not exist";
        let Some(k) = p.key() else {
            bail!("aging a frame that is not IP");
        };
        let v = self.dp.maps.flow(&k).context(missing)?;
        self.dp.maps.write_flow(&k, back(v))
    }

    /// The classifier's average time (ns, as `BPF_PROG_TEST_RUN` measures
    /// it) for the first packet of a new TCP flow to `dst` under the config
    /// `text`, with `learned` addresses in `DOMAIN_DST` (from 100.96.0.0 on,
    /// learned for the config's first domain rule; `dst` may be one). Every
    /// WAN is down (the config must say `all_down = "unreachable"`), so no
    /// pin is made and each of the `repeat` runs takes
    /// the whole new-flow path (parse, flow-map miss, bypass, rule
    /// matching, choice); checked with the `no_wan` counter.
    pub fn time_new_flow(
        &mut self,
        text: &str,
        learned: u32,
        dst: Ipv4Addr,
        repeat: u32,
    ) -> Result<f64> {
        self.configure(text)?;
        let names: Vec<String> = self.cfg.wans.iter().map(|w| w.name.clone()).collect();
        let changes: Vec<(&str, Health)> =
            names.iter().map(|n| (n.as_str(), Health::Bad)).collect();
        self.set_health(&changes, false)?;
        let bit = self
            .cfg
            .rules
            .iter()
            .position(|r| !r.domains.is_empty())
            .map(|i| 1u64 << i)
            .unwrap_or(1);
        let map = &mut self.dp.maps.v4.domain_dst;
        let base = u32::from(Ipv4Addr::new(100, 96, 0, 0));
        for i in 0..learned {
            map.insert(
                u32::from_ne_bytes(Ipv4Addr::from(base + i).octets()),
                bit,
                0,
            )?;
        }
        let input = Input {
            mac: None,
            on: "lan0",
            mark: 0,
            body: Body::Ip(Pkt::tcp(HOST, 40000, dst, 443, SYN)),
        };
        let frame = input.body.frame();
        let all_before = self.dp.maps.global_counters()?;
        let before = all_before[GS_NO_WAN as usize];
        let mut ctx_in = [0u8; SKB_SIZE];
        let ifindex = self.ifindex["lan0"];
        ctx_in[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4]
            .copy_from_slice(&ifindex.to_ne_bytes());
        ctx_in[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let res = self
            .dp
            .program(PROG_LAN_ETH)?
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx_in),
                repeat,
                ..Default::default()
            })
            .map_err(|e| anyhow!("BPF_PROG_TEST_RUN: {e:?}"))?;
        let all_after = self.dp.maps.global_counters()?;
        let after = all_after[GS_NO_WAN as usize];
        ensure!(
            after - before == repeat as u64,
            "{} of {repeat} runs took the new-flow path to the end (counters moved: {:?})",
            after - before,
            all_after
                .iter()
                .zip(&all_before)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, (a, b))| format!("{} +{}", COUNTERS[i].name, a - b))
                .collect::<Vec<_>>()
        );
        self.dp.maps.clear_domain_dst()?;
        Ok(res.duration.as_nanos() as f64)
    }

    pub fn run_fixture(&mut self, f: &Fixture) -> Result<()> {
        let reads_conntrack = f.steps.iter().any(|s| matches!(s, Step::Record(..)));
        if reads_conntrack && self.dp.conntrack == ConntrackAccess::Nftables {
            // Without the kfuncs the classifier never sees conntrack's
            // record (nftables restores it, which BPF_PROG_TEST_RUN skips).
            println!("skipped (the loaded datapath reads no conntrack entries)");
            return Ok(());
        }
        self.configure(&f.config)?;
        for (i, step) in f.steps.iter().enumerate() {
            let res = match step {
                Step::Send(input, want) => self.check(input, want).with_context(|| {
                    format!(
                        "step {}: {} on {} (mark {:#x})",
                        i + 1,
                        input.body.describe(),
                        input.on,
                        input.mark
                    )
                }),
                Step::Health(changes) => self.set_health(changes, false),
                Step::Health6(changes) => self.set_health(changes, true),
                Step::Age(p, secs) => self.age(p, *secs),
                Step::Learn(chain, addr, ttl) => self.learn(chain, *addr, *ttl),
                Step::Advance(secs) => self.advance(*secs),
                Step::Record(p, wan) => self.record(p, *wan),
            };
            res?;
        }
        Ok(())
    }
}

/// The state maps around one packet.
struct Snapshot {
    flows: HashMap<AnyFlowKey, FlowValue>,
    hosts: HashMap<HostKey, HostValue>,
    counters: Vec<u64>,
    passive: HashMap<(Family, u8), PassiveCounters>,
}

/// The counters moved by exactly `want` (every other one unchanged).
fn check_counters(before: &Snapshot, after: &Snapshot, want: &[(u32, u64)]) -> Result<()> {
    let mut want_delta = vec![0u64; GS_COUNT as usize];
    for (i, n) in want {
        want_delta[*i as usize] += n;
    }
    let delta: Vec<u64> = after
        .counters
        .iter()
        .zip(&before.counters)
        .map(|(a, b)| a - b)
        .collect();
    let named = |d: &[u64]| {
        let v: Vec<String> = d
            .iter()
            .enumerate()
            .filter(|(_, n)| **n != 0)
            .map(|(i, n)| format!("{} +{n}", COUNTERS[i].name))
            .collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    ensure!(
        delta == want_delta,
        "counters: {} (expected {})",
        named(&delta),
        named(&want_delta)
    );
    Ok(())
}
