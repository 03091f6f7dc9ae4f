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
//! * `weight` is 1..=10000. nginx accepts any positive weight; ELB refuses
//!   more than [`MAX_WEIGHT`] (an error, not a silent clamp) so that the
//!   shared round-robin schedule stays small and what `GET` shows is what was
//!   set. 0 is refused, as nginx does.
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

use std::fmt::Write as _;

/// Largest weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;

/// Default `fail_timeout`, in milliseconds (nginx: 10 s).
pub const DEFAULT_FAIL_TIMEOUT_MS: u64 = 10_000;

/// Longest `fail_timeout` / `slow_start` accepted, in milliseconds (a year).
const MAX_TIME_MS: u64 = 365 * 24 * 3600 * 1000;

/// One peer's parameters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerParams {
    /// 1..=[`MAX_WEIGHT`]; default 1.
    pub weight: u32,
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
            weight: 1,
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
    /// A weight outside 1..=[`MAX_WEIGHT`].
    #[error("weight {0} out of range 1..={MAX_WEIGHT}")]
    WeightRange(u64),
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

    /// `fail_timeout` in whole seconds, rounded up (the admin API's
    /// `fail_timeout` field, in the original's unit).
    pub fn fail_timeout_s(&self) -> u64 {
        self.fail_timeout_ms.div_ceil(1000)
    }

    /// The value to store in etcd or show: the nginx-parameter form with only
    /// the non-default parameters (`"weight=10 max_fails=2 backup"`; empty
    /// when everything is default), or, when a field only the JSON form can
    /// carry is set (`check_url`, `slow_start`, a `status` other than `"up"`),
    /// the JSON object form with `weight` and every non-default field, so
    /// nothing is lost: `parse_peer_value(&p.to_value()) == Ok(p)`.
    pub fn to_value(&self) -> String {
        let d = PeerParams::default();
        let json = self.check_url.is_some() || self.slow_start_s != 0 || self.status != d.status;
        if !json {
            let mut parts: Vec<String> = Vec::new();
            if self.weight != d.weight {
                parts.push(format!("weight={}", self.weight));
            }
            if self.max_fails != d.max_fails {
                parts.push(format!("max_fails={}", self.max_fails));
            }
            if self.fail_timeout_ms != d.fail_timeout_ms {
                parts.push(format!(
                    "fail_timeout={}",
                    format_time(self.fail_timeout_ms)
                ));
            }
            if self.backup {
                parts.push("backup".to_string());
            }
            if self.down {
                parts.push("down".to_string());
            }
            return parts.join(" ");
        }
        let mut out = String::from("{");
        let _ = write!(out, "\"weight\":{}", self.weight);
        if self.max_fails != d.max_fails {
            let _ = write!(out, ",\"max_fails\":{}", self.max_fails);
        }
        if self.fail_timeout_ms != d.fail_timeout_ms {
            if self.fail_timeout_ms.is_multiple_of(1000) {
                let _ = write!(out, ",\"fail_timeout\":{}", self.fail_timeout_ms / 1000);
            } else {
                let _ = write!(
                    out,
                    ",\"fail_timeout\":\"{}\"",
                    format_time(self.fail_timeout_ms)
                );
            }
        }
        if self.backup {
            out.push_str(",\"backup\":true");
        }
        if self.down {
            out.push_str(",\"down\":true");
        }
        if self.slow_start_s != 0 {
            let _ = write!(out, ",\"slow_start\":{}", self.slow_start_s);
        }
        if let Some(url) = &self.check_url {
            let _ = write!(out, ",\"check_url\":{}", json_string(url));
        }
        if self.status != d.status {
            let _ = write!(out, ",\"status\":{}", json_string(&self.status));
        }
        out.push('}');
        out
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Milliseconds in nginx time syntax: whole seconds as a bare number
/// (`10`), otherwise with `ms` (`1500ms`).
fn format_time(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        format!("{ms}ms")
    }
}

/// Parses a peer value (see the module documentation for the forms).
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
        parse_json(value)
    } else {
        parse_nginx(value)
    }
}

/// Decodes `%XX` escapes; `None` when there is none, or when the result is
/// not UTF-8 (then the value is taken as written). `+` is left as is (the
/// old ELB's dump escaped with `ngx.escape_uri`).
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut any = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            out.push(h << 4 | l);
            any = true;
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    if !any {
        return None;
    }
    String::from_utf8(out).ok()
}

