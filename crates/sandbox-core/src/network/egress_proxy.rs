//! The egress proxy: how connections of sandboxes whose `allowOut` names hosts are
//! decided by name.
//!
//! The egress table redirects such a sandbox's TCP 80 and 443 to this proxy (nftables
//! `redirect`, so the connection arrives at this host with its original destination in
//! conntrack). For each connection the proxy reads what the client sends first, at most
//! [`MAX_PEEK`] bytes within [`PEEK_TIMEOUT`]: the TLS ClientHello's server name (SNI),
//! or the HTTP request's Host. With a name, the proxy resolves it itself and dials the
//! first address the sandbox's rules allow for that name, never a private, loopback or
//! link-local one, nor one of this host's own; the address the sandbox resolved and
//! dialled does not count. Without a name, the original destination is decided by the
//! address rules. What is refused is closed (an HTTP request gets a 403 saying why).
//! An allowed connection is spliced both ways until either side closes; the proxy holds
//! at most [`MAX_PEEK`] bytes of it, once, then two buffers of [`COPY_BUFFER`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::egress::{EgressRules, Verdict};

/// Most bytes read before deciding (a ClientHello with many extensions, a request head).
pub const MAX_PEEK: usize = 16 * 1024;
/// How long a client may take to send them.
pub const PEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialling a destination may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections proxied at once; more wait for a place.
const MAX_CONNECTIONS: usize = 1024;
/// Buffer of each direction of a proxied connection: with [`MAX_CONNECTIONS`], the
/// proxy's copies hold at most 64 MiB.
pub const COPY_BUFFER: usize = 32 * 1024;

/// The rules of the sandboxes whose connections come through the proxy, by address.
pub type ProxiedRules = Arc<RwLock<HashMap<Ipv4Addr, EgressRules>>>;

/// How the proxy turns names into addresses.
#[derive(Clone)]
pub enum Resolver {
    /// This host's resolver (`/etc/hosts`, `/etc/resolv.conf`).
    System,
    /// These DNS servers (`[network] egress_resolvers`).
    Servers(Arc<hickory_resolver::TokioResolver>),
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::System => f.write_str("System"),
            Self::Servers(_) => f.write_str("Servers"),
        }
    }
}

impl Resolver {
    /// The system resolver when `servers` is empty, else those servers (port 53).
    pub fn new(servers: &[IpAddr]) -> Self {
        if servers.is_empty() {
            return Self::System;
        }
        use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
        use hickory_resolver::name_server::TokioConnectionProvider;
        let group = NameServerConfigGroup::from_ips_clear(servers, 53, true);
        let config = ResolverConfig::from_parts(None, vec![], group);
        let resolver = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioConnectionProvider::default(),
        )
        .build();
        Self::Servers(Arc::new(resolver))
    }

    /// The addresses of `name`.
    async fn lookup(&self, name: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        match self {
            Self::System => tokio::net::lookup_host((name, port))
                .await
                .map(|addrs| addrs.map(|a| a.ip()).collect())
                .map_err(|e| e.to_string()),
            Self::Servers(r) => r
                .lookup_ip(name)
                .await
                .map(|l| l.iter().collect())
                .map_err(|e| e.to_string()),
        }
    }
}

/// What the client's first bytes name.
#[derive(Debug, PartialEq, Eq)]
pub enum Requested {
    /// Not enough read yet to tell.
    NeedMore,
    /// This host name (lowercase, without a port).
    Name(String),
    /// Neither a TLS ClientHello with a server name nor an HTTP request with a Host.
    Nothing,
}

