//! Image builds: [`SandboxBackend::build_image`] reports a build's steps, output and cache
//! hits as they come, applies the request's memory and network, names a base that is not
//! local, and leaves no image behind when a build fails or is given up on;
//! [`SandboxBackend::remove_image`] removes what was built. A backend without builds says
//! unsupported to both.
//!
//! The checks build from the fixture's image and tag their images with the run id; a
//! check that fails reports the images it leaves.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::{Cleanup, Fixture, SUITE_LABEL};
use crate::backend::{BuildEvent, BuildRequest, ImageInfo, SandboxBackend};
use crate::error::{Error, Result};

/// Memory each build step gets in these checks.
const STEP_MEMORY: u64 = 256 << 20;

/// A build context on disk (a tar archive, gzip-compressed when asked), removed when
/// dropped.
struct Context(PathBuf);

impl Context {
    fn new(fixture: &Fixture, name: &str, files: &[(&str, &str)], gzip: bool) -> Self {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_cksum();
            builder
                .append_data(&mut header, path, data.as_bytes())
                .expect("a build context entry");
        }
        let tar = builder.into_inner().expect("a build context");
        let bytes = if gzip { gzip_stored(&tar) } else { tar };
        let path = std::env::temp_dir().join(format!(
            "colima-e2b-conf-{}-{name}.tar{}",
            fixture.run_id,
            if gzip { ".gz" } else { "" }
        ));
        std::fs::write(&path, bytes).expect("write the build context");
        Self(path)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `data` as a gzip member of stored (uncompressed) deflate blocks: valid gzip without a
/// compressor.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut blocks = data.chunks(0xffff).peekable();
    if data.is_empty() {
        out.extend([1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        out.push(u8::from(blocks.peek().is_none()));
        let len = block.len() as u16;
        out.extend(len.to_le_bytes());
        out.extend((!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend(crc32(data).to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A build of `context` into `tag`, offline, labelled for the suite.
fn request(fixture: &Fixture, tag: &str, context: &Context) -> BuildRequest {
    BuildRequest {
        tag: tag.to_string(),
        context: context.0.clone(),
        dockerfile: "Dockerfile".into(),
        labels: BTreeMap::from([(SUITE_LABEL.to_string(), fixture.run_id.clone())]),
        memory_bytes: STEP_MEMORY,
        cpus: 1.0,
        network: false,
        no_cache: false,
    }
}

/// Runs a build, collecting its events.
async fn build(
    backend: &dyn SandboxBackend,
    req: &BuildRequest,
) -> (Result<ImageInfo>, Vec<BuildEvent>) {
    let events = Mutex::new(Vec::new());
    let sink = |e: BuildEvent| events.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    let result = backend.build_image(req, &sink).await;
    (
        result,
        events.into_inner().unwrap_or_else(|p| p.into_inner()),
    )
}

fn outputs(events: &[BuildEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Output(line) => Some(line.trim_end()),
            _ => None,
        })
        .collect()
}

fn cached(events: &[BuildEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, BuildEvent::Cached))
        .count()
}

/// The images a check built: [`Images::run`] removes them at its end; dropped by a
/// panic, it says which are left.
struct Images<'a> {
    backend: &'a dyn SandboxBackend,
    tags: Vec<String>,
}

impl Images<'_> {
    async fn run(mut self) {
        for tag in std::mem::take(&mut self.tags) {
            match self.backend.remove_image(&tag).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => panic!("conformance: could not remove image {tag}: {e}"),
            }
        }
    }
}

impl Drop for Images<'_> {
    fn drop(&mut self) {
        if !self.tags.is_empty() {
            eprintln!(
                "conformance: check failed; remove the images it left: {:?}",
                self.tags
            );
        }
    }
}

/// Whether the backend builds; one that does not must say unsupported to both calls.
async fn builds(backend: &dyn SandboxBackend, result: &Result<ImageInfo>, tag: &str) -> bool {
    if !matches!(result, Err(Error::Unsupported { .. })) {
        return true;
    }
    assert!(
        matches!(
            backend.remove_image(tag).await,
            Err(Error::Unsupported { .. })
        ),
        "a backend without builds must not remove images either"
    );
    false
}

/// A build reports its steps numbered 1..N, the output of its RUN steps (which see the
/// files COPY put in, loopback only without network, and the memory asked), and returns
/// the image; built again (from a gzip context) its steps come from the cache. The image
/// cannot be removed while a container uses it; removed, it is gone, and a second removal
/// is not found.
pub async fn a_build_reports_steps_output_and_cached_steps(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let tag = fixture.derived_tag("build");
    let run = &fixture.run_id;
    let dockerfile = format!(
        "FROM {base}\n\
         RUN echo \"marker-{run}\"\n\
         COPY probe.txt /colima-e2b-probe.txt\n\
         RUN echo \"copied: $(cat /colima-e2b-probe.txt)\" && \
             echo \"ifaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' ')\" && \
             echo \"memory: $(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes)\"\n",
        base = fixture.image,
    );
    let files = [
        ("Dockerfile", dockerfile.as_str()),
        ("probe.txt", "probe-content\n"),
    ];
    let plain = Context::new(fixture, "build", &files, false);
    let gzip = Context::new(fixture, "build-gz", &files, true);
    let (result, events) = build(backend, &request(fixture, &tag, &plain)).await;
    if !builds(backend, &result, &tag).await {
        return;
    }
    let images = Images {
        backend,
        tags: vec![tag.clone()],
    };
    let built = result.unwrap_or_else(|e| panic!("build failed: {e}; events: {events:?}"));
    assert!(built.id.is_some(), "the built image has no id");

    let steps: Vec<(u32, u32, &str)> = events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Step {
                number,
                total,
                text,
            } => Some((*number, *total, text.as_str())),
            _ => None,
        })
        .collect();
    let total = steps.first().map(|s| s.1).unwrap_or(0);
    assert!(total >= 4, "expected at least 4 steps: {steps:?}");
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "steps are not numbered 1..{total}: {steps:?}"
    );
    assert!(
        steps.iter().all(|s| s.1 == total),
        "the step totals differ: {steps:?}"
    );
    assert!(
        steps[0].2.to_ascii_uppercase().starts_with("FROM"),
        "the first step is not the FROM: {steps:?}"
    );
    let out = outputs(&events);
    let marker = format!("marker-{run}");
    for want in [
        marker.as_str(),
        "copied: probe-content",
        "ifaces: lo",
        &format!("memory: {STEP_MEMORY}"),
    ] {
        assert!(
            out.contains(&want),
            "the build's output lacks {want:?}: {out:?}"
        );
    }
    let info = backend
        .image_info(&tag)
        .await
        .expect("image_info")
        .expect("the built image exists under its tag");
    assert_eq!(info.id, built.id, "the tag names another image");

    let (again, events) = build(backend, &request(fixture, &tag, &gzip)).await;
    again.unwrap_or_else(|e| panic!("the rebuild from a gzip context failed: {e}; {events:?}"));
    assert!(
        cached(&events) >= 3,
        "the rebuild's RUN and COPY steps were not reported cached: {events:?}"
    );
    assert!(
        !outputs(&events).contains(&marker.as_str()),
        "the rebuild ran a cached step again: {events:?}"
    );

    let mut spec = fixture.spec("build-user");
    spec.image = tag.clone();
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    backend
        .create(&spec)
        .await
        .expect("a container from the built image");
    match backend.remove_image(&tag).await {
        Err(Error::Conflict(_)) => {}
        other => panic!("removing an image a container uses gave {other:?}"),
    }
    cleanup.run().await;
    backend
        .remove_image(&tag)
        .await
        .expect("remove the built image");
    assert_eq!(
        backend.image_info(&tag).await.expect("image_info"),
        None,
        "the removed image is still there"
    );
    match backend.remove_image(&tag).await {
        Err(Error::NotFound { .. }) => {}
        other => panic!("removing a removed image gave {other:?}"),
    }
    images.run().await;
}

