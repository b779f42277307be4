//! The pool against a fake server on the loopback: what is accepted as an
//! answer, what is dropped, timeouts, ICMP errors and rotation.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::*;

const DEADLINE: Duration = Duration::from_secs(5);

fn settings() -> Settings {
    Settings {
        size: 4,
        uses: 256,
        age: Duration::from_secs(30),
        timeout: Duration::from_secs(5),
    }
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The server's answer to `q` as received (its ID, question and an A
/// record).
fn answer(q: &[u8]) -> Vec<u8> {
    let mut a = q.to_vec();
    a[2] |= 0x80;
    a[6..8].copy_from_slice(&1u16.to_be_bytes());
    a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 203, 0, 113, 5]);
    a
}

async fn server(ip: IpAddr) -> Option<UdpSocket> {
    UdpSocket::bind(SocketAddr::new(ip, 0)).await.ok()
}

/// The next query the server gets, and where from.
async fn next_query(server: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0; 1500];
    let (n, from) = tokio::time::timeout(DEADLINE, server.recv_from(&mut buf))
        .await
        .expect("a query in time")
        .unwrap();
    (buf[..n].to_vec(), from)
}

/// Asks through `pool` in a task of its own.
fn ask(
    pool: &Arc<Pool>,
    q: Vec<u8>,
    to: SocketAddr,
) -> tokio::task::JoinHandle<Result<Vec<u8>, Failure>> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.ask(&q, to).await })
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "{what}: not in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f).await.expect("in time")
}

/// The answer is handed back with the client's ID; the server saw the
/// query unchanged but for the ID. Over IPv4 and IPv6.
#[tokio::test]
async fn an_answer_is_returned_with_the_clients_id() {
    let pool = Arc::new(Pool::new(settings()));
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), Ipv6Addr::LOCALHOST.into()] {
        let Some(srv) = server(ip).await else {
            assert!(ip.is_ipv6(), "no IPv4 loopback");
            continue;
        };
        let q = query(0x1234, "www.gov.example");
        let job = ask(&pool, q.clone(), srv.local_addr().unwrap());
        let (sent, from) = next_query(&srv).await;
        assert_eq!(sent[2..], q[2..], "only the ID is rewritten");
        srv.send_to(&answer(&sent), from).await.unwrap();
        let got = within(job).await.unwrap().unwrap();
        let mut want = answer(&q);
        want[..2].copy_from_slice(&0x1234u16.to_be_bytes());
        assert_eq!(got, want);
    }
    assert_eq!(pool.waiting(), 0);
    assert_eq!(pool.dropped(), 0);
}

/// Datagrams with the wrong ID, from another port, or with another
/// question (even only in case) are dropped; the exchange waits on and
/// takes the real answer.
#[tokio::test]
async fn a_datagram_that_is_not_the_answer_is_dropped() {
    let pool = Arc::new(Pool::new(settings()));
    let srv = server(Ipv4Addr::LOCALHOST.into()).await.unwrap();
    let other = server(Ipv4Addr::LOCALHOST.into()).await.unwrap();
    let job = ask(
        &pool,
        query(7, "www.gov.example"),
        srv.local_addr().unwrap(),
    );
    let (sent, from) = next_query(&srv).await;
    let real = answer(&sent);

    let mut wrong_id = real.clone();
    wrong_id[1] ^= 1;
    srv.send_to(&wrong_id, from).await.unwrap();
    other.send_to(&real, from).await.unwrap();
    let mut sent_upper = sent.clone();
    sent_upper[13] = b'W';
    srv.send_to(&answer(&sent_upper), from).await.unwrap();
    let mut other_name = sent.clone();
    other_name[13..16].copy_from_slice(b"xyz");
    srv.send_to(&answer(&other_name), from).await.unwrap();
    srv.send_to(&real[..8], from).await.unwrap();
    until("five dropped", || pool.dropped() == 5).await;
    assert!(!job.is_finished(), "a wrong datagram ended the wait");

    srv.send_to(&real, from).await.unwrap();
    let got = within(job).await.unwrap().unwrap();
    assert_eq!(got[2..], real[2..]);
    assert_eq!(got[..2], [0, 7]);
}

