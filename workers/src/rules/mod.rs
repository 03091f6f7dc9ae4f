//! A domain's routing rules (SPEC §5): a small graph of filters, compiled
//! once per configuration and walked once per request.
//!
//! ```json
//! {"init": "r1", "rules": {
//!     "r1": {"type": "ua",      "args": {"pattern": "httpie", "succ": "r2", "fail": "r3"}},
//!     "r2": {"type": "path",    "args": {"pattern": "^/blog/(\\S+)$", "regex": true, "rewrite": true, "succ": "r3"}},
//!     "r3": {"type": "backend", "args": {"servername": "up1", "expires": "30d"}}
//! }}
//! ```
//!
//! Compiling resolves rule names to indices and refuses, with a message naming
//! the rule, anything the walk could trip on: a dangling name, a cycle, a
//! pattern that does not compile, a backend without a `servername`.
//!
//! Patterns are byte regexes with Unicode mode off, as the original's
//! `ngx.re.match` without options (PCRE without `u`): `.` is one byte, `\w` and
//! `\s` are ASCII, and `(?i)` folds ASCII only. `(?u)` turns Unicode back on
//! for a pattern that wants it. PCRE-only syntax (look-around,
//! back-references) is refused as "does not compile".
//!
//! A walk allocates nothing once the caller's [`Scratch`] has grown: the
//! lower-cased User-Agent and a rewritten path live in its buffers, and a
//! rewriting rule keeps its capture slots next to its regex (behind a
//! `Mutex` that is never contended in a single-threaded worker; should it be,
//! the walk takes fresh slots instead of waiting).

use std::collections::HashMap;
use std::sync::{Mutex, TryLockError};

use regex::bytes::{CaptureLocations, Regex, RegexBuilder};
use serde_json::{Map, Value};

mod limit;

pub use limit::{Limit, LimitKey, Verdict};