/// Builds `FROM base; RUN <layer>` into `tag` and says whether its RUN came from the
/// cache, i.e. whether an earlier build's image of that step is still there; builds it
/// again to see that the cache works (else the answer means nothing), then removes it.
async fn layer_is_cached(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
    name: &str,
    layer: &str,
) -> bool {
    let tag = fixture.derived_tag(name);
    let dockerfile = format!("FROM {}\n{layer}\n", fixture.image);
    let context = Context::new(fixture, name, &[("Dockerfile", &dockerfile)], false);
    let images = Images {
        backend,
        tags: vec![tag.clone()],
    };
    let (result, events) = build(backend, &request(fixture, &tag, &context)).await;
    result.unwrap_or_else(|e| panic!("the build of {tag} failed: {e}; {events:?}"));
    let (again, again_events) = build(backend, &request(fixture, &tag, &context)).await;
    again.unwrap_or_else(|e| panic!("the rebuild of {tag} failed: {e}; {again_events:?}"));
    assert!(
        cached(&again_events) > 0,
        "the rebuild of {tag} used no cache: {again_events:?}"
    );
    images.run().await;
    assert_eq!(
        backend.image_info(&tag).await.expect("image_info"),
        None,
        "{tag} is still there after its removal"
    );
    cached(&events) > 0
}

