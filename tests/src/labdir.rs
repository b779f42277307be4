//! The lab's private directory: a bpffs mount for mwan's pins, a state
//! directory and the logs of spawned processes.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::ns::is_leftover;
use crate::sys;

/// Parent of every lab directory.
const ROOT: &str = "/run/mwan-lab";

/// `/run/mwan-lab/<lab name>/{bpf,state,logs}`; `bpf` is a private bpffs.
/// Unmounted and deleted on drop.
pub(crate) struct LabDir {
    root: PathBuf,
}

impl LabDir {
    pub(crate) fn create(name: &str) -> Result<LabDir> {
        let root = Path::new(ROOT).join(name);
        // Another lab may remove the shared parent, empty for a moment,
        // between the two mkdirs of create_dir_all: try again then.
        let mut tries = 0;
        while let Err(e) = fs::create_dir_all(&root) {
            tries += 1;
            if e.kind() != std::io::ErrorKind::NotFound || tries == 3 {
                return Err(e).with_context(|| format!("creating {}", root.display()));
            }
        }
        let dir = LabDir { root };
        for sub in ["bpf", "state", "logs"] {
            fs::create_dir(dir.root.join(sub))
                .with_context(|| format!("creating {sub} in {}", dir.root.display()))?;
        }
        sys::mount_bpffs(&dir.bpf())
            .with_context(|| format!("mounting bpffs on {}", dir.bpf().display()))?;
        Ok(dir)
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn bpf(&self) -> PathBuf {
        self.root.join("bpf")
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    pub(crate) fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
}

impl Drop for LabDir {
    fn drop(&mut self) {
        remove(&self.root);
        // The shared parent goes with the last lab (fails while others exist).
        let _ = fs::remove_dir(ROOT);
    }
}

/// Unmounts the bpffs of lab directory `root` (if mounted) and deletes it.
fn remove(root: &Path) {
    // Also peels off bpffs mounts a daemon may have stacked on top; fails
    // harmlessly once nothing is mounted there.
    for _ in 0..4 {
        if sys::unmount(&root.join("bpf")).is_err() {
            break;
        }
    }
    if let Err(e) = fs::remove_dir_all(root) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("lab: removing {}: {e}", root.display());
        }
    }
}

/// Removes the directories left behind by lab processes that died without
/// cleaning up.
pub(crate) fn sweep_leftovers() {
    let Ok(entries) = fs::read_dir(ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        if is_leftover(&entry.file_name().to_string_lossy()) {
            remove(&entry.path());
        }
    }
}
