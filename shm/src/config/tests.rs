use super::*;

fn drain(r: &mut ConfigReader<'_>, view: &mut BTreeMap<Vec<u8>, Vec<u8>>) -> u64 {
    r.poll(|c| match c {
        Change::Reset => view.clear(),
        Change::Put { key, value } => {
            view.insert(key.to_vec(), value.to_vec());
        }
        Change::Delete { key } => {
            view.remove(key);
        }
    })
}

#[test]
fn put_delete_and_reuse_reach_a_reader_in_order() {
    let region = Region::create(1 << 20).expect("region");
    let mut w = ConfigWriter::new(&region);
    let mut r = ConfigReader::new(&region);
    let mut view = BTreeMap::new();
    w.put(b"a", b"1").expect("put");
    w.put(b"b", b"2").expect("put");
    let g = w.publish();
    assert_eq!(drain(&mut r, &mut view), g);
    assert_eq!(view.len(), 2);
    w.delete(b"a");
    w.put(b"c", b"3").expect("put"); // reuses a's entry
    w.put(b"b", b"22").expect("put");
    w.publish();
    drain(&mut r, &mut view);
    let want: BTreeMap<Vec<u8>, Vec<u8>> = [
        (b"b".to_vec(), b"22".to_vec()),
        (b"c".to_vec(), b"3".to_vec()),
    ]
    .into_iter()
    .collect();
    assert_eq!(view, want);
    // A late reader sees the same state by scanning.
    let mut late = ConfigReader::new(&region);
    let mut v2 = BTreeMap::new();
    drain(&mut late, &mut v2);
    assert_eq!(v2, want);
}

#[test]
fn unpublished_changes_are_invisible() {
    let region = Region::create(1 << 20).expect("region");
    let mut w = ConfigWriter::new(&region);
    let mut r = ConfigReader::new(&region);
    let mut view = BTreeMap::new();
    w.put(b"a", b"1").expect("put");
    w.publish();
    drain(&mut r, &mut view);
    w.put(b"a", b"2").expect("put");
    assert!(!r.is_stale());
    assert_eq!(
        view.get(b"a".as_slice()).map(Vec::as_slice),
        Some(b"1".as_slice())
    );
}

#[test]
fn a_listing_blocked_by_an_unpublished_batch_applies_nothing() {
    let region = Region::create(1 << 20).expect("region");
    let mut w = ConfigWriter::new(&region);
    w.put(b"a", b"1").expect("put");
    w.put(b"b", b"2").expect("put");
    let published = w.publish();
    // A batch in progress rewrites b: a new reader cannot list b as
    // published, and must not list a alone.
    w.put(b"b", b"3").expect("put");
    let mut r = ConfigReader::new(&region);
    let mut view = BTreeMap::new();
    let mut changes = 0;
    let applied = r.poll(|c| {
        changes += 1;
        match c {
            Change::Reset => view.clear(),
            Change::Put { key, value } => {
                view.insert(key.to_vec(), value.to_vec());
            }
            Change::Delete { key } => {
                view.remove(key);
            }
        }
    });
    assert_eq!(
        (applied, changes, view.len()),
        (0, 0, 0),
        "a partial listing was applied as generation {applied}: {view:?}"
    );
    // Once the batch is published, the next poll lists it whole.
    let g = w.publish();
    assert!(g > published);
    assert_eq!(drain(&mut r, &mut view), g);
    assert_eq!(view.len(), 2);
    assert_eq!(view[b"b".as_slice()], b"3");
}

#[test]
fn a_reader_behind_a_whole_ring_rescans() {
    let region = Region::create(1 << 20).expect("region");
    let log = region.layout().log_count;
    let mut w = ConfigWriter::new(&region);
    let mut r = ConfigReader::new(&region);
    let mut view = BTreeMap::new();
    w.put(b"keep", b"x").expect("put");
    w.publish();
    drain(&mut r, &mut view);
    for i in 0..log + 10 {
        w.put(b"hot", i.to_string().as_bytes()).expect("put");
        w.publish();
    }
    drain(&mut r, &mut view);
    assert_eq!(view.len(), 2);
    assert_eq!(view[b"hot".as_slice()], (log + 9).to_string().into_bytes());
}

#[test]
fn arena_space_is_reused_and_exhaustion_is_an_error() {
    let region = Region::create(1 << 20).expect("region");
    let mut w = ConfigWriter::new(&region);
    let free = w.arena_free();
    for _ in 0..1000 {
        w.put(b"k", &[7u8; 1000]).expect("put");
        w.publish();
    }
    assert!(w.arena_free() + 2048 >= free, "replaced records are freed");
    let big = vec![0u8; free + 1];
    assert!(matches!(
        w.put(b"big", &big),
        Err(ConfigError::ArenaFull(_))
    ));
}

#[test]
fn a_batch_that_does_not_fit_changes_nothing() {
    let region = Region::create(1 << 20).expect("region");
    let mut w = ConfigWriter::new(&region);
    w.put(b"old", b"1").expect("put");
    let g = w.publish();
    let (free, keys) = (w.arena_free(), w.len());
    let big = vec![0u8; free];
    let err = w.put_all(&[(b"a", b"2"), (b"old", b"3"), (b"b", &big)]);
    assert_eq!(
        err,
        Err(ConfigError::ArenaFull(4 + 1 + 1 + 4 + 3 + 1 + 4 + 1 + free))
    );
    assert!(err.is_err_and(|e| e.to_string().contains("arena")));
    assert_eq!((w.arena_free(), w.len(), w.generation()), (free, keys, g));
    assert!(!w.contains(b"a"));
    // Directory: fill every entry but one, then ask for two.
    let dir = region.layout().dir_count;
    for i in 1..dir - 1 {
        w.put(format!("k{i}").as_bytes(), b"").expect("put");
    }
    let g = w.publish();
    let err = w.put_all(&[(b"x", b"1"), (b"y", b"1")]);
    assert_eq!(err, Err(ConfigError::DirectoryFull(dir)));
    assert!(err.is_err_and(|e| e.to_string().contains("keys")));
    assert_eq!(w.generation(), g);
    w.put_all(&[(b"x", b"1")]).expect("the last key fits");
    let mut r = ConfigReader::new(&region);
    let mut view = BTreeMap::new();
    drain(&mut r, &mut view);
    w.publish();
    drain(&mut r, &mut view);
    assert_eq!(view.len(), dir);
    assert!(!view.contains_key(b"a".as_slice()) && !view.contains_key(b"y".as_slice()));
    assert_eq!(view[b"old".as_slice()], b"1");
}

#[test]
fn free_list_coalesces() {
    let mut f = FreeList::new(1024);
    let a = f.alloc(100).expect("a");
    let b = f.alloc(100).expect("b");
    let c = f.alloc(100).expect("c");
    f.free(b, 100);
    f.free(a, 100);
    f.free(c, 100);
    assert_eq!(f.by_off.len(), 1);
    assert_eq!(f.free_bytes, 1024);
}
