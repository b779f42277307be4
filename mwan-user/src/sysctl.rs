//! The kernel settings mwan needs, set through `/proc/sys` with the
//! original values recorded so they can be restored.
//!
//! Keys are written as for sysctl(8): `net.ipv4.ip_forward`, or with
//! slashes when a component contains a dot, as an interface name may
//! (`net/ipv4/conf/eth0.10/rp_filter`); [`key`] builds either from parts.
//! `/proc/sys/net` shows the network namespace of the calling thread.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The original values of the keys mwan changed, by canonical key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedSysctls {
    pub values: BTreeMap<String, String>,
}

/// The key of `parts` in canonical form: dotted, or with slashes if a part
/// contains a dot.
pub fn key(parts: &[&str]) -> String {
    match parts.iter().any(|p| p.contains('.')) {
        true => parts.join("/"),
        false => parts.join("."),
    }
}

/// The key of a per-interface IPv4 setting, `net.ipv4.conf.<iface>.<name>`.
pub fn iface_key(iface: &str, name: &str) -> String {
    key(&["net", "ipv4", "conf", iface, name])
}

/// The key of a per-interface IPv6 setting, `net.ipv6.conf.<iface>.<name>`.
pub fn iface_key6(iface: &str, name: &str) -> String {
    key(&["net", "ipv6", "conf", iface, name])
}

fn parts(key: &str) -> Result<Vec<&str>> {
    let parts: Vec<&str> = key
        .split(if key.contains('/') { '/' } else { '.' })
        .collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        bail!("`{key}` is not a sysctl key");
    }
    Ok(parts)
}

fn canonical(k: &str) -> Result<String> {
    Ok(key(&parts(k)?))
}

/// The file of a key under `/proc/sys`.
pub fn path(key: &str) -> Result<PathBuf> {
    Ok(parts(key)?
        .iter()
        .fold(PathBuf::from("/proc/sys"), |p, part| p.join(part)))
}

pub fn read(key: &str) -> Result<String> {
    let path = path(key)?;
    match std::fs::read_to_string(&path) {
        Ok(v) => Ok(v.trim().to_string()),
        Err(e) => bail!("reading sysctl {key} ({}): {e}", path.display()),
    }
}

fn write(key: &str, value: &str) -> io::Result<()> {
    let path = path(key).map_err(io::Error::other)?;
    std::fs::write(path, value)
}

/// Sets `key` to `value` and records its original value, the first time
/// only. A key that already has the value is left alone and not recorded.
pub fn set(saved: &mut SavedSysctls, key: &str, value: &str) -> Result<()> {
    let key = canonical(key)?;
    let current = read(&key)?;
    if current.split_whitespace().eq(value.split_whitespace()) {
        return Ok(());
    }
    if let Err(e) = write(&key, value) {
        bail!("setting sysctl {key}={value}: {e}");
    }
    saved.values.entry(key).or_insert(current);
    Ok(())
}

/// Writes the recorded values back, as far as possible; returns the
/// failures. Keys of interfaces that have disappeared are skipped.
pub fn restore(saved: &SavedSysctls) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    for (key, value) in &saved.values {
        match write(key, value) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!("not restoring sysctl {key}: it no longer exists")
            }
            Err(e) => errors.push(anyhow::anyhow!("restoring sysctl {key}={value}: {e}")),
            Ok(()) => {}
        }
    }
    errors
}

