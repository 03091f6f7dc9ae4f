//! Crash tests: every store of every operation interrupted in turn (a
//! simulated SIGKILL, [`super::zone::crash_point`]), each leaving a zone that
//! repair makes consistent with the operation either done or not.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Once;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::index::hash_key;
use super::zone::{CRASH_AFTER, Geo, SimulatedCrash, Z_BUCKETS, Z_LRU_HEAD, size_of_class};
use super::*;

fn quiet_simulated_crashes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<SimulatedCrash>() {
                default(info);
            }
        }));
    });
}

/// Runs `op`, simulating a SIGKILL at its `n`th store; `None` if it
/// "died". The lock is released by unwinding, with the repair flag set,
/// exactly as `EOWNERDEAD` would make the next locker repair.
fn crash_after<R>(n: u64, op: impl FnOnce() -> R) -> Option<R> {
    CRASH_AFTER.with(|c| c.set(n));
    let r = catch_unwind(AssertUnwindSafe(op));
    CRASH_AFTER.with(|c| c.set(0));
    match r {
        Ok(v) => Some(v),
        Err(p) if p.is::<SimulatedCrash>() => None,
        Err(p) => resume_unwind(p),
    }
}

fn snapshot(d: &Dict<'_>) -> BTreeMap<Vec<u8>, Value> {
    let mut all = BTreeMap::new();
    // Stale items too: walk the LRU list through get_stale.
    let keys = d
        .with(|z2| {
            let mut out = Vec::new();
            let mut cur = z2.w64(Z_LRU_HEAD).load(Relaxed) as usize;
            while cur != 0 {
                let it = z2.item(cur)?;
                out.push(z2.read_key(&it));
                cur = it.lru_next;
            }
            Ok(out)
        })
        .expect("keys");
    for k in keys {
        if let Some((v, _, _)) = d.get_stale(&k).expect("get_stale") {
            all.insert(k, v);
        }
    }
    all
}

fn populate(d: &Dict<'_>) {
    for i in 0..40u8 {
        let key = format!("k{i}");
        let v = Value::Bytes(vec![i; 20 + 37 * i as usize]);
        d.set(key.as_bytes(), &v, None, u32::from(i))
            .expect("populate");
        d.set(
            format!("n{i}").as_bytes(),
            &Value::Int(i64::from(i)),
            None,
            0,
        )
        .expect("populate");
    }
}

