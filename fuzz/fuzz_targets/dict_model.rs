//! The dictionary against a model: a sequence of set, delete, incr and
//! update_int on a few keys, in a zone small enough to evict, must agree
//! with a HashMap wherever the dictionary kept the key, and leave the zone
//! consistent.
#![no_main]
use std::collections::HashMap;
use std::sync::OnceLock;

use elb_shm::Region;
use elb_shm::dict::Value;
use libfuzzer_sys::fuzz_target;

fn region() -> &'static Region {
    static R: OnceLock<Region> = OnceLock::new();
    R.get_or_init(|| Region::create(1 << 20).expect("region"))
}

fuzz_target!(|data: &[u8]| {
    let d = region().dict();
    let _ = d.flush_all();
    let mut model: HashMap<Vec<u8>, Value> = HashMap::new();
    for op in data.chunks(3) {
        let (&kind, key, n) = match op {
            [k, key, n] => (k, vec![b'k', *key % 16], *n),
            _ => break,
        };
        match kind % 4 {
            0 => {
                let v = Value::Bytes(vec![n; n as usize * 8]);
                if d.set(&key, &v, None, 0).is_ok() {
                    model.insert(key, v);
                }
            }
            1 => {
                d.delete(&key).expect("delete");
                model.remove(&key);
            }
            2 => {
                if let Ok((v, _)) = d.incr(&key, i64::from(n), Some(0), None) {
                    model.insert(key, Value::Int(v));
                }
            }
            _ => {
                if let Ok((v, _)) =
                    d.update_int(&key, |old, _| {
                        let v = old.unwrap_or(0).wrapping_add(i64::from(n));
                        (Some((v, None)), v)
                    })
                {
                    model.insert(key, Value::Int(v));
                }
            }
        }
    }
    // Eviction may have dropped keys; what is left matches the model.
    for (k, v) in &model {
        if let Ok(Some((got, _))) = d.get(k) {
            assert_eq!(&got, v, "key {k:?}");
        }
    }
    d.check_consistency().expect("consistent");
});
