//! The session's part of the access log: what a request's line needs,
//! gathered as the exchange goes, and written when it ends. Nothing here
//! runs when the access log is off.

use std::time::Instant;

use elb_shm::Region;

use crate::access_log::{AccessLog, Record};
use crate::args::WorkerArgs;
use crate::http::RequestHead;
use crate::route::{header, split_target};

use super::{Phase, Session};

impl Session {
    /// Copies the head fields a log line shows, before the head's bytes
    /// are dropped from the input buffer.
    pub(super) fn start_record(&mut self, head: &RequestHead, now: Instant) {
        let buf = &self.inbuf;
        let text = &mut self.rec_text;
        text.clear();
        let mut keep = |v: &[u8]| {
            let start = text.len();
            text.extend_from_slice(v);
            start..text.len()
        };
        let target = head.target(buf);
        let (path, query) = split_target(target);
        let host = keep(head.host.clone().map_or(&[][..], |r| &buf[r]));
        let method = keep(head.method(buf));
        keep(b" ");
        keep(target);
        let version = keep(if head.minor_version == 0 {
            b" HTTP/1.0"
        } else {
            b" HTTP/1.1"
        });
        let referer = keep(header(buf, head, b"referer").unwrap_or_default());
        let user_agent = keep(head.user_agent.clone().map_or(&[][..], |r| &buf[r]));
        let forwarded_for = keep(header(buf, head, b"x-forwarded-for").unwrap_or_default());
        let uri = keep(path);
        let args = keep(query.strip_prefix(b"?").unwrap_or(query));
        let rec = Record {
            host,
            request: method.start..version.end,
            referer,
            user_agent,
            forwarded_for,
            uri,
            args,
            started: Some(now),
            ..Record::default()
        };
        self.rec = rec;
    }

    /// The connection closes with a request unfinished: it counts, and its
    /// line says, what the client got: the peer's status when its answer
    /// had begun, else 499 (nginx's "client closed the request").
    pub(crate) fn end_unfinished(
        &mut self,
        log: Option<&mut AccessLog>,
        region: &Region,
        args: &WorkerArgs,
        now: Instant,
    ) {
        let status = self.rec.upstream_status.unwrap_or(499);
        self.count(region, args, status, now);
        if let Phase::Exchange(x) = &self.phase {
            self.rec.body_bytes = x.sent_body;
            self.rec.upstream_addr = x.peer.map(|p| p.addr);
            self.rec.upstream_done = Some(now);
        }
        self.end_record(log, status, now);
    }

    /// Counts the request in its domain's entry of this worker's counters,
    /// once.
    pub(super) fn count(&mut self, region: &Region, args: &WorkerArgs, status: u16, now: Instant) {
        let Some(entry) = self.counting.take() else {
            return;
        };
        if let Some(c) = region.counters(args.index, args.workers, entry as usize) {
            let ms = now.saturating_duration_since(self.started).as_millis();
            c.count(status, u64::try_from(ms).unwrap_or(u64::MAX));
        }
    }

    /// Writes the line of the request in progress, if one is recorded.
    pub(super) fn end_record(&mut self, log: Option<&mut AccessLog>, status: u16, now: Instant) {
        let Some(log) = log else { return };
        if self.rec.started.is_none() {
            return;
        }
        self.rec.status = status;
        log.write(&self.rec, &self.rec_text, self.client_addr, now);
        self.rec.started = None;
    }
}
