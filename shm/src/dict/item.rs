//! Items: how a key, its value, flags and expiry are laid out in a block,
//! read back validated, and stored or removed.
//!
//! Reading validates every field that sizes or locates something (state,
//! class, key and value lengths, value type) before anything is copied, so
//! a torn or garbage item is reported as corruption, never followed. A store
//! writes the whole item before the one store that links it (see the index),
//! then frees what it replaced: a crash before the link loses the new item,
//! after it the old one is merely unfreed until repair.

use std::sync::atomic::Ordering::{Relaxed, Release};

use super::expiry::is_expired;
use super::zone::{
    B_EXPIRES, B_FLAGS, B_HASH, B_KEY, B_LAST_USED, B_LRU_NEXT, B_NEXT, B_PREV, B_VALUE_LEN, E,
    ITEM_HDR, STATE_ITEM, T_BOOL, T_BYTES, T_FLOAT, T_INT, Z_ITEMS, Z_USED, Zone, size_of_class,
};
use super::{DictError, MAX_KEY_LEN, Mode, SetOutcome, Value};

/// A value ready to be written.
pub(super) struct Enc<'v> {
    pub(super) vtype: u32,
    pub(super) bytes: &'v [u8],
    pub(super) word: u64,
}

impl<'v> Enc<'v> {
    pub(super) fn new(v: &'v Value) -> Enc<'v> {
        let (vtype, bytes, word) = match v {
            Value::Bytes(b) => (T_BYTES, b.as_slice(), 0),
            Value::Int(i) => (T_INT, &[][..], *i as u64),
            Value::Float(f) => (T_FLOAT, &[][..], f.to_bits()),
            Value::Bool(b) => (T_BOOL, &[][..], u64::from(*b)),
        };
        Enc { vtype, bytes, word }
    }

    pub(super) fn len(&self) -> usize {
        if self.vtype == T_BYTES {
            self.bytes.len()
        } else {
            8
        }
    }
}

/// A validated item header, copied out.
#[derive(Debug, Clone)]
pub(super) struct Item {
    pub(super) off: usize,
    pub(super) class: u32,
    pub(super) next: usize,
    pub(super) lru_prev: usize,
    pub(super) lru_next: usize,
    pub(super) last_used: u64,
    pub(super) expires: u64,
    pub(super) hash: u32,
    pub(super) flags: u32,
    pub(super) key_len: usize,
    pub(super) vtype: u32,
    pub(super) value_len: usize,
}

impl Item {
    pub(super) fn value_off(&self) -> usize {
        self.off + ITEM_HDR + self.key_len.next_multiple_of(8)
    }
}

impl<'a> Zone<'a> {
    pub(super) fn item(&self, off: usize) -> Result<Item, E> {
        let b = self.block(off, self.bump())?;
        if b.state != STATE_ITEM {
            return Err(E::Corrupt("not an item"));
        }
        let kw = self.blk32(off, B_KEY).load(Relaxed);
        let key_len = (kw & 0xff_ffff) as usize;
        let vtype = kw >> 24;
        let value_len = self.blk32(off, B_VALUE_LEN).load(Relaxed) as usize;
        let ok_type = match vtype {
            T_BYTES => true,
            T_INT | T_FLOAT | T_BOOL => value_len == 8,
            _ => false,
        };
        if !ok_type
            || key_len == 0
            || key_len > MAX_KEY_LEN
            || ITEM_HDR + key_len.next_multiple_of(8) + value_len > size_of_class(b.class)
        {
            return Err(E::Corrupt("malformed item"));
        }
        Ok(Item {
            off,
            class: b.class,
            next: self.ptr32(off, B_NEXT),
            lru_prev: self.ptr32(off, B_PREV),
            lru_next: self.ptr32(off, B_LRU_NEXT),
            last_used: self.blk64(off, B_LAST_USED).load(Relaxed),
            expires: self.blk64(off, B_EXPIRES).load(Relaxed),
            hash: self.blk32(off, B_HASH).load(Relaxed),
            flags: self.blk32(off, B_FLAGS).load(Relaxed),
            key_len,
            vtype,
            value_len,
        })
    }

    pub(super) fn read_key(&self, it: &Item) -> Vec<u8> {
        self.read_bytes(it.off + ITEM_HDR, it.key_len)
    }

