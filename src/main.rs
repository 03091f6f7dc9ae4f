//! `elb`: the master process, and (re-executed as `elb worker`) a worker.

#![forbid(unsafe_code)]

mod admin;
mod etcd;
mod health;
mod kubernetes;
mod listeners;
mod logging;
mod peers;
mod probe;
mod schedule;
mod settings;
mod spawn;
mod stats;
mod statsd_sender;
mod store;
mod supervisor;

use std::io::Write;
use std::process::ExitCode;

use settings::{Command, SettingsError};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("worker") {
        logging::init("worker");
        return match elb_workers::WorkerArgs::from_env() {
            Ok(a) => exit(elb_workers::run(a)),
            Err(e) => {
                eprintln!("elb: {e}");
                ExitCode::from(2)
            }
        };
    }
    match settings::from_args(args) {
        Ok(Command::Help(text) | Command::Version(text)) => print(&text),
        Ok(Command::Check(s)) => print(&s.to_string()),
        Ok(Command::Probe(s)) => match probe::admin(&s) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("elb: probe: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(Command::Run(s)) => {
            logging::init("master");
            exit(supervisor::run(*s))
        }
        Err(e @ (SettingsError::Invalid { .. } | SettingsError::Usage(_))) => {
            eprintln!("elb: {e}");
            ExitCode::from(2)
        }
    }
}

/// Writes to stdout; a reader that went away (`elb --check | head`) is not
/// an error worth more than the exit code.
fn print(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
