//! What every namespace of one lab shares: its name, log directory and the
//! registry of background work that must end when the lab is dropped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use anyhow::Result;

use crate::lock;
use crate::proc::ProcInner;
use crate::stop::Stopper;

pub(crate) struct LabCtx {
    pub(crate) name: String,
    /// How the router's main table is set up for the WANs.
    pub(crate) kind: crate::topology::RouterKind,
    /// IPv6 on (see [`crate::LabBuilder::dual_stack`]).
    pub(crate) dual_stack: bool,
    pub(crate) log_dir: PathBuf,
    procs: Mutex<Vec<Arc<ProcInner>>>,
    stoppers: Mutex<Vec<Weak<Stopper>>>,
    seq: AtomicU32,
}

impl LabCtx {
    pub(crate) fn new(
        name: String,
        kind: crate::topology::RouterKind,
        dual_stack: bool,
        log_dir: PathBuf,
    ) -> Self {
        LabCtx {
            name,
            kind,
            dual_stack,
            log_dir,
            procs: Mutex::new(Vec::new()),
            stoppers: Mutex::new(Vec::new()),
            seq: AtomicU32::new(0),
        }
    }

    /// A number unique within this lab (log file names and the like).
    pub(crate) fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// A new stopper that also fires when the lab shuts down.
    pub(crate) fn stopper(&self) -> Result<Arc<Stopper>> {
        let stopper = Arc::new(Stopper::new()?);
        let mut all = lock(&self.stoppers);
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&stopper));
        Ok(stopper)
    }

    pub(crate) fn register_proc(&self, proc: Arc<ProcInner>) {
        let mut all = lock(&self.procs);
        all.retain(|p| p.is_running());
        all.push(proc);
    }

    /// Fires every stopper and ends every process of the lab.
    pub(crate) fn shutdown(&self) {
        for stopper in lock(&self.stoppers).drain(..) {
            if let Some(s) = stopper.upgrade() {
                s.stop();
            }
        }
        for proc in lock(&self.procs).drain(..) {
            proc.terminate();
        }
    }
}
