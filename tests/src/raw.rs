//! The engine's own floor for the benchmarks: plain bollard calls with no sandbox
//! profile (default bridge network, no limits), to compare colima-e2b against.

use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error;
use bollard::exec::StartExecResults;
use bollard::models::{ContainerCreateBody, ExecConfig};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use bollard::Docker;
use futures_util::StreamExt;

/// Creates and starts container `name` from `image`, running `sleep infinity`.
pub async fn create_started(docker: &Docker, name: &str, image: &str) -> Result<(), Error> {
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.to_string()),
                ..Default::default()
            }),
            ContainerCreateBody {
                image: Some(image.to_string()),
                cmd: Some(vec!["sleep".into(), "infinity".into()]),
                ..Default::default()
            },
        )
        .await?;
    docker.start_container(name, None).await
}

/// Runs `cmd` in `name` with the engine's exec (create + start + inspect), as `user`;
/// returns its stdout and exit code.
pub async fn exec(
    docker: &Docker,
    name: &str,
    cmd: &[&str],
    user: Option<&str>,
) -> Result<(Vec<u8>, Option<i64>), Error> {
    let exec = docker
        .create_exec(
            name,
            ExecConfig {
                cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                user: user.map(str::to_string),
                ..Default::default()
            },
        )
        .await?;
    let mut stdout = Vec::new();
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while let Some(chunk) = output.next().await {
            if let LogOutput::StdOut { message } = chunk? {
                stdout.extend_from_slice(&message);
            }
        }
    }
    let code = docker.inspect_exec(&exec.id).await?.exit_code;
    Ok((stdout, code))
}

/// Force-removes container `name`.
pub async fn remove(docker: &Docker, name: &str) -> Result<(), Error> {
    docker
        .remove_container(
            name,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
}

/// A benchmark's arguments: `[iterations] [engine...]` (10, both engines by default).
pub fn bench_args() -> Result<(usize, Vec<String>), String> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|a| a.parse().map_err(|_| "iterations must be a number"))
        .transpose()?
        .unwrap_or(10);
    let mut engines: Vec<String> = args.collect();
    if engines.is_empty() {
        engines = vec!["docker".into(), "podman".into()];
    }
    Ok((n, engines))
}

/// Median and p90 of `v`, in milliseconds.
pub fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| ms(v[((v.len() as f64 - 1.0) * q).round() as usize]);
    (p(0.5), p(0.9))
}
