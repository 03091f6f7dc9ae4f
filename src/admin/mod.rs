//! The admin API, served by the master: on `--admin` (TCP or a
//! unix socket), and on a private unix socket to which workers forward the
//! `/__erulb__/` requests they receive on the proxy listeners.

mod api;
mod dashboard;
mod metrics;
mod server;
mod stats;
mod status;

pub use server::{AdminLimits, serve};
