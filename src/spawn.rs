//! Starting a worker: re-executing this binary with the region, the wake-up
//! eventfd and the listeners as inherited descriptors.
//!
//! The master has threads (admin API, etcd), so it never forks: without a
//! `pre_exec` hook std starts the child with `posix_spawn`. The descriptors
//! to pass are made inheritable for the length of the spawn only; this is
//! safe because only the main thread starts processes. The worker sets its
//! own parent-death signal and checks that its parent is still this master.

use std::os::fd::BorrowedFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::unistd::Pid;

use elb_workers::WorkerArgs;

/// Starts one worker. Call from the master's main thread only. `fds` are
/// the descriptors `args` names by number, borrowed from their owners so
/// that they stay open for the whole spawn.
pub fn worker(args: &WorkerArgs, fds: &[BorrowedFd<'_>]) -> std::io::Result<Pid> {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("elb-worker")
        .arg("worker")
        .env(elb_workers::args::ENV, args.to_env());
    set_inheritable(fds, true)?;
    let spawned = cmd.spawn();
    set_inheritable(fds, false)?;
    // The supervisor reaps by PID with waitpid; the Child handle is not kept.
    Ok(Pid::from_raw(spawned?.id() as i32))
}

fn set_inheritable(fds: &[BorrowedFd<'_>], inheritable: bool) -> std::io::Result<()> {
    let flags = if inheritable {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    for fd in fds {
        fcntl(fd, FcntlArg::F_SETFD(flags))?;
    }
    Ok(())
}
