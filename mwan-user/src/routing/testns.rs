//! Throwaway network namespaces for the integration tests of the kernel
//! plumbing (routing, nft, conntrack, sysctl).
//!
//! A [`TestNs`] is created with `ip netns add` under a unique name and
//! deleted on drop (also when the test panics), taking its interfaces,
//! routes, rules, nft tables, conntrack entries and sysctls with it. Code
//! under test runs on a thread that entered the namespace with `setns`, so
//! its netlink sockets, `/proc/sys/net` accesses and child processes (`nft`)
//! all act inside it; the root namespace is never touched.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct TestNs {
    pub name: String,
}

impl TestNs {
    /// A new namespace with `lo` up.
    pub fn new(tag: &str) -> TestNs {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("mwant-{tag}-{}-{n}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = TestNs { name };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n <ns> <args>` (split on whitespace); panics on failure.
    pub fn ip(&self, args: &str) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args.split_whitespace());
        run_ok(&mut cmd)
    }

    /// A command run inside the namespace (`ip netns exec`); panics on
    /// failure.
    pub fn exec(&self, argv: &[&str]) -> String {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
        )
    }

    /// Like [`exec`](Self::exec), returning the output whatever the status.
    pub fn exec_output(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("running ip netns exec")
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs the future made by `f` on a current-thread tokio runtime inside
    /// the namespace.
    pub fn block_on<F: Future>(&self, f: impl FnOnce() -> F + Send) -> F::Output
    where
        F::Output: Send,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a tokio runtime")
                .block_on(f())
        })
    }

    /// Moves the calling thread into the namespace and checks it got there.
    fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).expect("opening the namespace");
        // SAFETY: plain syscall on a valid descriptor; affects this thread only.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        let here = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        assert_eq!(
            here,
            file.metadata().unwrap().ino(),
            "setns did not enter {path}"
        );
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth pair between two namespaces: `a_if` in `a`, `b_if` in `b`, both up.
pub fn veth(a: &TestNs, a_if: &str, b: &TestNs, b_if: &str) {
    a.ip(&format!(
        "link add {a_if} type veth peer name {b_if} netns {}",
        b.name
    ));
    a.ip(&format!("link set {a_if} up"));
    b.ip(&format!("link set {b_if} up"));
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small Internet: `lan` (100.64.1.2) — `router` — two uplinks to
/// `server`, which stands for the Internet with the remote address
/// 192.0.2.10: wan1 (198.51.100.1, gateway .2) and wan2 (203.0.113.1,
/// gateway .2, the router's main default route). The router forwards; the
/// server drops packets whose source it reaches through its other link
/// (strict rp_filter), so a reply leaving through the wrong WAN is lost.
pub struct WanLab {
    pub lan: TestNs,
    pub router: TestNs,
    pub server: TestNs,
}

pub fn wan_lab(tag: &str) -> WanLab {
    let t = WanLab {
        lan: TestNs::new(&format!("{tag}-lan")),
        router: TestNs::new(&format!("{tag}-rtr")),
        server: TestNs::new(&format!("{tag}-srv")),
    };
    veth(&t.lan, "eth0", &t.router, "lan0");
    veth(&t.router, "wan1", &t.server, "s1");
    veth(&t.router, "wan2", &t.server, "s2");
    t.lan.ip("addr add 100.64.1.2/24 dev eth0");
    t.lan.ip("route add default via 100.64.1.1");
    t.router.ip("addr add 100.64.1.1/24 dev lan0");
    t.router.ip("addr add 198.51.100.1/24 dev wan1");
    t.router.ip("addr add 203.0.113.1/24 dev wan2");
    t.router.ip("route add default via 203.0.113.2");
    t.router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    t.server.ip("addr add 198.51.100.2/24 dev s1");
    t.server.ip("addr add 203.0.113.2/24 dev s2");
    t.server.ip("addr add 192.0.2.10/32 dev lo");
    t.server
        .exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"]);
    t
}

impl WanLab {
    /// Adds IPv6 to the lab (no DAD, so addresses are usable at once): the
    /// LAN fd00:1::/64 (host fd00:1::2, router fd00:1::1), wan1
    /// 2001:db8:1::/64 (router ::1, server ::2), wan2 2001:db8:2::/64
    /// (likewise; the router's main default route), the server's remote
    /// address 2001:db8:ff::10, and the router's "delegated" prefixes
    /// 2001:db8:a1::/64 (via wan1) and 2001:db8:a2::/64 (via wan2) routed
    /// to it by the server. The router forwards IPv6.
    pub fn with_ipv6(self) -> WanLab {
        let t = &self;
        t.lan.ip("addr add fd00:1::2/64 dev eth0 nodad");
        t.lan.ip("route add default via fd00:1::1");
        t.router.ip("addr add fd00:1::1/64 dev lan0 nodad");
        t.router.ip("addr add 2001:db8:1::1/64 dev wan1 nodad");
        t.router.ip("addr add 2001:db8:2::1/64 dev wan2 nodad");
        t.router.ip("-6 route add default via 2001:db8:2::2");
        t.router
            .exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        t.server.ip("addr add 2001:db8:1::2/64 dev s1 nodad");
        t.server.ip("addr add 2001:db8:2::2/64 dev s2 nodad");
        t.server.ip("addr add 2001:db8:ff::10/128 dev lo");
        t.server
            .ip("-6 route add 2001:db8:a1::/64 via 2001:db8:1::1");
        t.server
            .ip("-6 route add 2001:db8:a2::/64 via 2001:db8:2::1");
        self
    }
}
