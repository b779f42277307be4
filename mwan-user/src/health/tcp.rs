//! TCP connect probes.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::TcpSocket;

use super::outcome::{Outcome, NO_ANSWER};

/// Connects to `addr` with `mark` through `interface` only. Success is a
/// connection or an active refusal (RST): both prove the path works. The
/// RTT is the time from sending the SYN to its answer.
pub async fn probe(interface: &str, mark: u32, addr: SocketAddr, deadline: Instant) -> Outcome {
    let sock = socket(interface, mark, addr.is_ipv6())
        .map_err(|e| format!("tcp socket on {interface}: {e}"))?;
    let start = Instant::now();
    let connected = tokio::time::timeout_at(deadline.into(), sock.connect(addr)).await;
    let rtt = start.elapsed();
    match connected {
        Err(_) => Err(NO_ANSWER.to_string()),
        Ok(Ok(_)) => Ok(rtt),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(rtt),
        Ok(Err(e)) => Err(format!("connect: {e}")),
    }
}

fn socket(interface: &str, mark: u32, v6: bool) -> io::Result<TcpSocket> {
    let sock = if v6 {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    let s = SockRef::from(&sock);
    s.set_mark(mark)?;
    s.bind_device(Some(interface.as_bytes()))?;
    // Close with a reset: no TIME_WAIT left behind by every probe.
    s.set_linger(Some(Duration::ZERO))?;
    Ok(sock)
}
