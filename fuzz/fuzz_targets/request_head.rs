//! A request head of any bytes: the parser answers (complete, incomplete or
//! an error) without panicking, and what it finds lies inside the buffer.
#![no_main]
use elb_workers::http::parse_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(head)) = parse_request(data, 64 << 10) {
        assert!(head.len <= data.len());
        let _ = head.method(data);
        let _ = head.target(data);
        for (n, v) in &head.headers {
            assert!(n.end <= head.len && v.end <= head.len);
        }
    }
});
