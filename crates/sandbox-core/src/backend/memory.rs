//! [`InMemoryBackend`]: containers kept in memory. A real implementation of the
//! contract (it passes every conformance check that needs no running process), for
//! engine-free tests of everything above the backend; never a stand-in for the engine
//! suites, which run the same checks on real engines.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    AgentAddress, Capabilities, ContainerInfo, ContainerSpec, DeriveImage, EngineInfo, ImageInfo,
    SandboxBackend,
};
use crate::error::{Error, Result};
use crate::types::SandboxState;

const NAME: &str = "memory";

/// An image: the programs a container of it can start, and its entrypoint.
#[derive(Clone, Debug, Default)]
struct Image {
    programs: Vec<String>,
    entrypoint: Vec<String>,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct State {
    images: HashMap<String, Image>,
    containers: HashMap<String, ContainerInfo>,
    next_id: u64,
    agent: Option<SocketAddr>,
}

/// Containers and images in memory.
///
/// A container "runs" when its main process (its command, else its image's entrypoint)
/// is one of the programs its image has: like an engine whose exec fails, a create with
/// any other program fails and leaves nothing. Nothing runs for real, so
/// [`Capabilities::processes`] is off and [`SandboxBackend::agent_address`] is
/// unsupported unless a test points it at an agent of its own
/// ([`InMemoryBackend::set_agent_address`]).
#[derive(Debug, Default)]
pub struct InMemoryBackend {
    state: Mutex<State>,
}

impl fmt::Display for InMemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("memory (in-process)")
    }
}

impl InMemoryBackend {
    /// A backend without images.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds image `name`, whose containers can start `programs` (e.g. `sleep`, `/bin/sh`).
    pub fn with_image(self, name: &str, programs: &[&str]) -> Self {
        self.lock().images.insert(
            name.to_string(),
            Image {
                programs: programs.iter().map(|p| p.to_string()).collect(),
                ..Image::default()
            },
        );
        self
    }

    /// Where [`SandboxBackend::agent_address`] points every container (a test's own
    /// agent); `None` makes it unsupported again.
    pub fn set_agent_address(&self, addr: Option<SocketAddr>) {
        self.lock().agent = addr;
    }

    /// Puts `info` in as it is: for tests that need a container in a state the trait
    /// cannot produce (a half-created one, another server's).
    pub fn insert(&self, info: ContainerInfo) {
        self.lock().containers.insert(info.name.clone(), info);
    }

    /// Every container, for tests to look at.
    pub fn containers(&self) -> Vec<ContainerInfo> {
        self.lock().containers.values().cloned().collect()
    }

    /// Every image name, for tests to look at.
    pub fn images(&self) -> Vec<String> {
        self.lock().images.keys().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a test panicked mid-update of plain data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn container<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut ContainerInfo) -> Result<T>,
    ) -> Result<T> {
        let mut state = self.lock();
        let c = state
            .containers
            .get_mut(name)
            .ok_or_else(|| Error::not_found(format!("container {name}")))?;
        f(c)
    }
}

