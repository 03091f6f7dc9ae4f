//! A peer's parameters, as stored in etcd under
//! `/$ELBNAME/upstreams/$upstream/$host:$port` (or under the services prefix)
//! and as given to the admin API (`PUT /__erulb__/upstream`, body
//! `{name: {"host:port": "params"}}`).
//!
//! A value is one of:
//!
//! * empty (or only whitespace): every parameter at its default;
//! * an nginx server-parameter string, space separated: `weight=N`,
//!   `max_fails=N`, `fail_timeout=T`, `slow_start=T`, `backup`, `down`, and
//!   the legacy `backup=true|false`, `down=true|false`;
//! * a JSON object (lua-resty-upstream-etcd):
//!   `{"weight":100,"check_url":"/health","slow_start":30,"status":"up"}`,
//!   with `checkurl` read as `check_url`, and `max_fails`, `fail_timeout`,
//!   `backup`, `down` accepted too. Keys this module does not know are
//!   ignored: values written by other tools may carry extras. A known key with
//!   a value of the wrong type is an error; a `null` value counts as absent;
//! * either of the above URI-escaped by the old ELB's dump
//!   (`max_fails%3D2%20weight%3D10`, `%7B%22weight%22%3A2%7D`).
//!
//! Choices made where nginx leaves room:
//!
//! * `weight` is 0.001..=10000, an integer or a decimal fraction (`1.5`, as
//!   lua-resty-upstream-etcd allowed; kept in thousandths, [`Weight`]).
//!   nginx accepts any positive integer; ELB refuses more than
//!   [`MAX_WEIGHT`] (an error, not a silent clamp) so that what `GET` shows
//!   is what was set. 0 is refused, as nginx does.
//! * `fail_timeout` is kept in milliseconds ([`PeerParams::fail_timeout_ms`]).
//!   A bare number is seconds (`fail_timeout=10`); nginx's time syntax is
//!   accepted too: units `ms`, `s`, `m`, `h`, `d`, combinable as in nginx
//!   (`1m30s`). In JSON it is a number of seconds (fractions allowed, rounded
//!   to the millisecond) or a string in that syntax.
//! * `slow_start` is kept in whole seconds; the same syntax is accepted
//!   (a value that is not a whole number of seconds is an error).
//! * `max_fails` is any `u32`; 0 means "never take the peer out".
//! * A parameter given twice: the last one wins (nginx does the same).
//! * `status` is kept as written; anything other than `"up"` takes the peer
//!   out ([`PeerParams::is_available`]).
//!
//! Defaults depend on where a value comes from ([`Origin`]): nginx's under
//! `/$ELBNAME/upstreams/` and in the admin API; lua-resty-upstream-etcd's
//! under the services prefix and from Kubernetes, where a value that is not
//! a JSON object gives the peer every default, as the original did.

use std::borrow::Cow;

mod address;
mod json;
mod nginx;
mod weight;

pub use address::split_host_port;
pub use weight::Weight;

/// Largest weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;

/// Default `fail_timeout`, in milliseconds (nginx: 10 s).
pub const DEFAULT_FAIL_TIMEOUT_MS: u64 = 10_000;

/// Longest `fail_timeout` / `slow_start` accepted, in milliseconds (a year).
const MAX_TIME_MS: u64 = 365 * 24 * 3600 * 1000;

/// One peer's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerParams {
    /// 0.001..=[`MAX_WEIGHT`]; default 1.
    pub weight: Weight,
    /// Failures within `fail_timeout` that take the peer out; 0 = never.
    /// Default 1.
    pub max_fails: u32,
    /// Window for counting failures, and how long a failed peer stays out,
    /// in milliseconds. Default 10 000.
    pub fail_timeout_ms: u64,
    /// Used only when no primary peer is available.
    pub backup: bool,
    /// Permanently out.
    pub down: bool,
    /// Seconds over which a joining or recovering peer ramps up to its full
    /// weight; 0 = at once.
    pub slow_start_s: u32,
    /// Path probed by the active health check (lua-resty-upstream-etcd).
    pub check_url: Option<String>,
    /// lua-resty-upstream-etcd's status; anything but `"up"` means out.
    pub status: String,
}

impl Default for PeerParams {
    fn default() -> Self {
        PeerParams {
            weight: Weight::whole(1),
            max_fails: 1,
            fail_timeout_ms: DEFAULT_FAIL_TIMEOUT_MS,
            backup: false,
            down: false,
            slow_start_s: 0,
            check_url: None,
            status: "up".to_string(),
        }
    }
}

