//! The package on a fresh Debian under the real systemd (issue 22): a
//! container of this machine's release (`lab::container`, its own network
//! namespace with a LAN host and an ISP made inside it) installs the .deb
//! with apt, and mwan.service, with every setting of its sandbox (the
//! seccomp filters too), starts, probes and forwards; an upgrade hands
//! the running datapath to the new daemon; `apt remove` leaves the
//! network as it was and `apt purge` the file system.

use std::path::Path;
use std::time::Duration;

use lab::container::Container;
use lab::*;

/// What the container needs beyond a minimal Debian: an init, mwan's
/// dependencies, and bash for a TCP connection from the LAN host.
const PACKAGES: [&str; 6] = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "nftables",
    "iproute2",
    "bash",
];

/// A router with a LAN (a host in netns `lanhost`) and an ISP (netns
/// `isp`, whose loopback address answers probes), made inside the
/// container; and the bpffs systemd mounts at /sys/fs/bpf on a real
/// machine (a container has none: its /sys is a read-only copy).
const NETWORK: &str = "set -e
mount -o remount,rw /sys && mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf && mount -o remount,ro /sys
ip link set lo up
ip netns add isp
ip link add wan1 type veth peer name ispside netns isp
ip link set wan1 up && ip addr add 100.64.1.2/24 dev wan1
ip -n isp link set lo up && ip -n isp link set ispside up
ip -n isp addr add 100.64.1.1/24 dev ispside && ip -n isp addr add 198.51.100.1/32 dev lo
ip -n isp route add default via 100.64.1.2
ip netns add lanhost
ip link add lan0 type veth peer name host netns lanhost
ip link set lan0 up && ip addr add 192.0.2.1/24 dev lan0
ip -n lanhost link set lo up && ip -n lanhost link set host up
ip -n lanhost addr add 192.0.2.10/24 dev host && ip -n lanhost route add default via 192.0.2.1
cat > /etc/mwan/mwan.toml <<EOF
lan_interfaces = [\"lan0\"]
probe_targets = [\"198.51.100.1\"]

[[wan]]
name = \"isp1\"
interface = \"wan1\"
gateway = \"100.64.1.1\"
EOF
";

/// What mwan changes on the container's router: nftables, rules, routes,
/// tc, pins, the sysctls it sets.
/// (The kernel's own routes come and go with addresses: left out.)
const SNAPSHOT: &str = "nft list ruleset; ip rule show; ip -6 rule show; \
    ip route show table all | grep -v 'proto kernel'; \
    ip -6 route show table all | grep -v 'proto kernel'; \
    tc qdisc show dev lan0; tc filter show dev lan0 ingress; ls -R /sys/fs/bpf; \
    cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/fib_multipath_hash_policy";

mod diff {
    /// The lines of `a` not in `b` ("-") and of `b` not in `a` ("+").
    pub fn lines(a: &str, b: &str) -> Vec<String> {
        let only = |x: &str, y: &str, sign: char| -> Vec<String> {
            x.lines()
                .filter(|l| !y.lines().any(|m| m == *l))
                .map(|l| format!("{sign} {l}"))
                .collect()
        };
        let mut d = only(a, b, '-');
        d.extend(only(b, a, '+'));
        d
    }
}

fn wait_active(c: &Container) {
    let up = wait_until(Duration::from_secs(20), || {
        c.sh("mwan status >/dev/null")
            .is_ok_and(|o| o.status.success())
    });
    assert!(
        up,
        "mwan.service is not up:\n{}",
        c.ok("systemctl status mwan --no-pager; journalctl -u mwan --no-pager -n 30 || true")
    );
}

/// The daemon's main PID, as the container's systemd knows it.
fn main_pid(c: &Container) -> String {
    c.ok("systemctl show -p MainPID --value mwan")
        .trim()
        .to_string()
}

/// A TCP connection from the LAN host to the ISP's address, refused by it
/// (no server there): the refusal came back through mwan.
fn lan_connection(c: &Container) {
    let said = c
        .sh("ip netns exec lanhost timeout 3 bash -c 'echo > /dev/tcp/198.51.100.1/80'")
        .unwrap();
    let err = String::from_utf8_lossy(&said.stderr);
    assert!(
        err.contains("Connection refused"),
        "no answer through mwan: {err}"
    );
}

#[test]
fn a_fresh_debian_runs_the_package_from_its_unit() {
    let lab = Lab::builder().lan_hosts(1).isps(1).build().unwrap();
    let deb = lab::deb::build(&lab);
    let name = format!("{}", deb.file_name().unwrap().to_string_lossy());
    let inside = format!("/root/{name}");
    // Docker-like defaults drop CAP_BPF and CAP_PERFMON, which a real
    // machine's root has.
    let c = Container::boot(
        &lab,
        &format!("mwan-{}", std::process::id()),
        &PACKAGES,
        &[(&inside, Path::new(&deb))],
        &["CAP_BPF", "CAP_PERFMON"],
    )
    .unwrap();

    // apt installs it; nothing is enabled or started.
    let said = c.ok(&format!("apt-get install -y -q {inside} 2>&1"));
    assert!(said.contains("systemctl enable --now mwan"), "{said}");
    let state = c
        .sh("systemctl is-enabled mwan; systemctl is-active mwan")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&state.stdout),
        "disabled\ninactive\n"
    );

    // The admin describes the router and enables the unit.
    c.ok(NETWORK);
    let before = c.ok(SNAPSHOT);
    c.ok("mwan check && systemctl enable --now mwan");
    wait_active(&c);
    let during = c.ok(SNAPSHOT);
    assert!(
        during.contains("table inet mwan") && during.contains("FLOWS"),
        "{during}"
    );
    let pid = main_pid(&c);
    let status = c.ok(&format!(
        "grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/{pid}/status"
    ));
    // CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF, CAP_PERFMON; seccomp filter mode.
    assert!(status.contains("CapBnd:\t000000c000003000"), "{status}");
    assert!(
        status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"),
        "{status}"
    );
    let attached = c.ok("tc filter show dev lan0 ingress");
    assert!(attached.contains("bpf"), "{attached}");
    lan_connection(&c);

    // An upgrade (the same version again: prerm upgrade, postinst
    // configure VERSION) hands the running datapath to a new daemon.
    c.ok(&format!("dpkg -i {inside}"));
    wait_active(&c);
    let new_pid = main_pid(&c);
    assert_ne!(pid, new_pid, "the upgrade did not restart mwan");
    let log = c.ok("journalctl -u mwan --no-pager -o cat");
    assert!(
        log.contains("the datapath keeps forwarding")
            && log.contains("taking over the running datapath inherited=true"),
        "no handover in the log:\n{log}"
    );
    assert!(!log.contains("everything mwan added was removed"), "{log}");
    lan_connection(&c);

    // Removal stops the unit, which removes everything mwan added.
    c.ok("apt-get remove -y -q mwan");
    let state = c.sh("systemctl is-active mwan").unwrap();
    assert_eq!(String::from_utf8_lossy(&state.stdout), "inactive\n");
    let after = c.ok(SNAPSHOT);
    let changed: Vec<_> = diff::lines(&before, &after);
    assert!(changed.is_empty(), "apt remove left changes: {changed:#?}");
    assert!(
        c.root().join("etc/mwan/mwan.toml").exists(),
        "remove took the config"
    );

    c.ok("apt-get purge -y -q mwan");
    assert!(!c.root().join("etc/mwan").exists(), "purge left /etc/mwan");
    for dir in ["/run/mwan", "/var/lib/mwan"] {
        let left = c.sh(&format!("test -e {dir}")).unwrap();
        assert!(!left.status.success(), "purge left {dir}");
    }
}
