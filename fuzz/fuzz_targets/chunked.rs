//! A chunked body of any bytes, fed in two pieces: decoding never panics
//! and never claims more bytes than it was given.
#![no_main]
use elb_workers::http::chunked::ChunkedTracker;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize % (data.len().max(1)));
    let mut c = ChunkedTracker::default();
    let mut out = Vec::new();
    let mut at = 0;
    for piece in [&data[..split], &data[split..]] {
        match c.decode(piece, &mut out) {
            Ok(n) => {
                assert!(n <= piece.len());
                at += n;
            }
            Err(_) => return,
        }
    }
    assert!(out.len() <= at);
});
