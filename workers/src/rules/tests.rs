use serde_json::json;

use super::*;

fn set(v: Value) -> RuleSet {
    match RuleSet::from_json(&v) {
        Ok(s) => s,
        Err(e) => panic!("refused {v}: {e}"),
    }
}

fn refused(v: Value) -> String {
    match RuleSet::from_json(&v) {
        Ok(_) => panic!("accepted {v}"),
        Err(e) => e.to_string(),
    }
}

/// The servername chosen, the path sent ("" when not rewritten).
fn go(s: &RuleSet, path: &str, ua: Option<&str>) -> Option<(String, String)> {
    let mut scratch = Scratch::default();
    go_with(s, path, ua, &mut scratch)
}

fn go_with(
    s: &RuleSet,
    path: &str,
    ua: Option<&str>,
    scratch: &mut Scratch,
) -> Option<(String, String)> {
    match s.route(path.as_bytes(), ua.map(str::as_bytes), scratch, &mut |_| {
        Verdict::Pass
    }) {
        Decision::Forbidden | Decision::Limited { .. } => None,
        Decision::Backend {
            servername,
            rewritten,
            ..
        } => {
            let sent = if rewritten {
                String::from_utf8_lossy(&scratch.path).into_owned()
            } else {
                String::new()
            };
            Some((servername.to_owned(), sent))
        }
    }
}

fn to(servername: &str) -> Option<(String, String)> {
    Some((servername.to_owned(), String::new()))
}

fn rewritten(servername: &str, path: &str) -> Option<(String, String)> {
    Some((servername.to_owned(), path.to_owned()))
}

/// `init` is a path rule with `args`, then backends "yes" / "no".
fn path_rule(args: Value) -> RuleSet {
    let mut args = args;
    args["succ"] = json!("yes");
    args["fail"] = json!("no");
    set(json!({"init": "p", "rules": {
        "p": {"type": "path", "args": args},
        "yes": {"type": "backend", "args": {"servername": "yes"}},
        "no": {"type": "backend", "args": {"servername": "no"}},
    }}))
}

fn ua_rule(pattern: &str) -> RuleSet {
    set(json!({"init": "u", "rules": {
        "u": {"type": "ua", "args": {"pattern": pattern, "succ": "yes", "fail": "no"}},
        "yes": {"type": "backend", "args": {"servername": "yes"}},
        "no": {"type": "backend", "args": {"servername": "no"}},
    }}))
}

// The README of projecteru2/elb (its trailing comma left out).
#[test]
fn readme_example_ua_then_path_then_backend() {
    let s = set(json!({
        "init": "r1",
        "rules": {
            "r1": {"type": "ua", "args": {"fail": "r3", "pattern": "httpie(\\S+)$", "succ": "r4"}},
            "r2": {"type": "backend", "args": {"servername": "upstrimg1"}},
            "r3": {"type": "backend", "args": {"servername": "upstream2"}},
            "r4": {"type": "path", "args": {"regex": true, "pattern": "^\\/blog\\/(\\S+)$", "succ": "r2", "fail": "r3", "rewrite": false}}
        }
    }));
    let httpie = Some("HTTPie/0.9.9");
    assert_eq!(go(&s, "/blog/post-1", httpie), to("upstrimg1"));
    assert_eq!(go(&s, "/blog/", httpie), to("upstream2"));
    assert_eq!(go(&s, "/about", httpie), to("upstream2"));
    assert_eq!(go(&s, "/blog/post-1", Some("curl/8.0")), to("upstream2"));
    assert_eq!(go(&s, "/blog/post-1", None), to("upstream2"));
    // The same chain, rewriting.
    let s = set(json!({
        "init": "r1",
        "rules": {
            "r1": {"type": "ua", "args": {"fail": "r3", "pattern": "httpie(\\S+)$", "succ": "r4"}},
            "r2": {"type": "backend", "args": {"servername": "upstrimg1"}},
            "r3": {"type": "backend", "args": {"servername": "upstream2"}},
            "r4": {"type": "path", "args": {"regex": true, "pattern": "^\\/blog\\/(\\S+)$", "succ": "r2", "fail": "r3", "rewrite": true}}
        }
    }));
    assert_eq!(
        go(&s, "/blog/post-1", httpie),
        rewritten("upstrimg1", "/post-1")
    );
}

