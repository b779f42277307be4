//! The relay over TCP: a connection of the relay's own to the server each
//! diverted connection was for, messages passed both ways as they come.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::sockets::original_dst;
use super::{question, Question, Shared, MAX_PENDING_TCP, UPSTREAM_TIMEOUT};
use crate::dns::learned::LearnedSink;
use crate::dns::{frame, Deframer};

/// A TCP connection idle this long (either side) is closed.
const TCP_IDLE: Duration = Duration::from_secs(30);
/// Pause after an error accepting (out of file descriptors, ...).
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts the diverted connections of `listener` until aborted.
pub(super) async fn accept<S: LearnedSink>(listener: TcpListener, shared: Arc<Shared<S>>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "DNS relay: accepting a TCP connection");
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        let admitted = shared
            .connections
            .lock()
            .expect("connections lock")
            .admit(peer.ip());
        if let Err(why) = admitted {
            warn!(%peer, ?why, "DNS relay: too many TCP connections, connection closed");
            continue;
        }
        let s = shared.clone();
        let spawned = shared.spawn(async move {
            if let Err(e) = relay(&s, client).await {
                debug!(%peer, error = %format!("{e:#}"), "DNS relay: TCP connection ended");
            }
            s.connections
                .lock()
                .expect("connections lock")
                .cancel(peer.ip());
        });
        if !spawned {
            return;
        }
    }
}

/// Relays one connection: queries from the client go to the server it
/// addressed as they come (pipelined, framed, [`Deframer`]); each answer is
/// learned from when it answers a pending query (ID and question), then
/// passed on. Either side closing or idling [`TCP_IDLE`] ends both.
async fn relay<S: LearnedSink>(shared: &Shared<S>, mut client: TcpStream) -> Result<()> {
    let server = original_dst(&client).context("reading the original destination")?;
    let mut upstream = tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(server))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {server}: no answer in time"))?
        .with_context(|| format!("connecting to {server}"))?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let pending: Mutex<HashMap<u16, Question>> = Mutex::default();
    let (mut c_read, mut c_write) = client.split();
    let (mut u_read, mut u_write) = upstream.split();
    let up = async {
        queries(&mut c_read, &mut u_write, &pending).await?;
        // The client is done asking: wait for the answers still to come.
        std::future::pending::<Result<()>>().await
    };
    let down = answers(shared, &mut u_read, &mut c_write, &pending);
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

/// Client to server: every message passed on, each query's question noted.
async fn queries(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    pending: &Mutex<HashMap<u16, Question>>,
) -> Result<()> {
    let mut d = Deframer::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = idle_read(from, &mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        d.push(&buf[..n]);
        while let Some(msg) = d.next_message() {
            if let Some(q) = question(msg) {
                let mut p = pending.lock().expect("pending lock");
                // Bounded: a client cannot make mwan hold more.
                if p.len() < MAX_PENDING_TCP {
                    p.insert(q.id, q);
                }
            }
            to.write_all(&frame(msg).expect("a deframed message fits"))
                .await?;
        }
    }
}

/// Server to client: each answer to a pending query learned from (written)
/// before it is passed on.
async fn answers<S: LearnedSink>(
    shared: &Shared<S>,
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    pending: &Mutex<HashMap<u16, Question>>,
) -> Result<()> {
    let mut d = Deframer::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = idle_read(from, &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        d.push(&buf[..n]);
        while let Some(msg) = d.next_message() {
            if msg.len() >= 2 {
                let id = u16::from_be_bytes([msg[0], msg[1]]);
                let q = pending.lock().expect("pending lock").remove(&id);
                if let Some(q) = q {
                    shared.learn(&q, msg);
                }
            }
            to.write_all(&frame(msg).expect("a deframed message fits"))
                .await?;
        }
    }
}

/// A read that fails after [`TCP_IDLE`] without data.
async fn idle_read(from: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> Result<usize> {
    match tokio::time::timeout(TCP_IDLE, from.read(buf)).await {
        Ok(r) => Ok(r?),
        Err(_) => anyhow::bail!("idle for {} s", TCP_IDLE.as_secs()),
    }
}