type Step = Box<dyn Fn(&Dict<'_>)>;

struct Case {
    name: &'static str,
    setup: Step,
    op: Step,
    /// The value of "x" once the operation is done.
    done: Option<Value>,
}

fn case(name: &'static str, setup: Step, op: Step, done: Option<Value>) -> Case {
    Case {
        name,
        setup,
        op,
        done,
    }
}

fn bytes(b: u8, n: usize) -> Value {
    Value::Bytes(vec![b; n])
}

#[test]
fn every_crash_point_of_every_operation_is_repairable() {
    quiet_simulated_crashes();
    let region = Region::create(1 << 20).expect("region");
    let d = region.dict();
    populate(&d);
    let x: &[u8] = b"x";
    let set = |v: Value| -> Step { Box::new(move |d| drop(d.set(b"x", &v, None, 0))) };
    let del: Step = Box::new(|d| drop(d.delete(b"x")));
    let cases = vec![
        case("set new", del, set(bytes(1, 100)), Some(bytes(1, 100))),
        case(
            "set same class",
            set(bytes(1, 100)),
            set(bytes(2, 100)),
            Some(bytes(2, 100)),
        ),
        case(
            "set bigger",
            set(bytes(1, 100)),
            set(bytes(3, 3000)),
            Some(bytes(3, 3000)),
        ),
        case(
            "add",
            Box::new(|d| drop(d.delete(b"x"))),
            Box::new(|d| drop(d.add(b"x", &Value::Int(5), None, 0))),
            Some(Value::Int(5)),
        ),
        case(
            "replace",
            set(Value::Int(1)),
            Box::new(|d| drop(d.replace(b"x", &Value::Float(2.5), None, 0))),
            Some(Value::Float(2.5)),
        ),
        case(
            "delete",
            set(bytes(4, 10)),
            Box::new(|d| drop(d.delete(b"x"))),
            None,
        ),
        case(
            "incr in place",
            set(Value::Int(10)),
            Box::new(|d| drop(d.incr(b"x", 5, None, None))),
            Some(Value::Int(15)),
        ),
        case(
            "incr init",
            Box::new(|d| drop(d.delete(b"x"))),
            Box::new(|d| drop(d.incr(b"x", 5, Some(1), Some(Duration::from_secs(60))))),
            Some(Value::Int(6)),
        ),
        case(
            "update_int in place",
            set(Value::Int(10)),
            Box::new(|d| {
                drop(d.update_int(b"x", |v, _| {
                    (
                        Some((v.unwrap_or(0) * 2, Some(Duration::from_secs(60)))),
                        (),
                    )
                }))
            }),
            Some(Value::Int(20)),
        ),
        case(
            "update_int new",
            Box::new(|d| drop(d.delete(b"x"))),
            Box::new(|d| drop(d.update_int(b"x", |v, _| (Some((v.unwrap_or(7), None)), ())))),
            Some(Value::Int(7)),
        ),
        case(
            "expire",
            set(Value::Int(1)),
            Box::new(|d| drop(d.expire(b"x", Some(Duration::from_secs(3600))))),
            Some(Value::Int(1)),
        ),
        case(
            "get",
            set(Value::Int(3)),
            Box::new(|d| drop(d.get(b"x"))),
            Some(Value::Int(3)),
        ),
        case(
            "flush_expired",
            Box::new(|d| {
                d.set(b"x", &Value::Int(1), Some(Duration::from_millis(1)), 0)
                    .expect("set");
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while d.get(b"x").expect("get").is_some() {
                    assert!(std::time::Instant::now() < deadline, "x never expired");
                    std::thread::yield_now();
                }
            }),
            Box::new(|d| drop(d.flush_expired(0))),
            None,
        ),
        case(
            "repair",
            set(Value::Int(7)),
            Box::new(|d| drop(d.repair())),
            Some(Value::Int(7)),
        ),
    ];
    for c in &cases {
        let mut crashes = 0;
        for n in 1.. {
            (c.setup)(&d);
            let before = snapshot(&d);
            let finished = crash_after(n, || (c.op)(&d)).is_some();
            if let Err(e) = d.check_consistency() {
                panic!("{}: crash at store {n}: {e}", c.name);
            }
            let mut after = snapshot(&d);
            let mut before = before;
            let (bx, ax) = (before.remove(x), after.remove(x));
            assert_eq!(
                before, after,
                "{}: crash at store {n}: other keys changed",
                c.name
            );
            assert!(
                ax == bx || ax == c.done,
                "{}: crash at store {n}: x is {ax:?}, was {bx:?}, would be {:?}",
                c.name,
                c.done
            );
            if finished {
                assert_eq!(ax, c.done, "{}: finished", c.name);
                break;
            }
            crashes += 1;
        }
        assert!(crashes > 0, "{}: no store at all?", c.name);
    }
}

#[test]
fn crashes_while_evicting_are_repairable() {
    quiet_simulated_crashes();
    let region = Region::create(1 << 20).expect("region");
    let d = region.dict();
    let mut i = 0u32;
    // Fill with mixed sizes until a safe store fails.
    while d
        .safe_set(
            format!("f{i}").as_bytes(),
            &bytes(i as u8, 30 + (i as usize * 97) % 1500),
            None,
            0,
        )
        .is_ok()
    {
        i += 1;
    }
    assert!(i > 50);
    let big = d.max_value_len(8);
    for n in 1.. {
        let key = format!("big{n}");
        let out = crash_after(n, || d.set(key.as_bytes(), &bytes(9, big), None, 0));
        if let Err(e) = d.check_consistency() {
            panic!("crash at store {n}: {e}");
        }
        if let Some(r) = out {
            // Earlier crashes may have evicted enough already.
            assert!(r.is_ok(), "{r:?}");
            assert!(n > 10, "eviction took only {n} stores");
            break;
        }
    }
    d.check_consistency().expect("consistent");
}

#[test]
fn geometry_fits_the_zone() {
    for size in [1usize << 20, 3 << 20, 64 << 20, 1 << 30] {
        let l = crate::Layout::for_size(size).expect("layout");
        let g = Geo::new(l.dict_off, l.dict_len);
        assert!(g.nbuckets.is_power_of_two() && g.nbuckets >= 16);
        assert!(g.heap_start >= Z_BUCKETS + 4 * g.nbuckets);
        assert!(g.heap_end <= l.dict_len && g.heap_end > g.heap_start);
        let max = size_of_class(g.max_class);
        assert!(max * 8 <= g.heap_end - g.heap_start && max <= 1 << 20);
        assert!(max >= 8192, "{size}: max block {max}");
    }
}

#[test]
fn hash_depends_on_seed_and_every_byte() {
    let k = b"some key of more than eight bytes";
    assert_ne!(hash_key(1, k), hash_key(2, k));
    let mut k2 = *k;
    k2[30] ^= 1;
    assert_ne!(hash_key(1, k), hash_key(1, &k2));
    assert_ne!(hash_key(1, b"a"), hash_key(1, b"a\0"));
}
