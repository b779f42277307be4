//! mwan.service's sandbox, applied by hand: there is no systemd PID 1 in
//! the lab, so a test starts mwan with the unit's own settings read from
//! the unit file and applied the way systemd applies them.
//!
//! Applied: `CapabilityBoundingSet` (mwan runs as root, so the bounding set
//! is what it gets, as under systemd) and `NoNewPrivileges` with `setpriv`;
//! in a private mount namespace (`unshare`): `ProtectSystem=strict` (every
//! mount read-only but /dev, /proc and /sys), `ReadOnlyPaths`,
//! `ReadWritePaths`, `RuntimeDirectory`, `StateDirectory`, `PrivateTmp`, `PrivateDevices`,
//! `ProtectHome`, and `ProtectKernelTunables` as systemd 252 does it
//! (/proc/sys and /sys read-only, including a mount under /sys that
//! `ReadWritePaths` names, such as /sys/fs/bpf). Not applied: the seccomp
//! filters (`SystemCallFilter`, `RestrictAddressFamilies`,
//! `MemoryDenyWriteExecute`...), which need systemd itself: the container
//! test in tests/tests/package.rs runs the unit under a real systemd.
//!
//! A lab's daemon keeps its pins and state in the lab's directories, not in
//! /sys/fs/bpf and /run/mwan: [`UnitSandbox::wrapper`] is told where each
//! of the unit's paths is in the lab.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The sandbox settings of a unit's `[Service]` section.
#[derive(Clone, Debug, Default)]
pub struct UnitSandbox {
    /// `CapabilityBoundingSet`, lower case without `CAP_` (setpriv's names).
    pub caps: Vec<String>,
    pub no_new_privileges: bool,
    pub protect_system_strict: bool,
    pub protect_kernel_tunables: bool,
    /// `ReadOnlyPaths` (a leading `-`: ignored when missing).
    pub read_only_paths: Vec<PathBuf>,
    pub read_write_paths: Vec<PathBuf>,
    /// `RuntimeDirectory` and `StateDirectory`, as paths under /run and
    /// /var/lib.
    pub runtime_dirs: Vec<PathBuf>,
    pub private_tmp: bool,
    pub private_devices: bool,
    pub protect_home: bool,
}

fn yes(v: &str) -> bool {
    matches!(v, "yes" | "true" | "on" | "1")
}