// projecteru2/elb's sample/fill_upstream_with_rules.py.
#[test]
fn sample_ua_rule_falls_back_to_prefix_rule() {
    let s = set(json!({"init": "ua", "rules": {
        "ua": {"type": "ua", "args": {"pattern": "test$", "succ": "backend1", "fail": "path"}},
        "path": {"type": "path", "args": {"pattern": "/path1", "succ": "backend2", "fail": "backend1"}},
        "backend1": {"type": "backend", "args": {"servername": "up1"}},
        "backend2": {"type": "backend", "args": {"servername": "up2"}},
    }}));
    assert_eq!(go(&s, "/path1/x", Some("my TEST")), to("up1"));
    assert_eq!(go(&s, "/path1/x", Some("test-not-last")), to("up2"));
    assert_eq!(go(&s, "/path1/x", None), to("up2"));
    assert_eq!(go(&s, "/path2", None), to("up1"));
}

#[test]
fn ua_is_lower_cased_before_matching() {
    let s = ua_rule("firefox/\\d+");
    assert_eq!(go(&s, "/", Some("Mozilla/5.0 FireFox/120")), to("yes"));
    assert_eq!(go(&s, "/", Some("Mozilla/5.0 Chrome/120")), to("no"));
}

#[test]
fn ua_pattern_with_upper_case_never_matches() {
    let s = ua_rule("Firefox");
    assert_eq!(go(&s, "/", Some("Firefox")), to("no"));
    assert_eq!(go(&s, "/", Some("firefox")), to("no"));
    // Case-insensitivity is the pattern's to ask for.
    assert_eq!(go(&ua_rule("(?i)Firefox"), "/", Some("Firefox")), to("yes"));
}

#[test]
fn missing_ua_takes_fail_even_for_a_pattern_matching_empty() {
    let s = ua_rule("");
    assert_eq!(go(&s, "/", None), to("no"));
    assert_eq!(go(&s, "/", Some("")), to("yes"));
}

#[test]
fn ua_lower_cased_once_per_walk_and_not_leaked_to_next_request() {
    let s = set(json!({"init": "a", "rules": {
        "a": {"type": "ua", "args": {"pattern": "^x", "succ": "b", "fail": "b"}},
        "b": {"type": "ua", "args": {"pattern": "^xy$", "succ": "yes", "fail": "no"}},
        "yes": {"type": "backend", "args": {"servername": "yes"}},
        "no": {"type": "backend", "args": {"servername": "no"}},
    }}));
    let mut scratch = Scratch::default();
    assert_eq!(go_with(&s, "/", Some("XY"), &mut scratch), to("yes"));
    assert_eq!(go_with(&s, "/", None, &mut scratch), to("no"));
    assert_eq!(go_with(&s, "/", Some("X"), &mut scratch), to("no"));
}

#[test]
fn prefix_path_is_literal_and_anchored_at_start() {
    let s = path_rule(json!({"pattern": "/a.b"}));
    assert_eq!(go(&s, "/a.b", None), to("yes"));
    assert_eq!(go(&s, "/a.b/c", None), to("yes"));
    assert_eq!(go(&s, "/axb", None), to("no"));
    assert_eq!(go(&s, "/x/a.b", None), to("no"));
    assert_eq!(go(&s, "/a", None), to("no"));
    // Not a regex, so not compiled: any text is a valid prefix.
    let s = path_rule(json!({"pattern": "/a(b", "regex": false}));
    assert_eq!(go(&s, "/a(b", None), to("yes"));
    // An empty prefix matches every path.
    assert_eq!(go(&path_rule(json!({"pattern": ""})), "/", None), to("yes"));
}

#[test]
fn rewrite_without_regex_is_ignored() {
    let s = path_rule(json!({"pattern": "/api", "rewrite": true}));
    assert_eq!(go(&s, "/api/v1", None), to("yes"));
}

#[test]
fn regex_path_matches_anywhere_unless_anchored() {
    let s = path_rule(json!({"pattern": "\\.png$", "regex": true}));
    assert_eq!(go(&s, "/img/a.png", None), to("yes"));
    assert_eq!(go(&s, "/img/a.png/x", None), to("no"));
    let s = path_rule(json!({"pattern": "img", "regex": true}));
    assert_eq!(go(&s, "/static/img/a", None), to("yes"));
    let s = path_rule(json!({"pattern": "^img", "regex": true}));
    assert_eq!(go(&s, "/static/img/a", None), to("no"));
}

#[test]
fn patterns_are_case_sensitive_as_written() {
    let s = path_rule(json!({"pattern": "/API", "regex": true}));
    assert_eq!(go(&s, "/api", None), to("no"));
    assert_eq!(go(&s, "/API", None), to("yes"));
    let s = path_rule(json!({"pattern": "/API"}));
    assert_eq!(go(&s, "/api", None), to("no"));
}

