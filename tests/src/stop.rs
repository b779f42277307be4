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
        if self.is_stopped() {
            return Ok(Wake::Stopped);
        }
        let ready = sys::poll_readable(&[fd, self.event.as_raw_fd()], timeout)?;
        Ok(if ready[1] || self.is_stopped() {
            Wake::Stopped
        } else if ready[0] {
            Wake::Readable
        } else {
            Wake::TimedOut
        })
    }
}
