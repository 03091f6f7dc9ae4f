//! ELB's shared-memory region: one memfd, mapped by the master and every worker.
//!
//! The region plays the part of nginx's `lua_shared_dict` zones. It holds:
//!
//! * a header naming the layout and the published configuration generation,
//! * one slot per worker (what each worker has applied, its counters),
//! * the configuration store ([`config`]): versioned entries, a change log and
//!   an arena, written by the master alone and read by workers without a lock,
//! * a dictionary ([`dict`]) with the surface of `lua_shared_dict`, shared by
//!   every process under a robust mutex.
//!
//! Nothing here knows about HTTP or etcd. `LIFECYCLE.md` beside this file walks
//! through who writes what and what a SIGKILL at each point leaves behind.
//!
//! `unsafe` lives in three places: `atomic_mem` turns the mapping into
//! bounds-checked atomics, `robust` calls pthread, and the dictionary's
//! lock module hands its mutex to `robust`. Everything else is safe code
//! over those, which the lint below holds to.

#![deny(unsafe_code, unsafe_op_in_unsafe_fn)]

#[allow(unsafe_code)]
mod atomic_mem;
pub mod config;
pub mod counters;
pub mod dict;
mod layout;
mod region;
#[allow(unsafe_code)]
mod robust;
mod seqlock;
pub mod slots;
pub mod states;

pub use layout::{Layout, MAX_WORKERS, MIN_DICT};
pub use region::{Region, RegionError};
