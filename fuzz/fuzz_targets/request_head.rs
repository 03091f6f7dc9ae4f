//! Requests of any bytes on one connection, as a pipelining client sends
//! them: each head is parsed (complete, incomplete or an error) without a
//! panic, what it finds lies inside the buffer, and its framing (length,
//! chunked or none) says where the next request starts, as the worker
//! reads it.
#![no_main]
use elb_workers::http::chunked::ChunkedTracker;
use elb_workers::http::{BodyKind, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        let buf = &data[at..];
        let Ok(Some(head)) = parse_request(buf, 64 << 10) else {
            return;
        };
        // A head of no bytes would read the same request forever.
        assert!(head.len > 0 && head.len <= buf.len());
        let _ = head.method(buf);
        let _ = head.target(buf);
        for (n, v) in &head.headers {
            assert!(n.end <= head.len && v.end <= head.len);
        }
        let rest = &buf[head.len..];
        let body = match head.body {
            BodyKind::None => 0,
            BodyKind::Length(n) => match usize::try_from(n) {
                Ok(n) if n <= rest.len() => n,
                _ => return,
            },
            BodyKind::Chunked => {
                let mut c = ChunkedTracker::default();
                let Ok(n) = c.advance(rest) else { return };
                assert!(n <= rest.len());
                if !c.is_done() {
                    return;
                }
                n
            }
        };
        at += head.len + body;
    }
});