/// Most rules one rule set may hold.
pub const MAX_RULES: usize = 1000;
/// Longest pattern, in bytes.
pub const MAX_PATTERN_LEN: usize = 4096;
/// Compiled size limit of one regex, so that a hostile pattern cannot eat a
/// worker's memory (`RegexBuilder::size_limit`, and the lazy DFA's cache).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Why a rule set is refused; the message names the rule at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("rule set is not JSON: {0}")]
    Json(String),
    #[error("rule set is not a JSON object")]
    NotObject,
    #[error("init is missing or not a string")]
    InitMissing,
    #[error("init names no rule: '{0}'")]
    InitUnknown(String),
    #[error("rules is missing or not an object")]
    RulesNotObject,
    #[error("too many rules: {0} (at most {MAX_RULES})")]
    TooManyRules(usize),
    #[error("rule '{rule}' is not an object")]
    RuleNotObject { rule: String },
    #[error("rule '{rule}': type is missing or not a string")]
    TypeMissing { rule: String },
    #[error("rule '{rule}': unknown type '{ty}' (expected ua, path, limit or backend)")]
    UnknownType { rule: String, ty: String },
    #[error("rule '{rule}': args is missing or not an object")]
    ArgsNotObject { rule: String },
    #[error("rule '{rule}': {key} must be a string naming a rule")]
    LinkNotString { rule: String, key: &'static str },
    #[error("rule '{rule}': {key} names no rule: '{target}'")]
    LinkUnknown {
        rule: String,
        key: &'static str,
        target: String,
    },
    #[error("cycle through rule '{0}'")]
    Cycle(String),
    #[error("rule '{rule}': pattern is missing or not a string")]
    PatternMissing { rule: String },
    #[error("rule '{rule}': pattern is {len} bytes long (at most {MAX_PATTERN_LEN})")]
    PatternTooLong { rule: String, len: usize },
    #[error("rule '{rule}': pattern does not compile: {reason}")]
    PatternInvalid { rule: String, reason: String },
    #[error("rule '{rule}': {key} must be true or false")]
    NotBool { rule: String, key: &'static str },
    #[error("rule '{rule}': backend has no servername")]
    ServernameMissing { rule: String },
    #[error("rule '{rule}': servername must be a non-empty string")]
    ServernameNotString { rule: String },
    #[error("rule '{rule}': '{name}' cannot be sent as a request header")]
    BadHeaderName { rule: String, name: String },
    #[error("rule '{rule}': the value of '{name}' cannot be sent in a request header")]
    BadHeaderValue { rule: String, name: String },
    #[error("rule '{rule}': {key} {why}")]
    BadLimit {
        rule: String,
        key: &'static str,
        why: String,
    },
}

/// A compiled rule set.
#[derive(Debug)]
pub struct RuleSet {
    nodes: Vec<Node>,
    init: usize,
}

/// Per-worker buffers reused by [`RuleSet::route`] from one request to the
/// next.
#[derive(Debug, Default)]
pub struct Scratch {
    /// The rewritten path, when [`Decision::Backend`] says `rewritten`.
    pub path: Vec<u8>,
    /// The User-Agent, lower-cased.
    ua: Vec<u8>,
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'s> {
    /// Proxy to `servername` (an upstream name or a `host:port`), adding
    /// `headers`; when `rewritten`, the path to send is in [`Scratch::path`]
    /// (the query string is the caller's to keep).
    Backend {
        servername: &'s str,
        headers: &'s [(String, String)],
        rewritten: bool,
    },
    /// The walk reached a rule with no `succ` (or `fail`) for its outcome:
    /// answer 403.
    Forbidden,
    /// A `limit` rule without `fail` refused it: answer 429, with
    /// `Retry-After` in seconds.
    Limited { rule: &'s str, retry_after: u64 },
}

#[derive(Debug)]
enum Node {
    Filter {
        test: Test,
        succ: Option<usize>,
        fail: Option<usize>,
    },
    Backend {
        servername: String,
        headers: Vec<(String, String)>,
    },
}

#[derive(Debug)]
enum Test {
    /// The lower-cased User-Agent contains a match.
    Ua(Regex),
    /// The path starts with these bytes.
    Prefix(Box<[u8]>),
    /// The path contains a match.
    PathRegex(Regex),
    /// The path contains a match; the path becomes its first group.
    Rewrite(Regex, Mutex<CaptureLocations>),
    /// Within the rate of the rule's bucket.
    Limit(Limit),
}

impl RuleSet {
    /// Compiles a rule set from its JSON text.
    pub fn from_slice(bytes: &[u8]) -> Result<RuleSet, RuleError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| RuleError::Json(e.to_string()))?;
        RuleSet::from_json(&v)
    }

    /// Compiles and validates a rule set.
    pub fn from_json(v: &Value) -> Result<RuleSet, RuleError> {
        let set = v.as_object().ok_or(RuleError::NotObject)?;
        let init = set
            .get("init")
            .and_then(Value::as_str)
            .ok_or(RuleError::InitMissing)?;
        let rules = set
            .get("rules")
            .and_then(Value::as_object)
            .ok_or(RuleError::RulesNotObject)?;
        if rules.len() > MAX_RULES {
            return Err(RuleError::TooManyRules(rules.len()));
        }
        let index: HashMap<&str, usize> = rules
            .keys()
            .enumerate()
            .map(|(i, name)| (name.as_str(), i))
            .collect();
        let init = *index
            .get(init)
            .ok_or_else(|| RuleError::InitUnknown(init.to_owned()))?;
        let nodes = rules
            .iter()
            .map(|(name, rule)| compile_rule(name, rule, &index))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(at) = find_cycle(&nodes) {
            let name = rules.keys().nth(at).map_or("", String::as_str);
            return Err(RuleError::Cycle(name.to_owned()));
        }
        Ok(RuleSet { nodes, init })
    }

    /// Walks the graph for one request. `path` is the request path without
    /// the query string.
    ///
    /// `scratch` is a per-worker buffer reused across requests (no allocation
    /// per request once warm): when a rewrite happened, the final path is
    /// left in `scratch.path` and `Decision::Backend.rewritten` is true.
    /// `limiter` decides each `limit` rule the walk meets (the caller owns
    /// the buckets; rule sets without limits never call it).
    pub fn route<'s>(
        &'s self,
        path: &[u8],
        user_agent: Option<&[u8]>,
        scratch: &mut Scratch,
        limiter: &mut dyn FnMut(&Limit) -> Verdict,
    ) -> Decision<'s> {
        let mut rewritten = false;
        let mut ua_ready = false;
        let mut at = self.init;
        // The graph is acyclic, so a walk visits each node at most once; the
        // bound is defence in depth.
        for _ in 0..self.nodes.len() {
            let Some(node) = self.nodes.get(at) else {
                break;
            };
            let (test, succ, fail) = match node {
                Node::Backend {
                    servername,
                    headers,
                } => {
                    return Decision::Backend {
                        servername,
                        headers,
                        rewritten,
                    };
                }
                Node::Filter { test, succ, fail } => (test, *succ, *fail),
            };
            let matched = match test {
                Test::Ua(re) => match user_agent {
                    None => false,
                    Some(ua) => {
                        if !ua_ready {
                            scratch.ua.clear();
                            scratch.ua.extend(ua.iter().map(u8::to_ascii_lowercase));
                            ua_ready = true;
                        }
                        re.is_match(&scratch.ua)
                    }
                },
                Test::Prefix(prefix) => current(path, scratch, rewritten).starts_with(prefix),
                Test::PathRegex(re) => re.is_match(current(path, scratch, rewritten)),
                Test::Rewrite(re, locs) => {
                    match first_group(re, locs, current(path, scratch, rewritten)) {
                        None => false,
                        Some(group) => {
                            set_path(&mut scratch.path, path, rewritten, group);
                            rewritten = true;
                            true
                        }
                    }
                }
                Test::Limit(l) => match limiter(l) {
                    Verdict::Pass => true,
                    Verdict::Over { retry_after } if fail.is_none() => {
                        return Decision::Limited {
                            rule: &l.name,
                            retry_after,
                        };
                    }
                    Verdict::Over { .. } => false,
                },
            };
            match if matched { succ } else { fail } {
                Some(next) => at = next,
                None => break,
            }
        }
        Decision::Forbidden
    }
}