/// A build whose RUN fails is a build failure with the engine's message (after the step's
/// output), gives no image, and leaves none of its steps' images: built again, the step
/// before the failing one is not answered from the cache.
pub async fn a_failed_build_is_build_failed_and_leaves_no_step_images(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let tag = fixture.derived_tag("failed");
    let run = &fixture.run_id;
    let layer = format!("RUN echo \"layer-{run}\" > /colima-e2b-layer");
    let dockerfile = format!(
        "FROM {}\n{layer}\nRUN echo \"failing-{run}\" && exit 3\n",
        fixture.image
    );
    let context = Context::new(fixture, "failed", &[("Dockerfile", &dockerfile)], false);
    let (result, events) = build(backend, &request(fixture, &tag, &context)).await;
    if !builds(backend, &result, &tag).await {
        return;
    }
    let images = Images {
        backend,
        tags: vec![tag.clone()],
    };
    match &result {
        Err(Error::BuildFailed(message)) => assert!(
            message.contains('3'),
            "the failure does not give the exit code: {message}"
        ),
        other => panic!("a failing RUN gave {other:?}"),
    }
    let failing = format!("failing-{run}");
    assert!(
        outputs(&events).contains(&failing.as_str()),
        "the failing step's output did not arrive: {events:?}"
    );
    assert_eq!(
        backend.image_info(&tag).await.expect("image_info"),
        None,
        "a failed build tagged an image"
    );
    assert!(
        !layer_is_cached(backend, fixture, "failed-prefix", &layer).await,
        "the failed build left the image of its successful step"
    );
    images.run().await;
}

/// A build from a base that is not local is not found, naming the base (builds never
/// pull).
pub async fn a_build_from_a_base_that_is_not_local_is_not_found(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let tag = fixture.derived_tag("nobase");
    let dockerfile = "FROM colima-e2b.invalid/no-such-base:never\nRUN true\n";
    let context = Context::new(fixture, "nobase", &[("Dockerfile", dockerfile)], false);
    let (result, events) = build(backend, &request(fixture, &tag, &context)).await;
    if !builds(backend, &result, &tag).await {
        return;
    }
    match result {
        Err(Error::NotFound { what }) => {
            assert!(what.contains("no-such-base"), "not named: {what}")
        }
        other => panic!("a build from a missing base gave {other:?}; {events:?}"),
    }
    assert_eq!(backend.image_info(&tag).await.expect("image_info"), None);
}

/// A build whose future is dropped mid-RUN leaves no image: neither its result (the
/// engine may finish the build) nor the image of the step before.
pub async fn an_abandoned_build_leaves_no_images(backend: &dyn SandboxBackend, fixture: &Fixture) {
    const SLEEP: u64 = 2;
    let tag = fixture.derived_tag("abandoned");
    let run = &fixture.run_id;
    let layer = format!("RUN echo \"abandoned-{run}\" > /colima-e2b-layer");
    let dockerfile = format!(
        "FROM {}\n{layer}\nRUN echo \"started-{run}\" && sleep {SLEEP}\n",
        fixture.image
    );
    let context = Context::new(fixture, "abandoned", &[("Dockerfile", &dockerfile)], false);
    let started = tokio::sync::Notify::new();
    let marker = format!("started-{run}");
    let sink = |e: BuildEvent| {
        if matches!(&e, BuildEvent::Output(line) if line.trim_end() == marker) {
            started.notify_one();
        }
    };
    let req = request(fixture, &tag, &context);
    let outcome = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::select! {
            result = backend.build_image(&req, &sink) => Some(result),
            () = started.notified() => None,
        }
    })
    .await
    .expect("the build neither started its RUN nor ended within 120 s");
    if let Some(result) = outcome {
        if !builds(backend, &result, &tag).await {
            return;
        }
        panic!("the build ended before its RUN step's output arrived: {result:?}");
    }
    let images = Images {
        backend,
        tags: vec![tag.clone()],
    };
    // The build's future is gone. Give an engine that keeps building the time to finish,
    // and the backend the time to remove what it left.
    tokio::time::sleep(Duration::from_secs(SLEEP + 8)).await;
    assert_eq!(
        backend.image_info(&tag).await.expect("image_info"),
        None,
        "an abandoned build left its image"
    );
    assert!(
        !layer_is_cached(backend, fixture, "abandoned-prefix", &layer).await,
        "an abandoned build left the image of its finished step"
    );
    images.run().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn stored_gzip_has_its_frame() {
        let gz = gzip_stored(b"hello");
        assert_eq!(&gz[..3], &[0x1f, 0x8b, 8]);
        // Header, one final stored block (1 + 4 bytes + data), CRC and size.
        assert_eq!(gz.len(), 10 + 5 + 5 + 8);
        assert_eq!(&gz[gz.len() - 4..], &5u32.to_le_bytes());
    }
}
