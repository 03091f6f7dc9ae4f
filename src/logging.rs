//! Leveled logs to stderr, filtered by `RUST_LOG` (default `info`), each
//! line naming the process that wrote it.

use std::io::Write;

pub fn init(role: &'static str) {
    let env = env_logger::Env::default().default_filter_or("info");
    let pid = std::process::id();
    env_logger::Builder::from_env(env)
        .format(move |f, record| {
            writeln!(
                f,
                "{} {:<5} elb[{pid}] {role}: {}",
                f.timestamp_millis(),
                record.level(),
                record.args()
            )
        })
        .init();
}