/// What mwan needs:
///
/// * `net.ipv4.ip_forward = 1`: the host routes the LAN's traffic;
/// * `net.ipv4.fib_multipath_hash_policy = 1`: the balance route hashes on
///   ports (L4), so the router's own connections spread over the WANs;
/// * `rp_filter = 2` (loose) on each WAN: replies to connections that left
///   through another WAN's route, and traffic to a WAN whose address the
///   main table would route elsewhere, must not be dropped. The kernel uses
///   the maximum of `conf.all` and the interface's value, so 2 on the WAN is
///   enough even when `all` is 1 (strict): `all`, and with it strict
///   filtering on the LAN side, is left alone.
/// * `src_valid_mark = 1` on each WAN: the reverse-path check of a packet
///   arriving from a WAN looks the route back up with the packet's mark,
///   which nftables restored from the connection's ct mark, so it finds
///   the WAN's own table. Without it the check uses the main table, and a
///   router with no main-table default route (static uplinks, the default
///   route left to the balancer) drops every reply to a forwarded
///   connection: even a loose check needs some route back. The kernel ORs
///   `conf.all` with the interface's value.
///
/// A WAN interface that does not exist yet (PPP) gets its settings when it
/// appears.
pub fn router_settings(wan_ifaces: &[String]) -> Vec<(String, String)> {
    let mut out = vec![
        ("net.ipv4.ip_forward".to_string(), "1".to_string()),
        (
            "net.ipv4.fib_multipath_hash_policy".to_string(),
            "1".to_string(),
        ),
    ];
    for i in wan_ifaces {
        for (name, value) in WAN_IFACE_SETTINGS {
            out.push((iface_key(i, name), value.to_string()));
        }
    }
    out
}

/// What mwan needs for the WANs with IPv6 (`ipv6_ifaces`; none: nothing):
///
/// * `net.ipv6.fib_multipath_hash_policy = 1`: the IPv6 balance route
///   hashes on ports too;
/// * `accept_ra = 2` on each WAN of `ra_ifaces` (`gateway6 = "auto"`): a
///   forwarding host ignores Router Advertisements unless it is 2, and the
///   RA's router is the WAN's gateway (and its prefix the WAN's address).
///
/// IPv6 forwarding itself (`net.ipv6.conf.all.forwarding`) is left to the
/// admin: turning it on changes how every interface treats RAs, which is
/// theirs to decide; see [`ipv6_forwarding`].
pub fn ipv6_settings(ipv6_ifaces: &[String], ra_ifaces: &[String]) -> Vec<(String, String)> {
    if ipv6_ifaces.is_empty() {
        return Vec::new();
    }
    let mut out = vec![(
        "net.ipv6.fib_multipath_hash_policy".to_string(),
        "1".to_string(),
    )];
    for i in ra_ifaces {
        out.push((iface_key6(i, "accept_ra"), "2".to_string()));
    }
    out
}

/// Whether the host forwards IPv6 (`net.ipv6.conf.all.forwarding`).
pub fn ipv6_forwarding() -> Result<bool> {
    Ok(read("net.ipv6.conf.all.forwarding")? != "0")
}