/// The host name `first` (what a client sent first) asks for: TLS SNI or HTTP Host.
pub fn requested_name(first: &[u8]) -> Requested {
    if first.first() == Some(&0x16) {
        return tls_server_name(first);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(first) {
        Ok(httparse::Status::Partial) => Requested::NeedMore,
        Ok(httparse::Status::Complete(_)) => req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(host_without_port)
            .filter(|h| !h.is_empty())
            .map_or(Requested::Nothing, Requested::Name),
        Err(_) => Requested::Nothing,
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `::1`.
fn host_without_port(host: &str) -> String {
    let host = host.trim();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
    };
    bare.trim_end_matches('.').to_ascii_lowercase()
}

fn tls_server_name(first: &[u8]) -> Requested {
    use tls_parser::{
        parse_tls_extensions, parse_tls_plaintext, SNIType, TlsExtension, TlsMessage,
        TlsMessageHandshake,
    };
    let record = match parse_tls_plaintext(first) {
        Ok((_, record)) => record,
        Err(tls_parser::nom::Err::Incomplete(_)) => return Requested::NeedMore,
        Err(_) => return Requested::Nothing,
    };
    for msg in &record.msg {
        let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = msg else {
            continue;
        };
        let Some(Ok((_, extensions))) = hello.ext.map(parse_tls_extensions) else {
            return Requested::Nothing;
        };
        for ext in extensions {
            if let TlsExtension::SNI(names) = ext {
                for (kind, name) in names {
                    if kind == SNIType::HostName {
                        if let Ok(name) = std::str::from_utf8(name) {
                            return Requested::Name(
                                name.trim_end_matches('.').to_ascii_lowercase(),
                            );
                        }
                    }
                }
            }
        }
    }
    Requested::Nothing
}

/// The egress proxy, listening.
#[derive(Debug)]
pub struct EgressProxy {
    port: u16,
}

impl EgressProxy {
    /// Listens on every address of this host on an ephemeral port and serves the
    /// sandboxes `rules` names; `allowed_private` are the ranges the operator opened.
    pub async fn start(
        rules: ProxiedRules,
        resolver: Resolver,
        allowed_private: Vec<IpNet>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
        let port = listener.local_addr()?.port();
        let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let ctx = Arc::new(Context {
            rules,
            resolver,
            allowed_private,
            port,
        });
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "egress proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(place) = places.clone().acquire_owned().await else {
                    return;
                };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    ctx.serve(stream, peer).await;
                    drop(place);
                });
            }
        });
        Ok(Self { port })
    }

    /// The port it listens on (the egress table redirects to it).
    pub fn port(&self) -> u16 {
        self.port
    }
}

struct Context {
    rules: ProxiedRules,
    resolver: Resolver,
    allowed_private: Vec<IpNet>,
    port: u16,
}

impl Context {
    async fn serve(&self, mut client: TcpStream, peer: SocketAddr) {
        let IpAddr::V4(from) = peer.ip() else { return };
        let Some(rules) = self.rules.read().ok().and_then(|r| r.get(&from).cloned()) else {
            // Not a sandbox of ours: nobody else may use this port.
            return;
        };
        let Some(original) = original_destination(&client) else {
            return;
        };
        if original.port() == self.port {
            return; // dialled directly, not redirected
        }
        let mut first = Vec::with_capacity(1024);
        // One deadline for the whole peek: a client trickling bytes cannot hold a place.
        let deadline = tokio::time::Instant::now() + PEEK_TIMEOUT;
        let name = loop {
            match requested_name(&first) {
                Requested::NeedMore if first.len() < MAX_PEEK => {}
                Requested::Name(n) => break Some(n),
                _ => break None,
            }
            let mut chunk = [0u8; 4096];
            let room = (MAX_PEEK - first.len()).min(chunk.len());
            match tokio::time::timeout_at(deadline, client.read(&mut chunk[..room])).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => first.extend_from_slice(&chunk[..n]),
                Err(_) => break None,
            }
        };
        let port = original.port();
        let dest = match &name {
            Some(name) => self.dial_name(&rules, name, port).await,
            None => match rules.decide_ip(IpAddr::V4(*original.ip()), &self.allowed_private) {
                Verdict::Allow if !is_own_address(IpAddr::V4(*original.ip())) => {
                    Ok(SocketAddr::V4(original))
                }
                _ => Err(format!("{} is not allowed", original.ip())),
            },
        };
        let dest = match dest {
            Ok(d) => d,
            Err(why) => {
                tracing::info!(sandbox_addr = %from, name = name.as_deref().unwrap_or("-"), port, reason = %why, "egress refused");
                metrics::counter!("colima_e2b_egress_proxy_connections_total", "outcome" => "refused").increment(1);
                if first.first() != Some(&0x16) && !first.is_empty() {
                    let body = format!("egress refused: {why}\n");
                    let answer = format!(
                        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = client.write_all(answer.as_bytes()).await;
                }
                return;
            }
        };
        let upstream = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(dest)).await {
            Ok(Ok(s)) => s,
            _ => {
                metrics::counter!("colima_e2b_egress_proxy_connections_total", "outcome" => "unreachable").increment(1);
                return;
            }
        };
        metrics::counter!("colima_e2b_egress_proxy_connections_total", "outcome" => "allowed")
            .increment(1);
        let mut upstream = upstream;
        if upstream.write_all(&first).await.is_err() {
            return;
        }
        drop(first);
        let _ = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut upstream,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await;
    }

    /// The first address of `name` the rules allow it to reach on `port`.
    async fn dial_name(
        &self,
        rules: &EgressRules,
        name: &str,
        port: u16,
    ) -> Result<SocketAddr, String> {
        let addrs = self
            .resolver
            .lookup(name, port)
            .await
            .map_err(|e| format!("{name} does not resolve: {e}"))?;
        let mut last = format!("{name} has no address");
        for ip in addrs {
            if !ip.is_ipv4() {
                continue; // sandbox networks are IPv4: so is what they reach
            }
            match rules.decide_name(name, ip, &self.allowed_private) {
                Verdict::Allow if is_own_address(ip) => {
                    last = format!("{name} resolves to this host ({ip})")
                }
                Verdict::Allow => return Ok(SocketAddr::new(ip, port)),
                Verdict::Deny(why) => last = format!("{name} ({ip}): {why:?}"),
            }
        }
        Err(last)
    }
}

