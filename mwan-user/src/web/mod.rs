//! The read-only web listener (`metrics_listen`): Prometheus metrics at
//! `/metrics`, a status page for a browser at `/`, and its JSON at
//! `/api/status` (the same as `mwan status --json`) and `/api/history`.
//!
//! The daemon publishes a [`Snapshot`] every second (and after every state
//! change) and appends a sample to the [`History`]; requests are answered
//! from those alone, on their own tasks, so a scrape never waits for the
//! daemon's loop and never reads the flow map. Nothing here changes state.
//!
//! A deliberately small HTTP/1.1 server: GET and HEAD only, one request per
//! connection, a request head of at most [`MAX_HEAD`] bytes read within
//! [`READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections at once (more
//! are refused at once). Malformed, huge or slow requests cost a bounded
//! amount of memory and one task each, never the forwarding or the probes.

pub mod history;
pub mod metrics;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::control::Status;
use crate::health::HealthStats;
use history::History;

/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 32;
/// The longest request head (request line and headers) read.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

const PAGE: &str = include_str!("page.html");

/// What the daemon publishes for the listener.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub status: Status,
    /// Parallel to `status.wans`.
    pub health: Vec<HealthStats>,
    /// When it was taken.
    pub taken: SystemTime,
    pub start_time: SystemTime,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub hook_runs: u64,
    pub hook_failures: u64,
    pub max_flows: u32,
}

struct Shared {
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    history: Mutex<History>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running listener; stops when dropped.
pub struct Web {
    shared: Arc<Shared>,
    task: AbortHandle,
    pub addr: SocketAddr,
}

impl Web {
    /// Listens on `addr` (within a tokio runtime). An address that is taken
    /// or not this host's is refused with an error that says so.
    pub async fn start(addr: SocketAddr) -> Result<Web> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            let why = match e.kind() {
                io::ErrorKind::AddrInUse => {
                    "the address is already in use (another mwan, or another program, listens there)"
                        .to_string()
                }
                io::ErrorKind::AddrNotAvailable => {
                    format!("no interface of this host has the address {}", addr.ip())
                }
                _ => e.to_string(),
            };
            anyhow!("metrics_listen = \"{addr}\": cannot listen: {why}")
        })?;
        let shared = Arc::new(Shared {
            snapshot: Mutex::new(None),
            history: Mutex::new(History::new(history::CAPACITY)),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone())).abort_handle();
        info!(address = %addr, "serving /metrics, the status page and its JSON API (read-only)");
        Ok(Web { shared, task, addr })
    }

    /// Replaces the snapshot the listener answers from; `sample` also
    /// appends it to the graphs' history (once a second).
    pub fn publish(&self, snap: Snapshot, sample: bool) {
        if sample {
            lock(&self.shared.history).record(snap.taken, &snap.status.wans);
        }
        *lock(&self.shared.snapshot) = Some(Arc::new(snap));
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, typically: wait rather than spin.
                warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Full: refuse at once instead of queueing behind slow clients.
            let _ = stream.try_write(&response(Reply::text(503, "too many connections\n"), false));
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = serve(stream, &shared).await;
        });
    }
}

/// Why a request head could not be read.
enum HeadError {
    TooLarge,
    Io(io::Error),
}

/// Reads up to the blank line that ends the request head.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

fn find_end(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = b.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn serve(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let (reply, head_only) = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await
    {
        Err(_) => (Reply::text(408, "request timeout\n"), false),
        Ok(Err(HeadError::TooLarge)) => (Reply::text(431, "request head too large\n"), false),
        Ok(Err(HeadError::Io(e))) => return Err(e),
        Ok(Ok(head)) => match parse_request(&head) {
            Ok(req) => (route(&req, shared), req.method == "HEAD"),
            Err(reply) => (reply, false),
        },
    };
    let bytes = response(reply, head_only);
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes)).await {
        Ok(r) => r?,
        Err(_) => return Err(io::ErrorKind::TimedOut.into()),
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.shutdown()).await;
    Ok(())
}

#[derive(Debug, PartialEq)]
struct Request {
    method: String,
    path: String,
    query: Option<String>,
}

