//! The smooth weighted round-robin schedule the master publishes for each
//! upstream: one period of nginx's choice sequence, computed once per
//! peer-list version.
//!
//! nginx (`ngx_http_upstream_round_robin.c`, since commit 52327e062) picks a
//! peer thus: every peer's `current += effective`; the peer with the largest
//! `current` is chosen (the first, in peer order, on a tie); the chosen
//! peer's `current -= total` (the sum of the weights). After `Σw` picks every
//! `current` is back to 0, each peer having been chosen exactly `w` times, so
//! the sequence is periodic with period `Σw`. The workers walk the published
//! period with one shared cursor (`elb_workers::balance::pick`), so all of
//! them together make nginx's sequence.
//!
//! How the master uses it: one schedule for the primary peers and one for
//! the `backup` peers; peers that are permanently out (`down`, `status` other
//! than `"up"`) get weight 0 and never appear, while passive and active
//! health, which change between versions, are left to the workers; slow
//! start changes weights over time, so the master publishes a new schedule
//! as the ramp proceeds.

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
}
