//! Retrying S3 requests: which failures are worth another try, and the backoff between tries
//! up to a deadline. object_store already retries each request a few times within about a
//! minute; this is the layer above it, for a server that stays away longer (restarted, a
//! network partition), and the one that turns what is left into an error naming the object.

use super::RemoteError;
use gantry_checkpoint::CheckpointError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Backoff and deadline for transient failures.
#[derive(Clone, Debug, PartialEq)]
pub struct Retry {
    /// Give up when a request has kept failing this long (from its first failure).
    pub deadline: Duration,
    /// The first wait; each next one doubles, up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            deadline: Duration::from_secs(300),
            first_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(15),
        }
    }
}

impl Retry {
    /// The wait before try `attempt + 1` (attempt 1 is the first failure): doubling from
    /// `first_backoff`, capped, with up to a quarter of jitter so the ranks of a host do not
    /// retry in step.
    pub(crate) fn backoff(&self, attempt: u32, jitter_seed: u64) -> Duration {
        let doubled = self
            .first_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let base = doubled.min(self.max_backoff);
        let unit = crate::splitmix::mix64(jitter_seed ^ u64::from(attempt)) as f64 / u64::MAX as f64;
        base.mul_f64(1.0 + 0.25 * unit)
            .min(self.max_backoff.max(self.first_backoff))
    }
}

/// Whether a failed request may succeed if tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The server or the network: down, overloaded, reset, timed out.
    Transient,
    /// An answer that will not change: missing, refused, invalid.
    Permanent,
}

