//! Writing the live configuration back to etcd (`POST /__erulb__/dump`).

use std::collections::HashMap;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};

use super::Task;
use super::retry::retry;
use crate::etcd::view::{Op, desired, plan_dump};
use crate::etcd::{DumpError, DumpReport, DumpRequest};

impl Task {
    pub(super) async fn dump(&mut self, req: DumpRequest) {
        if Instant::now() > req.deadline {
            // The caller has given up already: write nothing.
            return;
        }
        let started = Instant::now();
        let result = self.write_dump(req.deadline, req.timeout).await;
        match &result {
            Ok(r) => log::info!(
                "etcd: dump written: {} puts, {} deletes in {} transactions, {:.0?}",
                r.puts,
                r.deletes,
                r.txns,
                started.elapsed()
            ),
            Err(e) => log::warn!("etcd: dump failed: {e}"),
        }
        let _ = req.reply.try_send(result);
    }

    async fn write_dump(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<DumpReport, DumpError> {
        let layout = self.view.layout().clone();
        // The state to write, read here: no watch event is applied between
        // this read and the writes.
        let (domains, upstreams) = {
            let store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
            let domains: Vec<_> = store
                .domains()
                .iter()
                .map(|(d, r)| (d.clone(), r.clone()))
                .collect();
            let upstreams = store.etcd_upstreams();
            (domains, upstreams)
        };
        let want = desired(&layout, &domains, &upstreams);
        let (listing, _) = self
            .fetch(&layout.dumped())
            .await
            .map_err(|e| DumpError::Unavailable(e.to_string()))?;
        let current: HashMap<Vec<u8>, Vec<u8>> =
            listing.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let plan = plan_dump(&current, &want);
        let total = plan.len();
        let mut report = DumpReport {
            puts: 0,
            deletes: 0,
            txns: 0,
        };
        let mut written: Vec<(Op, i64)> = Vec::new();
        let mut kv = self.kv();
        let mut failure = None;
        for (i, batch) in plan.into_iter().enumerate() {
            if Instant::now() > deadline {
                failure = Some(DumpError::Timeout(timeout));
                break;
            }
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|op| match op {
                    Op::Put(k, v) => TxnOp::put(k.clone(), v.clone(), None),
                    Op::Delete(k) => TxnOp::delete(k.clone(), None),
                })
                .collect();
            let txn = Txn::new().and_then(ops);
            let revision = match retry(async || kv.txn(txn.clone()).await).await {
                Ok(resp) => resp.header().map(|h| h.revision()),
                Err(e) => {
                    failure = Some(DumpError::Failed {
                        done: i,
                        total,
                        reason: e.to_string(),
                    });
                    break;
                }
            };
            report.txns += 1;
            for op in batch {
                match op {
                    Op::Put(..) => report.puts += 1,
                    Op::Delete(_) => report.deletes += 1,
                }
                // Without a revision the echo is applied as any event (the
                // store skips values it holds already).
                if let Some(r) = revision {
                    written.push((op, r));
                }
            }
        }
        self.view.record_dump(&written);
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}
