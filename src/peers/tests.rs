use super::*;

fn p() -> PeerParams {
    PeerParams::default()
}

#[test]
fn defaults() {
    let d = p();
    assert_eq!(d.weight, Weight::whole(1));
    assert_eq!(d.max_fails, 1);
    assert_eq!(d.fail_timeout_ms, 10_000);
    assert!(!d.backup && !d.down);
    assert_eq!(d.slow_start_s, 0);
    assert_eq!(d.check_url, None);
    assert_eq!(d.status, "up");
    assert!(d.is_available());
}

#[test]
fn empty_is_default() {
    assert_eq!(parse_peer_value(""), Ok(p()));
    assert_eq!(parse_peer_value("   "), Ok(p()));
}

#[test]
fn nginx_form() {
    let got = parse_peer_value("max_fails=2 weight=10").unwrap();
    assert_eq!(
        got,
        PeerParams {
            weight: Weight::whole(10),
            max_fails: 2,
            ..p()
        }
    );
    let got = parse_peer_value("fail_timeout=10").unwrap();
    assert_eq!(got, p());
    let got = parse_peer_value("fail_timeout=30 backup").unwrap();
    assert_eq!(
        got,
        PeerParams {
            fail_timeout_ms: 30_000,
            backup: true,
            ..p()
        }
    );
    assert_eq!(
        parse_peer_value("down").unwrap(),
        PeerParams { down: true, ..p() }
    );
    assert!(!parse_peer_value("down").unwrap().is_available());
    assert_eq!(parse_peer_value("max_fails=0").unwrap().max_fails, 0);
    assert_eq!(
        parse_peer_value("weight=10000").unwrap().weight,
        Weight::whole(10_000)
    );
    // Several spaces, tabs, the last of a repeated parameter wins.
    let got = parse_peer_value("  weight=2 \t weight=3  ").unwrap();
    assert_eq!(got.weight, Weight::whole(3));
    assert_eq!(parse_peer_value("slow_start=30s").unwrap().slow_start_s, 30);
}

#[test]
fn nginx_legacy_bools() {
    assert!(parse_peer_value("backup=true").unwrap().backup);
    assert!(!parse_peer_value("backup=false").unwrap().backup);
    assert!(parse_peer_value("down=true").unwrap().down);
    assert!(!parse_peer_value("down=false").unwrap().down);
}

#[test]
fn nginx_time_suffixes() {
    let ft = |s: &str| parse_peer_value(&format!("fail_timeout={s}")).map(|p| p.fail_timeout_ms);
    assert_eq!(ft("10"), Ok(10_000));
    assert_eq!(ft("0"), Ok(0));
    assert_eq!(ft("5s"), Ok(5_000));
    assert_eq!(ft("2m"), Ok(120_000));
    assert_eq!(ft("1h"), Ok(3_600_000));
    assert_eq!(ft("1d"), Ok(86_400_000));
    assert_eq!(ft("1500ms"), Ok(1_500));
    assert_eq!(ft("1m30s"), Ok(90_000));
    assert_eq!(ft("1s500ms"), Ok(1_500));
    for bad in [
        "",
        "x",
        "5x",
        "s",
        "-1",
        "1.5",
        "1s1s",
        "99999999999999999999",
    ] {
        assert_eq!(
            ft(bad),
            Err(ParamError::Invalid {
                name: "fail_timeout",
                value: bad.to_string()
            }),
            "{bad}"
        );
    }
}

#[test]
fn nginx_errors() {
    assert_eq!(
        parse_peer_value("wieght=2"),
        Err(ParamError::Unknown("wieght=2".into()))
    );
    assert_eq!(
        parse_peer_value("weight=2 resolve"),
        Err(ParamError::Unknown("resolve".into()))
    );
    assert_eq!(
        parse_peer_value("weight"),
        Err(ParamError::Unknown("weight".into()))
    );
    assert_eq!(
        parse_peer_value("weight=x"),
        Err(ParamError::Invalid {
            name: "weight",
            value: "x".into()
        })
    );
    assert_eq!(
        parse_peer_value("weight=-1"),
        Err(ParamError::Invalid {
            name: "weight",
            value: "-1".into()
        })
    );
    assert_eq!(
        parse_peer_value("weight=+1"),
        Err(ParamError::Invalid {
            name: "weight",
            value: "+1".into()
        })
    );
    assert_eq!(
        parse_peer_value("weight=0"),
        Err(ParamError::WeightRange("0".into()))
    );
    assert_eq!(
        parse_peer_value("weight=10001"),
        Err(ParamError::WeightRange("10001".into()))
    );
    assert_eq!(
        parse_peer_value("max_fails=4294967296"),
        Err(ParamError::Invalid {
            name: "max_fails",
            value: "4294967296".into()
        })
    );
    assert_eq!(
        parse_peer_value("backup=yes"),
        Err(ParamError::Invalid {
            name: "backup",
            value: "yes".into()
        })
    );
    assert_eq!(
        parse_peer_value("slow_start=1500ms"),
        Err(ParamError::Invalid {
            name: "slow_start",
            value: "1500ms".into()
        })
    );
    assert_eq!(
        parse_peer_value("wieght=2").unwrap_err().to_string(),
        "unknown peer parameter 'wieght=2'"
    );
    assert_eq!(
        parse_peer_value("weight=x").unwrap_err().to_string(),
        "invalid weight 'x'"
    );
}

