//! End-to-end proof of the metrics endpoint and the status page (issue 13):
//! a real Prometheus server scrapes mwan every second while ISP 1 fails and
//! PromQL sees it; `promtool check metrics` accepts the exposition;
//! headless Chromium renders the status page and shows ISP 1 `down`; bad,
//! huge and slow requests and a taken address are handled without touching
//! forwarding or probing.
//!
//! The listener runs in the router namespace (like the daemon); Prometheus
//! and Chromium are started there too, and everything is stopped with the
//! lab. Prometheus (`promtool`, `prometheus`) and Chromium come from
//! Debian's `prometheus` and `chromium` packages (`cargo xtask test`
//! installs them).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use lab::http::{url_encode, HttpResponse};
use lab::mwan::{config_with, router_snapshot, Mwan, Status};
use lab::*;

/// Where mwan listens in the router namespace.
const LISTEN: &str = "127.0.0.1:9849";
/// Where the test's Prometheus listens in the router namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";
const UP: Duration = Duration::from_secs(10);
/// Bound for Prometheus to see a change mwan made (1 s scrapes).
const SEEN_WITHIN: Duration = Duration::from_secs(20);

fn listen() -> SocketAddr {
    LISTEN.parse().expect("valid address")
}

fn build() -> Lab {
    Lab::builder()
        .lan_hosts(2)
        .isps(2)
        .build()
        .expect("lab builds")
}

fn config(lab: &Lab) -> String {
    config_with(
        lab,
        &format!("metrics_listen = \"{LISTEN}\""),
        &|_| String::new(),
        "",
    )
}

fn start<'l>(lab: &'l Lab) -> Mwan<'l> {
    let mwan = Mwan::start(lab, &config(lab)).expect("mwan starts");
    mwan.wait_all_up(UP).expect("WANs up");
    mwan
}

fn get(lab: &Lab, path: &str) -> HttpResponse {
    lab.router()
        .http_get(listen(), path)
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
}

