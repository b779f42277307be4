//! Builds the eBPF datapath (`../mwan-ebpf`) for `bpfel-unknown-none` and
//! places the object in `OUT_DIR`, where `src/datapath.rs` embeds it, so the
//! `mwan` binary is self-contained.
//!
//! Set `MWAN_EBPF_OBJ=/path/to/object` to embed a prebuilt object instead.

#[path = "build_support/bpf_toolchain.rs"]
#[allow(dead_code)]
mod bpf_toolchain;
#[path = "build_support/kfunc.rs"]
#[allow(dead_code)]
mod kfunc;

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let dest = out_dir.join("mwan.bpf.o");
    println!("cargo:rerun-if-env-changed=MWAN_EBPF_OBJ");
    if let Some(obj) = env::var_os("MWAN_EBPF_OBJ") {
        println!("cargo:rerun-if-changed={}", Path::new(&obj).display());
        std::fs::copy(&obj, &dest)
            .unwrap_or_else(|e| panic!("MWAN_EBPF_OBJ={}: {e}", Path::new(&obj).display()));
        mark_kfunc_calls(&dest);
        return;
    }
    let ebpf_dir = manifest_dir.join("../mwan-ebpf");
    let common_dir = manifest_dir.join("../mwan-common");
    for p in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
        manifest_dir.join("build_support"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let toolchain = match bpf_toolchain::find() {
        Ok(t) => t,
        Err(missing) => {
            eprintln!("error: cannot build the eBPF datapath: {missing}");
            std::process::exit(1);
        }
    };
    let target_dir = bpf_target_dir(&out_dir);
    let status = toolchain
        .build_command(&ebpf_dir, &target_dir)
        .status()
        .unwrap_or_else(|e| panic!("running cargo for the eBPF crate: {e}"));
    if !status.success() {
        eprintln!(
            "error: building the eBPF datapath failed ({status}) with {:?}",
            toolchain.route
        );
        std::process::exit(1);
    }
    let obj = bpf_toolchain::Toolchain::object_path(&target_dir);
    std::fs::copy(&obj, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", obj.display()));
    mark_kfunc_calls(&dest);
}

/// Turns the object's calls of kernel functions into kfunc calls (see
/// build_support/kfunc.rs).
fn mark_kfunc_calls(obj: &Path) {
    let mut bytes = std::fs::read(obj).unwrap_or_else(|e| panic!("reading {}: {e}", obj.display()));
    if let Err(e) = kfunc::mark_calls(&mut bytes) {
        eprintln!("error: marking the kfunc calls of {}: {e}", obj.display());
        std::process::exit(1);
    }
    std::fs::write(obj, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", obj.display()));
}

/// `<cargo target dir>/bpf`: shared by all profiles so the eBPF crate is built
/// once. The target dir is the nearest ancestor of OUT_DIR holding cargo's
/// CACHEDIR.TAG.
fn bpf_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(|d| d.join("bpf"))
        .unwrap_or_else(|| out_dir.join("bpf"))
}