fn hex_val(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

fn parse_nginx(value: &str) -> Result<PeerParams, ParamError> {
    let mut p = PeerParams::default();
    for tok in value.split_ascii_whitespace() {
        let (key, val) = match tok.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (tok, None),
        };
        match (key, val) {
            ("weight", Some(v)) => p.weight = parse_weight(parse_uint(v, "weight")?)?,
            ("max_fails", Some(v)) => {
                p.max_fails = u32::try_from(parse_uint(v, "max_fails")?)
                    .map_err(|_| invalid("max_fails", v))?
            }
            ("fail_timeout", Some(v)) => p.fail_timeout_ms = parse_time(v, "fail_timeout")?,
            ("slow_start", Some(v)) => {
                p.slow_start_s = time_to_secs(parse_time(v, "slow_start")?, v)?
            }
            ("backup", None) => p.backup = true,
            ("down", None) => p.down = true,
            ("backup", Some(v)) => p.backup = parse_bool(v, "backup")?,
            ("down", Some(v)) => p.down = parse_bool(v, "down")?,
            _ => return Err(ParamError::Unknown(tok.to_string())),
        }
    }
    Ok(p)
}

fn invalid(name: &'static str, value: &str) -> ParamError {
    ParamError::Invalid {
        name,
        value: value.to_string(),
    }
}

/// A decimal without sign; refused when empty, signed or too large.
fn parse_uint(v: &str, name: &'static str) -> Result<u64, ParamError> {
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
        return Err(invalid(name, v));
    }
    v.parse::<u64>().map_err(|_| invalid(name, v))
}

fn parse_weight(w: u64) -> Result<u32, ParamError> {
    if w == 0 || w > u64::from(MAX_WEIGHT) {
        return Err(ParamError::WeightRange(w));
    }
    // In range, so it fits.
    Ok(w as u32)
}

fn parse_bool(v: &str, name: &'static str) -> Result<bool, ParamError> {
    match v {
        "true" | "on" | "1" => Ok(true),
        "false" | "off" | "0" => Ok(false),
        _ => Err(invalid(name, v)),
    }
}

/// nginx time syntax into milliseconds: a bare number is seconds; otherwise
/// one or more `<number><unit>` with units `ms`, `s`, `m`, `h`, `d`
/// (`1m30s`), each unit at most once.
fn parse_time(v: &str, name: &'static str) -> Result<u64, ParamError> {
    let b = v.as_bytes();
    if b.is_empty() {
        return Err(invalid(name, v));
    }
    if b.iter().all(u8::is_ascii_digit) {
        return parse_uint(v, name)?
            .checked_mul(1000)
            .filter(|&ms| ms <= MAX_TIME_MS)
            .ok_or_else(|| invalid(name, v));
    }
    let mut total: u64 = 0;
    let mut seen: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(invalid(name, v));
        }
        let n: u64 = v[start..i].parse().map_err(|_| invalid(name, v))?;
        let ustart = i;
        while i < b.len() && b[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = &v[ustart..i];
        let scale: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid(name, v)),
        };
        if seen.contains(&unit) {
            return Err(invalid(name, v));
        }
        seen.push(unit);
        total = n
            .checked_mul(scale)
            .and_then(|x| total.checked_add(x))
            .filter(|&ms| ms <= MAX_TIME_MS)
            .ok_or_else(|| invalid(name, v))?;
    }
    Ok(total)
}

fn time_to_secs(ms: u64, v: &str) -> Result<u32, ParamError> {
    if !ms.is_multiple_of(1000) {
        return Err(invalid("slow_start", v));
    }
    u32::try_from(ms / 1000).map_err(|_| invalid("slow_start", v))
}

