//! The Debian package of the mwan binary under test, built by `cargo xtask
//! deb` (the xtask binary: `$MWAN_XTASK`, which `cargo xtask test` sets).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::topology::Lab;

/// The xtask binary (`cargo xtask test` sets `MWAN_XTASK` to itself; a
/// relative path is from the workspace root), else the workspace's debug
/// build of it.
pub fn xtask() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(p) = std::env::var_os("MWAN_XTASK") {
        return root.join(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let p = target.join("debug/xtask");
    assert!(
        p.is_file(),
        "no xtask binary: run `cargo xtask test` (or set MWAN_XTASK)"
    );
    p
}

/// `cargo xtask deb` of the binary under test, into the lab directory.
pub fn build(lab: &Lab) -> PathBuf {
    let out_dir = lab.dir().join("deb");
    let bin = crate::mwan::binary();
    let build = Command::new(xtask())
        .args(["deb", "--no-lintian", "--bin"])
        .arg(&bin)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "cargo xtask deb: {}{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    let name = debs[0].file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with(&format!("mwan_{}_", env!("CARGO_PKG_VERSION"))),
        "{name}"
    );
    debs[0].clone()
}
