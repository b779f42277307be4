//! Helpers shared by mwan's netlink clients (rtnetlink in `routing`,
//! ctnetlink in `conntrack`): socket sizing and error wording. Depends on
//! nothing else in mwan.

use std::fmt;
use std::io;
use std::os::fd::RawFd;

use anyhow::anyhow;

/// Sets a socket's receive buffer, beyond `rmem_max` when allowed
/// (`SO_RCVBUFFORCE` needs CAP_NET_ADMIN).
pub fn force_rcvbuf(fd: RawFd, bytes: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |opt| {
        // SAFETY: `size` outlives the call and its length is passed.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SO_RCVBUFFORCE).or_else(|_| set(libc::SO_RCVBUF))
}

/// "<op>: <strerror>", e.g. "adding rule 1010 …: Operation not permitted".
pub fn op_error(op: impl fmt::Display, e: &io::Error) -> anyhow::Error {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    anyhow!("{op}: {text}")
}
