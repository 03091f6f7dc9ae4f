//! The lua-resty-upstream-etcd JSON form of a peer value
//! (`{"weight":100,"check_url":"/health","slow_start":30,"status":"up"}`).

use serde::Serialize;

use super::nginx::{format_time, parse_bool, parse_time, parse_uint, time_to_secs};
use super::{MAX_TIME_MS, ParamError, PeerParams, Weight, invalid};

/// Parses the JSON form; a field it does not name keeps its value in
/// `defaults`.
pub(super) fn parse(value: &str, defaults: PeerParams) -> Result<PeerParams, ParamError> {
    let obj: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(value).map_err(|e| ParamError::Json(e.to_string()))?;
    let mut p = defaults;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    if let Some(v) = get("weight") {
        p.weight = match (v.as_f64(), v.as_str()) {
            (Some(w), _) => Weight::from_f64(w)?,
            (None, Some(s)) => Weight::parse(s)?,
            _ => return Err(json_invalid("weight", v)),
        };
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

/// The JSON form as written back: `weight` always, every other field only
/// when it differs from its default, in this order.
#[derive(Serialize)]
struct Written<'a> {
    weight: Weight,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_fails: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fail_timeout: Option<Time>,
    #[serde(skip_serializing_if = "is_false")]
    backup: bool,
    #[serde(skip_serializing_if = "is_false")]
    down: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_start: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    check_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
}

/// A time as the original wrote it: whole seconds as a number, anything
/// finer in nginx syntax (`"1500ms"`).
#[derive(Serialize)]
#[serde(untagged)]
enum Time {
    Seconds(u64),
    Text(String),
}

fn is_false(b: &bool) -> bool {
    !b
}

pub(super) fn render(p: &PeerParams) -> String {
    let d = PeerParams::default();
    let written = Written {
        weight: p.weight,
        max_fails: (p.max_fails != d.max_fails).then_some(p.max_fails),
        fail_timeout: (p.fail_timeout_ms != d.fail_timeout_ms).then(|| {
            if p.fail_timeout_ms.is_multiple_of(1000) {
                Time::Seconds(p.fail_timeout_ms / 1000)
            } else {
                Time::Text(format_time(p.fail_timeout_ms))
            }
        }),
        backup: p.backup,
        down: p.down,
        slow_start: (p.slow_start_s != 0).then_some(p.slow_start_s),
        check_url: p.check_url.as_deref(),
        status: (p.status != d.status).then_some(p.status.as_str()),
    };
    // Plain fields and string keys: serializing cannot fail.
    serde_json::to_string(&written).unwrap_or_default()
}