#[test]
fn patterns_match_bytes_as_pcre_without_utf8() {
    // `.` is one byte, and a path need not be UTF-8.
    let s = path_rule(json!({"pattern": "^/.$", "regex": true}));
    let mut scratch = Scratch::default();
    assert!(matches!(
        s.route(b"/\xff", None, &mut scratch, &mut |_| Verdict::Pass),
        Decision::Backend {
            servername: "yes",
            ..
        }
    ));
    assert_eq!(go(&s, "/é", None), to("no"));
    // Non-ASCII text in a pattern matches its UTF-8 bytes.
    let s = path_rule(json!({"pattern": "^/café", "regex": true}));
    assert_eq!(go(&s, "/café/menu", None), to("yes"));
    // `\w` is ASCII, unless the pattern asks for Unicode.
    let s = path_rule(json!({"pattern": "^/\\w+$", "regex": true}));
    assert_eq!(go(&s, "/é", None), to("no"));
    let s = path_rule(json!({"pattern": "^/(?u:\\w)+$", "regex": true}));
    assert_eq!(go(&s, "/é", None), to("yes"));
}

#[test]
fn rewrite_to_first_capture_group() {
    let s = path_rule(json!({"pattern": "^/api(/.*)$", "regex": true, "rewrite": true}));
    assert_eq!(go(&s, "/api/v1/users", None), rewritten("yes", "/v1/users"));
    assert_eq!(go(&s, "/v1", None), to("no"));
    // Only the first group counts.
    let s = path_rule(json!({"pattern": "^/(a)/(b)", "regex": true, "rewrite": true}));
    assert_eq!(go(&s, "/a/b/c", None), rewritten("yes", "/a"));
}

#[test]
fn rewrite_adds_leading_slash() {
    let s = path_rule(json!({"pattern": "^/blog/(\\S+)$", "regex": true, "rewrite": true}));
    assert_eq!(
        go(&s, "/blog/2024/post", None),
        rewritten("yes", "/2024/post")
    );
}

#[test]
fn rewrite_to_slash_when_nothing_captured() {
    // No group at all.
    let s = path_rule(json!({"pattern": "^/old", "regex": true, "rewrite": true}));
    assert_eq!(go(&s, "/old/page", None), rewritten("yes", "/"));
    // A group that took no part in the match.
    let s = path_rule(json!({"pattern": "^/old(/x)?", "regex": true, "rewrite": true}));
    assert_eq!(go(&s, "/old/page", None), rewritten("yes", "/"));
    assert_eq!(go(&s, "/old/x", None), rewritten("yes", "/x"));
    // An empty group.
    let s = path_rule(json!({"pattern": "^/old(.*)$", "regex": true, "rewrite": true}));
    assert_eq!(go(&s, "/old", None), rewritten("yes", "/"));
}

#[test]
fn rewrite_is_seen_by_later_rules() {
    let s = set(json!({"init": "strip", "rules": {
        "strip": {"type": "path", "args": {"pattern": "^/v1(/.*)$", "regex": true, "rewrite": true, "succ": "check", "fail": "check"}},
        "check": {"type": "path", "args": {"pattern": "/users", "succ": "users", "fail": "other"}},
        "users": {"type": "backend", "args": {"servername": "users"}},
        "other": {"type": "backend", "args": {"servername": "other"}},
    }}));
    assert_eq!(go(&s, "/v1/users/7", None), rewritten("users", "/users/7"));
    assert_eq!(go(&s, "/users/7", None), to("users"));
    assert_eq!(go(&s, "/v1/items", None), rewritten("other", "/items"));
}

