//! Finding a toolchain that can build `mwan-ebpf` for `bpfel-unknown-none`.
//!
//! Shared by `mwan-user/build.rs` (which builds and embeds the object) and
//! `xtask` (which provisions a toolchain when none is found), so both agree on
//! what "a working toolchain" means.
//!
//! Two routes are recognised, tried in this order:
//! 1. Debian's `rustc-web` (`/usr/bin/rustc`) with `libstd-rust-web-dev-bpf`,
//!    which ships a prebuilt `core` for the BPF target. Built with
//!    `RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 cargo build --target bpfel-unknown-none`.
//! 2. A rustup nightly with the `rust-src` component, built with
//!    `cargo +nightly build -Z build-std=core`.
//!
//! Both need `bpf-linker` on `PATH` (or in `$CARGO_HOME/bin`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const BPF_TARGET: &str = "bpfel-unknown-none";
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub const DEBIAN_BPF_CORE_DIR: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";

/// Debian packages of route 1, and those `bpf-linker` needs to build.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
pub const LLVM_BIN_DIR: &str = "/usr/lib/llvm-22/bin";
pub const BPF_LINKER_INSTALL: &[&str] = &[
    "install",
    "bpf-linker",
    "--locked",
    "--no-default-features",
    "--features",
    "llvm-22",
];

#[derive(Debug, Clone)]
pub enum Route {
    /// Debian's rustc-web with a prebuilt BPF `core`.
    DebianRustcWeb,
    /// rustup nightly with rust-src (`-Z build-std=core`).
    NightlyBuildStd,
}

#[derive(Debug, Clone)]
pub struct Toolchain {
    pub route: Route,
    pub bpf_linker: PathBuf,
}

/// What is missing, for an error message.
#[derive(Debug, Default)]
pub struct Missing {
    pub bpf_linker: bool,
    pub compiler: bool,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.compiler {
            parts.push(format!(
                "a Rust compiler with a `core` for {BPF_TARGET} (Debian: apt-get install rustc-web libstd-rust-web-dev-bpf; \
                 elsewhere: rustup toolchain install nightly --component rust-src)"
            ));
        }
        if self.bpf_linker {
            parts.push(format!(
                "bpf-linker (Debian: apt-get install {}; PATH={LLVM_BIN_DIR}:$PATH cargo {})",
                DEBIAN_PACKAGES.join(" "),
                BPF_LINKER_INSTALL.join(" ")
            ));
        }
        write!(
            f,
            "missing {}. `cargo xtask build` installs them on Debian and Ubuntu",
            parts.join(" and ")
        )
    }
}

fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

pub fn find_bpf_linker() -> Option<PathBuf> {
    let on_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join("bpf-linker"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let p = cargo_home()?.join("bin").join("bpf-linker");
        p.is_file().then_some(p)
    })
}

fn debian_route_present() -> bool {
    Path::new(DEBIAN_RUSTC).is_file()
        && std::fs::read_dir(DEBIAN_BPF_CORE_DIR)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
            })
            .unwrap_or(false)
}

fn nightly_route_present() -> bool {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let sysroot = String::from_utf8_lossy(&o.stdout).trim().to_string();
            Path::new(&sysroot)
                .join("lib/rustlib/src/rust/library/core")
                .is_dir()
        }
        _ => false,
    }
}

pub fn find() -> Result<Toolchain, Missing> {
    let bpf_linker = find_bpf_linker();
    let route = if debian_route_present() {
        Some(Route::DebianRustcWeb)
    } else if nightly_route_present() {
        Some(Route::NightlyBuildStd)
    } else {
        None
    };
    match (route, bpf_linker) {
        (Some(route), Some(bpf_linker)) => Ok(Toolchain { route, bpf_linker }),
        (route, linker) => Err(Missing {
            compiler: route.is_none(),
            bpf_linker: linker.is_none(),
        }),
    }
}

impl Toolchain {
    /// A `cargo build` of the eBPF crate at `crate_dir` into `target_dir`,
    /// with an environment cleaned of the outer cargo's variables.
    pub fn build_command(&self, crate_dir: &Path, target_dir: &Path) -> Command {
        let mut cmd = match self.route {
            Route::DebianRustcWeb => {
                let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
                c.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
                c.arg("build");
                c
            }
            Route::NightlyBuildStd => {
                let mut c = Command::new("rustup");
                c.args(["run", "nightly", "cargo", "build", "-Z", "build-std=core"]);
                c
            }
        };
        for (k, _) in env::vars_os() {
            let k = k.to_string_lossy().to_string();
            let drop = (k.starts_with("CARGO") && k != "CARGO_HOME")
                || k.starts_with("RUSTC")
                || k.starts_with("RUSTDOC")
                || k == "RUSTFLAGS"
                || k == "RUSTUP_TOOLCHAIN";
            if drop {
                cmd.env_remove(&k);
            }
        }
        if let Route::DebianRustcWeb = self.route {
            cmd.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
        }
        // bpf-linker is found through PATH by rustc.
        let linker_dir = self.bpf_linker.parent().map(Path::to_path_buf);
        if let Some(dir) = linker_dir {
            let mut paths = vec![dir];
            if let Some(p) = env::var_os("PATH") {
                paths.extend(env::split_paths(&p));
            }
            cmd.env(
                "PATH",
                env::join_paths(paths).expect("PATH entries are valid"),
            );
        }
        cmd.current_dir(crate_dir)
            .args([
                "--release",
                "--locked",
                "--target",
                BPF_TARGET,
                "--target-dir",
            ])
            .arg(target_dir);
        cmd
    }

    /// Where `build_command` leaves the object.
    pub fn object_path(target_dir: &Path) -> PathBuf {
        target_dir.join(BPF_TARGET).join("release").join("mwan")
    }
}
