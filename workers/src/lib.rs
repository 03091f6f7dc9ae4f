//! ELB's worker process: one `mio` event loop that accepts on the listeners
//! the master passed down, serves HTTP, and follows the configuration the
//! master publishes in the shared region.
//!
//! A worker never learns where the configuration comes from: it reads what
//! the master (`src/`) published in the region, and everything about the
//! sources, their formats and the admin API's storage stays in the master.

// `unsafe` only where inherited descriptors are adopted (`inherit.rs`).
#![deny(unsafe_code)]

pub mod access;
mod access_log;
pub mod args;
mod balance;
mod event_loop;
pub mod health;
pub mod http;
#[allow(unsafe_code)]
mod inherit;
pub mod limit;
mod pool;
pub mod published;
mod route;
pub mod rules;
mod session;
#[cfg(test)]
mod testing;
mod timers;
mod upstream_conn;
mod view;

pub use args::WorkerArgs;

/// Runs a worker to completion; returns the process exit code.
pub fn run(args: WorkerArgs) -> i32 {
    let resources = match inherit::adopt(&args) {
        Ok(r) => r,
        Err(e) => {
            log::error!("worker {}: {e}", args.index);
            return 1;
        }
    };
    match event_loop::Worker::new(args, resources).and_then(|w| w.run()) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("worker: {e}");
            1
        }
    }
}