#[test]
fn successive_rewrites_work_on_the_rewritten_path() {
    // Each rewrite reads scratch.path itself: a group that starts with
    // `/`, one preceded by a byte, and one at the very start.
    let s = set(json!({"init": "a", "rules": {
        "a": {"type": "path", "args": {"pattern": "^/a(/.*)$", "regex": true, "rewrite": true, "succ": "b"}},
        "b": {"type": "path", "args": {"pattern": "^/b/(.*)$", "regex": true, "rewrite": true, "succ": "c"}},
        "c": {"type": "path", "args": {"pattern": "^(.)(.*)", "regex": true, "rewrite": true, "succ": "d"}},
        "d": {"type": "path", "args": {"pattern": "^/(.)", "regex": true, "rewrite": true, "succ": "end"}},
        "end": {"type": "backend", "args": {"servername": "end"}},
    }}));
    let s_c = set(json!({"init": "a", "rules": {
        "a": {"type": "path", "args": {"pattern": "^/a(/.*)$", "regex": true, "rewrite": true, "succ": "b"}},
        "b": {"type": "path", "args": {"pattern": "^/b/(.*)$", "regex": true, "rewrite": true, "succ": "end"}},
        "end": {"type": "backend", "args": {"servername": "end"}},
    }}));
    assert_eq!(go(&s_c, "/a/b/c/d", None), rewritten("end", "/c/d"));
    // "/a/b/xyz" -> "/b/xyz" -> "/xyz" -> "/" (group 1 of `^(.)(.*)`),
    // which `^/(.)` does not match, and "d" has no fail: Forbidden.
    assert_eq!(go(&s, "/a/b/xyz", None), None);
    let s = set(json!({"init": "a", "rules": {
        "a": {"type": "path", "args": {"pattern": "^/a(/.*)$", "regex": true, "rewrite": true, "succ": "c"}},
        "c": {"type": "path", "args": {"pattern": "^/(x)yz", "regex": true, "rewrite": true, "succ": "d"}},
        "d": {"type": "path", "args": {"pattern": "^(/)(x)", "regex": true, "rewrite": true, "succ": "e"}},
        "e": {"type": "path", "args": {"pattern": "^.*$", "regex": true, "rewrite": false, "succ": "end"}},
        "end": {"type": "backend", "args": {"servername": "end"}},
    }}));
    // "/a/xyz" -> "/xyz" -> "/x" -> "/"
    assert_eq!(go(&s, "/a/xyz", None), rewritten("end", "/"));
    let s = set(json!({"init": "a", "rules": {
        "a": {"type": "path", "args": {"pattern": "^/a/(.*)$", "regex": true, "rewrite": true, "succ": "b"}},
        "b": {"type": "path", "args": {"pattern": "^/(.*)$", "regex": true, "rewrite": true, "succ": "c"}},
        "c": {"type": "path", "args": {"pattern": "^(.*)$", "regex": true, "rewrite": true, "succ": "end"}},
        "end": {"type": "backend", "args": {"servername": "end"}},
    }}));
    // Group starting at offset 0 without a slash: one is inserted.
    let mut scratch = Scratch::default();
    scratch.path.extend_from_slice(b"stale");
    assert_eq!(
        go_with(&s, "/a/q/r", None, &mut scratch),
        rewritten("end", "/q/r")
    );
}

#[test]
fn in_place_rewrite_of_each_shape() {
    let cases = [
        ("/abc/def", Some((4, 8)), "/def"),
        ("/abc/def", Some((5, 8)), "/def"),
        ("/abc/def", Some((1, 4)), "/abc"),
        ("abc/def", Some((0, 3)), "/abc"),
        ("/abc", Some((0, 4)), "/abc"),
        ("/abc", Some((2, 2)), "/"),
        ("/abc", None, "/"),
    ];
    for (path, group, want) in cases {
        let mut buf = path.as_bytes().to_vec();
        set_path(&mut buf, b"", true, group);
        assert_eq!(buf, want.as_bytes(), "{path} {group:?}");
        let mut buf = b"junk".to_vec();
        set_path(&mut buf, path.as_bytes(), false, group);
        assert_eq!(buf, want.as_bytes(), "{path} {group:?}");
    }
}

#[test]
fn scratch_is_reused_without_reallocating() {
    let s = set(json!({"init": "u", "rules": {
        "u": {"type": "ua", "args": {"pattern": "bot", "succ": "p", "fail": "p"}},
        "p": {"type": "path", "args": {"pattern": "^/x(/.*)$", "regex": true, "rewrite": true, "succ": "end", "fail": "end"}},
        "end": {"type": "backend", "args": {"servername": "end"}},
    }}));
    let mut scratch = Scratch::default();
    let long = format!("/x/{}", "a".repeat(200));
    let ua = "B".repeat(200);
    assert!(go_with(&s, &long, Some(&ua), &mut scratch).is_some());
    let (path_buf, ua_buf) = (scratch.path.as_ptr(), scratch.ua.as_ptr());
    for _ in 0..10 {
        assert_eq!(
            go_with(&s, "/x/y", Some("Bot"), &mut scratch),
            rewritten("end", "/y")
        );
        assert_eq!(go_with(&s, "/other", Some("Bot"), &mut scratch), to("end"));
        assert_eq!(
            go_with(&s, &long, Some(&ua), &mut scratch).map(|r| r.1.len()),
            Some(201)
        );
    }
    assert_eq!(scratch.path.as_ptr(), path_buf);
    assert_eq!(scratch.ua.as_ptr(), ua_buf);
}

