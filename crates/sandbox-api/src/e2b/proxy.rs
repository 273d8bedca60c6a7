//! The E2B data plane: requests for a sandbox's agent (or any port inside a sandbox)
//! proxied to it, streaming both ways. HTTP upgrades (WebSocket) are spliced through.

use std::net::SocketAddr;
use std::sync::Arc;

use envd_proto::signature::FileOp;
use envd_proto::{AGENT_PORT, TOKEN_HEADER};
use futures_util::{StreamExt, TryStreamExt};
use poem::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use sandbox_core::{Error, SandboxId};

use super::control::reject;
use super::E2b;
use crate::abort::Aborts;
use crate::AppState;

/// Header naming the sandbox a data-plane request is for.
pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
/// Header naming the port inside the sandbox (default: the agent's).
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";

/// Headers that describe one hop, not the message; never forwarded.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::HOST,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A sandbox and port a request is routed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The sandbox id as the client sent it.
    pub sandbox: String,
    /// Port inside the sandbox.
    pub port: u16,
}

/// Parses `<port>-<sandbox id>.<domain>` host names (with or without `:port`).
pub fn target_from_host(host: &str) -> Option<Target> {
    let (label, rest) = host.split_once('.')?;
    if rest.is_empty() {
        return None;
    }
    let (port, sandbox) = label.split_once('-')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    if sandbox.is_empty()
        || !sandbox
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return None;
    }
    Some(Target {
        sandbox: sandbox.to_string(),
        port,
    })
}

/// The target of a request under the data-plane base: the `E2b-Sandbox-Id` and
/// `E2b-Sandbox-Port` headers.
pub fn target_from_headers(headers: &HeaderMap) -> Option<Target> {
    let sandbox = headers.get(SANDBOX_ID_HEADER)?.to_str().ok()?.to_string();
    let port = match headers.get(SANDBOX_PORT_HEADER) {
        Some(v) => v.to_str().ok()?.parse().ok()?,
        None => AGENT_PORT,
    };
    Some(Target { sandbox, port })
}

/// E2B's data-plane error: the SDK reads a 502 as "sandbox gone or port closed".
fn bad_gateway(sandbox: &str, message: &str) -> Response {
    let body = serde_json::json!({"sandboxId": sandbox, "message": message, "code": 502});
    Response::builder()
        .status(StatusCode::BAD_GATEWAY)
        .content_type("application/json")
        .body(body.to_string())
}

/// Middleware: requests whose Host is `<port>-<id>.<domain>` go to that sandbox port;
/// everything else to `next`.
pub async fn route_by_host<E: Endpoint>(next: Arc<E>, req: Request) -> poem::Result<Response> {
    let target = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(target_from_host);
    match (target, req.data::<AppState>().cloned()) {
        (Some(target), Some(state)) => {
            let mut req = req;
            if let Err(refused) = public_traffic(&state, &target, &mut req) {
                return Ok(*refused);
            }
            Ok(forward(&state, &target, req, true).await)
        }
        _ => next.call(req).await.map(IntoResponse::into_response),
    }
}

/// The header that carries a sandbox's traffic access token on host-routed requests.
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// The Host header a host-routed request carries inside (E2B's `maskRequestHost`).
#[derive(Clone, Debug)]
struct MaskedHost(HeaderValue);