fn parse_json(value: &str) -> Result<PeerParams, ParamError> {
    let obj: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(value).map_err(|e| ParamError::Json(e.to_string()))?;
    let mut p = PeerParams::default();
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    if let Some(v) = get("weight") {
        p.weight = parse_weight(json_uint(v, "weight")?)?;
    }
    if let Some(v) = get("max_fails") {
        p.max_fails =
            u32::try_from(json_uint(v, "max_fails")?).map_err(|_| json_invalid("max_fails", v))?;
    }
    if let Some(v) = get("fail_timeout") {
        p.fail_timeout_ms = json_time(v, "fail_timeout")?;
    }
    if let Some(v) = get("slow_start") {
        let ms = json_time(v, "slow_start")?;
        p.slow_start_s = time_to_secs(ms, &v.to_string())?;
    }
    if let Some(v) = get("backup") {
        p.backup = json_bool(v, "backup")?;
    }
    if let Some(v) = get("down") {
        p.down = json_bool(v, "down")?;
    }
    if let Some(v) = get("check_url").or_else(|| get("checkurl")) {
        match v.as_str() {
            Some(s) if !s.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                p.check_url = Some(s.to_string())
            }
            _ => return Err(json_invalid("check_url", v)),
        }
    }
    if let Some(v) = get("status") {
        match v.as_str() {
            Some(s) => p.status = s.to_string(),
            None => return Err(json_invalid("status", v)),
        }
    }
    Ok(p)
}

fn json_invalid(name: &'static str, v: &serde_json::Value) -> ParamError {
    match v.as_str() {
        Some(s) => invalid(name, s),
        None => invalid(name, &v.to_string()),
    }
}

/// A non-negative integer: a JSON integer, a float with no fraction, or a
/// string of digits (some tools write `"100"`).
fn json_uint(v: &serde_json::Value, name: &'static str) -> Result<u64, ParamError> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    if let Some(f) = v.as_f64()
        && f >= 0.0
        && f.fract() == 0.0
        && f <= u64::MAX as f64 / 2.0
    {
        return Ok(f as u64);
    }
    if let Some(s) = v.as_str() {
        return parse_uint(s, name);
    }
    Err(json_invalid(name, v))
}

/// A time: a JSON number of seconds (fractions rounded to the millisecond)
/// or a string in nginx time syntax.
fn json_time(v: &serde_json::Value, name: &'static str) -> Result<u64, ParamError> {
    if let Some(s) = v.as_str() {
        return parse_time(s, name);
    }
    if let Some(n) = v.as_u64() {
        return n
            .checked_mul(1000)
            .filter(|&ms| ms <= MAX_TIME_MS)
            .ok_or_else(|| json_invalid(name, v));
    }
    if let Some(f) = v.as_f64()
        && f >= 0.0
        && f * 1000.0 <= MAX_TIME_MS as f64
    {
        return Ok((f * 1000.0).round() as u64);
    }
    Err(json_invalid(name, v))
}

fn json_bool(v: &serde_json::Value, name: &'static str) -> Result<bool, ParamError> {
    if let Some(b) = v.as_bool() {
        return Ok(b);
    }
    match v.as_u64() {
        Some(0) => return Ok(false),
        Some(1) => return Ok(true),
        _ => {}
    }
    if let Some(s) = v.as_str() {
        return parse_bool(s, name);
    }
    Err(json_invalid(name, v))
}

/// Splits `"host:port"` into its host and port. An IPv6 address is written
/// in brackets (`"[::1]:80"`) and returned without them (`"::1"`), ready for
/// `(host, port)` resolution. The port is decimal, 1..=65535. The host is
/// non-empty and made of ASCII letters, digits, `.`, `-` and `_` (a name or
/// an IPv4 address; no spaces, slashes, or other punctuation).
pub fn split_host_port(addr: &str) -> Result<(&str, u16), ParamError> {
    let err = |why: &'static str| ParamError::Address {
        addr: addr.to_string(),
        why,
    };
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(|| err("missing ']'"))?;
        let port = after.strip_prefix(':').ok_or_else(|| err("missing port"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(err("invalid IPv6 address"));
        }
        (h, port)
    } else {
        let (h, port) = addr.rsplit_once(':').ok_or_else(|| err("missing port"))?;
        if h.contains(':') {
            return Err(err("IPv6 address must be in brackets"));
        }
        if h.is_empty() {
            return Err(err("empty host"));
        }
        if !h
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
        {
            return Err(err("invalid character in host"));
        }
        (h, port)
    };
    if port.is_empty() || !port.bytes().all(|c| c.is_ascii_digit()) {
        return Err(err("invalid port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((host, p)),
        _ => Err(err("port out of range 1..=65535")),
    }
}

#[cfg(test)]
mod tests;