#[test]
fn rewrite_still_works_when_capture_slots_are_busy() {
    let s = path_rule(json!({"pattern": "^/a(/.*)$", "regex": true, "rewrite": true}));
    let Some(Node::Filter {
        test: Test::Rewrite(_, locs),
        ..
    }) = s.nodes.get(s.init)
    else {
        panic!("init is not a rewriting rule");
    };
    let _held = locs.lock();
    assert_eq!(go(&s, "/a/b", None), rewritten("yes", "/b"));
}

#[test]
fn rule_set_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<RuleSet>();
}

#[test]
fn missing_succ_or_fail_is_forbidden() {
    let s = set(json!({"init": "p", "rules": {
        "p": {"type": "path", "args": {"pattern": "/open", "succ": "b"}},
        "b": {"type": "backend", "args": {"servername": "b"}},
    }}));
    assert_eq!(go(&s, "/open/x", None), to("b"));
    assert_eq!(go(&s, "/closed", None), None);
    let s = set(json!({"init": "u", "rules": {
        "u": {"type": "ua", "args": {"pattern": "bot", "fail": "b"}},
        "b": {"type": "backend", "args": {"servername": "b"}},
    }}));
    assert_eq!(go(&s, "/", Some("GoogleBot")), None);
    assert_eq!(go(&s, "/", Some("curl")), to("b"));
    assert_eq!(go(&s, "/", None), to("b"));
}

#[test]
fn null_succ_or_fail_is_absent() {
    // The original's Python client sends None for an unset branch.
    let s = set(json!({"init": "p", "rules": {
        "p": {"type": "path", "args": {"pattern": "/a", "succ": "b", "fail": null}},
        "b": {"type": "backend", "args": {"servername": "b"}},
    }}));
    assert_eq!(go(&s, "/a", None), to("b"));
    assert_eq!(go(&s, "/z", None), None);
}

#[test]
fn init_may_be_a_backend() {
    let s = set(
        json!({"init": "b", "rules": {"b": {"type": "backend", "args": {"servername": "10.0.0.1:80"}}}}),
    );
    assert_eq!(go(&s, "/anything", None), to("10.0.0.1:80"));
}

#[test]
fn extra_backend_args_become_headers() {
    let s = set(
        json!({"init": "b", "rules": {"b": {"type": "backend", "args": {
            "servername": "static",
            "path": "/srv/www",
            "expires": "30d",
            "max-age": 3600,
            "ratio": 1.5,
            "X-Flag": true,
            "X-None": null,
            "X-List": [1, "a"],
            "X-Map": {"k": "v"},
        }}}}),
    );
    let mut scratch = Scratch::default();
    let Decision::Backend {
        servername,
        headers,
        rewritten,
    } = s.route(b"/", None, &mut scratch, &mut |_| Verdict::Pass)
    else {
        panic!("forbidden");
    };
    assert_eq!(servername, "static");
    assert!(!rewritten);
    let mut got: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    got.sort_unstable();
    assert_eq!(
        got,
        [
            ("X-Flag", "true"),
            ("X-List", "[1,\"a\"]"),
            ("X-Map", "{\"k\":\"v\"}"),
            ("X-None", "null"),
            ("expires", "30d"),
            ("max-age", "3600"),
            ("path", "/srv/www"),
            ("ratio", "1.5"),
        ]
    );
    // A backend with only its servername sends no header.
    let s = set(
        json!({"init": "b", "rules": {"b": {"type": "backend", "args": {"servername": "up"}}}}),
    );
    assert!(matches!(
        s.route(b"/", None, &mut scratch, &mut |_| Verdict::Pass),
        Decision::Backend { headers: [], .. }
    ));
}

#[test]
fn backend_args_that_cannot_be_headers_are_refused() {
    let backend =
        |args: Value| json!({"init": "b", "rules": {"b": {"type": "backend", "args": args}}});
    assert_eq!(
        refused(backend(json!({"servername": "up", "bad name": "x"}))),
        "rule 'b': 'bad name' cannot be sent as a request header"
    );
    assert_eq!(
        refused(backend(json!({"servername": "up", "": "x"}))),
        "rule 'b': '' cannot be sent as a request header"
    );
    assert_eq!(
        refused(backend(json!({"servername": "up", "Content-Length": "0"}))),
        "rule 'b': 'Content-Length' cannot be sent as a request header"
    );
    assert_eq!(
        refused(backend(
            json!({"servername": "up", "transfer-encoding": "chunked"})
        )),
        "rule 'b': 'transfer-encoding' cannot be sent as a request header"
    );
    assert_eq!(
        refused(backend(json!({"servername": "up", "x-a": "1\r\nx-b: 2"}))),
        "rule 'b': the value of 'x-a' cannot be sent in a request header"
    );
    assert_eq!(
        refused(backend(json!({"servername": "up", "x-a": "a\u{0}"}))),
        "rule 'b': the value of 'x-a' cannot be sent in a request header"
    );
    // Tabs and non-ASCII text are fine.
    set(backend(json!({"servername": "up", "x-a": "a\tb é"})));
}

