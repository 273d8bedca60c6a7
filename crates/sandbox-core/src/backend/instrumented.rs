//! A backend wrapper that records every engine call's latency and errors as metrics.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use async_trait::async_trait;

use crate::backend::{
    AgentAddress, Capabilities, ContainerInfo, ContainerSpec, DeriveImage, DynBackend, EngineInfo,
    HostNetwork, ImageInfo, SandboxBackend,
};
use crate::error::Result;

/// Wraps a backend; `colima_e2b_engine_call_duration_seconds{backend,op,outcome}` records
/// each call. The manager wraps its backend in this, so every engine call is seen.
#[derive(Debug)]
pub struct Instrumented(pub DynBackend);

impl fmt::Display for Instrumented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Instrumented {
    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = call.await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        metrics::histogram!(
            "colima_e2b_engine_call_duration_seconds",
            "backend" => self.0.name(),
            "op" => op,
            "outcome" => outcome
        )
        .record(started.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!("colima_e2b_engine_errors_total", "backend" => self.0.name(), "op" => op, "code" => outcome)
                .increment(1);
        }
        result
    }
}

#[async_trait]
impl SandboxBackend for Instrumented {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn check(&self) -> Result<EngineInfo> {
        self.timed("check", self.0.check()).await
    }
    async fn image_info(&self, image: &str) -> Result<Option<ImageInfo>> {
        self.timed("image_info", self.0.image_info(image)).await
    }

    async fn ensure_image(&self, image: &str) -> Result<ImageInfo> {
        self.timed("ensure_image", self.0.ensure_image(image)).await
    }
    async fn derive_image(&self, req: &DeriveImage) -> Result<()> {
        self.timed("derive_image", self.0.derive_image(req)).await
    }
    async fn build_image(
        &self,
        req: &crate::backend::BuildRequest,
        sink: crate::backend::BuildSink<'_>,
    ) -> Result<ImageInfo> {
        self.timed("build_image", self.0.build_image(req, sink))
            .await
    }
    async fn remove_image(&self, image: &str) -> Result<()> {
        self.timed("remove_image", self.0.remove_image(image)).await
    }
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerInfo> {
        self.timed("create", self.0.create(spec)).await
    }
    async fn inspect(&self, name: &str) -> Result<ContainerInfo> {
        self.timed("inspect", self.0.inspect(name)).await
    }
    async fn create_volume(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        self.timed("create_volume", self.0.create_volume(name, labels))
            .await
    }

    async fn list_volumes(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        self.timed("list_volumes", self.0.list_volumes(labels))
            .await
    }

    async fn remove_volume(&self, name: &str) -> Result<()> {
        self.timed("remove_volume", self.0.remove_volume(name))
            .await
    }

    async fn disk_usage(&self, name: &str) -> Result<Option<u64>> {
        self.timed("disk_usage", self.0.disk_usage(name)).await
    }
    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>> {
        self.timed("list", self.0.list(labels)).await
    }
    async fn pause(&self, name: &str) -> Result<()> {
        self.timed("pause", self.0.pause(name)).await
    }
    async fn resume(&self, name: &str) -> Result<()> {
        self.timed("resume", self.0.resume(name)).await
    }
    async fn remove(&self, name: &str) -> Result<()> {
        self.timed("remove", self.0.remove(name)).await
    }
    async fn stop(&self, name: &str) -> Result<()> {
        self.timed("stop", self.0.stop(name)).await
    }
    async fn snapshot(
        &self,
        name: &str,
        image: &str,
        labels: &std::collections::BTreeMap<String, String>,
        running: bool,
    ) -> Result<ImageInfo> {
        self.timed("snapshot", self.0.snapshot(name, image, labels, running))
            .await
    }
    async fn list_images(&self, label: &str) -> Result<Vec<crate::backend::ImageEntry>> {
        self.timed("list_images", self.0.list_images(label)).await
    }
    async fn start(&self, name: &str) -> Result<ContainerInfo> {
        self.timed("start", self.0.start(name)).await
    }
    async fn host_networks(&self) -> Result<Vec<HostNetwork>> {
        self.timed("host_networks", self.0.host_networks()).await
    }
    async fn agent_address(&self, name: &str, port: u16) -> Result<AgentAddress> {
        self.timed("agent_address", self.0.agent_address(name, port))
            .await
    }
}
