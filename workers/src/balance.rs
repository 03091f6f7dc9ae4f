//! Peer choice: nginx's smooth weighted round robin, precomputed.
//!
//! nginx (`ngx_http_upstream_round_robin.c`, since commit 52327e062) picks a
//! peer thus: every peer's `current += effective`; the peer with the largest
//! `current` is chosen (the first, in peer order, on a tie); the chosen
//! peer's `current -= total` (the sum of the weights). After `Σw` picks every
//! `current` is back to 0, each peer having been chosen exactly `w` times, so
//! the sequence is periodic with period `Σw`.
//!
//! ELB's workers share the choice: the master computes one period of that
//! sequence once per peer-list version ([`smooth_wrr_schedule`]) and publishes
//! it in the shared region next to one atomic cursor per upstream; every
//! worker picks `schedule[cursor.fetch_add(1) % len]` ([`pick`]), so all
//! workers together walk one sequence and the split is exact.
//!
//! Intended use (for the callers):
//!
//! * one schedule for the primary peers and one for the `backup` peers; the
//!   backup schedule is used only when [`pick`] on the primary one finds no
//!   usable peer;
//! * peers that are permanently out (`down`, `status` other than `"up"`) may
//!   be given weight 0 (they never appear), while passive and active health,
//!   which change between versions, are left to `usable`;
//! * slow start changes weights over time: the master publishes a new
//!   schedule (a new version) as the ramp proceeds.

/// Longest schedule kept; larger weight sums are scaled down (after dividing
/// by their gcd), each weight kept >= 1. (A schedule is longer only when more
/// than `MAX_SCHEDULE` peers have a weight: then each appears once.)
pub const MAX_SCHEDULE: usize = 4096;

/// Peers addressable by a schedule (indices are `u16`); peers at later
/// indices never appear.
const MAX_PEERS: usize = u16::MAX as usize + 1;

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The weights actually scheduled: divided by their gcd and, when their sum
/// exceeds [`MAX_SCHEDULE`], scaled down (rounding down, each nonzero weight
/// kept >= 1) until the sum fits. Zero stays zero.
fn schedule_weights(weights: &[u32]) -> Vec<u64> {
    let mut w: Vec<u64> = weights
        .iter()
        .take(MAX_PEERS)
        .map(|&x| u64::from(x))
        .collect();
    let g = w.iter().fold(0, |g, &x| gcd(g, x));
    if g == 0 {
        return w; // all zero (or empty)
    }
    w.iter_mut().for_each(|x| *x /= g);
    let sum: u64 = w.iter().sum();
    if sum as usize <= MAX_SCHEDULE {
        return w;
    }
    let live = w.iter().filter(|&&x| x > 0).count();
    if live >= MAX_SCHEDULE {
        w.iter_mut().filter(|x| **x > 0).for_each(|x| *x = 1);
        return w;
    }
    // floor(x * budget / sum) sums to at most `budget`; the `max(1)` adds at
    // most `live` more. Lower the budget by the excess until it all fits (it
    // terminates: the budget drops each round, and any budget at or below
    // MAX_SCHEDULE - live fits).
    let max = MAX_SCHEDULE as u64;
    let mut budget = max;
    loop {
        let scaled: Vec<u64> = w
            .iter()
            .map(|&x| if x == 0 { 0 } else { (x * budget / sum).max(1) })
            .collect();
        let s: u64 = scaled.iter().sum();
        if s <= max {
            let g = scaled.iter().fold(0, |g, &x| gcd(g, x)).max(1);
            return scaled.into_iter().map(|x| x / g).collect();
        }
        budget -= s - max;
    }
}