/// E2B's `allowPublicTraffic: false` and `maskRequestHost` for a request routed by its
/// Host: without the sandbox's traffic token it is refused (403), except on the agent's
/// and the code interpreter's ports, which check the sandbox's access token themselves;
/// with a mask, the request carries the masked Host inside.
fn public_traffic(
    state: &AppState,
    target: &Target,
    req: &mut Request,
) -> Result<(), Box<Response>> {
    let Some(net) = target
        .sandbox
        .parse::<SandboxId>()
        .ok()
        .and_then(|id| state.manager.network(&id))
    else {
        return Ok(());
    };
    let own_auth = [
        AGENT_PORT,
        sandbox_core::agent::interpreter::INTERPRETER_PORT,
    ];
    if let Some(token) = net.traffic_token.as_deref() {
        let sent = req
            .headers()
            .get(TRAFFIC_TOKEN_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !own_auth.contains(&target.port) && !envd_proto::signature::ct_eq(sent, token.as_bytes())
        {
            let message = if sent.is_empty() {
                format!("sandbox {} takes no public traffic: send its traffic access token in {TRAFFIC_TOKEN_HEADER}", target.sandbox)
            } else {
                format!(
                    "wrong {TRAFFIC_TOKEN_HEADER} for sandbox {}",
                    target.sandbox
                )
            };
            return Err(Box::new(
                reject(StatusCode::FORBIDDEN, message).into_response(),
            ));
        }
    }
    if let Some(mask) = net.config.mask_request_host.as_deref() {
        if let Ok(v) = HeaderValue::from_str(&sandbox_core::manager::masked_host(mask, target.port))
        {
            req.extensions_mut().insert(MaskedHost(v));
        }
    }
    req.headers_mut().remove(TRAFFIC_TOKEN_HEADER);
    Ok(())
}

/// `ANY /e2b/envd/*`: the data plane routed by the `E2b-Sandbox-Id` header.
pub async fn envd(req: Request) -> Response {
    let Some(state) = req.data::<AppState>().cloned() else {
        return bad_gateway("", "the E2B layer is not configured");
    };
    let Some(target) = target_from_headers(req.headers()) else {
        return reject(
            StatusCode::BAD_REQUEST,
            format!("the data plane needs the {SANDBOX_ID_HEADER} header"),
        )
        .into_response();
    };
    // The router nested this endpoint under `/e2b/envd` and stripped that prefix.
    forward(&state, &target, req, true).await
}

/// Query of a signed `/files` URL.
#[derive(Debug, serde::Deserialize)]
struct SignedQuery {
    path: String,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<i64>,
}

/// `GET|POST /files?path=&signature=`: E2B's signed file URLs. The SDK builds them on
/// the server's root without the sandbox's id, so the sandbox is the one whose token
/// verifies the signature; its agent checks the signature (and expiry) again.
pub async fn signed_files(req: Request) -> Response {
    let Some(state) = req.data::<AppState>().cloned() else {
        return bad_gateway("", "the E2B layer is not configured");
    };
    let unauthorized = |message: &str| reject(StatusCode::UNAUTHORIZED, message).into_response();
    let query: SignedQuery = match serde_urlencoded::from_str(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(_) => return unauthorized("a signed file URL needs path and signature"),
    };
    let Some(signature) = query.signature.as_deref() else {
        return unauthorized("a signed file URL needs path and signature");
    };
    let op = if req.method() == poem::http::Method::POST {
        FileOp::Write
    } else {
        FileOp::Read
    };
    let user = query.username.as_deref().unwrap_or("");
    let Some(id) = state
        .manager
        .sandbox_for_file_signature(&query.path, op, user, query.signature_expiration, signature)
        .await
    else {
        return unauthorized("invalid signature");
    };
    let target = Target {
        sandbox: id.to_string(),
        port: AGENT_PORT,
    };
    forward(&state, &target, req, false).await
}

/// Proxies `req` to `target`, at the same path and query (as the router left them)
/// inside the sandbox. With `vouch`, the server adds the sandbox's access token where the
/// perimeter's [`crate::auth::Caller`] lets it (see [`sandbox_core::Vouch`]).
pub async fn forward(state: &AppState, target: &Target, mut req: Request, vouch: bool) -> Response {
    let sandbox = target.sandbox.as_str();
    let Some(e2b) = state.e2b.as_ref() else {
        return bad_gateway(sandbox, "the E2B layer is not configured");
    };
    let Ok(id) = sandbox.parse::<SandboxId>() else {
        return bad_gateway(sandbox, "The sandbox was not found");
    };
    let client_token = req.headers().contains_key(TOKEN_HEADER);
    let vouch = match req.extensions().get::<crate::auth::Caller>() {
        Some(caller) if vouch => caller.vouch(),
        _ => sandbox_core::Vouch::Nobody,
    };
    let route = match state
        .manager
        .proxy_target(&id, target.port, vouch, client_token)
        .await
    {
        Ok(route) => route,
        // E2B's proxy treats a paused sandbox as not found: the SDK then reports it as
        // not running instead of retrying.
        Err(Error::Conflict(m)) => {
            return bad_gateway(sandbox, &format!("The sandbox was not found: {m}"))
        }
        Err(Error::NotFound { .. }) => return bad_gateway(sandbox, "The sandbox was not found"),
        Err(e) => return bad_gateway(sandbox, &e.to_string()),
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let url = format!("http://{}{path}", route.addr);
    let mut headers = HeaderMap::new();
    for (name, value) in req.headers() {
        if !HOP_BY_HOP.contains(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(MaskedHost(host)) = req.extensions().get::<MaskedHost>() {
        headers.insert(header::HOST, host.clone());
    }
    if let Some(token) = route.token.as_deref() {
        // Not secure: the server vouches for the client (E2B sends no token then).
        if let Ok(v) = HeaderValue::from_str(token) {
            headers.insert(TOKEN_HEADER, v);
        }
    }
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let method = req.method().clone();
    // A stream that breaks upstream breaks the client's connection too.
    let on_break = crate::abort::peer_of(&req).map(|peer| (state.aborts.clone(), peer));
    // A run of code stops when its client leaves: the upstream connection is dropped.
    let watch_client = target.port == sandbox_core::agent::interpreter::INTERPRETER_PORT;
    let result = match upgrade {
        Some(protocol) => splice_upgrade(e2b, &mut req, url, method, headers, protocol).await,
        None => {
            let body = reqwest::Body::wrap_stream(req.take_body().into_bytes_stream());
            e2b.http
                .request(method, url)
                .headers(headers)
                .body(body)
                .send()
                .await
                .map(|resp| into_response(resp, on_break, watch_client))
        }
    };
    let port = if target.port == AGENT_PORT {
        "agent"
    } else {
        "other"
    };
    let outcome = if result.is_ok() { "ok" } else { "port_closed" };
    metrics::counter!("colima_e2b_proxy_requests_total", "port" => port, "outcome" => outcome)
        .increment(1);
    result.unwrap_or_else(|e| {
        tracing::debug!(sandbox, port = target.port, error = %e, "proxied request failed");
        bad_gateway(sandbox, "The sandbox is running but port is not open")
    })
}

/// A proxied response, its body streamed through. When the upstream body breaks (the
/// sandbox died mid-stream), the client's connection `on_break` names is aborted, so the
/// client sees a broken transfer rather than a complete one. With `watch_client`, the
/// stream also ends once that client has gone.
fn into_response(
    resp: reqwest::Response,
    on_break: Option<(Aborts, SocketAddr)>,
    watch_client: bool,
) -> Response {
    let mut out = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if !HOP_BY_HOP.contains(name) {
            out = out.header(name.clone(), value.clone());
        }
    }
    let watched = on_break.clone().filter(|_| watch_client);
    let stream = resp.bytes_stream().map_err(move |e| {
        tracing::debug!(error = %e, "the proxied response broke upstream");
        if let Some((aborts, peer)) = &on_break {
            aborts.abort(*peer);
        }
        std::io::Error::other(e)
    });
    match watched {
        Some((aborts, peer)) => out.body(Body::from_bytes_stream(until_client_gone(
            Box::pin(stream),
            aborts,
            peer,
        ))),
        None => out.body(Body::from_bytes_stream(stream)),
    }
}

/// How often a watched stream asks whether its client is still there.
const CLIENT_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// `stream` until it ends or the client of `peer`'s connection has gone; then it is
/// dropped, which closes the upstream connection.
fn until_client_gone<S>(
    stream: S,
    aborts: Aborts,
    peer: SocketAddr,
) -> impl futures_util::Stream<Item = S::Item> + Send + 'static
where
    S: futures_util::Stream + Send + Unpin + 'static,
    S::Item: Send,
{
    let tick = tokio::time::interval(CLIENT_PROBE_INTERVAL);
    futures_util::stream::unfold(
        (stream, tick, aborts),
        move |(mut stream, mut tick, aborts)| async move {
            loop {
                tokio::select! {
                    item = stream.next() => return item.map(|i| (i, (stream, tick, aborts))),
                    _ = tick.tick() => {
                        if aborts.client_gone(peer) {
                            tracing::debug!(%peer, "the client left; the proxied stream ends");
                            return None;
                        }
                    }
                }
            }
        },
    )
}

/// Sends an upgrade request upstream and, once both sides have switched protocols,
/// copies bytes between them until either closes.
async fn splice_upgrade(
    e2b: &E2b,
    req: &mut Request,
    url: String,
    method: poem::http::Method,
    mut headers: HeaderMap,
    protocol: String,
) -> reqwest::Result<Response> {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&protocol) {
        headers.insert(header::UPGRADE, v);
    }
    let resp = e2b
        .http
        .request(method, url)
        .headers(headers)
        .send()
        .await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(into_response(resp, None, false));
    }
    let mut out = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for (name, value) in resp.headers() {
        out = out.header(name.clone(), value.clone());
    }
    let downstream = match req.take_upgrade() {
        Ok(on_upgrade) => on_upgrade,
        Err(e) => {
            return Ok(reject(
                StatusCode::BAD_REQUEST,
                format!("cannot upgrade this connection: {e}"),
            )
            .into_response())
        }
    };
    tokio::spawn(async move {
        let upstream = resp.upgrade().await;
        let downstream = downstream.await;
        match (upstream, downstream) {
            (Ok(mut up), Ok(mut down)) => {
                let _ = tokio::io::copy_bidirectional(&mut up, &mut down).await;
            }
            (up, down) => tracing::debug!(
                upstream = up.is_ok(),
                downstream = down.is_ok(),
                "proxied upgrade failed"
            ),
        }
    });
    Ok(out.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_host_names_parse() {
        assert_eq!(
            target_from_host("49983-clmabc123.localhost:8000"),
            Some(Target {
                sandbox: "clmabc123".into(),
                port: 49983
            })
        );
        assert_eq!(
            target_from_host("8080-clmx.sandbox.example.com"),
            Some(Target {
                sandbox: "clmx".into(),
                port: 8080
            })
        );
        for other in [
            "localhost:8000",
            "127.0.0.1:8000",
            "api.localhost",
            "0-clm.localhost",
            "99999-clm.localhost",
            "80-CLM.localhost",
            "80-.localhost",
            "80-clm.",
        ] {
            assert_eq!(target_from_host(other), None, "{other}");
        }
    }

    #[test]
    fn headers_route_to_the_agent_port_by_default() {
        let mut h = HeaderMap::new();
        assert_eq!(target_from_headers(&h), None);
        h.insert(SANDBOX_ID_HEADER, HeaderValue::from_static("clmabc"));
        assert_eq!(
            target_from_headers(&h),
            Some(Target {
                sandbox: "clmabc".into(),
                port: AGENT_PORT
            })
        );
        h.insert(SANDBOX_PORT_HEADER, HeaderValue::from_static("3000"));
        assert_eq!(target_from_headers(&h).map(|t| t.port), Some(3000));
    }
}
