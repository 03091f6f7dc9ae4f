//! A peer's answer head of any bytes: parsed without panicking, and what
//! ELB rebuilds from it for the client is a head that parses again, to the
//! same status, with no hop-by-hop field of the peer's left in it and no
//! more fields than the peer sent plus ELB's own `Connection`.
#![no_main]
use elb_workers::http::{parse_response, write::client_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some(head)) = parse_response(data, 64 << 10, Vec::new()) else {
        return;
    };
    assert!(head.len <= data.len());
    let decoded = data.first().is_some_and(|b| b & 1 == 1);
    let mut out = Vec::new();
    client_head(&mut out, data, &head, Some(b"keep-alive"), decoded);
    // The parser has slots for 128 fields: one with 128 from the peer plus
    // ELB's `Connection` is too many for it, not for a client.
    if head.headers.len() >= 128 {
        return;
    }
    let again = match parse_response(&out, 64 << 10, Vec::new()) {
        Ok(Some(h)) => h,
        other => panic!("the rebuilt head does not parse: {other:?}\n{}", String::from_utf8_lossy(&out)),
    };
    assert_eq!(again.len, out.len());
    assert_eq!(again.status, head.status);
    assert!(again.headers.len() <= head.headers.len() + 1);
    let mut connection = 0;
    for (n, _) in &again.headers {
        let name = &out[n.clone()];
        connection += usize::from(name.eq_ignore_ascii_case(b"connection"));
        for hop in [&b"keep-alive"[..], b"proxy-connection", b"te", b"trailer"] {
            assert!(!name.eq_ignore_ascii_case(hop), "{}", String::from_utf8_lossy(&out));
        }
    }
    // ELB's own, and only it.
    assert_eq!(connection, 1, "{}", String::from_utf8_lossy(&out));
});