#[test]
fn json_form() {
    let got =
        parse_peer_value(r#"{"weight":100,"check_url":"/health","slow_start":30,"status":"up"}"#)
            .unwrap();
    assert_eq!(
        got,
        PeerParams {
            weight: Weight::whole(100),
            slow_start_s: 30,
            check_url: Some("/health".into()),
            ..p()
        }
    );
    assert!(got.is_available());
    assert_eq!(parse_peer_value("{}"), Ok(p()));
    let got = parse_peer_value(
        r#"{"max_fails":3,"fail_timeout":5,"backup":true,"down":false,"weight":"7"}"#,
    )
    .unwrap();
    assert_eq!(
        got,
        PeerParams {
            weight: Weight::whole(7),
            max_fails: 3,
            fail_timeout_ms: 5_000,
            backup: true,
            ..p()
        }
    );
    assert_eq!(
        parse_peer_value(r#"{"fail_timeout":1.5}"#)
            .unwrap()
            .fail_timeout_ms,
        1_500
    );
    assert_eq!(
        parse_peer_value(r#"{"fail_timeout":"2m"}"#)
            .unwrap()
            .fail_timeout_ms,
        120_000
    );
    assert_eq!(
        parse_peer_value(r#"{"weight":2.0}"#).unwrap().weight,
        Weight::whole(2)
    );
    assert!(parse_peer_value(r#"{"down":1}"#).unwrap().down);
    // null counts as absent.
    assert_eq!(
        parse_peer_value(r#"{"weight":null,"check_url":null}"#),
        Ok(p())
    );
}

#[test]
fn json_checkurl_alias() {
    let got = parse_peer_value(r#"{"checkurl":"/ping"}"#).unwrap();
    assert_eq!(got.check_url.as_deref(), Some("/ping"));
    // Both given: check_url wins.
    let got = parse_peer_value(r#"{"checkurl":"/a","check_url":"/b"}"#).unwrap();
    assert_eq!(got.check_url.as_deref(), Some("/b"));
}

#[test]
fn json_status() {
    let got = parse_peer_value(r#"{"status":"down"}"#).unwrap();
    assert_eq!(got.status, "down");
    assert!(!got.is_available());
    let got = parse_peer_value(r#"{"status":"maintenance","weight":3}"#).unwrap();
    assert_eq!(got.status, "maintenance");
    assert!(!got.is_available());
}

#[test]
fn json_unknown_keys_ignored() {
    let got = parse_peer_value(r#"{"weight":2,"zone":"a","tags":[1,2],"meta":{"x":1}}"#).unwrap();
    assert_eq!(
        got,
        PeerParams {
            weight: Weight::whole(2),
            ..p()
        }
    );
}

#[test]
fn json_errors() {
    assert!(matches!(parse_peer_value("{"), Err(ParamError::Json(_))));
    assert!(matches!(
        parse_peer_value("{\"weight\":}"),
        Err(ParamError::Json(_))
    ));
    assert!(matches!(
        parse_peer_value("[1]"),
        Err(ParamError::Unknown(_))
    ));
    assert_eq!(
        parse_peer_value(r#"{"weight":"x"}"#),
        Err(ParamError::Invalid {
            name: "weight",
            value: "x".into()
        })
    );
    assert_eq!(
        parse_peer_value(r#"{"weight":-1}"#),
        Err(ParamError::WeightRange("-1".into()))
    );
    // Fractional weights are taken, in thousandths, as the original did.
    assert_eq!(
        parse_peer_value(r#"{"weight":1.5}"#).map(|p| p.weight.milli()),
        Ok(1500)
    );
    assert_eq!(
        parse_peer_value("weight=2.25").map(|p| p.weight.milli()),
        Ok(2250)
    );
    let frac = PeerParams {
        weight: Weight::parse("1.5").expect("1.5"),
        ..p()
    };
    assert_eq!(frac.to_value(), r#"{"weight":1.5}"#);
    assert_eq!(parse_peer_value(&frac.to_value()), Ok(frac));
    assert_eq!(
        parse_peer_value(r#"{"weight":0}"#),
        Err(ParamError::WeightRange("0".into()))
    );
    assert_eq!(
        parse_peer_value(r#"{"weight":20000}"#),
        Err(ParamError::WeightRange("20000".into()))
    );
    assert_eq!(
        parse_peer_value(r#"{"backup":"maybe"}"#),
        Err(ParamError::Invalid {
            name: "backup",
            value: "maybe".into()
        })
    );
    assert_eq!(
        parse_peer_value(r#"{"check_url":5}"#),
        Err(ParamError::Invalid {
            name: "check_url",
            value: "5".into()
        })
    );
    assert_eq!(
        parse_peer_value(r#"{"check_url":"/a b"}"#),
        Err(ParamError::Invalid {
            name: "check_url",
            value: "/a b".into()
        })
    );
    assert_eq!(
        parse_peer_value(r#"{"status":true}"#),
        Err(ParamError::Invalid {
            name: "status",
            value: "true".into()
        })
    );
    assert_eq!(
        parse_peer_value(r#"{"slow_start":1.5}"#),
        Err(ParamError::Invalid {
            name: "slow_start",
            value: "1.5".into()
        })
    );
    assert_eq!(
        parse_peer_value(r#"{"fail_timeout":-3}"#),
        Err(ParamError::Invalid {
            name: "fail_timeout",
            value: "-3".into()
        })
    );
}

#[test]
fn uri_escaped_from_old_dump() {
    assert_eq!(
        parse_peer_value("max_fails%3D2%20weight%3D10").unwrap(),
        PeerParams {
            weight: Weight::whole(10),
            max_fails: 2,
            ..p()
        }
    );
    assert_eq!(
        parse_peer_value("%7B%22weight%22%3A2%7D").unwrap(),
        PeerParams {
            weight: Weight::whole(2),
            ..p()
        }
    );
    assert_eq!(
        parse_peer_value("%7b%22checkurl%22%3a%22%2fh%22%7d")
            .unwrap()
            .check_url
            .as_deref(),
        Some("/h")
    );
    assert_eq!(
        parse_peer_value("backup%3Dtrue").unwrap(),
        PeerParams {
            backup: true,
            ..p()
        }
    );
    assert_eq!(parse_peer_value("%20").unwrap(), p());
    // A raw JSON object is not decoded: its `%` belongs to its strings.
    assert_eq!(
        parse_peer_value(r#"{"check_url":"/a%20b"}"#)
            .unwrap()
            .check_url
            .as_deref(),
        Some("/a%20b")
    );
    // Not an escape, or decoding to invalid UTF-8: taken as written.
    assert_eq!(
        parse_peer_value("weight=5%"),
        Err(ParamError::Invalid {
            name: "weight",
            value: "5%".into()
        })
    );
    assert_eq!(
        parse_peer_value("weight%3D%FF"),
        Err(ParamError::Unknown("weight%3D%FF".into()))
    );
    // Errors name the decoded parameter.
    assert_eq!(
        parse_peer_value("wieght%3D2"),
        Err(ParamError::Unknown("wieght=2".into()))
    );
}

#[test]
fn percent_decoder() {
    assert_eq!(percent_decode("abc"), None);
    assert_eq!(percent_decode("a%2"), None);
    assert_eq!(percent_decode("a%zz"), None);
    assert_eq!(percent_decode("%41%2a%2A+"), Some("A**+".into()));
    assert_eq!(percent_decode("%e2%82%ac"), Some("€".into()));
    assert_eq!(percent_decode("%FF"), None);
    assert_eq!(percent_decode("%41%"), Some("A%".into()));
}

#[test]
fn to_value_forms() {
    assert_eq!(p().to_value(), "");
    assert_eq!(
        PeerParams {
            weight: Weight::whole(10),
            max_fails: 2,
            backup: true,
            ..p()
        }
        .to_value(),
        "weight=10 max_fails=2 backup"
    );
    assert_eq!(
        PeerParams {
            fail_timeout_ms: 30_000,
            ..p()
        }
        .to_value(),
        "fail_timeout=30"
    );
    assert_eq!(
        PeerParams {
            fail_timeout_ms: 1_500,
            ..p()
        }
        .to_value(),
        "fail_timeout=1500ms"
    );
    assert_eq!(PeerParams { down: true, ..p() }.to_value(), "down");
    assert_eq!(
        PeerParams {
            weight: Weight::whole(100),
            slow_start_s: 30,
            check_url: Some("/health".into()),
            ..p()
        }
        .to_value(),
        r#"{"weight":100,"slow_start":30,"check_url":"/health"}"#
    );
    assert_eq!(
        PeerParams {
            status: "down".into(),
            ..p()
        }
        .to_value(),
        r#"{"weight":1,"status":"down"}"#
    );
}

#[test]
fn round_trip() {
    let cases = vec![
        p(),
        PeerParams {
            weight: Weight::whole(10),
            ..p()
        },
        PeerParams {
            weight: Weight::whole(10_000),
            max_fails: 0,
            ..p()
        },
        PeerParams {
            max_fails: u32::MAX,
            ..p()
        },
        PeerParams {
            fail_timeout_ms: 0,
            ..p()
        },
        PeerParams {
            fail_timeout_ms: 1,
            ..p()
        },
        PeerParams {
            fail_timeout_ms: 90_500,
            ..p()
        },
        PeerParams {
            fail_timeout_ms: 3_600_000,
            ..p()
        },
        PeerParams {
            backup: true,
            ..p()
        },
        PeerParams {
            down: true,
            backup: true,
            weight: Weight::whole(3),
            max_fails: 5,
            ..p()
        },
        PeerParams {
            slow_start_s: 30,
            ..p()
        },
        PeerParams {
            check_url: Some("/health".into()),
            ..p()
        },
        PeerParams {
            check_url: Some("".into()),
            ..p()
        },
        PeerParams {
            check_url: Some("/a%20b?x=\"y\"".into()),
            ..p()
        },
        PeerParams {
            status: "down".into(),
            ..p()
        },
        PeerParams {
            status: "".into(),
            ..p()
        },
        PeerParams {
            status: "we\"ird \\ \n".into(),
            ..p()
        },
        PeerParams {
            weight: Weight::whole(7),
            max_fails: 0,
            fail_timeout_ms: 1_500,
            backup: true,
            down: true,
            slow_start_s: 1,
            check_url: Some("/h".into()),
            status: "up".into(),
        },
        PeerParams {
            weight: Weight::whole(2),
            max_fails: 9,
            fail_timeout_ms: 20_000,
            backup: false,
            down: false,
            slow_start_s: 0,
            check_url: None,
            status: "draining".into(),
        },
    ];
    for c in cases {
        let v = c.to_value();
        assert_eq!(parse_peer_value(&v), Ok(c.clone()), "value {v:?}");
    }
}

#[test]
fn round_trip_from_values() {
    for raw in [
        "",
        "max_fails=2 weight=10",
        "fail_timeout=1m30s down",
        "backup=true",
        r#"{"weight":100,"check_url":"/health","slow_start":30,"status":"up"}"#,
        r#"{"checkurl":"/x","status":"down"}"#,
        "max_fails%3D2%20weight%3D10",
        "%7B%22weight%22%3A2%7D",
    ] {
        let once = parse_peer_value(raw).unwrap();
        assert_eq!(
            parse_peer_value(&once.to_value()),
            Ok(once.clone()),
            "{raw}"
        );
    }
}

#[test]
fn host_port() {
    assert_eq!(split_host_port("127.0.0.1:8088"), Ok(("127.0.0.1", 8088)));
    assert_eq!(split_host_port("localhost:80"), Ok(("localhost", 80)));
    assert_eq!(
        split_host_port("my_host.example-1.com:65535"),
        Ok(("my_host.example-1.com", 65535))
    );
    assert_eq!(split_host_port("[::1]:80"), Ok(("::1", 80)));
    assert_eq!(
        split_host_port("[2001:db8::1]:443"),
        Ok(("2001:db8::1", 443))
    );
    for bad in [
        "",
        "host",
        ":80",
        "host:",
        "host:0",
        "host:65536",
        "host:+80",
        "host:8o",
        "ho st:80",
        "a/b:80",
        "::1:80",
        "[::1]",
        "[::1]80",
        "[::1:80",
        "[nothex]:80",
        "[]:80",
        "http://a:80",
    ] {
        assert!(
            matches!(split_host_port(bad), Err(ParamError::Address { .. })),
            "{bad}"
        );
    }
    assert_eq!(
        split_host_port("host:0").unwrap_err().to_string(),
        "invalid address 'host:0': port out of range 1..=65535"
    );
}
