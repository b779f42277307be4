//! A stop signal for background threads that can also wake a `poll`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::sys;

/// One-shot stop signal: a flag plus an eventfd that stays readable once
/// fired, so every thread blocked in [`Stopper::wait_readable`] wakes.
pub(crate) struct Stopper {
    stopped: AtomicBool,
    event: OwnedFd,
}

/// Outcome of [`Stopper::wait_readable`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    Readable,
    Stopped,
    TimedOut,
}

impl Stopper {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Stopper {
            stopped: AtomicBool::new(false),
            event: sys::eventfd()?,
        })
    }

    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        sys::eventfd_signal(self.event.as_raw_fd());
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Waits until `fd` is readable, the stopper fires, or `timeout` (None =
    /// no limit) passes. A stop wins over readability.
    pub(crate) fn wait_readable(&self, fd: RawFd, timeout: Option<Duration>) -> io::Result<Wake> {
        Ok(match self.wait_any(&[fd], timeout)? {
            None => Wake::Stopped,
            Some(ready) if ready[0] => Wake::Readable,
            Some(_) => Wake::TimedOut,
        })
    }

    /// Waits until one of `fds` is readable, the stopper fires, or
    /// `timeout` passes: which of `fds` are readable (none: timed out), or
    /// `None` once stopped.
    pub(crate) fn wait_any(
        &self,
        fds: &[RawFd],
        timeout: Option<Duration>,
    ) -> io::Result<Option<Vec<bool>>> {
        if self.is_stopped() {
            return Ok(None);
        }
        let mut all = fds.to_vec();
        all.push(self.event.as_raw_fd());
        let mut ready = sys::poll_readable(&all, timeout)?;
        let stopped = ready.pop().unwrap_or(false);
        Ok((!stopped && !self.is_stopped()).then_some(ready))
    }
}