pub(crate) fn classify(e: &CheckpointError) -> Fault {
    use object_store::Error as E;
    match e {
        CheckpointError::Store { source, .. } => match source.as_ref() {
            E::NotFound { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::AlreadyExists { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::UnknownConfigurationKey { .. } => Fault::Permanent,
            // object_store reports some requests' HTTP errors (listings) as generic ones; it has
            // retried 5xx, 408 and 429 already, so another status from the server is an answer.
            other => match http_status(other) {
                Some(status) if (400..500).contains(&status) && status != 408 && status != 429 => Fault::Permanent,
                // Connection refused or reset, timeouts, 5xx and throttling once object_store's
                // own retries are spent, a body cut short.
                _ => Fault::Transient,
            },
        },
        _ => Fault::Permanent,
    }
}

/// The HTTP status an object_store error reports in its message ("… non-2xx status code:
/// 404 Not Found …"), where it carries one.
fn http_status(e: &object_store::Error) -> Option<u16> {
    let text = e.to_string();
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// Whether a failed listing of a location says its bucket does not exist (a 404 with S3's
/// `NoSuchBucket`, or object_store's not-found).
pub(crate) fn no_bucket(e: &RemoteError) -> bool {
    matches!(e, RemoteError::MissingObject { .. }) || s3_code(e).as_deref() == Some("NoSuchBucket")
}

/// An S3 error code (`<Code>NoSuchBucket</Code>`) in an error's message.
fn s3_code(e: &RemoteError) -> Option<String> {
    let text = match e {
        RemoteError::Store { source, .. } => source.to_string(),
        RemoteError::MissingObject { .. } => return None,
        other => other.to_string(),
    };
    let at = text.find("<Code>")? + "<Code>".len();
    let len = text[at..].find("</Code>")?;
    Some(text[at..at + len].to_string())
}

/// The error a permanent failure of a request on `object` becomes: access refusals and
/// missing objects by name, the rest with the store's own message.
pub(crate) fn permanent(object: &str, e: CheckpointError) -> RemoteError {
    use object_store::Error as E;
    if let CheckpointError::Store { source, .. } = &e {
        match source.as_ref() {
            E::PermissionDenied { source, .. } | E::Unauthenticated { source, .. } => {
                return RemoteError::Denied {
                    object: object.to_string(),
                    detail: source.to_string(),
                };
            }
            E::NotFound { .. } => {
                return RemoteError::MissingObject {
                    object: object.to_string(),
                };
            }
            _ => {}
        }
    }
    if let CheckpointError::Store { source, .. } = &e
        && http_status(source) == Some(404)
        && !source.to_string().contains("<Code>NoSuchBucket</Code>")
    {
        return RemoteError::MissingObject {
            object: object.to_string(),
        };
    }
    if let CheckpointError::MissingObject { .. } = e {
        return RemoteError::MissingObject {
            object: object.to_string(),
        };
    }
    RemoteError::Store {
        object: object.to_string(),
        source: Box::new(e),
    }
}

/// Run `op` until it succeeds, fails permanently, or has failed transiently for longer than
/// `retry.deadline`; each wait is logged. `object` names what is being read or written.
pub(crate) fn with_retry<T>(
    retry: &Retry,
    object: &str,
    op: impl FnMut() -> Result<T, CheckpointError>,
) -> Result<T, RemoteError> {
    with_retry_unless(retry, object, None, op)
}

/// [`with_retry`] that gives up with [`RemoteError::Stopped`] as soon as `stop` is set (a
/// streaming fetcher shutting down must not sit out a backoff to the deadline).
pub(crate) fn with_retry_unless<T>(
    retry: &Retry,
    object: &str,
    stop: Option<&AtomicBool>,
    mut op: impl FnMut() -> Result<T, CheckpointError>,
) -> Result<T, RemoteError> {
    let stopped = || stop.is_some_and(|s| s.load(Ordering::Relaxed));
    let mut first_failure: Option<Instant> = None;
    let mut attempt = 0u32;
    let seed = u64::from(std::process::id()) ^ (object.len() as u64).rotate_left(32);
    loop {
        let e = match op() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if classify(&e) == Fault::Permanent {
            return Err(permanent(object, e));
        }
        attempt += 1;
        let since = *first_failure.get_or_insert_with(Instant::now);
        let wait = retry.backoff(attempt, seed);
        if since.elapsed() + wait > retry.deadline {
            return Err(RemoteError::GaveUp {
                object: object.to_string(),
                attempts: attempt,
                waited_s: since.elapsed().as_secs_f64(),
                last: e.to_string(),
            });
        }
        tracing::warn!(
            object,
            attempt,
            retry_in_s = wait.as_secs_f64(),
            error = %e,
            "S3 request failed; retrying"
        );
        let until = Instant::now() + wait;
        while let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            if stopped() {
                return Err(RemoteError::Stopped {
                    object: object.to_string(),
                });
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_error(source: object_store::Error) -> CheckpointError {
        CheckpointError::Store {
            url: "s3://b/ds".into(),
            op: "read",
            key: "x.bin".into(),
            source: Box::new(source),
        }
    }

    fn generic() -> CheckpointError {
        store_error(object_store::Error::Generic {
            store: "S3",
            source: "connection refused".into(),
        })
    }

    fn fast(deadline_ms: u64) -> Retry {
        Retry {
            deadline: Duration::from_millis(deadline_ms),
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let r = Retry {
            deadline: Duration::from_secs(60),
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        for seed in [0, 7, u64::MAX] {
            let waits: Vec<Duration> = (1..=8).map(|a| r.backoff(a, seed)).collect();
            assert!(waits[0] >= Duration::from_millis(100) && waits[0] <= Duration::from_millis(125));
            assert!(waits[1] >= Duration::from_millis(200) && waits[1] <= Duration::from_millis(250));
            assert!(waits.iter().all(|w| *w <= Duration::from_secs(1)), "{waits:?}");
            assert_eq!(waits[7], Duration::from_secs(1));
        }
    }

    #[test]
    fn transient_failures_are_retried_until_success() {
        let mut calls = 0;
        let v = with_retry(&fast(10_000), "s3://b/ds/x.bin", || {
            calls += 1;
            if calls < 4 { Err(generic()) } else { Ok(calls) }
        })
        .unwrap();
        assert_eq!(v, 4);
    }

    #[test]
    fn a_deadline_ends_the_retries_naming_the_object() {
        let e = with_retry(&fast(30), "s3://b/ds/x.bin", || Err::<(), _>(generic()))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("s3://b/ds/x.bin: S3 still failing") && e.contains("connection refused"),
            "{e}"
        );
    }

    #[test]
    fn permanent_failures_are_not_retried_and_say_what_they_are() {
        let mut calls = 0;
        let e = with_retry(&fast(10_000), "s3://b/ds/x.bin", || {
            calls += 1;
            Err::<(), _>(store_error(object_store::Error::PermissionDenied {
                path: "ds/x.bin".into(),
                source: "SignatureDoesNotMatch".into(),
            }))
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(matches!(e, RemoteError::Denied { .. }), "{e}");
        assert!(e.to_string().contains("SignatureDoesNotMatch") && e.to_string().contains("credentials"));
        let e = with_retry(&fast(10_000), "s3://b/ds/y.idx", || {
            Err::<(), _>(store_error(object_store::Error::NotFound {
                path: "ds/y.idx".into(),
                source: "gone".into(),
            }))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "s3://b/ds/y.idx is missing, but the manifest lists it");
    }
}