/// The per-interface settings of every WAN (see [`router_settings`]).
pub const WAN_IFACE_SETTINGS: [(&str, &str); 2] = [("rp_filter", "2"), ("src_valid_mark", "1")];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::testns::TestNs;

    #[test]
    fn keys_and_paths() {
        assert_eq!(
            path("net.ipv4.ip_forward").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        let dotted = ["net", "ipv4", "conf", "eth0.10", "rp_filter"];
        assert_eq!(key(&dotted), "net/ipv4/conf/eth0.10/rp_filter");
        assert_eq!(
            path(&key(&dotted)).unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.10/rp_filter")
        );
        assert_eq!(
            iface_key("wan1", "rp_filter"),
            "net.ipv4.conf.wan1.rp_filter"
        );
        assert_eq!(
            canonical("net/ipv4/ip_forward").unwrap(),
            "net.ipv4.ip_forward"
        );
        for bad in ["", "net..ipv4", "net/../../etc/passwd", "net/ipv4/"] {
            assert!(path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn router_settings_list() {
        let s = router_settings(&["wan1".into(), "eth0.10".into()]);
        let s: Vec<(&str, &str)> = s.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            s,
            [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.fib_multipath_hash_policy", "1"),
                ("net.ipv4.conf.wan1.rp_filter", "2"),
                ("net.ipv4.conf.wan1.src_valid_mark", "1"),
                ("net/ipv4/conf/eth0.10/rp_filter", "2"),
                ("net/ipv4/conf/eth0.10/src_valid_mark", "1"),
            ]
        );
    }

    #[test]
    fn ipv6_settings_list() {
        assert!(ipv6_settings(&[], &[]).is_empty());
        let s = ipv6_settings(&["wan1".into(), "eth0.10".into()], &["eth0.10".into()]);
        let s: Vec<(&str, &str)> = s.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            s,
            [
                ("net.ipv6.fib_multipath_hash_policy", "1"),
                ("net/ipv6/conf/eth0.10/accept_ra", "2"),
            ]
        );
    }

    /// accept_ra is set in the namespace and restored, like the IPv4 keys.
    #[test]
    fn accept_ra_is_set_and_restored() {
        let ns = TestNs::new("sysctl6");
        ns.ip("link add w0 type veth peer name p0");
        let k = iface_key6("w0", "accept_ra");
        let saved = ns.run(|| {
            assert!(!ipv6_forwarding().unwrap());
            let before = read(&k).unwrap();
            assert_ne!(before, "2");
            let mut saved = SavedSysctls::default();
            for (k, v) in ipv6_settings(&["w0".into()], &["w0".into()]) {
                set(&mut saved, &k, &v).unwrap();
            }
            assert_eq!(read(&k).unwrap(), "2");
            assert_eq!(saved.values.get(&k), Some(&before));
            assert!(restore(&saved).is_empty());
            assert_eq!(read(&k).unwrap(), before);
            saved
        });
        assert_eq!(saved.values.len(), 2, "{saved:?}");
    }

    #[test]
    fn set_and_restore_in_a_namespace() {
        let root_forward = read("net.ipv4.ip_forward").unwrap();
        let ns = TestNs::new("sysctl");
        ns.ip("link add eth0.10 type veth peer name p0");
        let shown = |k: &str| {
            ns.exec(&["cat", path(k).unwrap().to_str().unwrap()])
                .trim()
                .to_string()
        };
        let rp = iface_key("eth0.10", "rp_filter");
        let saved = ns.run(|| {
            let mut saved = SavedSysctls::default();
            let forward = read("net.ipv4.ip_forward").unwrap();
            let rp_before = read(&rp).unwrap();
            assert_ne!(rp_before, "2");
            for (k, v) in router_settings(&["eth0.10".into()]) {
                set(&mut saved, &k, &v).unwrap();
            }
            // Already set: nothing more recorded; set again: original kept.
            set(&mut saved, "net/ipv4/ip_forward", "1").unwrap();
            set(&mut saved, &rp, "1").unwrap();
            assert_eq!(saved.values.get("net.ipv4.ip_forward"), Some(&forward));
            assert_eq!(saved.values.get(&rp), Some(&rp_before));
            assert_eq!(read(&rp).unwrap(), "1");
            let e = set(&mut saved, "net.ipv4.no_such_setting", "1").unwrap_err();
            assert!(e.to_string().contains("net.ipv4.no_such_setting"), "{e}");
            saved
        });
        // The namespace changed, the root namespace did not.
        assert_eq!(shown("net.ipv4.ip_forward"), "1");
        assert_eq!(shown(&rp), "1");
        assert_eq!(read("net.ipv4.ip_forward").unwrap(), root_forward);

        let json = serde_json::to_string(&saved).unwrap();
        let saved: SavedSysctls = serde_json::from_str(&json).unwrap();
        ns.run(|| assert!(restore(&saved).is_empty()));
        assert_eq!(
            shown("net.ipv4.ip_forward"),
            saved.values["net.ipv4.ip_forward"]
        );
        assert_eq!(shown(&rp), saved.values[&rp]);
        // An interface that went away is no failure.
        ns.ip("link del eth0.10");
        ns.run(|| assert!(restore(&saved).is_empty()));
    }
}