/// The peer indices (into `weights`) of one full period of nginx's smooth
/// WRR. Peers with weight 0 never appear. Empty input or all-zero → empty.
/// The length is the weight sum after gcd reduction and scaling (at most
/// [`MAX_SCHEDULE`], see there); each peer appears as many times as its
/// scheduled weight.
pub fn smooth_wrr_schedule(weights: &[u32]) -> Vec<u16> {
    let w = schedule_weights(weights);
    let live: Vec<(u16, i64)> = w
        .iter()
        .enumerate()
        .filter(|&(_, &x)| x > 0)
        // Indices are below MAX_PEERS, and scaled weights at most u32::MAX.
        .map(|(i, &x)| (i as u16, x as i64))
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    // Equal weights (all 1 after the gcd): nginx goes round in peer order.
    if live.iter().all(|&(_, x)| x == 1) {
        return live.iter().map(|&(i, _)| i).collect();
    }
    let total: i64 = live.iter().map(|&(_, x)| x).sum();
    let mut current = vec![0i64; live.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (k, &(_, x)) in live.iter().enumerate() {
            current[k] += x;
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        out.push(live[best].0);
    }
    out
}

/// Picks a peer from `schedule`.
///
/// `next` yields cursor values: in production one `fetch_add(1)` on the
/// upstream's shared cursor per call. Each step takes a fresh value, so a
/// skipped (unusable) position is consumed like a used one and the workers
/// keep walking one consistent sequence: with peers skipped, the others still
/// split the picks exactly by weight.
///
/// Steps: up to one period (`schedule.len()` calls of `next`), returning the
/// first peer for which `usable(peer)` holds. Since other workers take
/// positions meanwhile, those steps may miss some positions; if none was
/// usable, the rest of the period after the last position taken is swept
/// locally (no more calls of `next`), so `None` means no peer in the
/// schedule is usable. `usable` may be called more than once for a peer.
pub fn pick(
    schedule: &[u16],
    mut next: impl FnMut() -> u64,
    mut usable: impl FnMut(usize) -> bool,
) -> Option<usize> {
    let len = schedule.len();
    if len == 0 {
        return None;
    }
    let mut last = 0;
    for _ in 0..len {
        // The remainder is below len, a usize.
        last = (next() % len as u64) as usize;
        let peer = usize::from(schedule[last]);
        if usable(peer) {
            return Some(peer);
        }
    }
    (1..len)
        .map(|k| usize::from(schedule[(last + k) % len]))
        .find(|&peer| usable(peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(schedule: &[u16], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in schedule {
            c[usize::from(i)] += 1;
        }
        c
    }

    /// A `next` over a plain counter, as one worker alone would see it.
    fn counter(start: u64) -> impl FnMut() -> u64 {
        let mut c = start;
        move || {
            let v = c;
            c = c.wrapping_add(1);
            v
        }
    }

    #[test]
    fn five_one_one_is_nginx_sequence() {
        // nginx's comment: { a, a, b, a, c, a, a }.
        assert_eq!(smooth_wrr_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn one_three_sequence() {
        let s = smooth_wrr_schedule(&[1, 3]);
        assert_eq!(s, vec![1, 0, 1, 1]);
        assert_eq!(counts(&s, 2), vec![1, 3]);
    }

    #[test]
    fn other_exact_sequences() {
        assert_eq!(smooth_wrr_schedule(&[1]), vec![0]);
        assert_eq!(smooth_wrr_schedule(&[7]), vec![0]);
        assert_eq!(smooth_wrr_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(smooth_wrr_schedule(&[2, 1]), vec![0, 1, 0]);
        assert_eq!(smooth_wrr_schedule(&[3, 2]), vec![0, 1, 0, 1, 0]);
        // Same as the simulation without the equal-weights shortcut.
        assert_eq!(smooth_wrr_schedule(&[1, 2, 1]), vec![1, 0, 2, 1]);
    }

    #[test]
    fn gcd_reduction() {
        assert_eq!(smooth_wrr_schedule(&[10, 30]), smooth_wrr_schedule(&[1, 3]));
        assert_eq!(
            smooth_wrr_schedule(&[500, 100, 100]),
            vec![0, 0, 1, 0, 2, 0, 0]
        );
        assert_eq!(smooth_wrr_schedule(&[4, 4, 4]), vec![0, 1, 2]);
        assert_eq!(
            smooth_wrr_schedule(&[6, 0, 4]),
            smooth_wrr_schedule(&[3, 0, 2])
        );
    }

    #[test]
    fn zero_weights_never_appear() {
        assert_eq!(smooth_wrr_schedule(&[0, 2, 0, 1]), vec![1, 3, 1]);
        assert_eq!(smooth_wrr_schedule(&[0, 5]), vec![1]);
    }

    #[test]
    fn empty_and_all_zero() {
        assert!(smooth_wrr_schedule(&[]).is_empty());
        assert!(smooth_wrr_schedule(&[0]).is_empty());
        assert!(smooth_wrr_schedule(&[0, 0, 0]).is_empty());
    }

    #[test]
    fn period_counts_equal_weights() {
        for w in [
            vec![1u32, 2, 3, 4, 5],
            vec![10, 1],
            vec![100, 99, 1],
            vec![7, 11, 13],
            vec![3, 0, 3, 1],
        ] {
            let s = smooth_wrr_schedule(&w);
            let g = w.iter().fold(0u64, |g, &x| gcd(g, u64::from(x)));
            let expect: Vec<usize> = w.iter().map(|&x| (u64::from(x) / g) as usize).collect();
            assert_eq!(counts(&s, w.len()), expect, "{w:?}");
        }
    }

    #[test]
    fn smooth_spread() {
        // {1, 9}: the light peer in the middle, not at an end.
        assert_eq!(
            smooth_wrr_schedule(&[1, 9]),
            vec![1, 1, 1, 1, 0, 1, 1, 1, 1, 1]
        );
    }

    #[test]
    fn scaling_keeps_proportions() {
        let w = [10_000u32, 1, 9_999, 5_000, 3];
        let s = smooth_wrr_schedule(&w);
        assert!(s.len() <= MAX_SCHEDULE);
        let c = counts(&s, w.len());
        assert!(c.iter().all(|&x| x >= 1), "{c:?}");
        let total_w: f64 = w.iter().map(|&x| f64::from(x)).sum();
        for (i, &x) in w.iter().enumerate() {
            let want = f64::from(x) / total_w;
            let got = c[i] as f64 / s.len() as f64;
            assert!(
                (want - got).abs() < 0.002,
                "peer {i}: want {want}, got {got}"
            );
        }
        // Weights near the limit.
        let w = [u32::MAX, u32::MAX - 1, 1];
        let s = smooth_wrr_schedule(&w);
        assert!(s.len() <= MAX_SCHEDULE);
        let c = counts(&s, 3);
        assert!(c[2] >= 1 && c[0] >= c[1] && c[1] > 2000, "{c:?}");
    }

    #[test]
    fn scaling_many_peers() {
        // 3000 peers of weight 1 and one of 10000: the sum fits after
        // scaling, each peer kept.
        let mut w = vec![1u32; 3000];
        w.push(10_000);
        let s = smooth_wrr_schedule(&w);
        assert!(s.len() <= MAX_SCHEDULE);
        let c = counts(&s, w.len());
        assert!(c.iter().all(|&x| x >= 1));
        // More peers than MAX_SCHEDULE: each appears once.
        let mut w = vec![3u32; 5000];
        w[7] = 10;
        let s = smooth_wrr_schedule(&w);
        assert_eq!(s.len(), 5000);
        assert_eq!(s[..3], [0, 1, 2]);
    }

    #[test]
    fn pick_walks_the_schedule() {
        let s = smooth_wrr_schedule(&[5, 1, 1]);
        let mut next = counter(0);
        let got: Vec<usize> = (0..14)
            .map(|_| pick(&s, &mut next, |_| true).unwrap())
            .collect();
        assert_eq!(got, vec![0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
        // The cursor wraps.
        let mut next = counter(u64::MAX);
        assert_eq!(
            pick(&s, &mut next, |_| true),
            Some(usize::from(s[(u64::MAX % 7) as usize]))
        );
    }

    #[test]
    fn pick_skips_unusable() {
        let s = smooth_wrr_schedule(&[5, 1, 1]);
        let mut next = counter(0);
        let got: Vec<usize> = (0..4)
            .map(|_| pick(&s, &mut next, |p| p != 0).unwrap())
            .collect();
        assert_eq!(got, vec![1, 2, 1, 2]);
        // Skipped positions were consumed: 12 positions for 4 picks.
        assert_eq!(next(), 12);
    }

    #[test]
    fn pick_none_when_none_usable() {
        let s = smooth_wrr_schedule(&[5, 1, 1]);
        let mut calls = 0;
        let next = || {
            calls += 1;
            0
        };
        assert_eq!(pick(&s, next, |_| false), None);
        assert_eq!(calls, 7, "at most one period of cursor takes");
        assert_eq!(pick(&[], counter(0), |_| true), None);
    }

    #[test]
    fn pick_sweeps_when_cursor_moves_under_it() {
        // Other workers move the cursor so this one only ever sees position 0
        // (peer 0, unusable); the sweep still finds peer 2.
        let s = smooth_wrr_schedule(&[5, 1, 1]);
        assert_eq!(pick(&s, || 7, |p| p == 2), Some(2));
        assert_eq!(pick(&s, || 0, |p| p == 1), Some(1));
    }

    #[test]
    fn exact_counts_over_periods() {
        let w = [5u32, 1, 3, 2, 0, 4];
        let s = smooth_wrr_schedule(&w);
        let period = s.len();
        assert_eq!(period, 15);
        let n = 37;
        let mut next = counter(0);
        let mut c = vec![0usize; w.len()];
        for _ in 0..n * period {
            c[pick(&s, &mut next, |_| true).unwrap()] += 1;
        }
        let expect: Vec<usize> = w.iter().map(|&x| x as usize * n).collect();
        assert_eq!(c, expect);

        // With peer 2 out, the others still split exactly by weight.
        let mut next = counter(0);
        let mut c = vec![0usize; w.len()];
        for _ in 0..n * (period - 3) {
            c[pick(&s, &mut next, |p| p != 2).unwrap()] += 1;
        }
        let expect: Vec<usize> = w
            .iter()
            .enumerate()
            .map(|(i, &x)| if i == 2 { 0 } else { x as usize * n })
            .collect();
        assert_eq!(c, expect);
    }

    #[test]
    fn exact_counts_across_interleaved_workers() {
        // Three "workers" sharing one cursor, taking turns: together they
        // still walk one sequence.
        let w = [3u32, 2, 1];
        let s = smooth_wrr_schedule(&w);
        let cursor = std::cell::Cell::new(0u64);
        let next = || {
            let v = cursor.get();
            cursor.set(v + 1);
            v
        };
        let mut per_worker = [[0usize; 3]; 3];
        for k in 0..60 {
            let p = pick(&s, next, |_| true).unwrap();
            per_worker[k % 3][p] += 1;
        }
        let total: Vec<usize> = (0..3)
            .map(|p| per_worker.iter().map(|w| w[p]).sum())
            .collect();
        assert_eq!(total, vec![30, 20, 10]);
    }
}
