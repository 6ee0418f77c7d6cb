//! The registry's accept loop: what `axum::serve` does, plus the limits a service exposed to
//! many clients needs.
//!
//! - **Slow headers**: HTTP/1 request heads must arrive within
//!   [`ConnectionLimits::header_read_timeout`] (hyper's timer; it also runs while a kept-alive
//!   connection waits for its next request).
//! - **Idle connections** (no request in flight, no response body streaming, either protocol)
//!   are closed after [`ConnectionLimits::idle_timeout`].
//! - **A cap on open connections** ([`ConnectionLimits::max_connections`]). At the cap the
//!   least recently active idle connection is closed to make room, so a client holding many
//!   idle sockets cannot lock others out; when every connection is busy, the newcomer waits
//!   briefly for a slot and then gets a `503` and is closed.
//! - **Shutdown**: connections finish their requests in flight, idle ones close at once.
//!
//! Every connection is one task; the table of connections is only for eviction.

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

/// Timeouts and the cap on connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A request head (HTTP/1) must arrive within this, from the first wait for it.
    pub header_read_timeout: Duration,
    /// A connection with nothing in flight is closed after this.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// How long a newcomer waits for a slot when every connection is busy, before its 503.
    pub full_wait: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            full_wait: Duration::from_secs(1),
        }
    }
}

impl ConnectionLimits {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        for (name, d) in [
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(24 * 3600) {
                return Err(format!("{name} must be between 1 ms and 24 h, not {d:?}"));
            }
        }
        Ok(())
    }
}

/// What the accept loop knows of one connection.
struct Activity {
    /// Requests being handled plus response bodies still streaming.
    busy: AtomicUsize,
    /// Milliseconds since the loop started at the last start or end of a request.
    last_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Option<Duration> {
        (self.busy.load(Ordering::Acquire) == 0).then(|| {
            let now = self.epoch.elapsed().as_millis() as u64;
            Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
        })
    }
}

/// Held while a request is handled and its body streams out.
struct BusyGuard(Arc<Activity>);

impl BusyGuard {
    fn new(a: &Arc<Activity>) -> BusyGuard {
        a.busy.fetch_add(1, Ordering::AcqRel);
        a.touch();
        BusyGuard(a.clone())
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection marked busy until it is sent or dropped.
struct Guarded {
    body: Body,
    _guard: BusyGuard,
}

impl http_body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

type Table = Arc<Mutex<HashMap<u64, (Arc<Activity>, tokio::task::AbortHandle)>>>;

/// Serve `app` on `listener` until `shutdown` resolves, then let requests in flight finish.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let table: Table = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let epoch = Instant::now();
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                evict_idlest(&table);
                match tokio::time::timeout(limits.full_wait, slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        tracing::warn!(
                            max = limits.max_connections,
                            "connection cap reached, every connection busy: 503"
                        );
                        tokio::spawn(refuse(stream));
                        continue;
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let activity = Arc::new(Activity {
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(epoch.elapsed().as_millis() as u64),
            epoch,
        });
        let (app, limits, stop, table2) = (app.clone(), limits.clone(), stop_rx.clone(), table.clone());
        let act = activity.clone();
        let handle = tasks.spawn(async move {
            serve_one(stream, app, &limits, act, stop).await;
            table2.lock().expect("connection table").remove(&id);
            drop(permit);
        });
        table.lock().expect("connection table").insert(id, (activity, handle));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
}

/// Close the connection that has been idle longest, if any is idle.
fn evict_idlest(table: &Table) {
    let mut table = table.lock().expect("connection table");
    let idlest = table
        .iter()
        .filter_map(|(id, (a, _))| a.idle_for().map(|d| (d, *id)))
        .max();
    if let Some((idle, id)) = idlest {
        tracing::debug!(
            connection = id,
            idle_ms = idle.as_millis() as u64,
            "closing an idle connection to make room"
        );
        if let Some((_, handle)) = table.remove(&id) {
            handle.abort();
        }
    }
}

/// Answer a connection there is no room for, and close it.
async fn refuse(mut stream: TcpStream) {
    let body = r#"{"error":{"code":"overloaded","message":"too many open connections; retry shortly"}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// One connection: HTTP/1 or HTTP/2, closed when idle too long or when the server stops.
async fn serve_one(
    stream: TcpStream,
    app: Router,
    limits: &ConnectionLimits,
    activity: Arc<Activity>,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle_timeout.min(Duration::from_secs(20))));
    let act = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = BusyGuard::new(&act);
        let app = app.clone();
        async move {
            let response = app
                .oneshot(req)
                .await
                .unwrap_or_else(|never: Infallible| match never {});
            Ok::<_, Infallible>(response.map(|body| Body::new(Guarded { body, _guard: guard })))
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let tick = (limits.idle_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(tick);
    // When the connection was asked to close: it gets a moment to do so cleanly, then is
    // dropped if nothing is in flight (hyper keeps a connection that never sent a byte open).
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = ticks.tick() => {
                let idle = activity.idle_for();
                match closing {
                    None if idle.is_some_and(|d| d >= limits.idle_timeout) => {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                    Some(since) if idle.is_some() && since.elapsed() >= tick => return,
                    _ => {}
                }
            }
        }
    }
}
