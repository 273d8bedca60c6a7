//! E2B compatibility: the official `e2b` SDKs work against this server unchanged.
//!
//! - Control plane under `/e2b` (the SDK's `E2B_API_URL`): E2B's sandbox lifecycle REST
//!   API with `X-API-KEY` authentication and E2B's error bodies (`{code: <status>,
//!   message}`). It never collides with the native `/sandboxes/` API.
//! - Data plane under `/e2b/envd` (the SDK's `E2B_SANDBOX_URL`): every request is
//!   proxied, streaming both ways, to the agent of the sandbox its `E2b-Sandbox-Id`
//!   header names.
//! - Volume content under `/volumecontent` (the SDK's `E2B_VOLUME_API_URL` is the
//!   server's root), with each volume's bearer token.
//! - Host names `<port>-<sandbox id>.<domain>` (what the SDK's `get_host(port)` returns)
//!   reach that port inside the sandbox, HTTP and WebSocket alike.

pub mod control;
pub mod network;
pub mod proxy;
pub mod snapshots;
pub mod templates;
pub mod volumes;

use std::sync::Arc;

/// Where the control plane lives.
pub const API_BASE: &str = "/e2b";
/// Where the data plane lives.
pub const ENVD_BASE: &str = "/e2b/envd";

/// Settings of the compatibility layer (its keys are the perimeter's, see [`crate::auth`]).
#[derive(Clone, Debug)]
pub struct E2bSettings {
    /// The domain sandbox host names end in (`<port>-<id>.<domain>`), e.g.
    /// `localhost:8000`; returned to the SDK as the sandbox's `domain`.
    pub domain: String,
}

/// Shared state of the E2B layer.
#[derive(Clone, Debug)]
pub struct E2b {
    /// Settings.
    pub settings: Arc<E2bSettings>,
    /// Client for proxied traffic: no overall timeout (streams may run for hours).
    pub http: reqwest::Client,
    /// Key of the signed template-file upload links (new at every start: links live an
    /// hour, and the SDK asks for a new one at each build).
    pub upload_key: Arc<[u8; 32]>,
}

impl E2b {
    /// The E2B layer with `settings`.
    pub fn new(settings: E2bSettings) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(std::time::Duration::from_secs(5))
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .http1_only()
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            // No OS entropy: links stay unguessable enough from the clock and address.
            let seed = format!("{:?}{:p}", std::time::SystemTime::now(), &key);
            for (i, b) in seed.bytes().enumerate() {
                key[i % 32] ^= b;
            }
        }
        Self {
            settings: Arc::new(settings),
            http,
            upload_key: Arc::new(key),
        }
    }
}