#[test]
fn refuses_non_objects() {
    assert_eq!(refused(json!([])), "rule set is not a JSON object");
    assert_eq!(refused(json!("r")), "rule set is not a JSON object");
    assert_eq!(
        refused(json!({"init": "a", "rules": []})),
        "rules is missing or not an object"
    );
    assert_eq!(
        refused(json!({"init": "a"})),
        "rules is missing or not an object"
    );
    assert_eq!(
        refused(json!({"init": "a", "rules": {"a": "backend"}})),
        "rule 'a' is not an object"
    );
    assert_eq!(
        refused(json!({"init": "a", "rules": {"a": {"type": "backend", "args": ["servername"]}}})),
        "rule 'a': args is missing or not an object"
    );
    assert_eq!(
        refused(json!({"init": "a", "rules": {"a": {"type": "ua"}}})),
        "rule 'a': args is missing or not an object"
    );
}

#[test]
fn refuses_missing_or_unknown_init() {
    let rules = json!({"b": {"type": "backend", "args": {"servername": "up"}}});
    assert_eq!(
        refused(json!({"rules": rules})),
        "init is missing or not a string"
    );
    assert_eq!(
        refused(json!({"init": 1, "rules": rules})),
        "init is missing or not a string"
    );
    assert_eq!(
        refused(json!({"init": "x", "rules": rules})),
        "init names no rule: 'x'"
    );
    assert_eq!(
        RuleSet::from_json(&json!({"init": "x", "rules": rules})).err(),
        Some(RuleError::InitUnknown("x".into()))
    );
    assert_eq!(
        refused(json!({"init": "x", "rules": {}})),
        "init names no rule: 'x'"
    );
}

#[test]
fn refuses_dangling_or_non_string_links() {
    assert_eq!(
        refused(json!({"init": "p", "rules": {
            "p": {"type": "path", "args": {"pattern": "/", "succ": "gone", "fail": "b"}},
            "b": {"type": "backend", "args": {"servername": "up"}},
        }})),
        "rule 'p': succ names no rule: 'gone'"
    );
    assert_eq!(
        refused(json!({"init": "u", "rules": {
            "u": {"type": "ua", "args": {"pattern": "x", "succ": "b", "fail": "nope"}},
            "b": {"type": "backend", "args": {"servername": "up"}},
        }})),
        "rule 'u': fail names no rule: 'nope'"
    );
    assert_eq!(
        refused(json!({"init": "u", "rules": {
            "u": {"type": "ua", "args": {"pattern": "x", "succ": ["b"]}},
            "b": {"type": "backend", "args": {"servername": "up"}},
        }})),
        "rule 'u': succ must be a string naming a rule"
    );
    // Dangling links are refused even in rules the walk never reaches.
    assert_eq!(
        refused(json!({"init": "b", "rules": {
            "b": {"type": "backend", "args": {"servername": "up"}},
            "orphan": {"type": "path", "args": {"pattern": "/", "fail": "gone"}},
        }})),
        "rule 'orphan': fail names no rule: 'gone'"
    );
}

#[test]
fn refuses_cycles() {
    assert_eq!(
        refused(json!({"init": "a", "rules": {
            "a": {"type": "path", "args": {"pattern": "/", "succ": "a"}},
        }})),
        "cycle through rule 'a'"
    );
    assert_eq!(
        RuleSet::from_json(&json!({"init": "a", "rules": {
            "a": {"type": "ua", "args": {"pattern": "x", "succ": "b", "fail": "a"}},
            "b": {"type": "backend", "args": {"servername": "up"}},
        }}))
        .err(),
        Some(RuleError::Cycle("a".into()))
    );
    let msg = refused(json!({"init": "a", "rules": {
        "a": {"type": "ua", "args": {"pattern": "x", "succ": "end", "fail": "b"}},
        "b": {"type": "path", "args": {"pattern": "/", "succ": "c", "fail": "end"}},
        "c": {"type": "path", "args": {"pattern": "/x", "succ": "end", "fail": "a"}},
        "end": {"type": "backend", "args": {"servername": "up"}},
    }}));
    assert!(
        [
            "cycle through rule 'a'",
            "cycle through rule 'b'",
            "cycle through rule 'c'"
        ]
        .contains(&msg.as_str()),
        "{msg}"
    );
    // Also where the walk from init never goes.
    assert_eq!(
        refused(json!({"init": "end", "rules": {
            "end": {"type": "backend", "args": {"servername": "up"}},
            "x": {"type": "path", "args": {"pattern": "/", "succ": "y"}},
            "y": {"type": "path", "args": {"pattern": "/", "fail": "x"}},
        }})),
        "cycle through rule 'x'"
    );
}

