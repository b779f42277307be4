//! `cargo xtask demo` and `cargo xtask bench` (see issue 6).
use std::path::Path;

use anyhow::{bail, Result};

pub fn demo(_root: &Path, _bin: &Path, _args: &[String]) -> Result<()> {
    bail!("the demo is not written yet")
}

pub fn bench(_root: &Path, _bin: &Path, _args: &[String]) -> Result<()> {
    bail!("the benchmarks are not written yet")
}