#[async_trait]
impl SandboxBackend for InMemoryBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            internal_networks: true,
            // Limits are kept as given; nothing is written, so nothing needs a quota.
            disk_quota: true,
            isolated_sandboxes: true,
            ..Capabilities::default()
        }
    }

    async fn check(&self) -> Result<EngineInfo> {
        Ok(EngineInfo {
            engine: "In-memory".into(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: "1".into(),
            endpoint: "memory".into(),
            ..EngineInfo::default()
        })
    }

    async fn image_info(&self, image: &str) -> Result<Option<ImageInfo>> {
        Ok(self
            .lock()
            .images
            .contains_key(image)
            .then(ImageInfo::default))
    }

    async fn ensure_image(&self, image: &str) -> Result<ImageInfo> {
        if self.lock().images.contains_key(image) {
            Ok(ImageInfo::default())
        } else {
            Err(Error::not_found(format!(
                "image {image} (the in-memory backend has no registry to pull from)"
            )))
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerInfo> {
        let mut state = self.lock();
        if state.containers.contains_key(&spec.name) {
            return Err(Error::Conflict(format!(
                "container {} already exists",
                spec.name
            )));
        }
        let image = state
            .images
            .get(&spec.image)
            .ok_or_else(|| Error::not_found(format!("image {}", spec.image)))?;
        let main = if spec.command.is_empty() {
            &image.entrypoint
        } else {
            &spec.command
        };
        match main.first() {
            Some(program) if image.programs.contains(program) => {}
            other => {
                return Err(Error::backend(
                    NAME,
                    format!(
                        "container {}: cannot start {:?}: no such program in image {}",
                        spec.name,
                        other.map(String::as_str).unwrap_or(""),
                        spec.image
                    ),
                ))
            }
        }
        state.next_id += 1;
        let info = ContainerInfo {
            id: format!("mem{:08}", state.next_id),
            name: spec.name.clone(),
            image: spec.image.clone(),
            labels: spec.labels.clone(),
            state: SandboxState::Running,
            created_at: Some(OffsetDateTime::now_utc()),
            limits: Some(spec.limits),
            env: spec.env.clone(),
        };
        state.containers.insert(spec.name.clone(), info.clone());
        Ok(info)
    }

    async fn inspect(&self, name: &str) -> Result<ContainerInfo> {
        self.container(name, |c| Ok(c.clone()))
    }

    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>> {
        Ok(self
            .lock()
            .containers
            .values()
            .filter(|c| {
                labels
                    .iter()
                    .all(|(k, v)| c.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .cloned()
            .collect())
    }

    async fn pause(&self, name: &str) -> Result<()> {
        self.container(name, |c| match c.state {
            SandboxState::Running => {
                c.state = SandboxState::Paused;
                Ok(())
            }
            other => Err(Error::Conflict(format!("container {name} is {other}"))),
        })
    }

    async fn resume(&self, name: &str) -> Result<()> {
        self.container(name, |c| match c.state {
            SandboxState::Paused => {
                c.state = SandboxState::Running;
                Ok(())
            }
            other => Err(Error::Conflict(format!("container {name} is {other}"))),
        })
    }

    async fn stop(&self, name: &str) -> Result<()> {
        self.container(name, |c| match c.state {
            SandboxState::Running => {
                c.state = SandboxState::Exited;
                Ok(())
            }
            other => Err(Error::Conflict(format!("container {name} is {other}"))),
        })
    }

    async fn start(&self, name: &str) -> Result<ContainerInfo> {
        self.container(name, |c| match c.state {
            SandboxState::Exited | SandboxState::Created => {
                c.state = SandboxState::Running;
                Ok(c.clone())
            }
            other => Err(Error::Conflict(format!("container {name} is {other}"))),
        })
    }

    async fn remove(&self, name: &str) -> Result<()> {
        self.lock()
            .containers
            .remove(name)
            .map(drop)
            .ok_or_else(|| Error::not_found(format!("container {name}")))
    }

    async fn derive_image(&self, req: &DeriveImage) -> Result<()> {
        req.tar()
            .map_err(|e| Error::InvalidArgument(format!("image {}: {e}", req.tag)))?;
        let mut state = self.lock();
        if state.images.contains_key(&req.tag) {
            return Ok(());
        }
        let base = state
            .images
            .get(&req.base)
            .ok_or_else(|| Error::not_found(format!("image {}", req.base)))?;
        let mut programs = base.programs.clone();
        programs.extend(req.files.iter().map(|f| f.path.clone()));
        let mut labels = base.labels.clone();
        labels.extend(req.labels.clone());
        let image = Image {
            programs,
            entrypoint: req.entrypoint.clone(),
            labels,
        };
        state.images.insert(req.tag.clone(), image);
        Ok(())
    }

    async fn snapshot(
        &self,
        name: &str,
        image: &str,
        labels: &BTreeMap<String, String>,
        _running: bool,
    ) -> Result<ImageInfo> {
        let mut state = self.lock();
        let from = state
            .containers
            .get(name)
            .map(|c| c.image.clone())
            .ok_or_else(|| Error::not_found(format!("container {name}")))?;
        let base = state
            .images
            .get(&from)
            .ok_or_else(|| Error::not_found(format!("image {from}")))?;
        let mut copy = Image {
            programs: base.programs.clone(),
            entrypoint: base.entrypoint.clone(),
            labels: base.labels.clone(),
        };
        copy.labels.extend(labels.clone());
        state.images.insert(image.to_string(), copy);
        Ok(ImageInfo::default())
    }

    async fn agent_address(&self, name: &str, _port: u16) -> Result<AgentAddress> {
        let agent = {
            let state = self.lock();
            if !state.containers.contains_key(name) {
                return Err(Error::not_found(format!("container {name}")));
            }
            state.agent
        };
        match agent {
            // One stand-in agent answers for every port.
            Some(addr) => Ok(AgentAddress { addr }),
            None => Err(Error::Unsupported {
                backend: NAME,
                operation: "agent address (nothing runs in an in-memory container)",
            }),
        }
    }
}
