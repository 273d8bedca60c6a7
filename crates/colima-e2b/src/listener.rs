//! Accepted connections: small writes leave at once (Nagle off), the kernel buffers a
//! bounded amount per client, and a client that takes nothing for the stall timeout is
//! dropped, whatever it was receiving (a WebSocket, a proxied stream, a download), so a
//! reader that stops cannot hold the server's memory or tasks. A handler can abort a
//! connection ([`sandbox_api::abort`]): its writes fail from then on, so a broken proxied
//! stream is not ended as if complete.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use poem::http::uri::Scheme;
use poem::listener::{Acceptor, TcpAcceptor};
use poem::web::{LocalAddr, RemoteAddr};
use sandbox_api::abort::{AbortFlag, Aborts};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Kernel send buffer per client connection: what a stalled client can pin in the kernel.
const SEND_BUFFER: usize = 256 << 10;

/// The server's acceptor: TCP options and stall-guarded streams.
pub struct GuardedAcceptor {
    inner: TcpAcceptor,
    stall: Duration,
    aborts: Aborts,
}

impl GuardedAcceptor {
    /// Wraps `inner`; writes that make no progress for `stall` fail, and so do writes to
    /// a connection aborted through `aborts`.
    pub fn new(inner: TcpAcceptor, stall: Duration, aborts: Aborts) -> Self {
        Self {
            inner,
            stall,
            aborts,
        }
    }
}

impl Acceptor for GuardedAcceptor {
    type Io = StallGuard;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        let (io, local, remote, scheme) = self.inner.accept().await?;
        // Streamed events are small writes that must leave at once, not wait for the
        // client's delayed ACK (about 40 ms each).
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if let Err(e) = socket2::SockRef::from(&io).set_send_buffer_size(SEND_BUFFER) {
            tracing::debug!(error = %e, "cannot set SO_SNDBUF");
        }
        let mut guard = StallGuard::new(io, self.stall);
        if let Some(peer) = remote.as_socket_addr() {
            let probe = gone_probe(&guard.io);
            guard.abort = Some(self.aborts.register_with_probe(*peer, probe));
        }
        Ok((guard, local, remote, scheme))
    }
}

/// A probe that tells whether the client closed or reset the connection, reading
/// nothing (a peek on a duplicate of the socket, which is non-blocking as tokio's is). A
/// client that only shut down its sending side counts as gone too.
fn gone_probe(io: &TcpStream) -> Option<sandbox_api::abort::GoneProbe> {
    let sock = match socket2::SockRef::from(io).try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "cannot duplicate the client socket");
            return None;
        }
    };
    Some(std::sync::Arc::new(move || {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match sock.peek(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ),
        }
    }))
}

/// A client connection whose writes fail with `TimedOut` once they have made no
/// progress for the stall timeout, and with `ConnectionAborted` once a handler aborted
/// it (the connection is then closed).
pub struct StallGuard {
    io: TcpStream,
    stall: Duration,
    pending_since: Option<Pin<Box<Sleep>>>,
    abort: Option<AbortFlag>,
}

impl StallGuard {
    fn new(io: TcpStream, stall: Duration) -> Self {
        Self {
            io,
            stall,
            pending_since: None,
            abort: None,
        }
    }

    /// An error once a handler aborted the connection.
    fn aborted<T>(&self) -> Option<Poll<io::Result<T>>> {
        self.abort.as_ref().filter(|a| a.is_aborted()).map(|_| {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the response was aborted",
            )))
        })
    }

    /// After the inner write answered `poll`: progress clears the clock; being stuck
    /// starts it, and fails the write once it has run out.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(r) => {
                self.pending_since = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let stall = self.stall;
                let timer = self
                    .pending_since
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        metrics::counter!("colima_e2b_stalled_clients_dropped_total").increment(1);
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the client took nothing for {stall:?}"),
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

use std::future::Future as _;

impl AsyncRead for StallGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(err) = self.aborted() {
            return err;
        }
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(err) = self.aborted() {
            return err;
        }
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(err) = self.aborted() {
            return err;
        }
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_client_that_stops_reading_fails_the_write_after_the_stall_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // The client connects and never reads.
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server_side, _) = listener.accept().await.expect("accept");
        socket2::SockRef::from(&server_side)
            .set_send_buffer_size(SEND_BUFFER)
            .expect("sndbuf");
        let mut guarded = StallGuard::new(server_side, Duration::from_millis(300));
        let chunk = vec![b'x'; 64 << 10];
        let mut written = 0usize;
        let err = loop {
            match guarded.write_all(&chunk).await {
                Ok(()) => written += chunk.len(),
                Err(e) => break e,
            }
            assert!(
                written < 64 << 20,
                "the kernel buffered {written} bytes without stalling"
            );
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(written > 0, "nothing was written before the stall");
    }
}
