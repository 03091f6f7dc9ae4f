//! Peer choice: nginx's smooth weighted round robin, shared by every worker.
//!
//! The master publishes one period of nginx's smooth WRR sequence per
//! upstream in the shared region, next to one atomic cursor per upstream;
//! every worker picks `schedule[cursor.fetch_add(1) % len]` ([`pick`]), so
//! all workers together walk one sequence and the split is exact. The backup
//! peers have a schedule of their own, used only when [`pick`] on the primary
//! one finds no usable peer. Passive and active health, which change between
//! versions, are the `usable` test the caller passes.

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

    /// nginx's sequence for weights {5, 1, 1}: { a, a, b, a, c, a, a }.
    const FIVE_ONE_ONE: [u16; 7] = [0, 0, 1, 0, 2, 0, 0];
    /// The sequence for weights {5, 1, 3, 2, 0, 4}.
    const MIXED: [u16; 15] = [0, 5, 2, 3, 0, 5, 1, 0, 2, 5, 0, 3, 2, 5, 0];
    /// The sequence for weights {3, 2, 1}.
    const THREE_TWO_ONE: [u16; 6] = [0, 1, 0, 2, 1, 0];

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
    fn pick_walks_the_schedule() {
        let s = FIVE_ONE_ONE;
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
        let s = FIVE_ONE_ONE;
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
        let s = FIVE_ONE_ONE;
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
        let s = FIVE_ONE_ONE;
        assert_eq!(pick(&s, || 7, |p| p == 2), Some(2));
        assert_eq!(pick(&s, || 0, |p| p == 1), Some(1));
    }

    #[test]
    fn exact_counts_over_periods() {
        let w = [5u32, 1, 3, 2, 0, 4];
        let s = MIXED;
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
        let s = THREE_TWO_ONE;
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
