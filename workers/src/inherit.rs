//! Taking ownership of the descriptors the master passed down, and the
//! process-level set-up a worker needs before its loop starts.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::args::WorkerArgs;

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

pub(crate) struct Inherited {
    /// Mapped for the life of the process.
    pub region: &'static elb_shm::Region,
    pub wake: OwnedFd,
    pub listeners: Vec<std::net::TcpListener>,
    pub signals: SignalFd,
}

pub(crate) fn adopt(args: &WorkerArgs) -> Result<Inherited, InheritError> {
    // The master asked the kernel to kill us when it dies, but it may have
    // died before that request took effect.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| InheritError::Sys("prctl", e))?;
    if nix::unistd::getppid().as_raw() as u32 != args.master_pid {
        return Err(InheritError::Orphaned(args.master_pid));
    }
    let shm = own(args.shm_fd)?;
    let wake = own(args.wake_fd)?;
    let listeners = args
        .listen_fds
        .iter()
        .map(|&fd| {
            let l = std::net::TcpListener::from(own(fd)?);
            l.set_nonblocking(true).map_err(|e| {
                InheritError::Sys(
                    "listener",
                    nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
                )
            })?;
            Ok(l)
        })
        .collect::<Result<Vec<_>, InheritError>>()?;
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| InheritError::Sys("sigprocmask", e))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| InheritError::Sys("signalfd", e))?;
    // Ignore SIGPIPE: a client that vanishes mid-write is an EPIPE to handle,
    // not a reason to die.
    // SAFETY: installing SIG_IGN has no handler code to be unsafe about.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) }
        .map_err(|e| InheritError::Sys("signal", e))?;
    Ok(Inherited {
        region: Box::leak(Box::new(elb_shm::Region::attach(shm)?)),
        wake,
        listeners,
        signals,
    })
}

fn own(fd: i32) -> Result<OwnedFd, InheritError> {
    // Check that the number names an open descriptor before claiming it.
    if fd < 3 || nix::fcntl::fcntl(unsafe_borrow(fd), nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return Err(InheritError::BadFd(fd));
    }
    // SAFETY: the master opened `fd` for this process alone and passed its
    // number; nothing else in this process owns it (checked open above).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unsafe_borrow(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: used only for one F_GETFD on a number that may not be open,
    // which the kernel answers with EBADF; the borrow does not outlive it.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
