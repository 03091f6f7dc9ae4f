//! The worker's own view of the published configuration, rebuilt key by key
//! as the master publishes changes, and read per request without touching
//! the region.

use std::collections::HashMap;

use elb_shm::config::Change;

#[derive(Default)]
pub(crate) struct View {
    entries: HashMap<Vec<u8>, Vec<u8>>,
}

impl View {
    pub fn apply(&mut self, change: Change<'_>) {
        match change {
            Change::Reset => self.entries.clear(),
            Change::Put { key, value } => {
                self.entries.insert(key.to_vec(), value.to_vec());
            }
            Change::Delete { key } => {
                self.entries.remove(key);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}
