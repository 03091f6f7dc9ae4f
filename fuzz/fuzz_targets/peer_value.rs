//! A peer's value of any text (nginx parameters, JSON, escaped): parsed or
//! refused, and what parses writes back to itself.
#![no_main]
#[allow(dead_code, unused_imports)]
#[path = "../../src/peers/mod.rs"]
mod peers;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(p) = peers::parse_peer_value(text) {
        assert_eq!(peers::parse_peer_value(&p.to_value()), Ok(p));
    }
    let _ = peers::parse_peer_from(peers::Origin::Resty, text);
});