impl UnitSandbox {
    /// Reads the settings from the unit file's text.
    pub fn parse(unit: &str) -> Result<UnitSandbox> {
        let mut s = UnitSandbox::default();
        let mut section = "";
        for line in unit.lines().map(str::trim) {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[') {
                section = name.trim_end_matches(']');
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if section != "Service" {
                continue;
            }
            let words = || value.split_whitespace().map(str::to_string);
            match key {
                "CapabilityBoundingSet" => {
                    for cap in words() {
                        let Some(name) = cap.strip_prefix("CAP_") else {
                            bail!("CapabilityBoundingSet: `{cap}` is not a capability");
                        };
                        s.caps.push(name.to_lowercase());
                    }
                }
                "AmbientCapabilities" if !value.is_empty() => {
                    // Root needs none; a unit with some would be another
                    // design, which this model does not cover.
                    bail!("AmbientCapabilities is not modelled");
                }
                "User" | "DynamicUser" if !value.is_empty() && value != "root" && value != "no" => {
                    bail!("{key}={value} is not modelled: mwan runs as root");
                }
                "NoNewPrivileges" => s.no_new_privileges = yes(value),
                "ProtectSystem" => s.protect_system_strict = value == "strict",
                "ProtectKernelTunables" => s.protect_kernel_tunables = yes(value),
                "ReadOnlyPaths" => s.read_only_paths.extend(words().map(PathBuf::from)),
                "ReadWritePaths" => s.read_write_paths.extend(words().map(PathBuf::from)),
                "RuntimeDirectory" => {
                    s.runtime_dirs
                        .extend(words().map(|d| Path::new("/run").join(d)));
                }
                "StateDirectory" => {
                    s.runtime_dirs
                        .extend(words().map(|d| Path::new("/var/lib").join(d)));
                }
                "PrivateTmp" => s.private_tmp = yes(value),
                "PrivateDevices" => s.private_devices = yes(value),
                "ProtectHome" => s.protect_home = yes(value),
                _ => {}
            }
        }
        if s.caps.is_empty() {
            bail!("the unit sets no CapabilityBoundingSet");
        }
        Ok(s)
    }

    /// The same sandbox without capability `cap` (setpriv's name).
    pub fn without_cap(&self, cap: &str) -> UnitSandbox {
        let mut s = self.clone();
        s.caps.retain(|c| c != cap);
        s
    }

    /// The argv that runs a command (appended to it) in this sandbox;
    /// `lab_path` says where each of the unit's writable paths is in the
    /// lab (a path it returns unchanged is used as it is).
    pub fn wrapper(&self, lab_path: &dyn Fn(&Path) -> PathBuf) -> Vec<String> {
        let mut script = vec!["set -e".to_string()];
        let mounts = "$(awk '{print $5}' /proc/self/mountinfo | sort -u)";
        if self.protect_system_strict {
            script.push(format!(
                "for m in {mounts}; do case $m in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*) ;; \
                 *) mount -n -o remount,bind,ro \"$m\" ;; esac; done"
            ));
        }
        if self.protect_kernel_tunables {
            script.push("mount -n --bind /proc/sys /proc/sys".into());
            script.push(format!(
                "for m in /proc/sys {mounts}; do case $m in /proc/sys|/sys|/sys/*) \
                 mount -n -o remount,bind,ro \"$m\" ;; esac; done"
            ));
        }
        for p in &self.read_only_paths {
            let (optional, p) = match p.to_str().and_then(|s| s.strip_prefix('-')) {
                Some(rest) => (true, PathBuf::from(rest)),
                None => (false, p.clone()),
            };
            let ro = format!(
                "mount -n --bind '{0}' '{0}' && mount -n -o remount,bind,ro '{0}'",
                p.display()
            );
            script.push(if optional {
                format!("if [ -e '{}' ]; then {ro}; fi", p.display())
            } else {
                ro
            });
        }
        if self.private_tmp {
            script.push("mount -n -t tmpfs -o mode=1777 tmpfs /tmp".into());
            script.push("mount -n -t tmpfs -o mode=1777 tmpfs /var/tmp".into());
        }
        if self.protect_home {
            script.push(
                "for d in /home /root /run/user; do [ -d $d ] && mount -n -t tmpfs -o ro,mode=000 tmpfs $d; done; true"
                    .into(),
            );
        }
        if self.private_devices {
            // Only the pseudo devices, as systemd's private /dev has.
            script.push(
                "d=$(mktemp -d) && mount -n -t tmpfs -o mode=755 tmpfs $d && \
                 for n in null zero full random urandom tty; do touch $d/$n && mount -n --bind /dev/$n $d/$n; done && \
                 mount -n --move $d /dev"
                    .into(),
            );
        }
        for unit_path in self.read_write_paths.iter().chain(&self.runtime_dirs) {
            let p = lab_path(unit_path);
            script.push(format!(
                "mount -n --bind '{0}' '{0}' && mount -n -o remount,bind,rw '{0}'",
                p.display()
            ));
            // systemd 252 leaves a mount under /sys read-only with
            // ProtectKernelTunables, whatever ReadWritePaths says.
            if self.protect_kernel_tunables && unit_path.starts_with("/sys") {
                script.push(format!("mount -n -o remount,bind,ro '{}'", p.display()));
            }
        }
        let caps: String = self.caps.iter().map(|c| format!(",+{c}")).collect();
        let nnp = if self.no_new_privileges {
            "--no-new-privs "
        } else {
            ""
        };
        script.push(format!(
            "exec setpriv {nnp}--inh-caps=-all --bounding-set=-all{caps} -- \"$@\""
        ));
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script.join("\n"),
            "mwan-sandbox",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_packaged_unit() {
        let unit = include_str!("../../mwan-user/packaging/mwan.service");
        let s = UnitSandbox::parse(unit).unwrap();
        assert!(s.caps.contains(&"net_admin".to_string()), "{s:?}");
        assert!(s.no_new_privileges && s.protect_system_strict);
        assert!(
            s.read_only_paths.contains(&PathBuf::from("/proc/sys")),
            "{s:?}"
        );
        assert_eq!(
            s.runtime_dirs,
            [PathBuf::from("/run/mwan"), PathBuf::from("/var/lib/mwan")]
        );
        assert!(s.read_write_paths.contains(&PathBuf::from("/proc/sys/net")));
        let w = s.without_cap("net_admin").wrapper(&|p| p.to_path_buf());
        assert!(!w.join(" ").contains("+net_admin"), "{w:?}");
    }
}