/// `/metrics` as (series, value): `name{labels}` → value.
fn scrape(lab: &Lab) -> BTreeMap<String, f64> {
    let r = get(lab, "/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("`series value`");
            (series.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool_check(text: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian package prometheus; `cargo xtask test` installs it)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics ({}): {said}",
        out.status
    );
    Ok(())
}

/// A Prometheus server in the router namespace scraping mwan every second,
/// with its config and storage in the lab directory; stopped with the lab.
fn start_prometheus(lab: &Lab) -> Result<Proc> {
    let dir = lab.dir().join("prometheus");
    std::fs::create_dir_all(dir.join("data"))?;
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: mwan\n    static_configs:\n      - targets: [\"{LISTEN}\"]\n"
        ),
    )?;
    let args = [
        format!("--config.file={}", cfg.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address={PROMETHEUS}"),
        "--log.level=warn".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let prom = lab.router().spawn("prometheus", &args, &[])?;
    let ready = wait_until(Duration::from_secs(30), || {
        !prom.is_running() || prom_api(lab, "/-/ready").is_ok_and(|r| r.status == 200)
    });
    if !prom.is_running() || !ready {
        bail!("prometheus did not start:\n{}", prom.output_so_far());
    }
    Ok(prom)
}

fn prom_api(lab: &Lab, path: &str) -> Result<HttpResponse> {
    lab.router()
        .http_get(PROMETHEUS.parse().expect("valid address"), path)
}

/// An instant PromQL query: (labels, value) of each result.
fn promql(lab: &Lab, query: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
    let r = prom_api(lab, &format!("/api/v1/query?query={}", url_encode(query)))?;
    ensure!(
        r.status == 200,
        "query {query}: HTTP {}: {}",
        r.status,
        r.text()
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body)?;
    let results = v["data"]["result"]
        .as_array()
        .ok_or_else(|| anyhow!("query {query}: no result in {v}"))?;
    results
        .iter()
        .map(|r| {
            let labels = r["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("query {query}: bad value in {r}"))?;
            Ok((labels, value))
        })
        .collect()
}

/// Waits until `query` returns at least one series; returns the time it
/// took.
fn wait_promql(lab: &Lab, query: &str, from: Instant) -> Duration {
    let seen = wait_until(SEEN_WITHIN, || {
        promql(lab, query).is_ok_and(|r| !r.is_empty())
    });
    assert!(
        seen,
        "Prometheus did not see `{query}` within {SEEN_WITHIN:?}: {:?}",
        promql(lab, query)
    );
    from.elapsed()
}

#[test]
fn prometheus_scrapes_mwan_and_sees_isp1_fail() {
    let lab = build();
    let mwan = start(&lab);
    // Some LAN traffic, so the flow and byte counters move.
    let before = scrape(&lab);
    for r in many_tcp_whoami(lab.host(0), TCP_WHOAMI, 40, 8) {
        r.expect("connection through mwan");
    }

    // The exposition passes promtool and has HELP and TYPE for every family.
    let text = get(&lab, "/metrics").text();
    promtool_check(&text).expect("promtool accepts /metrics");
    let r = get(&lab, "/metrics");
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let sum = |m: &BTreeMap<String, f64>, prefix: &str| -> f64 {
        m.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    };
    // The snapshot behind /metrics is at most a second old.
    let mut after = scrape(&lab);
    let counted = wait_until(Duration::from_secs(3), || {
        after = scrape(&lab);
        sum(&after, "mwan_wan_new_flows_total") >= sum(&before, "mwan_wan_new_flows_total") + 40.0
    });
    assert!(counted, "40 new connections are counted as new flows");
    assert!(sum(&after, "mwan_wan_lan_bytes_total") > sum(&before, "mwan_wan_lan_bytes_total"));
    assert_eq!(after["mwan_wan_up{wan=\"isp1\",interface=\"wan1\"}"], 1.0);
    assert_eq!(
        after["mwan_wan_state{wan=\"isp1\",interface=\"wan1\",state=\"up\"}"],
        1.0
    );
    assert!(
        after["mwan_probe_answered_total{wan=\"isp1\",interface=\"wan1\",target=\"198.51.100.1\"}"]
            > 0.0
    );
    // Bounded cardinality: the 40 connections added no series (besides
    // the measurements that appear once probes or handshakes were
    // answered and the flow
    // count's age, once the daemon first counted), and only these label
    // names exist.
    let series = |m: &BTreeMap<String, f64>| -> Vec<String> {
        m.keys()
            .filter(|k| {
                !k.contains("rtt_seconds")
                    && !k.contains("jitter_seconds")
                    && !k.contains("passive_handshake_seconds")
                    && !k.starts_with("mwan_flows_count_age_seconds")
            })
            .cloned()
            .collect()
    };
    assert_eq!(
        series(&before),
        series(&after),
        "traffic must not add series"
    );
    for series in after.keys() {
        if let Some(labels) = series.split_once('{').map(|(_, l)| l.trim_end_matches('}')) {
            for kv in labels.split("\",") {
                let name = kv.split('=').next().unwrap_or_default();
                assert!(
                    [
                        "wan",
                        "interface",
                        "state",
                        "target",
                        "version",
                        "result",
                        "direction",
                        "family",
                        "action",
                        "rule"
                    ]
                    .contains(&name),
                    "unexpected label {name} in {series}"
                );
            }
        }
    }

    let _prom = start_prometheus(&lab).expect("prometheus runs");
    let t = Instant::now();
    wait_promql(&lab, r#"up{job="mwan"} == 1"#, t);
    wait_promql(&lab, r#"mwan_wan_state{wan="isp1",state="up"} == 1"#, t);
    let failovers = promql(&lab, r#"mwan_wan_failovers_total{wan="isp1"}"#).expect("query");
    assert_eq!(failovers.len(), 1, "{failovers:?}");
    assert_eq!(failovers[0].1, 0.0, "no failover yet");

    // ISP 1 fails silently.
    let failed = Instant::now();
    lab.isp(1).set_blackhole(true).expect("blackhole");
    let down = wait_promql(
        &lab,
        r#"mwan_wan_state{wan="isp1",state="down"} == 1"#,
        failed,
    );
    let failover = wait_promql(&lab, r#"mwan_wan_failovers_total{wan="isp1"} >= 1"#, failed);
    let loss = wait_promql(&lab, r#"mwan_wan_loss_ratio{wan="isp1"} > 0.2"#, failed);
    let changes = wait_promql(
        &lab,
        r#"increase(mwan_wan_state_changes_total{wan="isp1"}[1m]) > 0"#,
        failed,
    );
    eprintln!(
        "Prometheus saw isp1 down after {down:?}, the failover count after {failover:?}, the loss rise after {loss:?}, the state change increase after {changes:?}"
    );
    // ISP 2 carried on.
    let isp2 = promql(&lab, r#"mwan_wan_up{wan="isp2"}"#).expect("query");
    assert_eq!(isp2.first().map(|r| r.1), Some(1.0), "{isp2:?}");
    assert_eq!(mwan.wan("isp1").state, "down");
}

/// Runs headless Chromium in the router namespace with a fresh profile;
/// returns what it printed on stdout.
fn chromium(lab: &Lab, tag: &str, args: &[&str]) -> String {
    let profile = lab.dir().join(format!("chromium-{tag}"));
    std::fs::create_dir_all(&profile).expect("profile directory");
    let profile_arg = format!("--user-data-dir={}", profile.display());
    let mut argv = vec![
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        &profile_arg,
    ];
    argv.extend_from_slice(args);
    let home = lab.dir().display().to_string();
    let p = lab
        .router()
        .spawn("chromium", &argv, &[("HOME", &home)])
        .expect("chromium starts (Debian package chromium; `cargo xtask test` installs it)");
    let status = p.wait_timeout(Duration::from_secs(120));
    let out = p.output_so_far();
    assert!(
        status.is_some_and(|s| s.success()),
        "chromium {args:?}: {status:?}\n{out}"
    );
    out.stdout
}

/// Samples per WAN in `/api/history`.
fn history_len(lab: &Lab) -> Vec<(String, usize)> {
    let h: serde_json::Value =
        serde_json::from_slice(&get(lab, "/api/history").body).expect("JSON");
    h["wans"]
        .as_array()
        .expect("wans")
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or_default().to_string(),
                w["t"].as_array().map_or(0, |t| t.len()),
            )
        })
        .collect()
}

/// A metered WAN (issue 21): its usage this cycle and its allowance are in
/// `/metrics` (which promtool accepts) and on the status page.
#[test]
fn a_metered_wans_usage_is_in_the_metrics_and_on_the_page() {
    let lab = build();
    let per_wan = |i: usize| {
        if i == 2 {
            "quota = \"50GB\"\nquota_reset_day = 15\n".to_string()
        } else {
            String::new()
        }
    };
    let text = config_with(
        &lab,
        &format!("metrics_listen = \"{LISTEN}\""),
        &per_wan,
        "",
    );
    let mwan = Mwan::start(&lab, &text).expect("mwan starts");
    mwan.wait_all_up(UP).expect("WANs up");
    for r in many_tcp_whoami(lab.host(0), TCP_WHOAMI, 20, 4) {
        r.expect("connection through mwan");
    }
    let exposition = get(&lab, "/metrics").text();
    promtool_check(&exposition).expect("promtool accepts /metrics");
    let mut m = scrape(&lab);
    let isp2 = |name: &str| format!("{name}{{wan=\"isp2\",interface=\"wan2\"}}");
    assert!(
        wait_until(Duration::from_secs(5), || {
            m = scrape(&lab);
            m.get("mwan_wan_cycle_bytes{wan=\"isp2\",interface=\"wan2\",direction=\"receive\",family=\"ipv4\"}")
            .is_some_and(|v| *v > 0.0)
        }),
        "no usage counted: {m:?}"
    );
    assert_eq!(m[&isp2("mwan_wan_quota_bytes")], 50e9);
    assert_eq!(m[&isp2("mwan_wan_quota_exhausted")], 0.0);
    assert_eq!(
        m["mwan_wan_quota_action{wan=\"isp2\",interface=\"wan2\",action=\"backup\"}"],
        1.0
    );
    assert!(!m.contains_key("mwan_wan_quota_bytes{wan=\"isp1\",interface=\"wan1\"}"));
    let reset = m[&isp2("mwan_wan_cycle_reset_timestamp_seconds")];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(reset > now && reset < now + 32.0 * 86_400.0, "{reset}");

    let url = format!("http://{LISTEN}/");
    let dom = chromium(
        &lab,
        "usage",
        &["--virtual-time-budget=5000", "--dump-dom", &url],
    );
    for want in [
        "<section id=\"usage-section\">",
        "50.00 GB",
        "at 100%: new flows only while no other WAN is up",
    ] {
        assert!(dom.contains(want), "the rendered page lacks {want}:\n{dom}");
    }
}

#[test]
fn status_page_in_chromium_shows_isp1_down() {
    let lab = build();
    // Different RTTs, so the graph's lines differ.
    lab.isp(2)
        .set_delay(Duration::from_millis(15))
        .expect("delay");
    let mwan = start(&lab);
    // Traffic for the throughput graph: streams through both WANs.
    let streams: Vec<Stream> = (0..4)
        .map(|i| lab.host(i % 2).open_stream(STREAM).expect("stream"))
        .collect();
    let enough = |n: usize| history_len(&lab).iter().all(|(_, len)| *len >= n);
    assert!(
        wait_until(Duration::from_secs(60), || enough(20)),
        "20 s of history: {:?}",
        history_len(&lab)
    );
    lab.isp(1).set_blackhole(true).expect("blackhole");
    mwan.wait_state("isp1", "down", Duration::from_secs(5))
        .expect("isp1 down");
    // New connections go through ISP 2 now.
    let after: Vec<Stream> = (0..2)
        .map(|i| lab.host(i).open_stream(STREAM).expect("stream"))
        .collect();
    let down_at = history_len(&lab)[0].1;
    assert!(
        wait_until(Duration::from_secs(30), || enough(down_at + 10)),
        "10 s of history after the failure"
    );

    let url = format!("http://{LISTEN}/");
    let dom = chromium(
        &lab,
        "dom",
        &["--virtual-time-budget=5000", "--dump-dom", &url],
    );
    for want in [
        r#"<span id="state-isp1" class="state state-down">down</span>"#,
        r#"<span id="state-isp2" class="state state-up">up</span>"#,
        "live · updated",
    ] {
        assert!(dom.contains(want), "the rendered page lacks {want}:\n{dom}");
    }
    // The failure is in the events, with its reason.
    assert!(
        dom.contains("consecutive failed rounds"),
        "no event for the failure:\n{dom}"
    );

    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/status-page.png");
    let _ = std::fs::remove_file(&shot);
    let shot_arg = format!("--screenshot={}", shot.display());
    chromium(
        &lab,
        "shot",
        &[
            "--window-size=1280,1100",
            "--virtual-time-budget=5000",
            &shot_arg,
            &url,
        ],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    eprintln!("status page screenshot: {}", shot.display());
    for s in streams.into_iter().chain(after) {
        s.close();
    }
}

#[test]
fn listener_is_read_only_bounded_and_never_disturbs_forwarding() {
    let lab = build();
    let mwan = start(&lab);
    let addr = listen();
    let r = |req: &[u8]| lab.router().http_raw(addr, req).expect("an answer");

    // Read-only: nothing but GET and HEAD.
    for m in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/", "/metrics", "/api/status"] {
            let resp = r(format!("{m} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n").as_bytes());
            assert_eq!(resp.status, 405, "{m} {path}");
            assert_eq!(resp.header("allow"), Some("GET, HEAD"));
        }
    }
    assert_eq!(get(&lab, "/nothing-here").status, 404);
    assert_eq!(r(b"this is not http\r\n\r\n").status, 400);
    assert_eq!(get(&lab, "/api/history?since=yesterday").status, 400);
    let head = r(b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    // A huge request head is refused, not buffered.
    let mut huge = b"GET /metrics HTTP/1.0\r\n".to_vec();
    for i in 0..2000 {
        huge.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "x".repeat(40)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    assert_eq!(r(&huge).status, 431);

    // /api/status is `mwan status --json`.
    let api: Status = serde_json::from_slice(&get(&lab, "/api/status").body).expect("status JSON");
    let cli = mwan.status();
    let names = |s: &Status| {
        s.wans
            .iter()
            .map(|w| (w.name.clone(), w.state.clone(), w.weight))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&api), names(&cli));
    assert_eq!(api.pid, cli.pid);
    // The page is self-contained.
    let page = get(&lab, "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-security-policy")
        .is_some_and(|c| c.starts_with("default-src 'none'")));
    assert!(!page.text().contains("https://") && !page.text().contains("http://"));

    // Slow clients: every connection slot taken by a client that never
    // finishes its request. Further clients are turned away at once, while
    // forwarding and probing go on.
    let slow: Vec<TcpStream> = lab.router().run(|| {
        (0..40)
            .filter_map(|_| {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").ok()?;
                Some(s)
            })
            .collect()
    });
    assert_eq!(
        slow.len(),
        40,
        "connections are accepted (and then refused)"
    );
    let busy = wait_until(Duration::from_secs(3), || {
        lab.router()
            .http_get(addr, "/metrics")
            .is_ok_and(|r| r.status == 503)
    });
    assert!(
        busy,
        "a client beyond the connection limit is refused with 503"
    );
    for r in many_tcp_whoami(lab.host(0), TCP_WHOAMI, 20, 4) {
        r.expect("forwarding goes on while the listener is saturated");
    }
    let rounds = |s: &BTreeMap<String, f64>| {
        s["mwan_wan_probe_rounds_total{wan=\"isp1\",interface=\"wan1\"}"]
    };
    // The slow clients time out (5 s) and the listener serves again; the
    // probes went on meanwhile (the rounds counter kept counting).
    let mut first = None;
    let served = wait_until(Duration::from_secs(15), || {
        match lab.router().http_get(addr, "/metrics") {
            Ok(r) if r.status == 200 => {
                first.get_or_insert_with(|| scrape(&lab));
                true
            }
            _ => false,
        }
    });
    assert!(
        served,
        "the listener serves again once the slow clients timed out"
    );
    drop(slow);
    let later = wait_until(Duration::from_secs(5), || {
        rounds(&scrape(&lab)) > rounds(first.as_ref().expect("scraped")) + 5.0
    });
    assert!(later, "probing rounds go on");
    mwan.wait_all_up(Duration::from_secs(1))
        .expect("no WAN suffered from the listener's clients");
    let states: Vec<String> = mwan.status().wans.into_iter().map(|w| w.state).collect();
    assert_eq!(states, ["up", "up"]);
}

#[test]
fn a_taken_address_is_refused_at_start_and_changes_nothing() {
    let lab = build();
    let before = router_snapshot(&lab);
    // Someone else listens on the address first.
    let _taken = lab
        .router()
        .run(|| std::net::TcpListener::bind(LISTEN))
        .expect("bind");
    let err = match Mwan::start(&lab, &config(&lab)) {
        Ok(_) => panic!("mwan started although {LISTEN} is taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&format!(
            "metrics_listen = \"{LISTEN}\": cannot listen: the address is already in use"
        )),
        "{err}"
    );
    assert_eq!(router_snapshot(&lab), before, "the router was changed");

    // Off by default: nothing listens without metrics_listen.
    drop(_taken);
    let plain = config_with(&lab, "", &|_| String::new(), "");
    let mwan = Mwan::start(&lab, &plain).expect("mwan starts");
    mwan.wait_all_up(UP).expect("WANs up");
    let refused = lab
        .router()
        .run(|| TcpStream::connect_timeout(&listen(), Duration::from_secs(2)));
    assert!(refused.is_err(), "nothing listens on {LISTEN} by default");
}

#[test]
fn listens_on_ipv6_too() {
    let lab = build();
    // The lab's namespaces start without IPv6; the router's loopback gets it.
    lab.router()
        .sysctls(&[
            ("net.ipv6.conf.all.disable_ipv6", "0"),
            ("net.ipv6.conf.lo.disable_ipv6", "0"),
        ])
        .expect("IPv6 on the router's loopback");
    let addr: SocketAddr = "[::1]:9849".parse().expect("valid address");
    let text = config_with(
        &lab,
        &format!("metrics_listen = \"{addr}\""),
        &|_| String::new(),
        "",
    );
    let mwan = Mwan::start(&lab, &text).expect("mwan starts");
    mwan.wait_all_up(UP).expect("WANs up");
    let up = wait_until(Duration::from_secs(5), || {
        lab.router().http_get(addr, "/metrics").is_ok_and(|r| {
            r.status == 200
                && r.text()
                    .contains("mwan_wan_up{wan=\"isp1\",interface=\"wan1\"} 1")
        })
    });
    assert!(
        up,
        "/metrics over IPv6: {:?}",
        lab.router().http_get(addr, "/metrics")
    );
    let status: Status = serde_json::from_slice(
        &lab.router()
            .http_get(addr, "/api/status")
            .expect("GET")
            .body,
    )
    .expect("status JSON");
    assert_eq!(status.wans.len(), 2);
}

#[test]
fn reloads_and_hook_runs_are_counted() {
    let lab = build();
    // A hook that fails for isp2 only.
    let top =
        format!("metrics_listen = \"{LISTEN}\"\non_change = \"test \\\"$MWAN_WAN\\\" = isp1\"");
    let mwan =
        Mwan::start(&lab, &config_with(&lab, &top, &|_| String::new(), "")).expect("mwan starts");
    mwan.wait_all_up(UP).expect("WANs up");
    // unknown -> up for both WANs: two runs, isp2's failed.
    let hooks = wait_until(Duration::from_secs(10), || {
        let m = scrape(&lab);
        m["mwan_hook_runs_total"] == 2.0 && m["mwan_hook_failures_total"] == 1.0
    });
    assert!(hooks, "hook runs: {:?}\n{}", scrape(&lab), mwan.log());

    mwan.cli_ok(&["reload"]).expect("reload");
    let text = std::fs::read_to_string(&mwan.config).expect("config");
    std::fs::write(&mwan.config, text.replace("[[wan]]", "[[wan]]\nweight = 0")).expect("write");
    // The CLI cannot read the broken file either: SIGHUP, as systemctl does.
    let pid = mwan.pid().expect("running");
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let failed = wait_until(Duration::from_secs(5), || {
        scrape(&lab)["mwan_config_reloads_total{result=\"failure\"}"] == 1.0
    });
    assert!(failed, "the refused reload is counted:\n{}", mwan.log());
    let m = scrape(&lab);
    assert_eq!(m["mwan_config_reloads_total{result=\"success\"}"], 1.0);
}