/// The path as the walk sees it so far.
fn current<'a>(input: &'a [u8], scratch: &'a Scratch, rewritten: bool) -> &'a [u8] {
    if rewritten { &scratch.path } else { input }
}

/// Searches `hay`: `None` when there is no match, else the span of the first
/// group when it took part in the match.
fn first_group(
    re: &Regex,
    locs: &Mutex<CaptureLocations>,
    hay: &[u8],
) -> Option<Option<(usize, usize)>> {
    let search = |locs: &mut CaptureLocations| re.captures_read(locs, hay).map(|_| locs.get(1));
    match locs.try_lock() {
        Ok(mut locs) => search(&mut locs),
        // Capture slots hold no invariant a panic could break.
        Err(TryLockError::Poisoned(p)) => search(&mut p.into_inner()),
        Err(TryLockError::WouldBlock) => search(&mut re.capture_locations()),
    }
}

/// Makes `buf` the rewritten path: the captured span of the current path
/// (`input`, or `buf` itself after an earlier rewrite), with a leading `/`;
/// `/` alone when nothing was captured.
fn set_path(buf: &mut Vec<u8>, input: &[u8], in_buf: bool, group: Option<(usize, usize)>) {
    let (mut start, end) = match group {
        Some((s, e)) if s < e => (s, e),
        _ => {
            buf.clear();
            buf.push(b'/');
            return;
        }
    };
    if !in_buf {
        let captured = input.get(start..end).unwrap_or_default();
        buf.clear();
        if captured.first() != Some(&b'/') {
            buf.push(b'/');
        }
        buf.extend_from_slice(captured);
        return;
    }
    // In place: keep buf[start..end], with a `/` before it.
    buf.truncate(end);
    if buf.get(start) != Some(&b'/') {
        match start
            .checked_sub(1)
            .and_then(|s| buf.get_mut(s).map(|b| (s, b)))
        {
            Some((s, b)) => {
                *b = b'/';
                start = s;
            }
            None => {
                buf.insert(0, b'/');
                return;
            }
        }
    }
    buf.drain(..start);
}

fn compile_rule(name: &str, rule: &Value, index: &HashMap<&str, usize>) -> Result<Node, RuleError> {
    let rule_err = || name.to_owned();
    let rule = rule
        .as_object()
        .ok_or_else(|| RuleError::RuleNotObject { rule: rule_err() })?;
    let ty = rule
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| RuleError::TypeMissing { rule: rule_err() })?;
    let args = || {
        rule.get("args")
            .and_then(Value::as_object)
            .ok_or_else(|| RuleError::ArgsNotObject { rule: rule_err() })
    };
    let test = match ty {
        "backend" => return compile_backend(name, args()?),
        "ua" => Test::Ua(compile_regex(name, pattern(name, args()?)?)?),
        "limit" => Test::Limit(Limit::compile(name, args()?)?),
        "path" => {
            let args = args()?;
            let pattern = pattern(name, args)?;
            match (flag(name, args, "regex")?, flag(name, args, "rewrite")?) {
                (false, _) => Test::Prefix(pattern.as_bytes().into()),
                (true, false) => Test::PathRegex(compile_regex(name, pattern)?),
                (true, true) => {
                    let re = compile_regex(name, pattern)?;
                    let locs = Mutex::new(re.capture_locations());
                    Test::Rewrite(re, locs)
                }
            }
        }
        other => {
            return Err(RuleError::UnknownType {
                rule: rule_err(),
                ty: other.to_owned(),
            });
        }
    };
    let args = args()?;
    Ok(Node::Filter {
        test,
        succ: link(name, args, "succ", index)?,
        fail: link(name, args, "fail", index)?,
    })
}