/// The request line; headers are not needed (and not looked at).
fn parse_request(head: &[u8]) -> Result<Request, Reply> {
    let bad = |why: &str| Reply::text(400, &format!("bad request: {why}\n"));
    let text = std::str::from_utf8(head).map_err(|_| bad("not ASCII"))?;
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("the request line is not `METHOD TARGET HTTP/1.x`"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("only HTTP/1.x is spoken here"));
    }
    if !target.starts_with('/') {
        return Err(bad("the target must be a path"));
    }
    if method != "GET" && method != "HEAD" {
        let mut r = Reply::text(405, "read-only: GET and HEAD only\n");
        r.allow = true;
        return Err(r);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query,
    })
}

/// A response before it is written.
#[derive(Debug)]
struct Reply {
    code: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// The status page: a content security policy that allows nothing from
    /// elsewhere.
    html: bool,
    allow: bool,
}

impl Reply {
    fn new(code: u16, content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            code,
            content_type,
            body,
            html: false,
            allow: false,
        }
    }

    fn text(code: u16, body: &str) -> Reply {
        Reply::new(code, "text/plain; charset=utf-8", body.as_bytes().to_vec())
    }

    fn json(body: String) -> Reply {
        Reply::new(200, "application/json", body.into_bytes())
    }
}

