//! Starting a worker: re-executing this binary with the region, the wake-up
//! eventfd and the listeners as inherited descriptors.
//!
//! The binary is executed through a descriptor the master opened on
//! `/proc/self/exe` when it started ([`Executable`]): a worker runs the very
//! file the master runs, even after a package upgrade replaced the path.
//! Executing `/proc/self/fd/N` rather than `/proc/self/exe` itself also lets
//! a tool that follows children (valgrind's `--trace-children`, which the
//! instruction counts in `bench/callgrind` need) follow the workers: in such
//! a tool, `/proc/self/exe` names the tool.
//!
//! The master has threads (admin API, etcd), so it never forks: without a
//! `pre_exec` hook std starts the child with `posix_spawn`. The descriptors
//! to pass are made inheritable for the length of the spawn only; this is
//! safe because only the main thread starts processes. The worker sets its
//! own parent-death signal and checks that its parent is still this master.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::unistd::Pid;

use elb_workers::WorkerArgs;

/// This binary, held open for the master's life.
pub struct Executable(OwnedFd);

impl Executable {
    pub fn open() -> std::io::Result<Executable> {
        File::open("/proc/self/exe").map(|f| Executable(f.into()))
    }

    /// Passed to each worker with the others, which closes it at once.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Starts one worker. Call from the master's main thread only. `fds` are
/// the descriptors `args` names by number (the executable's among them),
/// borrowed from their owners so that they stay open for the whole spawn.
pub fn worker(exe: &Executable, args: &WorkerArgs, fds: &[BorrowedFd<'_>]) -> std::io::Result<Pid> {
    let mut cmd = Command::new(format!("/proc/self/fd/{}", exe.0.as_raw_fd()));
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