    pub(super) fn read_value(&self, it: &Item) -> Value {
        let vo = it.value_off();
        match it.vtype {
            T_BYTES => Value::Bytes(self.read_bytes(vo, it.value_len)),
            T_INT => Value::Int(self.w64(vo).load(Relaxed) as i64),
            T_FLOAT => Value::Float(f64::from_bits(self.w64(vo).load(Relaxed))),
            _ => Value::Bool(self.w64(vo).load(Relaxed) != 0),
        }
    }

    pub(super) fn remove_item(&self, it: &Item) -> Result<(), E> {
        self.chain_unlink(it)?;
        self.lru_unlink(it.off)?;
        self.w64(Z_ITEMS).fetch_sub(1, Relaxed);
        self.w64(Z_USED)
            .fetch_sub(size_of_class(it.class) as u64, Relaxed);
        self.free_block(it.off, it.class)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_item(
        &self,
        blk: usize,
        class: u32,
        key: &[u8],
        hash: u32,
        enc: &Enc<'_>,
        expires: u64,
        flags: u32,
    ) {
        let need = ITEM_HDR + key.len().next_multiple_of(8) + enc.len();
        assert!(need <= size_of_class(class) && blk + size_of_class(class) <= self.g.len);
        self.set_ptr32(blk, B_NEXT, 0);
        self.set_ptr32(blk, B_PREV, 0);
        self.set_ptr32(blk, B_LRU_NEXT, 0);
        self.blk64(blk, B_LAST_USED).store(0, Relaxed);
        self.blk64(blk, B_EXPIRES).store(expires, Relaxed);
        self.blk32(blk, B_HASH).store(hash, Relaxed);
        self.blk32(blk, B_FLAGS).store(flags, Relaxed);
        self.blk32(blk, B_VALUE_LEN)
            .store(enc.len() as u32, Relaxed);
        self.blk32(blk, B_KEY)
            .store(key.len() as u32 | (enc.vtype << 24), Relaxed);
        self.write_bytes(blk + ITEM_HDR, key);
        let vo = blk + ITEM_HDR + key.len().next_multiple_of(8);
        if enc.vtype == T_BYTES {
            self.write_bytes(vo, enc.bytes);
        } else {
            self.w64(vo).store(enc.word, Relaxed);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn store(
        &self,
        key: &[u8],
        hash: u32,
        enc: &Enc<'_>,
        class: u32,
        expires: u64,
        flags: u32,
        mode: Mode,
        safe: bool,
        now: u64,
    ) -> Result<SetOutcome, E> {
        self.expire_on_store(now)?;
        let old = self.find(key, hash)?;
        let live = old
            .as_ref()
            .is_some_and(|f| !is_expired(f.item.expires, now));
        match mode {
            Mode::Add if live => return Err(DictError::Exists.into()),
            Mode::Replace if !live => return Err(DictError::NotFound.into()),
            _ => {}
        }
        let mut forcible = false;
        let blk = match self.try_alloc(class)? {
            Some(b) => b,
            None => {
                // Short of memory: the old item goes first, as in nginx.
                if let Some(f) = &old {
                    self.remove_item(&f.item)?;
                }
                self.alloc_slow(class, safe, now, &mut forcible)?
            }
        };
        self.write_item(blk, class, key, hash, enc, expires, flags);
        // Chains may have changed while allocating: look again.
        match self.find(key, hash)? {
            Some(f) => {
                self.set_ptr32(blk, B_NEXT, f.item.next);
                // The commit point: the old item is replaced by the new.
                self.w32(f.link).store(blk as u32, Release);
                self.lru_unlink(f.item.off)?;
                self.w64(Z_USED)
                    .fetch_sub(size_of_class(f.item.class) as u64, Relaxed);
                self.free_block(f.item.off, f.item.class)?;
            }
            None => {
                let slot = self.bucket_slot(hash);
                self.set_ptr32(blk, B_NEXT, self.w32(slot).load(Relaxed) as usize);
                // The commit point.
                self.w32(slot).store(blk as u32, Release);
                self.w64(Z_ITEMS).fetch_add(1, Relaxed);
            }
        }
        self.w64(Z_USED)
            .fetch_add(size_of_class(class) as u64, Relaxed);
        self.lru_push_head(blk)?;
        Ok(SetOutcome { forcible })
    }
}
