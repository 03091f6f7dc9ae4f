//! The peer's answer head: parsed, judged (interim, failure status, upgrade)
//! and rebuilt for the client.

use crate::health;
use crate::http::{self, parse_response};

use super::body::Body;
use super::error::{ErrorKind, ProxyError};
use super::{Cx, Phase, Session};

/// A response head from a peer larger than this is an invalid response.
const MAX_RESPONSE_HEAD: usize = 64 << 10;

impl Session {
    /// Takes the answer head at the start of the peer's buffer and queues
    /// it for the client; returns false while it is incomplete. A failure
    /// status goes to `fail` when another peer may take the request.
    pub(super) fn relay_head(&mut self, cx: &mut Cx<'_>) -> Result<bool, ProxyError> {
        let Phase::Exchange(x) = &mut self.phase else {
            return Ok(false);
        };
        let parsed = parse_response(&x.up_in, MAX_RESPONSE_HEAD, std::mem::take(cx.headers));
        let head = match parsed {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(false),
            Err(_) => return self.fail(cx, ErrorKind::InvalidResponse.into()),
        };
        if (100..200).contains(&head.status) && head.status != 101 {
            // ELB answered 100 Continue itself; other interim answers (103
            // Early Hints) go on, but never to an HTTP/1.0 client (RFC 9110
            // 15.2), which could take one for the answer.
            if head.status != 100 && !x.request.http10 {
                http::write::client_head(&mut self.out, &x.up_in, &head, None, false);
            }
            x.up_in.drain(..head.len);
            *cx.headers = head.headers;
            return Ok(true);
        }
        if let Some(p) = x.peer
            && let Some(slot) = p.health(cx.region)
        {
            if cx.args.retry.failure_statuses.contains(&head.status) {
                if x.may_retry() {
                    return self.fail(cx, ErrorKind::FailureStatus.into());
                }
                health::record_failure(&slot, health::now_ms(), p.max_fails, p.fail_timeout_ms);
            } else {
                health::record_success(&slot);
            }
        }
        if let Some(p) = x.peer {
            super::answers::count(cx, &p, head.status, x.attempt_started);
        }
        self.rec.upstream_status = Some(head.status);
        let tunnel = head.status == 101 && x.request.upgrade;
        let body = if tunnel {
            Body::UntilClose
        } else if x.request.head_method || head.status == 204 || head.status == 304 {
            Body::Done
        } else if head.until_close {
            Body::UntilClose
        } else {
            Body::new(head.body)
        };
        x.decode_chunked &= matches!(body, Body::Chunked(_));
        // Only an answer whose end the client can see keeps the client's
        // connection.
        x.client_keep &= !matches!(body, Body::UntilClose) && !x.decode_chunked && !tunnel;
        x.poolable &= head.keep_alive && !tunnel;
        let connection: &[u8] = match (tunnel, x.client_keep) {
            (true, _) => b"upgrade",
            (false, true) => b"keep-alive",
            (false, false) => b"close",
        };
        http::write::client_head(
            &mut self.out,
            &x.up_in,
            &head,
            Some(connection),
            x.decode_chunked,
        );
        x.up_in.drain(..head.len);
        *cx.headers = head.headers;
        if tunnel {
            x.tunnel();
        } else {
            x.answer(body);
        }
        Ok(true)
    }
}
