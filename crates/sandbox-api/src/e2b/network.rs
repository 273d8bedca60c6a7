//! E2B's network config: the create body's `network` object and
//! `PUT /sandboxes/{id}/network` (the SDK's `update_network`), mapped onto the core's
//! [`NetworkConfig`].
//!
//! Taken: `allowOut` (addresses, CIDRs, host names and `*.` wildcards), `denyOut`,
//! `allow_internet_access`, `allowPublicTraffic`, `maskRequestHost`. `dnsServers` is
//! accepted and changes nothing: sandboxes always reach the resolvers their engine gives
//! them. Refused with 501, since this server cannot honour them: `egressProxy`,
//! header-injecting `rules` and `httpsPorts`.

use poem::http::StatusCode;
use poem::web::{Data, Path};
use poem::{Body, Response};
use sandbox_core::NetworkConfig;
use serde::Deserialize;
use serde_json::Value;

use super::control::{answer, no_content, parse_body, parse_id, reject, Reject};
use crate::AppState;

/// The egress fields both the create and the update body carry.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Egress {
    #[serde(default)]
    allow_out: Option<Vec<String>>,
    #[serde(default)]
    deny_out: Option<Vec<String>>,
    #[serde(default)]
    dns_servers: Option<Vec<String>>,
    #[serde(default)]
    egress_proxy: Option<Value>,
    #[serde(default)]
    rules: Option<Value>,
}

/// The create body's `network`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreateNetwork {
    #[serde(flatten)]
    egress: Egress,
    #[serde(default)]
    allow_public_traffic: Option<bool>,
    #[serde(default)]
    mask_request_host: Option<String>,
    #[serde(default)]
    https_ports: Option<Vec<u16>>,
}

/// `PUT /sandboxes/{id}/network` body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateNetwork {
    #[serde(flatten)]
    egress: Egress,
    #[serde(default, rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
}

/// Longest `dnsServers` list E2B takes.
const MAX_DNS_SERVERS: usize = 10;

fn unsupported(what: &str) -> Reject {
    reject(
        StatusCode::NOT_IMPLEMENTED,
        format!("{what} is not supported by this server"),
    )
}

impl Egress {
    /// The core's config with these egress fields and `internet`.
    fn config(self, internet: bool) -> Result<NetworkConfig, Reject> {
        if self.egress_proxy.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported("network.egressProxy (tunnelling egress)"));
        }
        let has_rules = match &self.rules {
            None | Some(Value::Null) => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(_) => true,
        };
        if has_rules {
            return Err(unsupported("network.rules (header transforms on egress)"));
        }
        let dns = self.dns_servers.unwrap_or_default();
        if dns.len() > MAX_DNS_SERVERS
            || dns.iter().any(|d| d.parse::<std::net::Ipv4Addr>().is_err())
        {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                format!("network.dnsServers takes at most {MAX_DNS_SERVERS} IPv4 addresses"),
            ));
        }
        Ok(NetworkConfig {
            allow_out: self.allow_out.unwrap_or_default(),
            deny_out: self.deny_out.unwrap_or_default(),
            internet,
            ..NetworkConfig::default()
        })
    }
}

impl CreateNetwork {
    /// The core's config for a create whose `allow_internet_access` is `internet`.
    pub(crate) fn config(self, internet: bool) -> Result<NetworkConfig, Reject> {
        if self.https_ports.as_ref().is_some_and(|p| !p.is_empty()) {
            return Err(unsupported(
                "network.httpsPorts (TLS to the sandbox's ports)",
            ));
        }
        Ok(NetworkConfig {
            allow_public_traffic: self.allow_public_traffic.unwrap_or(true),
            mask_request_host: self.mask_request_host.filter(|m| !m.is_empty()),
            ..self.egress.config(internet)?
        })
    }
}

/// `PUT /sandboxes/{id}/network`: replaces the sandbox's egress rules (fields left out
/// are cleared; who may reach it and the Host mask, set at create, stay) → 204.
#[poem::handler]
pub async fn update(Data(state): Data<&AppState>, Path(id): Path<String>, body: Body) -> Response {
    answer(
        async {
            let id = parse_id(&id)?;
            let body: UpdateNetwork = parse_body(body).await?;
            let internet = body.allow_internet_access.unwrap_or(true);
            let config = body.egress.config(internet)?;
            state
                .manager
                .update_egress(&id, config.allow_out, config.deny_out, Some(internet))
                .await?;
            Ok(no_content())
        }
        .await,
    )
}
