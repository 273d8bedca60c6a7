//! Sandboxes' agents: one client per sandbox (rebuilt from the container after a
//! restart), the routes into a sandbox, and which sandbox a signed file URL belongs to.

use std::net::SocketAddr;

use envd_proto::signature::{ct_eq, file_signature, FileOp};

use super::SandboxManager;
use crate::agent::errors::unavailable;
use crate::agent::interpreter::INTERPRETER_PORT;
use crate::agent::{AgentClient, AGENT_PORT, SECRET_ENV};
use crate::error::{Error, Result};
use crate::labels;
use crate::types::{SandboxId, SandboxState};

/// On whose behalf the server forwards a request into a sandbox, as the perimeter found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vouch {
    /// An owner of every sandbox (an API key): the server adds the access token.
    Owner,
    /// A local development caller: the token is added for sandboxes not created secure.
    Local,
    /// Nobody: the request carries its own credential (a token, a signed URL).
    Nobody,
}

/// Where a request for a port inside a sandbox goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyTarget {
    /// Address the server connects to.
    pub addr: SocketAddr,
    /// The access token to add to the request (the server vouches for the client).
    pub token: Option<String>,
}

impl SandboxManager {
    pub(super) fn agent_port(&self) -> u16 {
        self.inner.config.agent_port.unwrap_or(AGENT_PORT)
    }

    /// A client for sandbox `id`'s agent, to work in the sandbox. A paused sandbox is a
    /// [`Error::Conflict`] at once (its agent would not answer), unless it was created
    /// with `auto_resume`: then it is resumed first.
    ///
    /// After a server restart the client is rebuilt from the container itself (its
    /// secret is in the container's environment, its address comes from the backend), so
    /// nothing but the sandbox has to remember it.
    pub async fn agent(&self, id: &SandboxId) -> Result<AgentClient> {
        self.wake(id).await?;
        let info = self.info(id)?;
        if info.state == SandboxState::Paused {
            return Err(Error::Conflict(format!(
                "sandbox {id} is paused; resume it first"
            )));
        }
        self.agent_client(id).await
    }

    /// The access token sandbox `id`'s agent requires (E2B's `envdAccessToken`), in any
    /// state.
    pub async fn access_token(&self, id: &SandboxId) -> Result<String> {
        self.info(id)?;
        if let Some(client) = self.agents().get(id) {
            return Ok(client.token().to_string());
        }
        // A stopped container (a filesystem pause) has no address, but its secret.
        self.container_secret(id).await
    }

    pub(super) async fn agent_client(&self, id: &SandboxId) -> Result<AgentClient> {
        if let Some(client) = self.agents().get(id) {
            return Ok(client.clone());
        }
        if self.inner.config.agent.is_none() {
            return Err(unavailable("this server runs sandboxes without the agent"));
        }
        let client = self.container_agent(id).await?;
        self.agents().insert(id.clone(), client.clone());
        Ok(client)
    }

    /// A client for the agent of sandbox `id`'s container, from what the container
    /// itself says (its secret in its environment, its address from the backend).
    pub(super) async fn container_agent(&self, id: &SandboxId) -> Result<AgentClient> {
        let name = labels::container_name(id);
        let secret = self.container_secret(id).await?;
        let addr = self
            .inner
            .backend
            .agent_address(&name, self.agent_port())
            .await?;
        Ok(AgentClient::new(self.inner.http.clone(), addr.addr, secret))
    }

    /// The agent secret in sandbox `id`'s container's environment.
    async fn container_secret(&self, id: &SandboxId) -> Result<String> {
        let container = self.sandbox_container(id).await?;
        let prefix = format!("{SECRET_ENV}=");
        let secret = container
            .env
            .iter()
            .find_map(|e| e.strip_prefix(&prefix))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                unavailable(format!(
                    "sandbox {id} has no agent secret (created without the agent?)"
                ))
            })?
            .to_string();
        Ok(secret)
    }

    /// Where a request for `port` inside sandbox `id` goes: the agent's address for the
    /// agent port, else what the backend reports. For the agent's port the server adds
    /// the access token when it vouches for the caller and the request has none
    /// (`client_token`), and so for the code interpreter's port ([`INTERPRETER_PORT`]).
    /// A paused sandbox is a [`Error::Conflict`], unless `auto_resume` resumes it.
    pub async fn proxy_target(
        &self,
        id: &SandboxId,
        port: u16,
        vouch: Vouch,
        client_token: bool,
    ) -> Result<ProxyTarget> {
        self.wake(id).await?;
        let info = self.info(id)?;
        if info.state == SandboxState::Paused {
            return Err(Error::Conflict(format!("sandbox {id} is paused")));
        }
        let vouched = match vouch {
            Vouch::Owner => true,
            Vouch::Local => !info.secure,
            Vouch::Nobody => false,
        };
        if port == self.agent_port() {
            let agent = self.agent_client(id).await?;
            let token = (vouched && !client_token).then(|| agent.token().to_string());
            return Ok(ProxyTarget {
                addr: agent.addr(),
                token,
            });
        }
        let addr = self
            .inner
            .backend
            .agent_address(&labels::container_name(id), port)
            .await?;
        // The code interpreter checks the access token by asking the agent with it, so
        // it gets the same vouching as the agent's port.
        let token = if port == INTERPRETER_PORT && vouched && !client_token {
            Some(self.agent_client(id).await?.token().to_string())
        } else {
            None
        };
        Ok(ProxyTarget {
            addr: addr.addr,
            token,
        })
    }

    /// The running sandbox whose access token produced `signature` for this file
    /// operation. E2B's signed URLs name no sandbox (the SDK drops the data-plane base
    /// from them), so the one token that verifies identifies it.
    pub async fn sandbox_for_file_signature(
        &self,
        path: &str,
        op: FileOp,
        user: &str,
        expiration: Option<i64>,
        signature: &str,
    ) -> Option<SandboxId> {
        let running = self.running_ids();
        for id in running {
            let Ok(agent) = self.agent_client(&id).await else {
                continue;
            };
            let expected = file_signature(path, op, user, agent.token().as_bytes(), expiration);
            if ct_eq(expected.as_bytes(), signature.as_bytes()) {
                return Some(id);
            }
        }
        None
    }
}
