//! The admin API's requests and answers, as pure functions over the store.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::peers::{Weight, parse_peer_value};

use elb_shm::config::ConfigError;

use crate::store::{Store, StoreError, resolve_peers};

/// How long a dump may take before the API answers 503.
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// An answer: status, content type and body.
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Answer {
    /// A JSON answer; a value that does not serialise is a 500.
    pub(super) fn json(status: u16, body: &impl Serialize) -> Answer {
        match serde_json::to_vec(body) {
            Ok(body) => Answer {
                status,
                content_type: "application/json",
                body,
            },
            Err(e) => error(500, e.to_string()),
        }
    }

    pub(super) fn text(content_type: &'static str, body: impl Into<Vec<u8>>) -> Answer {
        Answer {
            status: 200,
            content_type,
            body: body.into(),
        }
    }
}

fn ok() -> Answer {
    Answer::json(200, &json!({"msg": "OK"}))
}

pub(super) fn error(status: u16, msg: impl Into<String>) -> Answer {
    let body = json!({"error": msg.into()}).to_string().into_bytes();
    Answer {
        status,
        content_type: "application/json",
        body,
    }
}

pub fn handle(store: &Mutex<Store>, method: &[u8], target: &[u8], body: &[u8]) -> Answer {
    let path = target.split(|b| *b == b'?').next().unwrap_or(target);
    let path = path.strip_suffix(b"/").unwrap_or(path);
    let resource = match path {
        b"/__erulb__/domain" => Resource::Domain,
        b"/__erulb__/upstream" => Resource::Upstream,
        b"/__erulb__/dump" => Resource::Dump,
        b"/__erulb__/status" => Resource::Status,
        b"/__erulb__/metrics" => Resource::Metrics,
        b"/__erulb__/stats" => Resource::Stats,
        b"/__erulb__/stats/tps" => Resource::Tps,
        b"/__erulb__" => Resource::Dashboard,
        _ => return error(404, "no such admin path"),
    };
    if let (Resource::Dump, b"PUT") = (&resource, method) {
        // Without the store's lock: the etcd thread reads the state itself.
        return match crate::etcd::dump(DUMP_TIMEOUT) {
            Ok(_) => ok(),
            Err(e) => error(e.status(), e.to_string()),
        };
    }
    if let (Resource::Upstream, b"PUT") = (&resource, method) {
        // Resolves peers before it takes the store's lock.
        return put_upstreams(store, body);
    }
    let Ok(mut store) = store.lock() else {
        return unavailable();
    };
    match (resource, method) {
        (Resource::Domain, b"GET") => Answer::json(200, store.domains()),
        (Resource::Domain, b"PUT") => put_domains(&mut store, body),
        (Resource::Domain, b"DELETE") => match names(body) {
            Ok(names) => {
                store.delete_domains(&names);
                ok()
            }
            Err(e) => e,
        },
        (Resource::Upstream, b"GET") => get_upstreams(&store),
        (Resource::Status, b"GET") => super::status::answer(&store),
        (Resource::Metrics, b"GET") => super::metrics::answer(&store),
        (Resource::Stats, b"GET") => super::stats::report(&store, target),
        (Resource::Tps, b"GET") => super::stats::tps(&store, target),
        (Resource::Dashboard, b"GET") => super::dashboard::page(),
        (Resource::Upstream, b"DELETE") => match names(body) {
            Ok(names) => {
                let found = store.delete_upstreams(&names);
                let body: Map<String, Value> = names
                    .into_iter()
                    .zip(found)
                    .map(|(n, f)| (n, if f { Value::Bool(true) } else { json!(404) }))
                    .collect();
                Answer::json(200, &body)
            }
            Err(e) => e,
        },
        _ => error(405, "method not allowed on this path"),
    }
}

enum Resource {
    Domain,
    Upstream,
    Dump,
    Status,
    Metrics,
    Stats,
    Tps,
    Dashboard,
}

fn parse_json(body: &[u8]) -> Result<Value, Answer> {
    serde_json::from_slice(body).map_err(|e| error(400, format!("body is not JSON: {e}")))
}

fn names(body: &[u8]) -> Result<Vec<String>, Answer> {
    match parse_json(body)? {
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(error(
                    400,
                    format!("expected a list of names, found {other}"),
                )),
            })
            .collect(),
        _ => Err(error(400, "expected a JSON list of names")),
    }
}

