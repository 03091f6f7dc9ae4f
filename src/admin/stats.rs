//! `GET /__erulb__/stats?upstream=U[&peer=A][&offset=S]` and
//! `GET /__erulb__/stats/tps[?offset=S]`: the request statistics
//! (`crate::stats`) over the last S seconds (default and most: 60).

use percent_encoding::percent_decode_str;
use serde_json::json;

use super::api::{Answer, error};
use crate::stats::{KEEP, unix_now};
use crate::store::Store;

/// The query's parameters, decoded; a later repeat wins.
struct Query {
    upstream: Option<String>,
    peer: Option<String>,
    offset: u64,
}

fn query(target: &[u8]) -> Result<Query, Answer> {
    let text = String::from_utf8_lossy(target);
    let mut q = Query {
        upstream: None,
        peer: None,
        offset: KEEP,
    };
    let Some((_, params)) = text.split_once('?') else {
        return Ok(q);
    };
    for pair in params.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode_str(&v.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned();
        match k {
            "upstream" => q.upstream = Some(v),
            "peer" => q.peer = Some(v),
            "offset" => {
                q.offset = match v.parse::<u64>() {
                    Ok(n) if n > 0 => n.min(KEEP),
                    _ => {
                        return Err(error(
                            400,
                            format!("offset: expected whole seconds from 1 to {KEEP}, found '{v}'"),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(q)
}

pub(super) fn report(store: &Store, target: &[u8]) -> Answer {
    let q = match query(target) {
        Ok(q) => q,
        Err(e) => return e,
    };
    let Some(upstream) = q.upstream else {
        return error(
            400,
            "stats: the query must name an upstream (?upstream=NAME)",
        );
    };
    if !store.upstreams().contains_key(&upstream) {
        return error(404, format!("no upstream named '{upstream}'"));
    }
    let r = store
        .stats()
        .report(&upstream, q.peer.as_deref(), q.offset, unix_now());
    Answer::json(200, &r)
}

pub(super) fn tps(store: &Store, target: &[u8]) -> Answer {
    match query(target) {
        Ok(q) => Answer::json(
            200,
            &json!({"tps": store.stats().tps(q.offset, unix_now())}),
        ),
        Err(e) => e,
    }
}