fn compile_backend(name: &str, args: &Map<String, Value>) -> Result<Node, RuleError> {
    let servername = match args.get("servername") {
        None => {
            return Err(RuleError::ServernameMissing {
                rule: name.to_owned(),
            });
        }
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(RuleError::ServernameNotString {
                rule: name.to_owned(),
            });
        }
    };
    let mut headers = Vec::with_capacity(args.len().saturating_sub(1));
    for (key, value) in args {
        if key == "servername" {
            continue;
        }
        if !is_header_name(key) {
            return Err(RuleError::BadHeaderName {
                rule: name.to_owned(),
                name: key.clone(),
            });
        }
        let value = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if !is_header_value(&value) {
            return Err(RuleError::BadHeaderValue {
                rule: name.to_owned(),
                name: key.clone(),
            });
        }
        headers.push((key.clone(), value));
    }
    Ok(Node::Backend {
        servername,
        headers,
    })
}

fn pattern<'a>(name: &str, args: &'a Map<String, Value>) -> Result<&'a str, RuleError> {
    let pattern =
        args.get("pattern")
            .and_then(Value::as_str)
            .ok_or_else(|| RuleError::PatternMissing {
                rule: name.to_owned(),
            })?;
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(RuleError::PatternTooLong {
            rule: name.to_owned(),
            len: pattern.len(),
        });
    }
    Ok(pattern)
}

fn compile_regex(name: &str, pattern: &str) -> Result<Regex, RuleError> {
    RegexBuilder::new(pattern)
        .unicode(false)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| RuleError::PatternInvalid {
            rule: name.to_owned(),
            reason: e.to_string(),
        })
}

/// An optional boolean arg (default false).
fn flag(name: &str, args: &Map<String, Value>, key: &'static str) -> Result<bool, RuleError> {
    match args.get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(RuleError::NotBool {
            rule: name.to_owned(),
            key,
        }),
    }
}

/// `succ` or `fail`: absent (or `null`, as a client with an unset field
/// sends) means "answer 403 on this outcome".
fn link(
    name: &str,
    args: &Map<String, Value>,
    key: &'static str,
    index: &HashMap<&str, usize>,
) -> Result<Option<usize>, RuleError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(target)) => match index.get(target.as_str()) {
            Some(&i) => Ok(Some(i)),
            None => Err(RuleError::LinkUnknown {
                rule: name.to_owned(),
                key,
                target: target.clone(),
            }),
        },
        Some(_) => Err(RuleError::LinkNotString {
            rule: name.to_owned(),
            key,
        }),
    }
}

/// A node on a cycle of the graph, if there is one (iterative depth-first
/// search, three colours).
fn find_cycle(nodes: &[Node]) -> Option<usize> {
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let edges = |at: usize| match nodes.get(at) {
        Some(Node::Filter { succ, fail, .. }) => [*succ, *fail],
        _ => [None, None],
    };
    let mut colour = vec![Colour::White; nodes.len()];
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for root in 0..nodes.len() {
        if colour[root] != Colour::White {
            continue;
        }
        colour[root] = Colour::Grey;
        stack.push((root, 0));
        while let Some((at, next)) = stack.last_mut() {
            let at = *at;
            let Some(edge) = edges(at).get(*next).copied() else {
                colour[at] = Colour::Black;
                stack.pop();
                continue;
            };
            *next += 1;
            let Some(to) = edge else { continue };
            match colour[to] {
                Colour::Grey => return Some(to),
                Colour::Black => {}
                Colour::White => {
                    colour[to] = Colour::Grey;
                    stack.push((to, 0));
                }
            }
        }
    }
    None
}

/// RFC 9110 token, and not a header the proxy itself frames the request
/// with: a rule must not be able to smuggle a second `Content-Length`.
fn is_header_name(name: &str) -> bool {
    const RESERVED: &[&str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
        "trailer",
        "expect",
    ];
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        && !RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// No control characters (which would end the header line) but tab.
fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

#[cfg(test)]
mod tests;