/// Queries in flight to one server on one socket have distinct IDs, and
/// answers in any order go to their own queries.
#[tokio::test]
async fn pending_queries_have_distinct_ids_and_get_their_own_answers() {
    let pool = Arc::new(Pool::new(Settings {
        size: 1,
        ..settings()
    }));
    let srv = server(Ipv4Addr::LOCALHOST.into()).await.unwrap();
    let to = srv.local_addr().unwrap();
    let jobs: Vec<_> = (0..20u16)
        .map(|i| ask(&pool, query(100, &format!("n{i:02}.example")), to))
        .collect();
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(next_query(&srv).await);
    }
    let ids: std::collections::HashSet<_> = got.iter().map(|(q, _)| [q[0], q[1]]).collect();
    assert_eq!(ids.len(), 20, "IDs repeat");
    for (q, from) in got.iter().rev() {
        srv.send_to(&answer(q), from).await.unwrap();
    }
    for (i, job) in jobs.into_iter().enumerate() {
        let a = within(job).await.unwrap().unwrap();
        assert_eq!(a[..2], [0, 100]);
        assert_eq!(a[13..16], *format!("n{i:02}").as_bytes());
    }
}

/// No answer: a timeout, and the pending slot is free again.
#[tokio::test]
async fn a_timeout_frees_the_pending_slot() {
    let pool = Arc::new(Pool::new(Settings {
        timeout: Duration::from_millis(200),
        ..settings()
    }));
    let srv = server(Ipv4Addr::LOCALHOST.into()).await.unwrap();
    let job = ask(&pool, query(1, "a.example"), srv.local_addr().unwrap());
    let (sent, from) = next_query(&srv).await;
    assert_eq!(pool.waiting(), 1);
    assert!(matches!(within(job).await.unwrap(), Err(Failure::Timeout)));
    assert_eq!(pool.waiting(), 0);
    // A late answer is dropped.
    srv.send_to(&answer(&sent), from).await.unwrap();
    until("the late answer dropped", || pool.dropped() == 1).await;
}

/// Nobody serves there: the ICMP port unreachable fails the query at once.
#[tokio::test]
async fn a_port_nobody_serves_fails_the_query() {
    let pool = Arc::new(Pool::new(settings()));
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = closed.local_addr().unwrap();
    drop(closed);
    match within(pool.ask(&query(1, "a.example"), to)).await {
        Err(Failure::Unreachable(e)) => {
            assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(pool.waiting(), 0);
}

/// A socket that served its queries is replaced by one on another port;
/// the retired one still takes the answers it waits for, then ends.
#[tokio::test]
async fn rotation_replaces_a_socket_and_the_old_one_drains() {
    let pool = Arc::new(Pool::new(Settings {
        size: 1,
        uses: 2,
        ..settings()
    }));
    let srv = server(Ipv4Addr::LOCALHOST.into()).await.unwrap();
    let to = srv.local_addr().unwrap();
    let first = ask(&pool, query(1, "a.example"), to);
    let (q1, port1) = next_query(&srv).await;
    let second = ask(&pool, query(2, "b.example"), to);
    let (q2, port2) = next_query(&srv).await;
    assert_eq!(port1, port2, "one socket for its first two queries");
    // The third retires it: a fresh socket, while the first two wait.
    let third = ask(&pool, query(3, "c.example"), to);
    let (q3, port3) = next_query(&srv).await;
    assert_ne!(port3, port1, "not replaced");
    assert_eq!(pool.receivers(), 2);
    for (q, from) in [(&q3, port3), (&q1, port1), (&q2, port2)] {
        srv.send_to(&answer(q), from).await.unwrap();
    }
    for (job, id) in [(first, 1u8), (second, 2), (third, 3)] {
        assert_eq!(within(job).await.unwrap().unwrap()[..2], [0, id]);
    }
    until("the retired socket's task ended", || pool.receivers() == 1).await;
}

/// An old socket is retired too.
#[tokio::test]
async fn a_socket_past_its_age_is_replaced() {
    let pool = Arc::new(Pool::new(Settings {
        size: 1,
        age: Duration::from_millis(100),
        timeout: Duration::from_millis(50),
        ..settings()
    }));
    let srv = server(Ipv4Addr::LOCALHOST.into()).await.unwrap();
    let to = srv.local_addr().unwrap();
    let _ = pool.ask(&query(1, "a.example"), to).await;
    let (_, port1) = next_query(&srv).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _ = pool.ask(&query(2, "a.example"), to).await;
    let (_, port2) = next_query(&srv).await;
    assert_ne!(port1, port2);
}