#[test]
fn accepts_shared_successors_and_long_chains() {
    // A diamond is not a cycle.
    let s = set(json!({"init": "a", "rules": {
        "a": {"type": "path", "args": {"pattern": "/a", "succ": "b", "fail": "c"}},
        "b": {"type": "path", "args": {"pattern": "/ab", "succ": "d", "fail": "d"}},
        "c": {"type": "path", "args": {"pattern": "/c", "succ": "d", "fail": "d"}},
        "d": {"type": "backend", "args": {"servername": "d"}},
    }}));
    assert_eq!(go(&s, "/abc", None), to("d"));
    // The longest chain allowed is walked to its end.
    let mut rules = Map::new();
    for i in 0..MAX_RULES - 1 {
        rules.insert(
            format!("r{i}"),
            json!({"type": "path", "args": {"pattern": "/", "succ": format!("r{}", i + 1)}}),
        );
    }
    rules.insert(
        format!("r{}", MAX_RULES - 1),
        json!({"type": "backend", "args": {"servername": "last"}}),
    );
    let s = set(json!({"init": "r0", "rules": rules}));
    assert_eq!(go(&s, "/", None), to("last"));
}

#[test]
fn refuses_unknown_or_missing_type() {
    assert_eq!(
        refused(json!({"init": "a", "rules": {"a": {"type": "cookie", "args": {}}}})),
        "rule 'a': unknown type 'cookie' (expected ua, path, limit or backend)"
    );
    assert_eq!(
        refused(
            json!({"init": "a", "rules": {"a": {"type": "Backend", "args": {"servername": "x"}}}})
        ),
        "rule 'a': unknown type 'Backend' (expected ua, path, limit or backend)"
    );
    assert_eq!(
        refused(json!({"init": "a", "rules": {"a": {"args": {"servername": "x"}}}})),
        "rule 'a': type is missing or not a string"
    );
}

#[test]
fn refuses_bad_patterns() {
    let ua = |pattern: Value| {
        json!({"init": "ua1", "rules": {
            "ua1": {"type": "ua", "args": {"pattern": pattern, "succ": "b"}},
            "b": {"type": "backend", "args": {"servername": "up"}},
        }})
    };
    let msg = refused(ua(json!("(unclosed")));
    assert!(
        msg.starts_with("rule 'ua1': pattern does not compile: "),
        "{msg}"
    );
    // PCRE-only syntax.
    let msg = refused(ua(json!("foo(?=bar)")));
    assert!(
        msg.starts_with("rule 'ua1': pattern does not compile: "),
        "{msg}"
    );
    assert_eq!(
        refused(ua(json!(42))),
        "rule 'ua1': pattern is missing or not a string"
    );
    assert_eq!(
        refused(json!({"init": "p", "rules": {"p": {"type": "path", "args": {"succ": "p2"}}}})),
        "rule 'p': pattern is missing or not a string"
    );
    let path = |args: Value| json!({"init": "p", "rules": {"p": {"type": "path", "args": args}}});
    let msg = refused(path(json!({"pattern": "[z-a]", "regex": true})));
    assert!(
        msg.starts_with("rule 'p': pattern does not compile: "),
        "{msg}"
    );
}

#[test]
fn refuses_patterns_over_the_limits() {
    let path = |args: Value| json!({"init": "p", "rules": {"p": {"type": "path", "args": args}}});
    let long = "a".repeat(MAX_PATTERN_LEN + 1);
    assert_eq!(
        refused(path(json!({"pattern": long}))),
        "rule 'p': pattern is 4097 bytes long (at most 4096)"
    );
    set(path(
        json!({"pattern": "a".repeat(MAX_PATTERN_LEN), "regex": true}),
    ));
    // Short, but it would compile to far more than the size limit.
    for hostile in ["a{1000}{1000}", "(?u:\\w){1000}", "((a{100}){100}){100}"] {
        let msg = refused(path(json!({"pattern": hostile, "regex": true})));
        assert!(
            msg.starts_with("rule 'p': pattern does not compile: "),
            "{msg}"
        );
    }
}

