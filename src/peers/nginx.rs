//! The nginx server-parameter form of a peer value
//! (`weight=10 max_fails=2 fail_timeout=30s backup`), and nginx's time
//! syntax, which the JSON form accepts too.

use super::{MAX_TIME_MS, ParamError, PeerParams, Weight, invalid};

pub(super) fn parse(value: &str) -> Result<PeerParams, ParamError> {
    let mut p = PeerParams::default();
    for tok in value.split_ascii_whitespace() {
        let (key, val) = match tok.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (tok, None),
        };
        match (key, val) {
            ("weight", Some(v)) => p.weight = Weight::parse(v)?,
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

/// The nginx form with only the non-default parameters; empty when every
/// parameter is at its default.
pub(super) fn render(p: &PeerParams) -> String {
    let d = PeerParams::default();
    let mut parts: Vec<String> = Vec::new();
    if p.weight != d.weight {
        parts.push(format!("weight={}", p.weight));
    }
    if p.max_fails != d.max_fails {
        parts.push(format!("max_fails={}", p.max_fails));
    }
    if p.fail_timeout_ms != d.fail_timeout_ms {
        parts.push(format!("fail_timeout={}", format_time(p.fail_timeout_ms)));
    }
    if p.backup {
        parts.push("backup".to_string());
    }
    if p.down {
        parts.push("down".to_string());
    }
    parts.join(" ")
}

/// Milliseconds in nginx time syntax: whole seconds as a bare number
/// (`10`), otherwise with `ms` (`1500ms`).
pub(super) fn format_time(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        format!("{ms}ms")
    }
}

/// A decimal without sign; refused when empty, signed or too large.
pub(super) fn parse_uint(v: &str, name: &'static str) -> Result<u64, ParamError> {
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
        return Err(invalid(name, v));
    }
    v.parse::<u64>().map_err(|_| invalid(name, v))
}

pub(super) fn parse_bool(v: &str, name: &'static str) -> Result<bool, ParamError> {
    match v {
        "true" | "on" | "1" => Ok(true),
        "false" | "off" | "0" => Ok(false),
        _ => Err(invalid(name, v)),
    }
}

/// nginx time syntax into milliseconds: a bare number is seconds; otherwise
/// one or more `<number><unit>` with units `ms`, `s`, `m`, `h`, `d`
/// (`1m30s`), each unit at most once.
pub(super) fn parse_time(v: &str, name: &'static str) -> Result<u64, ParamError> {
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

pub(super) fn time_to_secs(ms: u64, v: &str) -> Result<u32, ParamError> {
    if !ms.is_multiple_of(1000) {
        return Err(invalid("slow_start", v));
    }
    u32::try_from(ms / 1000).map_err(|_| invalid("slow_start", v))
}
