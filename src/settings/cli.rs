//! The command line and the environment, read with `clap`: each setting
//! has a flag and, for the ones the originals read, an environment
//! variable; a flag wins over its variable. Values stay text here and are
//! parsed by the same functions as the file's, so that an error names the
//! flag or the variable it came from.

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

use super::values::{
    non_empty, parse_addr, parse_admin, parse_endpoint, parse_host_port, parse_name, parse_network,
    parse_seconds, parse_shm_size, parse_workers, split_list,
};
use super::{Settings, SettingsError, invalid};

#[derive(Parser, Debug)]
#[command(
    name = "elb",
    version,
    about = "elb: dynamic HTTP load balancer (routes and upstreams from etcd, applied live)",
    help_template = "{about}\n\nusage: {usage}\n\n{all-args}{after-help}",
    after_help = "\nFlags win over the environment, the environment over the file, the file over the defaults.\nELB_ADMIN_TOKEN (environment only) lets a client with that bearer token use the admin API from anywhere."
)]
pub(super) struct Cli {
    /// etcd endpoints, host:port[,host:port] [default: 127.0.0.1:2379]
    #[arg(long, env = "ETCD", value_name = "LIST", allow_hyphen_values = true)]
    etcd: Option<String>,
    /// etcd host, with ETCD_PORT (the originals' pair; ETCD wins)
    #[arg(long, env = "ETCD_HOST", hide = true, allow_hyphen_values = true)]
    etcd_host: Option<String>,
    #[arg(long, env = "ETCD_PORT", hide = true, allow_hyphen_values = true)]
    etcd_port: Option<String>,
    /// Key prefix in etcd [default: ELB]
    #[arg(long, env = "ELBNAME", value_name = "NAME", allow_hyphen_values = true)]
    name: Option<String>,
    /// Send metrics to statsd at HOST:PORT [default: off]
    #[arg(
        long,
        env = "STATSD",
        value_name = "HOST:PORT",
        allow_hyphen_values = true
    )]
    statsd: Option<String>,
    /// Proxy listener; repeatable, or comma-separated [default: 0.0.0.0:8080]
    #[arg(
        long,
        env = "ELB_LISTEN",
        value_name = "ADDR",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    listen: Vec<String>,
    /// Admin API, host:port or unix:PATH [default: 127.0.0.1:8081]
    #[arg(
        long,
        env = "ELB_ADMIN",
        value_name = "ADDR",
        allow_hyphen_values = true
    )]
    admin: Option<String>,
    /// Networks allowed to use the admin API over TCP, comma-separated CIDRs [default: loopback]
    #[arg(
        long,
        env = "ELB_ADMIN_ALLOW",
        value_name = "CIDRS",
        allow_hyphen_values = true
    )]
    admin_allow: Option<String>,
    #[arg(
        long,
        env = "ELB_ADMIN_TOKEN",
        hide = true,
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    admin_token: Option<String>,
    /// Worker processes [default: one per CPU]
    #[arg(
        long,
        env = "ELB_WORKERS",
        value_name = "N",
        allow_hyphen_values = true
    )]
    workers: Option<String>,
    /// Shared region, bytes or with k/m/g [default: 64m]
    #[arg(
        long,
        env = "ELB_SHM_SIZE",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    shm_size: Option<String>,
    /// lua-resty-upstream-etcd layout prefix in etcd [default: off]
    #[arg(
        long,
        env = "ELB_SERVICES_PREFIX",
        value_name = "PREFIX",
        allow_hyphen_values = true
    )]
    services_prefix: Option<String>,
    /// Graceful stop limit, seconds [default: 10]
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    shutdown_timeout: Option<String>,
    /// Access log file [default: off]
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    access_log: Option<String>,
    /// TOML file with these settings and the tunables
    #[arg(long, value_name = "FILE", allow_hyphen_values = true)]
    config: Option<String>,
    /// Check the settings, print them, and exit (0 when valid, 2 when not); starts nothing
    #[arg(long)]
    check: bool,
    /// Ask the running instance's admin API whether it is up: exit 0 when it answers, 1 when not (a container's health check)
    #[arg(long, conflicts_with = "check")]
    probe: bool,
}

/// The command line as read.
pub(super) struct Parsed {
    cli: Cli,
    matches: ArgMatches,
}

/// What the command line asks for before any setting is applied.
pub(super) enum Request {
    Settings(Box<Parsed>),
    Help(String),
    Version(String),
}

