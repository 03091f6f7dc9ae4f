//! A Python virtual environment with the original ELB's Python client,
//! `elb.py==0.0.6` from PyPI (module `elb`), and a way to run scripts in it.
//!
//! The environment lives under Cargo's target temp dir and is made (and the
//! package installed, which pip skips when it is already there) once per
//! test process.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{Capture, wait_until};

/// The client as published on PyPI: the project is `elb.py` (pip's name
/// `elb-py`); there is no `elb` project there.
pub const ELB_PY: &str = "elb.py==0.0.6";

/// How long making the environment and installing may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Environment variables that would send the client's requests elsewhere.
const PROXY_ENV: &[&str] = &[
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
    "PYTHONPATH",
    "PYTHONHOME",
];

/// What a finished command said.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end, up to `timeout`; past that it is killed by PID
/// and the test fails.
pub fn run(mut cmd: Command, timeout: Duration, what: &str) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for k in PROXY_ENV {
        cmd.env_remove(k);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    drop(child.stdin.take());
    let out = Capture::start(child.stdout.take().expect("stdout"));
    let err = Capture::start(child.stderr.take().expect("stderr"));
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{what}: still running after {timeout:?}, killed; stdout:\n{}\nstderr:\n{}",
            out.text(),
            err.text()
        );
    };
    out.wait_eof(Duration::from_secs(2));
    err.wait_eof(Duration::from_secs(2));
    Output {
        code: status.code(),
        stdout: out.text(),
        stderr: err.text(),
    }
}

/// The Python interpreter of a virtual environment holding [`ELB_PY`];
/// fails the test, saying why, when it cannot be made.
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(make_venv).clone()
}

fn make_venv() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("elb-py-venv");
    let py = dir.join("bin").join("python");
    let usable = py.exists() && {
        let mut c = Command::new(&py);
        c.args(["-c", "import sys"]);
        run(c, Duration::from_secs(30), "the venv's python").code == Some(0)
    };
    if !usable {
        let _ = std::fs::remove_dir_all(&dir);
        let system = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let mut c = Command::new(&system);
        c.args(["-m", "venv"]).arg(&dir);
        let o = run(c, INSTALL_TIMEOUT, "python3 -m venv");
        assert_eq!(
            o.code,
            Some(0),
            "cannot make a Python virtual environment with `{system} -m venv {}` \
             (python3 with its venv module is needed for the elb.py tests):\n{}{}",
            dir.display(),
            o.stdout,
            o.stderr
        );
    }
    let mut c = Command::new(&py);
    c.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--quiet",
        ELB_PY,
    ]);
    let o = run(c, INSTALL_TIMEOUT, "pip install");
    assert_eq!(
        o.code,
        Some(0),
        "cannot install the original ELB's Python client `{ELB_PY}` from PyPI into {} \
         (is PyPI reachable?):\n{}{}",
        dir.display(),
        o.stdout,
        o.stderr
    );
    py
}

/// Runs a Python `script` (given as text) with `args` in the environment;
/// returns what it said.
pub fn run_script(script: &str, args: &[&str], timeout: Duration) -> Output {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let thread: String = format!("{:?}", std::thread::current().id())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let path = dir.join(format!("elb-py-script-{}-{thread}.py", std::process::id()));
    let mut f = std::fs::File::create(&path).expect("write the python script");
    f.write_all(script.as_bytes())
        .expect("write the python script");
    drop(f);
    let mut c = Command::new(python());
    c.arg(&path).args(args);
    let o = run(c, timeout, "the python script");
    let _ = std::fs::remove_file(&path);
    o
}
