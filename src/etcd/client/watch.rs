//! Following changes: one watch stream over every prefix, kept honest by
//! progress requests, ended by compaction, a rewound revision or a fault.

use std::time::{Duration, Instant};

use etcd_client::{WatchOptions, WatchResponse};

use super::retry::{describe, retry};
use super::{MAX_MESSAGE, Task};
use crate::etcd::keys::prefix_end;
use crate::etcd::view::{Event, Kv};

/// The watch asks etcd for a progress notice this often...
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// ...and counts as lost when nothing came on it for this long: a hung
/// etcd, or a connection gone without a reset.
const WATCH_SILENCE: Duration = Duration::from_secs(6);

/// Why a watch ended.
pub(super) enum WatchEnd {
    Compacted(i64),
    Rewound { from: i64, to: i64 },
    Lost(String),
}

impl Task {
    /// Follows changes from the view's revision + 1 until something ends
    /// the watch; serves dumps meanwhile.
    pub(super) async fn watch(&mut self) -> WatchEnd {
        let prefixes = self.prefixes();
        let from = self.revision + 1;
        let options = |p: &str| {
            WatchOptions::new()
                .with_range(prefix_end(p.as_bytes()))
                .with_start_revision(from)
                .with_prev_key()
        };
        let mut wc = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let first = prefixes[0].clone();
        let mut stream =
            match retry(async || wc.watch(first.clone(), Some(options(&first))).await).await {
                Ok(s) => s,
                Err(e) => return WatchEnd::Lost(e.to_string()),
            };
        for p in &prefixes[1..] {
            if let Err(e) = stream.watch(p.clone(), Some(options(p))).await {
                return WatchEnd::Lost(describe(&e));
            }
        }
        let (mut sender, mut responses) = stream.split();
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                msg = responses.message() => {
                    heard = Instant::now();
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return WatchEnd::Lost("the stream ended".into()),
                        Err(e) => return WatchEnd::Lost(describe(&e)),
                    };
                    if let Some(end) = self.on_response(resp) {
                        return end;
                    }
                }
                Some(done) = self.resolving.join_next(), if !self.resolving.is_empty() => {
                    self.resolved(done);
                }
                Some(req) = self.requests.recv() => {
                    self.dump(req).await;
                    // The stream was not read meanwhile.
                    heard = Instant::now();
                }
                _ = progress.tick() => {
                    if heard.elapsed() > WATCH_SILENCE {
                        return WatchEnd::Lost(format!(
                            "no answer on the watch for {:.0?}",
                            heard.elapsed()
                        ));
                    }
                    if let Err(e) = sender.request_progress().await {
                        return WatchEnd::Lost(describe(&e));
                    }
                }
            }
        }
    }

    fn on_response(&mut self, resp: WatchResponse) -> Option<WatchEnd> {
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Some(WatchEnd::Compacted(resp.compact_revision()));
            }
            return Some(WatchEnd::Lost(format!(
                "canceled by etcd: {}",
                resp.cancel_reason()
            )));
        }
        if let Some(h) = resp.header()
            && h.revision() < self.revision
        {
            return Some(WatchEnd::Rewound {
                from: self.revision,
                to: h.revision(),
            });
        }
        if resp.created() {
            // Watching again: the next fault starts from a short back-off.
            self.backoff.reset();
        }
        if resp.events().is_empty() {
            return None;
        }
        let mut events = Vec::with_capacity(resp.events().len());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            self.revision = self.revision.max(kv.mod_revision());
            // Read the raw type: the crate's accessor panics on an unknown one.
            match ev.0.r#type {
                0 => events.push(Event::Put(Kv {
                    key: kv.key().to_vec(),
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                })),
                1 => events.push(Event::Delete {
                    key: kv.key().to_vec(),
                    revision: kv.mod_revision(),
                }),
                t => log::warn!(
                    "etcd: ignoring an event of unknown type {t} on {}",
                    String::from_utf8_lossy(kv.key())
                ),
            }
        }
        let outcome = self.view.apply(events);
        self.apply(outcome);
        self.report();
        None
    }
}
