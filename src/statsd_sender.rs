//! statsd (`--statsd HOST:PORT`): every flush interval the master sends,
//! per domain, Eru ELB's names for what happened since the last send:
//! `$ELBNAME.$domain.total` and `$ELBNAME.$domain.status.$code` as counts,
//! and `$ELBNAME.$domain.cost` as a timer (the mean request time in ms over
//! the interval), dots in the domain written `_`. The `statsd` crate's
//! pipeline packs the lines into datagrams of at most 512 bytes.
//!
//! The numbers are the workers' own counters in the region
//! (`elb_shm::counters`), summed; this thread only reads them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use elb_shm::counters::Counts;
use statsd::Client;
use statsd::client::Pipeline;

use crate::store::Store;

/// Starts the sender when an address is set.
pub fn start(
    address: &str,
    name: &str,
    every: Duration,
    store: Arc<Mutex<Store>>,
) -> std::io::Result<()> {
    let client = Client::new(address, name)
        .map_err(|e| std::io::Error::other(format!("statsd {address}: {e}")))?;
    std::thread::Builder::new()
        .name("elb-statsd".into())
        .spawn(move || run(&client, every, &store))?;
    Ok(())
}

fn run(client: &Client, every: Duration, store: &Mutex<Store>) {
    let mut last: HashMap<String, Counts> = HashMap::new();
    loop {
        std::thread::sleep(every);
        let now: Vec<(String, Counts)> = store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .domain_counts()
            .into_iter()
            .map(|(d, c)| (d.to_string(), c))
            .collect();
        let mut pipe = Pipeline::new();
        for (domain, counts) in &now {
            // A domain whose entry was cleared (removed, then set again)
            // starts from nothing.
            let before = last
                .get(domain)
                .filter(|b| b.requests <= counts.requests)
                .cloned()
                .unwrap_or_default();
            add_lines(&mut pipe, &domain.replace('.', "_"), &counts.since(&before));
        }
        pipe.send(client);
        last = now.into_iter().collect();
    }
}

/// The lines of one domain's interval, if anything happened in it.
fn add_lines(pipe: &mut Pipeline, domain: &str, d: &Counts) {
    if d.requests == 0 {
        return;
    }
    pipe.count(&format!("{domain}.total"), d.requests as f64);
    for &(code, n) in &d.codes {
        pipe.count(&format!("{domain}.status.{code}"), n as f64);
    }
    pipe.timer(
        &format!("{domain}.cost"),
        d.cost_ms as f64 / d.requests as f64,
    );
}