/// Why a peer value or address was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamError {
    /// A parameter this module does not know (nginx form).
    #[error("unknown peer parameter '{0}'")]
    Unknown(String),
    /// A known parameter with a value that does not parse or is out of range.
    #[error("invalid {name} '{value}'")]
    Invalid { name: &'static str, value: String },
    /// A weight outside 0.001..=[`MAX_WEIGHT`].
    #[error("weight {0} out of range 0.001..={MAX_WEIGHT}")]
    WeightRange(String),
    /// A value that starts like a JSON object but is not one.
    #[error("invalid peer JSON: {0}")]
    Json(String),
    /// A `host:port` that is not one.
    #[error("invalid address '{addr}': {why}")]
    Address { addr: String, why: &'static str },
}

impl PeerParams {
    /// True when the peer may be chosen at all (before passive or active
    /// health): not `down`, and `status` is `"up"`.
    pub fn is_available(&self) -> bool {
        !self.down && self.status == "up"
    }

    /// The value to store in etcd or show: the nginx-parameter form with only
    /// the non-default parameters (`"weight=10 max_fails=2 backup"`; empty
    /// when everything is default), or, when a field only the JSON form can
    /// carry is set (`check_url`, `slow_start`, a `status` other than `"up"`),
    /// the JSON object form with `weight` and every non-default field, so
    /// nothing is lost: `parse_peer_value(&p.to_value()) == Ok(p)`.
    pub fn to_value(&self) -> String {
        let needs_json = self.check_url.is_some()
            || self.slow_start_s != 0
            || self.status != PeerParams::default().status
            || !self.weight.is_whole();
        if needs_json {
            json::render(self)
        } else {
            nginx::render(self)
        }
    }
}

/// Where a peer value comes from, which decides its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `/$ELBNAME/upstreams/` and the admin API: nginx's defaults.
    Nginx,
    /// The services prefix and Kubernetes: lua-resty-upstream-etcd's
    /// (`weight` 100, `check_url` "/health", `slow_start` 30, `status` "up").
    Resty,
}

impl PeerParams {
    /// lua-resty-upstream-etcd's defaults.
    pub fn resty() -> PeerParams {
        PeerParams {
            weight: Weight::whole(100),
            check_url: Some("/health".to_string()),
            slow_start_s: 30,
            ..PeerParams::default()
        }
    }
}

/// Parses a peer value from `origin`. Under [`Origin::Resty`] a value that
/// is not a JSON object gives every default, and the second part of the
/// answer says why, for a warning; a JSON object with a bad field is an
/// error in both.
pub fn parse_peer_from(
    origin: Origin,
    raw: &str,
) -> Result<(PeerParams, Option<ParamError>), ParamError> {
    match origin {
        Origin::Nginx => parse_peer_value(raw).map(|p| (p, None)),
        Origin::Resty => {
            let trimmed = raw.trim();
            let decoded = percent_decode(trimmed);
            let value = decoded.as_deref().map_or(trimmed, str::trim);
            if value.starts_with('{') {
                json::parse(value, PeerParams::resty()).map(|p| (p, None))
            } else {
                Ok((
                    PeerParams::resty(),
                    Some(ParamError::Json(format!("not a JSON object: '{value}'"))),
                ))
            }
        }
    }
}

/// Parses a peer value (see the module documentation for the forms), with
/// nginx's defaults.
pub fn parse_peer_value(raw: &str) -> Result<PeerParams, ParamError> {
    let trimmed = raw.trim();
    // A raw JSON object is never escaped (escaped, it starts with `%7B`), and
    // a `%` in it belongs to a string such as a check_url: leave it alone.
    let decoded;
    let value = if trimmed.starts_with('{') {
        trimmed
    } else {
        match percent_decode(trimmed) {
            Some(d) => {
                decoded = d;
                decoded.trim()
            }
            None => trimmed,
        }
    };
    if value.is_empty() {
        return Ok(PeerParams::default());
    }
    if value.starts_with('{') {
        json::parse(value, PeerParams::default())
    } else {
        nginx::parse(value)
    }
}

/// Decodes `%XX` escapes; `None` when there is none, or when the result is
/// not UTF-8 (then the value is taken as written). `+` is left as is (the
/// old ELB's dump escaped with `ngx.escape_uri`, which writes a space as
/// `%20`).
pub fn percent_decode(s: &str) -> Option<String> {
    match percent_encoding::percent_decode_str(s).decode_utf8() {
        Ok(Cow::Owned(decoded)) => Some(decoded),
        Ok(Cow::Borrowed(_)) | Err(_) => None,
    }
}

fn invalid(name: &'static str, value: &str) -> ParamError {
    ParamError::Invalid {
        name,
        value: value.to_string(),
    }
}

#[cfg(test)]
mod tests;
