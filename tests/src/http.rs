//! A minimal HTTP/1.0 client for the tests: mwan's metrics listener and
//! Prometheus' API, reached from inside a namespace. Every step is bounded
//! by a timeout, and so is the whole exchange.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ns::Netns;

/// Bound of one whole request and response.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response read.
const MAX_RESPONSE: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value (name compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as it is and reads the response until the server
/// closes the connection (HTTP/1.0 style). Call it in the namespace of
/// `addr` (see [`Netns::http_get`]).
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> Result<HttpResponse> {
    let deadline = Instant::now() + HTTP_TIMEOUT;
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    s.write_all(request)
        .with_context(|| format!("sending to {addr}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{addr}: no complete response within {HTTP_TIMEOUT:?}");
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A server that closes with unread request data resets.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => return Err(e).with_context(|| format!("reading from {addr}")),
        }
        if raw.len() > MAX_RESPONSE {
            bail!("{addr}: response larger than {MAX_RESPONSE} bytes");
        }
    }
    parse(&raw).with_context(|| format!("response of {addr}"))
}

fn parse(raw: &[u8]) -> Result<HttpResponse> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!(
            "no complete head in {} bytes: {:?}",
            raw.len(),
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        );
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// `GET path` (already percent-encoded) from `addr`.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: mwan-tests\r\n\r\n").as_bytes(),
    )
}

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Netns {
    /// [`http_get`] from inside this namespace.
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
        self.run(|| http_get(addr, path))
    }

    /// [`http_raw`] from inside this namespace.
    pub fn http_raw(&self, addr: SocketAddr, request: &[u8]) -> Result<HttpResponse> {
        self.run(|| http_raw(addr, request))
    }
}
