//! What an etcd error is, which ones are worth an immediate retry, and the
//! back-off between reconnections.

use std::time::Duration;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Quick retries of one request on errors that another endpoint (or the
/// same one a moment later) may not give: a dead member in the balancer.
const QUICK_RETRIES: u32 = 3;

/// An error talking to etcd.
#[derive(Debug, thiserror::Error)]
pub(super) enum EtcdError {
    #[error("{}", describe(.0))]
    Client(#[from] etcd_client::Error),
    #[error("etcd answered without a response header")]
    NoHeader,
}

impl EtcdError {
    pub(super) fn code(&self) -> Option<tonic::Code> {
        match self {
            EtcdError::Client(etcd_client::Error::GRpcStatus(s)) => Some(s.code()),
            _ => None,
        }
    }
}

/// A one-line description (tonic's own Display carries metadata).
pub(super) fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            if s.message().is_empty() {
                format!("{:?}", s.code())
            } else {
                format!("{:?}: {}", s.code(), s.message())
            }
        }
        other => other.to_string(),
    }
}

/// Worth retrying at once: the request may well succeed elsewhere or now.
pub(super) fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

pub(super) async fn retry<T>(
    mut call: impl AsyncFnMut() -> Result<T, etcd_client::Error>,
) -> Result<T, EtcdError> {
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && attempt < QUICK_RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20) * attempt).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Capped exponential back-off with jitter.
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    pub(super) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    pub(super) fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        // ±20 %, from the clock's low bits: enough to spread many masters.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        let factor = 0.8 + f64::from(nanos % 1000) / 1000.0 * 0.4;
        d.mul_f64(factor)
    }
}