fn route(req: &Request, shared: &Shared) -> Reply {
    if req.path == "/" {
        let mut r = Reply::new(200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec());
        r.html = true;
        return r;
    }
    if req.path == "/api/history" {
        let since = match query_param(req.query.as_deref(), "since") {
            None => None,
            Some(v) => match v.parse::<f64>() {
                Ok(s) if s.is_finite() => Some(s),
                _ => {
                    return Reply::text(400, "bad request: since must be a number (Unix seconds)\n")
                }
            },
        };
        let h = lock(&shared.history).json(since);
        return Reply::json(serde_json::to_string(&h).unwrap_or_default());
    }
    if req.path != "/metrics" && req.path != "/api/status" {
        return Reply::text(
            404,
            "not found: try /, /metrics, /api/status or /api/history\n",
        );
    }
    let Some(snap) = lock(&shared.snapshot).clone() else {
        return Reply::text(503, "starting\n");
    };
    if req.path == "/metrics" {
        Reply::new(
            200,
            metrics::CONTENT_TYPE,
            metrics::render(&snap).into_bytes(),
        )
    } else {
        let mut body = serde_json::to_string_pretty(&snap.status).unwrap_or_default();
        body.push('\n');
        Reply::json(body)
    }
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

fn response(r: Reply, head_only: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        r.code,
        reason(r.code),
        r.content_type,
        r.body.len()
    );
    if r.html {
        head += "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:\r\n";
    }
    if r.allow {
        head += "Allow: GET, HEAD\r\n";
    }
    head += "\r\n";
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(&r.body);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::health::{RoundReport, TargetResult};
    use std::collections::BTreeMap;
    use std::time::Instant;

    /// A snapshot of two WANs, isp1 down with some loss.
    pub(crate) fn snapshot() -> Snapshot {
        let mut w1 = history::tests_support::wan("isp1", "down", 100);
        w1.interface = "wan1".into();
        w1.loss_pct = 25.0;
        let mut w2 = history::tests_support::wan("isp2", "up", 100);
        w2.interface = "wan2".into();
        // isp2 carries IPv6, which is down while its IPv4 is up.
        w2.ipv6 = Some(crate::control::FamilyStatus {
            state: "down".into(),
            since: "2026-01-01T00:00:00Z".into(),
            since_secs: 3.0,
            judged_by: "ipv6".into(),
            alive: false,
            share: 0.0,
            address: Some("2001:db8:2::2/64".into()),
            gateway: Some("fe80::1".into()),
            rtt_ms: None,
            jitter_ms: None,
            loss_pct: 100.0,
            passive: Default::default(),
        });
        // isp2 is a metered line, its allowance used up.
        w2.usage = Some(crate::control::UsageStatus {
            cycle_start: "2026-03-01T00:00:00+01:00".into(),
            next_reset: "2026-04-01T00:00:00+02:00".into(),
            cycle_start_epoch: 1_772_319_600,
            next_reset_epoch: 1_774_994_400,
            rx_bytes: 4_000_000,
            tx_bytes: 200_000,
            bytes: 4_200_000,
            ipv4: crate::control::ByteCounts {
                rx_bytes: 3_900_000,
                tx_bytes: 150_000,
            },
            ipv6: crate::control::ByteCounts {
                rx_bytes: 100_000,
                tx_bytes: 50_000,
            },
            quota_bytes: Some(4_000_000),
            used_pct: Some(105.0),
            warn_pct: vec![75, 95],
            reached_pct: vec![75, 95, 100],
            action: Some("backup".into()),
            exhausted: true,
            held_back: true,
            effect: "used up: no new flows while another WAN is up; its connections stay".into(),
            previous_cycle: None,
        });
        let targets: Vec<crate::config::ProbeTarget> = vec![
            "198.51.100.1".parse().unwrap(),
            "198.51.100.2".parse().unwrap(),
        ];
        let mut h = HealthStats::new(&targets);
        for seq in 0..2 {
            h.on_round(&RoundReport {
                wan: 0,
                family: crate::config::Family::Ipv4,
                seq,
                sent_at: Instant::now(),
                success: true,
                update: false,
                burst: None,
                results: targets
                    .iter()
                    .map(|t| TargetResult {
                        target: t.clone(),
                        rtt: Some(Duration::from_millis(10)),
                        error: None,
                    })
                    .collect(),
            });
        }
        let mut counters = BTreeMap::new();
        counters.insert("repins".to_string(), 7);
        Snapshot {
            status: Status {
                version: "0.1.0".into(),
                pid: 1,
                config: "/etc/mwan/mwan.toml".into(),
                uptime_secs: 10.0,
                sticky: "connection".into(),
                all_down: false,
                all_down6: false,
                ha_role: None,
                wans: vec![w1, w2],
                flows_total: 3,
                flows_counted_secs_ago: Some(0.5),
                flow_capacity: 262_144,
                counters,
                events: Vec::new(),
                start: Default::default(),
                reloads: Default::default(),
                lans: Vec::new(),
                relay: None,
                ..Default::default()
            },
            health: vec![h.clone(), h],
            taken: SystemTime::now(),
            start_time: SystemTime::now(),
            reloads_ok: 1,
            reloads_failed: 0,
            hook_runs: 0,
            hook_failures: 0,
            max_flows: 1024,
        }
    }

    #[test]
    fn request_lines_are_parsed_strictly() {
        let r = parse_request(b"GET /api/history?since=12.5 HTTP/1.1\r\nHost: x").unwrap();
        assert_eq!(r.path, "/api/history");
        assert_eq!(query_param(r.query.as_deref(), "since"), Some("12.5"));
        assert_eq!(parse_request(b"POST / HTTP/1.1").unwrap_err().code, 405);
        assert_eq!(
            parse_request(b"DELETE /metrics HTTP/1.1").unwrap_err().code,
            405
        );
        for bad in [
            &b"GET /"[..],
            b"GET / HTTP/2",
            b"GET http://x/ HTTP/1.1",
            b"\xff\xfe",
            b"GET  / HTTP/1.1",
        ] {
            assert_eq!(parse_request(bad).unwrap_err().code, 400, "{bad:?}");
        }
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(20));
        assert_eq!(find_end(b"GET / HTTP/1.0\n\n"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.0\r\n"), None);
    }

    #[test]
    fn routes_answer_from_the_snapshot_only() {
        let shared = Shared {
            snapshot: Mutex::new(None),
            history: Mutex::new(History::new(10)),
        };
        let get = |path: &str| parse_request(format!("GET {path} HTTP/1.1").as_bytes()).unwrap();
        assert_eq!(route(&get("/metrics"), &shared).code, 503);
        assert_eq!(route(&get("/"), &shared).code, 200);
        *lock(&shared.snapshot) = Some(Arc::new(snapshot()));
        let m = route(&get("/metrics"), &shared);
        assert_eq!((m.code, m.content_type), (200, metrics::CONTENT_TYPE));
        let s = route(&get("/api/status"), &shared);
        let back: Status = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(back.wans[0].state, "down");
        assert_eq!(route(&get("/api/history?since=x"), &shared).code, 400);
        assert_eq!(route(&get("/api/history?since=1"), &shared).code, 200);
        assert_eq!(route(&get("/nope"), &shared).code, 404);
        let head = response(route(&get("/"), &shared), true);
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.ends_with("\r\n\r\n")
                && head.contains("Content-Security-Policy: default-src 'none'")
        );
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for needle in ["http://", "https://", "src=\"", "<link", "@import"] {
            assert!(!PAGE.contains(needle), "page.html contains {needle}");
        }
    }
}