fn put_domains(store: &mut Store, body: &[u8]) -> Answer {
    let sets = match parse_json(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return error(400, "expected a JSON object {domain: ruleset}"),
        Err(e) => return e,
    };
    match store.set_domains(sets.into_iter().collect()) {
        Ok(()) => ok(),
        Err(e) => store_error(e),
    }
}

fn unavailable() -> Answer {
    error(500, "the configuration store is unavailable")
}

fn put_upstreams(store: &Mutex<Store>, body: &[u8]) -> Answer {
    let ups = match parse_json(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return error(
                400,
                "expected a JSON object {upstream: {\"host:port\": \"params\"}}",
            );
        }
        Err(e) => return e,
    };
    let mut parsed = Vec::with_capacity(ups.len());
    for (name, peers) in ups {
        let Value::Object(peers) = peers else {
            return error(
                400,
                format!("upstream '{name}': expected an object {{\"host:port\": \"params\"}}"),
            );
        };
        let mut list = Vec::with_capacity(peers.len());
        for (addr, params) in peers {
            let raw = match &params {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                Value::Object(_) => params.to_string(),
                other => {
                    return error(
                        400,
                        format!(
                            "upstream '{name}', peer '{addr}': parameters must be a string, found {other}"
                        ),
                    );
                }
            };
            match parse_peer_value(&raw) {
                Ok(p) => list.push((addr, p)),
                Err(e) => return error(400, format!("upstream '{name}', peer '{addr}': {e}")),
            }
        }
        // A slow resolver holds up this request only, not the store.
        match resolve_peers(&name, list) {
            Ok(resolved) => parsed.push((name, resolved)),
            Err(e) => return error(400, e.to_string()),
        }
    }
    let Ok(mut store) = store.lock() else {
        return unavailable();
    };
    match store.set_upstreams(parsed) {
        Ok(()) => ok(),
        Err(e) => store_error(e),
    }
}

/// A refused change: 507 when the region ran out of room (the message names
/// arena space, keys or state slots), 400 when the change itself is wrong.
fn store_error(e: StoreError) -> Answer {
    let status = match e {
        StoreError::Full(ConfigError::BadKey) => 400,
        StoreError::Full(_) | StoreError::NoStateSlot => 507,
        StoreError::Domain { .. } | StoreError::Upstream { .. } => 400,
    };
    error(status, e.to_string())
}

/// One peer as `GET /__erulb__/upstream` shows it. Fields in name order,
/// as the answer has always listed them.
#[derive(Serialize)]
struct PeerView<'a> {
    addr: String,
    backup: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    check_url: Option<&'a str>,
    down: bool,
    effective_weight: f64,
    fail_timeout: Seconds,
    /// Failed probes in a row.
    fails: u32,
    healthy: bool,
    last_check: Option<f64>,
    max_fails: u32,
    name: &'a str,
    out_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_start: Option<u32>,
    status: &'a str,
    weight: Weight,
}

/// Whole seconds as an integer, anything finer as a fraction.
#[derive(Serialize)]
#[serde(untagged)]
enum Seconds {
    Whole(u64),
    Fraction(f64),
}

fn get_upstreams(store: &Store) -> Answer {
    let body: BTreeMap<&str, Vec<PeerView>> = store
        .upstreams()
        .iter()
        .map(|(name, up)| {
            let peers = up
                .peers
                .iter()
                .map(|(peer_name, p)| {
                    let ms = p.params.fail_timeout_ms;
                    // Before the health thread first saw the peer: only
                    // its own parameters say anything.
                    let health = store.peer_status(p);
                    let out_reason = match health {
                        Some(h) => h.out_reason,
                        None => (!p.params.is_available()).then_some("down"),
                    };
                    PeerView {
                        addr: p.addr.to_string(),
                        backup: p.params.backup,
                        check_url: p.params.check_url.as_deref(),
                        down: p.params.down,
                        effective_weight: health
                            .map_or(p.params.weight.as_f64(), |h| h.effective_weight),
                        fail_timeout: if ms.is_multiple_of(1000) {
                            Seconds::Whole(ms / 1000)
                        } else {
                            Seconds::Fraction(ms as f64 / 1000.0)
                        },
                        fails: health.map_or(0, |h| h.fails),
                        healthy: out_reason.is_none(),
                        last_check: health.and_then(|h| h.last_check),
                        max_fails: p.params.max_fails,
                        name: peer_name,
                        out_reason,
                        slow_start: (p.params.slow_start_s > 0).then_some(p.params.slow_start_s),
                        status: &p.params.status,
                        weight: p.params.weight,
                    }
                })
                .collect();
            (name.as_str(), peers)
        })
        .collect();
    Answer::json(200, &body)
}
