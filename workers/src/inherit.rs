//! Taking ownership of the descriptors the master passed down, and the
//! process-level set-up a worker needs before its loop starts.
//!
//! The only module of this crate with `unsafe`: a descriptor number from
//! the command line becomes an `OwnedFd` here, once it is known to be open.
//! Everything after that borrows from the owned descriptor.
//!
//! SIGPIPE needs nothing here: Rust's runtime sets it to `SIG_IGN` before
//! `main` (the `elb` binary does not opt out), and the re-executed worker is
//! that same binary, so a write to a vanished client is an `EPIPE` to
//! handle, not a reason to die.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::Signal;

use crate::args::WorkerArgs;
use crate::event_loop::Resources;

#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("the master (pid {0}) is gone")]
    Orphaned(u32),
    #[error("descriptor {0} was not inherited")]
    BadFd(i32),
    #[error("shared region: {0}")]
    Region(#[from] elb_shm::RegionError),
    #[error("{0}: {1}")]
    Sys(&'static str, nix::Error),
}

/// Adopts what the master passed to this worker.
pub(crate) fn adopt(args: &WorkerArgs) -> Result<Resources, InheritError> {
    // The master asked the kernel to kill us when it dies, but it may have
    // died before that request took effect.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| InheritError::Sys("prctl", e))?;
    if nix::unistd::getppid().as_raw() as u32 != args.master_pid {
        return Err(InheritError::Orphaned(args.master_pid));
    }
    drop(own(args.exe_fd)?);
    let shm = own(args.shm_fd)?;
    let wake = own(args.wake_fd)?;
    let listeners = args
        .listen_fds
        .iter()
        .map(|&fd| own(fd).map(std::net::TcpListener::from))
        .collect::<Result<Vec<_>, InheritError>>()?;
    Ok(Resources {
        // Mapped for the life of the process.
        region: Box::leak(Box::new(elb_shm::Region::attach(shm)?)),
        listeners,
        wake,
    })
}

/// Claims descriptor `fd`, once it is known to be open. The check reads
/// `/proc/self/fd` (the master re-executes this binary through
/// `/proc/self/fd`, so `/proc` is there) instead of borrowing a number
/// that may name nothing.
fn own(fd: RawFd) -> Result<OwnedFd, InheritError> {
    if fd < 3 || std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
        return Err(InheritError::BadFd(fd));
    }
    // SAFETY: `fd` is open (checked above), the master opened it for this
    // process alone and passed its number once; nothing else in this
    // process owns it, so the `OwnedFd` is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    /// What the worker relies on instead of a handler of its own: Rust's
    /// runtime ignores SIGPIPE before `main` (this test binary's, as the
    /// `elb` binary's), so a write to a vanished peer is an error.
    #[test]
    fn the_runtime_ignores_sigpipe() {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .expect("SigIgn");
        let sigpipe = nix::sys::signal::Signal::SIGPIPE as u64;
        assert_ne!(ignored & (1 << (sigpipe - 1)), 0, "SigIgn {ignored:x}");
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        drop(b);
        let err = std::io::Write::write_all(&mut &a, b"x").expect_err("peer gone");
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    }
}
