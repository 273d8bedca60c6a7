//! Client connections a handler can abort: closed without finishing the response.
//!
//! A proxied stream whose upstream breaks (the sandbox was killed mid-command) must reach
//! the client as a broken transfer, as it does from E2B: the SDKs turn a transport error
//! plus a failed health probe into "the sandbox was killed". An HTTP/1.1 server that ends
//! the chunked body instead (hyper writes the last chunk even after a body error) tells
//! the client the stream finished normally. So the listener registers every connection
//! here by its peer address, and [`Aborts::abort`] makes its next write fail, which
//! closes it before the last chunk.
//!
//! A connection may also be registered with a probe that tells whether its client has
//! gone (closed or reset its socket): HTTP/1.1 servers read nothing while they stream a
//! response, so a proxied run of code would otherwise go on for a client that left.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Tells whether a connection's client has gone.
pub type GoneProbe = Arc<dyn Fn() -> bool + Send + Sync>;

/// One live connection.
#[derive(Clone)]
struct Live {
    flag: Arc<AtomicBool>,
    gone: Option<GoneProbe>,
}

/// The registry of abortable client connections, by peer address.
#[derive(Clone, Default)]
pub struct Aborts {
    live: Arc<Mutex<HashMap<SocketAddr, Live>>>,
}

impl std::fmt::Debug for Aborts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aborts")
            .field("connections", &self.lock().len())
            .finish()
    }
}

/// One registered connection: [`is_aborted`](Self::is_aborted) turns true once a handler
/// aborts it. Dropping it forgets the connection.
#[derive(Debug)]
pub struct AbortFlag {
    peer: SocketAddr,
    flag: Arc<AtomicBool>,
    aborts: Aborts,
}

impl Aborts {
    /// Registers the connection from `peer` (the listener calls this on accept).
    pub fn register(&self, peer: SocketAddr) -> AbortFlag {
        self.register_with_probe(peer, None)
    }

    /// Registers the connection from `peer` with a probe for [`Aborts::client_gone`].
    pub fn register_with_probe(&self, peer: SocketAddr, gone: Option<GoneProbe>) -> AbortFlag {
        let flag = Arc::new(AtomicBool::new(false));
        self.lock().insert(
            peer,
            Live {
                flag: flag.clone(),
                gone,
            },
        );
        AbortFlag {
            peer,
            flag,
            aborts: self.clone(),
        }
    }

    /// Aborts the connection from `peer`, if it is registered; returns whether it was.
    pub fn abort(&self, peer: SocketAddr) -> bool {
        match self.lock().get(&peer) {
            Some(live) => {
                live.flag.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Whether the client of the connection from `peer` has gone: its probe says so, or
    /// the connection is no longer registered. Without a probe, `false`.
    pub fn client_gone(&self, peer: SocketAddr) -> bool {
        let probe = match self.lock().get(&peer) {
            Some(live) => live.gone.clone(),
            None => return true,
        };
        probe.is_some_and(|gone| gone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AbortFlag {
    /// Whether a handler aborted this connection.
    pub fn is_aborted(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Drop for AbortFlag {
    fn drop(&mut self) {
        let mut live = self.aborts.lock();
        // A new connection may reuse the address once this one is closed.
        if live
            .get(&self.peer)
            .is_some_and(|l| Arc::ptr_eq(&l.flag, &self.flag))
        {
            live.remove(&self.peer);
        }
    }
}

/// The peer address of `req`'s connection, when it came over TCP.
pub fn peer_of(req: &poem::Request) -> Option<SocketAddr> {
    req.remote_addr().as_socket_addr().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aborted_connection_says_so_and_is_forgotten_when_dropped() {
        let aborts = Aborts::default();
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let other: SocketAddr = "127.0.0.1:40001".parse().expect("addr");
        let flag = aborts.register(peer);
        let kept = aborts.register(other);
        assert!(!flag.is_aborted());
        assert!(aborts.abort(peer));
        assert!(flag.is_aborted());
        assert!(!kept.is_aborted(), "only the named connection is aborted");
        drop(flag);
        assert!(!aborts.abort(peer), "a closed connection is forgotten");
        assert!(aborts.abort(other));
    }

    #[test]
    fn a_probe_tells_whether_the_client_has_gone() {
        let aborts = Aborts::default();
        let peer: SocketAddr = "127.0.0.1:40003".parse().expect("addr");
        let gone = Arc::new(AtomicBool::new(false));
        let probe = gone.clone();
        let flag =
            aborts.register_with_probe(peer, Some(Arc::new(move || probe.load(Ordering::SeqCst))));
        assert!(!aborts.client_gone(peer));
        gone.store(true, Ordering::SeqCst);
        assert!(aborts.client_gone(peer));
        drop(flag);
        assert!(aborts.client_gone(peer), "a closed connection is gone");
    }

    #[test]
    fn a_stale_flag_does_not_forget_its_successor() {
        let aborts = Aborts::default();
        let peer: SocketAddr = "127.0.0.1:40002".parse().expect("addr");
        let old = aborts.register(peer);
        let new = aborts.register(peer);
        drop(old);
        assert!(aborts.abort(peer));
        assert!(new.is_aborted());
    }
}
