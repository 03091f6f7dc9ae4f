//! A peer's answer head of any bytes: parsed without panicking.
#![no_main]
use elb_workers::http::parse_response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(head)) = parse_response(data, 64 << 10, Vec::new()) {
        assert!(head.len <= data.len());
    }
});