/// Reads `args` (without the program name) and the environment.
pub(super) fn parse(args: impl IntoIterator<Item = String>) -> Result<Request, SettingsError> {
    let argv = std::iter::once("elb".to_string()).chain(args);
    let matches = match Cli::command().try_get_matches_from(argv) {
        Ok(m) => m,
        Err(e) => {
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp => Ok(Request::Help(e.render().to_string())),
                clap::error::ErrorKind::DisplayVersion => {
                    Ok(Request::Version(e.render().to_string()))
                }
                _ => Err(SettingsError::Usage(usage_line(&e))),
            };
        }
    };
    let cli = Cli::from_arg_matches(&matches).map_err(|e| SettingsError::Usage(usage_line(&e)))?;
    Ok(Request::Settings(Box::new(Parsed { cli, matches })))
}

/// clap's first line, without its `error: ` prefix, and where to look.
fn usage_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("invalid arguments");
    format!(
        "{} (see elb --help)",
        first.strip_prefix("error: ").unwrap_or(first)
    )
}

impl Parsed {
    pub(super) fn config(&self) -> Option<&str> {
        self.cli.config.as_deref()
    }

    pub(super) fn check(&self) -> bool {
        self.cli.check
    }

    pub(super) fn probe(&self) -> bool {
        self.cli.probe
    }

    /// The flag or the variable a value came from, for messages.
    fn origin(&self, id: &str, flag: &str, var: Option<&str>) -> String {
        match (self.matches.value_source(id), var) {
            (Some(ValueSource::EnvVariable), Some(var)) => var.to_string(),
            _ => flag.to_string(),
        }
    }

    /// Applies the values given by flag or environment over `s`.
    pub(super) fn apply(&self, s: &mut Settings) -> Result<(), SettingsError> {
        let c = &self.cli;
        if let (Some(host), Some(port)) = (&c.etcd_host, &c.etcd_port) {
            s.etcd = vec![parse_host_port(
                "ETCD_HOST/ETCD_PORT",
                &format!("{}:{}", host.trim(), port.trim()),
            )?];
        }
        if let Some(v) = &c.etcd {
            let o = self.origin("etcd", "--etcd", Some("ETCD"));
            s.etcd = split_list(v)
                .map(|e| parse_endpoint(&o, e))
                .collect::<Result<_, _>>()?;
            if s.etcd.is_empty() {
                return Err(invalid(&o, "no endpoint given"));
            }
        }
        if let Some(v) = &c.name {
            s.name = parse_name(&self.origin("name", "--name", Some("ELBNAME")), v.trim())?;
        }
        if let Some(v) = &c.statsd {
            let o = self.origin("statsd", "--statsd", Some("STATSD"));
            s.statsd = non_empty(v).map(|a| parse_host_port(&o, a)).transpose()?;
        }
        if self.matches.value_source("listen").is_some() {
            let o = self.origin("listen", "--listen", Some("ELB_LISTEN"));
            s.listen = c
                .listen
                .iter()
                .filter_map(|a| non_empty(a))
                .map(|a| parse_addr(&o, a))
                .collect::<Result<_, _>>()?;
            if s.listen.is_empty() {
                return Err(invalid(&o, "no address given"));
            }
        }
        if let Some(v) = &c.admin {
            s.admin = parse_admin(
                &self.origin("admin", "--admin", Some("ELB_ADMIN")),
                v.trim(),
            )?;
        }
        if let Some(v) = &c.admin_allow {
            let o = self.origin("admin_allow", "--admin-allow", Some("ELB_ADMIN_ALLOW"));
            s.admin_allow = split_list(v)
                .map(|n| parse_network(&o, n))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = &c.admin_token {
            s.admin_token = non_empty(v).map(str::to_string);
        }
        if let Some(v) = &c.workers {
            let o = self.origin("workers", "--workers", Some("ELB_WORKERS"));
            s.workers = parse_workers(&o, v.trim())?;
        }
        if let Some(v) = &c.shm_size {
            let o = self.origin("shm_size", "--shm-size", Some("ELB_SHM_SIZE"));
            s.shm_size = parse_shm_size(&o, v.trim())?;
        }
        if let Some(v) = &c.services_prefix {
            s.services_prefix = non_empty(v).map(str::to_string);
        }
        if let Some(v) = &c.shutdown_timeout {
            s.shutdown_timeout = parse_seconds("--shutdown-timeout", v.trim())?;
        }
        if let Some(v) = &c.access_log {
            s.access_log = non_empty(v).map(Into::into);
        }
        Ok(())
    }
}