/// Where a redirected connection was going (conntrack's `SO_ORIGINAL_DST`).
fn original_destination(stream: &TcpStream) -> Option<SocketAddrV4> {
    let raw = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst).ok()?;
    let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
    Some(SocketAddrV4::new(ip, u16::from_be(raw.sin_port)))
}

/// Whether `ip` is one of this host's own addresses (or unspecified).
fn is_own_address(ip: IpAddr) -> bool {
    if ip.is_unspecified() || ip.is_loopback() {
        return true;
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return true; // cannot tell: refuse
    };
    addrs
        .filter_map(|a| a.address)
        .any(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()) == ip,
            (_, Some(v6)) => IpAddr::V6(v6.ip()) == ip,
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello naming `name`, as a TLS client sends it (built by tls-parser's
    /// serializer, so no bytes are made up here).
    fn client_hello(name: &str) -> Vec<u8> {
        use tls_parser::*;
        let ext = vec![TlsExtension::SNI(vec![(
            SNIType::HostName,
            name.as_bytes(),
        )])];
        let mut ext_bytes = Vec::new();
        for e in &ext {
            ext_bytes.extend(
                cookie_factory::gen_simple(gen_tls_extension(e), Vec::new()).expect("extension"),
            );
        }
        let hello = TlsMessageHandshake::ClientHello(TlsClientHelloContents::new(
            0x0303,
            &[0u8; 32],
            None,
            vec![TlsCipherSuiteID(0x1301)],
            vec![TlsCompressionID(0)],
            Some(&ext_bytes),
        ));
        let record = TlsPlaintext {
            hdr: TlsRecordHeader {
                record_type: TlsRecordType::Handshake,
                version: TlsVersion::Tls12,
                len: 0,
            },
            msg: vec![TlsMessage::Handshake(hello)],
        };
        cookie_factory::gen_simple(gen_tls_plaintext(&record), Vec::new()).expect("record")
    }

    #[test]
    fn http_requests_name_their_host() {
        let req = b"GET / HTTP/1.1\r\nHost: Api.Example.com:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            requested_name(req),
            Requested::Name("api.example.com".into())
        );
        assert_eq!(requested_name(&req[..20]), Requested::NeedMore);
        assert_eq!(
            requested_name(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"),
            Requested::Nothing
        );
        assert_eq!(requested_name(b"\x00\x01garbage"), Requested::Nothing);
        assert_eq!(host_without_port("[::1]:80"), "::1");
        assert_eq!(host_without_port("example.com."), "example.com");
    }

    #[test]
    fn tls_client_hellos_name_their_server() {
        let hello = client_hello("cdn.Example.org");
        assert_eq!(
            requested_name(&hello),
            Requested::Name("cdn.example.org".into())
        );
        assert_eq!(
            requested_name(&hello[..hello.len() / 2]),
            Requested::NeedMore
        );
    }
}