#[test]
fn refuses_non_boolean_flags() {
    let path = |args: Value| json!({"init": "p", "rules": {"p": {"type": "path", "args": args}}});
    assert_eq!(
        refused(path(json!({"pattern": "/", "regex": "true"}))),
        "rule 'p': regex must be true or false"
    );
    assert_eq!(
        refused(path(json!({"pattern": "/", "regex": true, "rewrite": 1}))),
        "rule 'p': rewrite must be true or false"
    );
    assert_eq!(
        refused(path(json!({"pattern": "/", "rewrite": null}))),
        "rule 'p': rewrite must be true or false"
    );
}

#[test]
fn refuses_backend_without_string_servername() {
    let backend =
        |args: Value| json!({"init": "b1", "rules": {"b1": {"type": "backend", "args": args}}});
    assert_eq!(
        refused(backend(json!({}))),
        "rule 'b1': backend has no servername"
    );
    assert_eq!(
        refused(backend(json!({"path": "/srv"}))),
        "rule 'b1': backend has no servername"
    );
    // The original's sample passed a map: refused.
    for bad in [json!({"up1": ""}), json!(8080), json!(null), json!("")] {
        assert_eq!(
            refused(backend(json!({"servername": bad}))),
            "rule 'b1': servername must be a non-empty string"
        );
    }
    assert_eq!(
        RuleSet::from_json(&backend(json!({}))).err(),
        Some(RuleError::ServernameMissing { rule: "b1".into() })
    );
}

#[test]
fn refuses_too_many_rules() {
    let mut rules = Map::new();
    for i in 0..=MAX_RULES {
        rules.insert(
            format!("r{i}"),
            json!({"type": "backend", "args": {"servername": "up"}}),
        );
    }
    assert_eq!(
        refused(json!({"init": "r0", "rules": rules})),
        "too many rules: 1001 (at most 1000)"
    );
}

#[test]
fn from_slice_parses_json_text() {
    let s = RuleSet::from_slice(
        br#"{"init": "b", "rules": {"b": {"type": "backend", "args": {"servername": "up"}}}}"#,
    );
    assert!(s.is_ok());
    let Err(e) = RuleSet::from_slice(b"{\"init\": ") else {
        panic!("accepted truncated JSON");
    };
    assert!(e.to_string().starts_with("rule set is not JSON: "), "{e}");
    assert_eq!(
        RuleSet::from_slice(b"[1]").err(),
        Some(RuleError::NotObject)
    );
}

#[test]
fn a_limit_rule_follows_succ_within_the_rate_and_fail_or_429_over_it() {
    let with_fail = set(json!({"init": "l", "rules": {
        "l": {"type": "limit", "args": {"rate": "5r/s", "burst": 2, "key": "header:X-Api-Key",
                                        "succ": "main", "fail": "cheap"}},
        "main": {"type": "backend", "args": {"servername": "main"}},
        "cheap": {"type": "backend", "args": {"servername": "cheap"}}
    }}));
    let mut scratch = Scratch::default();
    let mut seen = Vec::new();
    let mut verdict = Verdict::Pass;
    let mut walk = |s: &RuleSet, v: Verdict, seen: &mut Vec<Limit>| match s.route(
        b"/",
        None,
        &mut scratch,
        &mut |l| {
            seen.push(l.clone());
            v
        },
    ) {
        Decision::Backend { servername, .. } => servername.to_owned(),
        Decision::Limited { rule, retry_after } => format!("429 {rule} {retry_after}"),
        Decision::Forbidden => "403".into(),
    };
    assert_eq!(walk(&with_fail, verdict, &mut seen), "main");
    assert_eq!(seen[0].key, LimitKey::Header("x-api-key".into()));
    verdict = Verdict::Over { retry_after: 3 };
    assert_eq!(walk(&with_fail, verdict, &mut seen), "cheap");
    let no_fail = set(json!({"init": "l", "rules": {
        "l": {"type": "limit", "args": {"rate": "5r/s", "succ": "main"}},
        "main": {"type": "backend", "args": {"servername": "main"}}
    }}));
    assert_eq!(walk(&no_fail, verdict, &mut seen), "429 l 3");
    // Rule sets without a limit never ask.
    let plain = path_rule(json!({"pattern": "/"}));
    let asked = seen.len();
    walk(&plain, verdict, &mut seen);
    assert_eq!(seen.len(), asked);
    // A bad limit is refused naming the rule and the key.
    let bad = RuleSet::from_json(&json!({"init": "l", "rules": {
        "l": {"type": "limit", "args": {"rate": "5r/h", "succ": "l2"}},
        "l2": {"type": "backend", "args": {"servername": "x"}}
    }}));
    assert!(
        matches!(bad, Err(RuleError::BadLimit { ref rule, key: "rate", .. }) if rule == "l"),
        "{bad:?}"
    );
}
