//! A rule set of any bytes: compiled or refused with an error, never a
//! panic; a compiled one routes any path and User-Agent.
#![no_main]
use elb_workers::rules::{RuleSet, Scratch, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (json, rest) = data.split_at(cut);
    if let Ok(set) = RuleSet::from_slice(json) {
        let mut scratch = Scratch::default();
        let path = rest.get(1..).unwrap_or_default();
        let _ = set.route(path, Some(path), &mut scratch, &mut |_| Verdict::Pass);
        let _ = set.route(path, None, &mut scratch, &mut |_| Verdict::Over { retry_after: 1 });
    }
});
