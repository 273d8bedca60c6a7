//! One client connection and the guard that closes it when its socket stops taking
//! bytes: a client whose socket takes nothing for twice the stall timeout while the agent
//! has bytes for it (that stream's end, a download's) is disconnected, so a vanished
//! client holds no memory or worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::server::{handle, Agent};

/// Write progress of one connection: when its writes started to block, if they do.
#[derive(Debug)]
struct WriteProgress {
    epoch: Instant,
    /// Milliseconds after `epoch` + 1 when writes began to block; 0 while they flow.
    blocked_since: AtomicU64,
}

impl WriteProgress {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            blocked_since: AtomicU64::new(0),
        })
    }

    fn note<T>(&self, r: &Poll<std::io::Result<T>>) {
        match r {
            Poll::Pending => {
                let now = self.epoch.elapsed().as_millis() as u64 + 1;
                let _ = self.blocked_since.compare_exchange(
                    0,
                    now,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            Poll::Ready(_) => self.blocked_since.store(0, Ordering::Relaxed),
        }
    }

    fn blocked_for(&self) -> Duration {
        match self.blocked_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis(
                (self.epoch.elapsed().as_millis() as u64 + 1).saturating_sub(since),
            ),
        }
    }
}

/// A connection's socket, noting whether its writes make progress.
struct WatchedIo {
    inner: tokio::net::TcpStream,
    progress: Arc<WriteProgress>,
}

impl tokio::io::AsyncRead for WatchedIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress.note(&r);
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress.note(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.progress.note(&r);
        r
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one connection. A client whose socket takes nothing for twice the stall
/// timeout while the agent has bytes for it (a stalled stream whose end could not be
/// written, a stalled download) is disconnected, so it holds nothing for longer.
pub(crate) async fn serve(agent: Arc<Agent>, stream: tokio::net::TcpStream) {
    let progress = WriteProgress::new();
    let io = WatchedIo {
        inner: stream,
        progress: progress.clone(),
    };
    let a = agent.clone();
    let svc = hyper::service::service_fn(move |req| handle(a.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(1 << 20)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    let stall = agent.cfg.stall_timeout;
    let close_after = stall.saturating_mul(2);
    let mut check = tokio::time::interval((stall / 4).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = &mut conn => return,
            _ = check.tick() => {
                if progress.blocked_for() >= close_after {
                    return;
                }
            }
        }
    }
}
