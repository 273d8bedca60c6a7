//! Image builds through libpod's `/build`: the query of a build and the reading of its
//! newline-delimited JSON stream into the core's [`StepTracker`] (which, with
//! [`sandbox_core::backend::build_failure`], follows the steps and classifies failures).
//!
//! # What libpod 4.3 does with a build's network
//! Without `nsoptions`, libpod runs every `RUN` step in the *host's* network namespace,
//! whatever `networkmode` says (which it reads only as buildah's network configuration
//! policy: `NetworkDefault`, `NetworkDisabled`, `NetworkEnabled` or their numbers; `none`
//! or `bridge` count as the default). So the query always asks for a private network
//! namespace, configured (the default network) or not (loopback only).
//!
//! # And with its cache
//! Without `outputformat` libpod 4.3 commits the step images in a form its own cache
//! lookup never matches: every build runs every step again. The query names the format.

use sandbox_core::backend::{BuildRequest, BuildSink, StepTracker};
use serde_json::{json, Value};

/// CFS period of build steps, microseconds.
const CPU_PERIOD: i64 = 100_000;
/// The image format builds commit.
const DOCKER_FORMAT: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Longest unfinished line kept from the build stream; a longer one is dropped.
const MAX_PENDING: usize = 16 << 20;

/// The query of `POST /libpod/build` for `req`: never pull, layers cached, step
/// containers removed whatever happens, the request's limits (memory without swap) and a
/// private network namespace, with or without a network.
pub fn build_query(req: &BuildRequest) -> String {
    let labels = serde_json::to_string(&req.labels).unwrap_or_else(|_| "{}".into());
    let nsoptions = json!([{ "Name": "network", "Host": false, "Path": "" }]).to_string();
    let network = if req.network {
        "NetworkEnabled"
    } else {
        "NetworkDisabled"
    };
    let mut pairs = vec![
        ("t", req.tag.clone()),
        ("dockerfile", req.dockerfile.clone()),
        ("labels", labels),
        ("nocache", req.no_cache.to_string()),
        ("layers", "true".into()),
        ("rm", "true".into()),
        ("forcerm", "true".into()),
        ("pull", "false".into()),
        // `pull=false` alone still pulls a missing base.
        ("pullpolicy", "never".into()),
        // Without a format libpod 4.3 commits images its cache lookup never matches. The
        // Docker format keeps what a Dockerfile says (HEALTHCHECK, SHELL, ONBUILD).
        ("outputformat", DOCKER_FORMAT.into()),
        ("nsoptions", nsoptions),
        ("networkmode", network.into()),
    ];
    let memory = i64::try_from(req.memory_bytes).unwrap_or(i64::MAX);
    if memory > 0 {
        pairs.push(("memory", memory.to_string()));
        // Memory plus swap: equal to the memory means no swap.
        pairs.push(("memswap", memory.to_string()));
    }
    let quota = (req.cpus * CPU_PERIOD as f64).round();
    if quota >= 1.0 {
        let quota = if quota >= i64::MAX as f64 {
            i64::MAX
        } else {
            (quota as i64).max(1000)
        };
        pairs.push(("cpuperiod", CPU_PERIOD.to_string()));
        pairs.push(("cpuquota", quota.to_string()));
    }
    containers_api::url::encoded_pairs(pairs)
}

/// Splits the build stream into its JSON messages, one a line, whatever the chunks.
#[derive(Debug, Default)]
pub struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    /// Takes a chunk of the stream; returns the messages it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Value> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            out.extend(parse(&line));
        }
        if self.pending.len() > MAX_PENDING {
            tracing::debug!(
                bytes = self.pending.len(),
                "build message too long, dropped"
            );
            self.pending.clear();
        }
        out
    }

    /// Ends the stream: a last message without a newline.
    pub fn finish(&mut self) -> Option<Value> {
        parse(&std::mem::take(&mut self.pending))
    }
}

fn parse(line: &[u8]) -> Option<Value> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return None;
    }
    serde_json::from_slice(line)
        .inspect_err(|e| tracing::debug!(error = %e, "unreadable build message"))
        .ok()
}

/// The image id libpod sends alone as a successful build's last message.
pub fn final_image_id(msg: &Value) -> Option<&str> {
    let text = msg.get("stream")?.as_str()?.trim();
    (text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())).then_some(text)
}

/// Takes one JSON message of the build stream into `tracker`: the image id libpod sends
/// alone at the end of a successful build becomes the build's image id (not an output
/// line); anything else goes through the tracker.
pub fn take_message(tracker: &mut StepTracker, msg: &Value, sink: BuildSink<'_>) {
    if let Some(id) = final_image_id(msg) {
        tracker.out.image_id = Some(id.to_string());
        return;
    }
    tracker.message(msg, sink);
}

/// Builds tried, in all, when an engine fault cut one short.
pub const RERUN_ATTEMPTS: u32 = 5;

/// An engine fault that ended a build whose own steps had nothing wrong, so running it
/// again is the remedy: the steps done before the fault are in the layer cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rerun {
    /// Buildah's layer-cache lookup walks the images and fails with "layer not known"
    /// when one of them is removed meanwhile (another build's cleanup, a removed
    /// template), before the build did anything of its own.
    LostLayer,
    /// Podman before 4.6 starts a `RUN` step's runtime with a parent-death signal
    /// (SIGKILL) tied to the OS *thread* that started it (containers/podman#17918,
    /// fixed by buildah#4790 and #4813). The service ends threads whenever it sets up or
    /// tears down a container's network namespace, so creating or removing any
    /// networked container during a step kills that step: "while running runtime:
    /// signal: killed". Measured here on Podman 4.3.1: 5 of 12 builds of a 2 s step
    /// while another client ran containers in a loop, 0 of 12 with `--network none`
    /// containers or `stats` calls instead.
    KilledRuntime,
}

impl Rerun {
    /// Whether the failure `message` is such a fault on a Podman of `version` (major,
    /// minor; `None` when unknown, taken as affected).
    pub fn of(message: &str, version: Option<(u32, u32)>) -> Option<Self> {
        if message.contains("layer not known") {
            return Some(Self::LostLayer);
        }
        let affected = version.is_none_or(|v| v < (4, 6));
        (affected && message.contains("while running runtime: signal: killed"))
            .then_some(Self::KilledRuntime)
    }

    /// What happened, for the build log.
    pub fn explain(self) -> &'static str {
        match self {
            Self::LostLayer => "an image was removed during the cache check",
            Self::KilledRuntime => {
                "the engine killed the step's runtime when another container's network \
                 was set up or torn down (a bug of Podman before 4.6, containers/podman#17918)"
            }
        }
    }
}

/// Major and minor of a version such as `4.3.1` or `5.0.0-dev`.
pub fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_core::backend::BuildEvent;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    fn query(req: &BuildRequest) -> Vec<(String, String)> {
        containers_api::url::url::form_urlencoded::parse(build_query(req).as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    fn request(network: bool) -> BuildRequest {
        BuildRequest {
            tag: "t:1".into(),
            context: "/tmp/c.tar".into(),
            dockerfile: "sub/Dockerfile".into(),
            labels: BTreeMap::from([("k".to_string(), "v \"q\"".to_string())]),
            memory_bytes: 256 << 20,
            cpus: 0.5,
            network,
            no_cache: false,
        }
    }

    #[test]
    fn the_query_never_pulls_and_keeps_the_network_private() {
        let q = query(&request(false));
        let get = |k: &str| {
            q.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("{k} missing from {q:?}"))
        };
        assert_eq!(get("t"), "t:1");
        assert_eq!(get("dockerfile"), "sub/Dockerfile");
        assert_eq!(
            serde_json::from_str::<Value>(get("labels")).expect("labels"),
            json!({"k": "v \"q\""})
        );
        assert_eq!(get("pullpolicy"), "never");
        assert_eq!(get("pull"), "false");
        assert_eq!(get("layers"), "true");
        assert_eq!(get("outputformat"), DOCKER_FORMAT);
        assert_eq!(get("forcerm"), "true");
        assert_eq!(get("memory"), (256u64 << 20).to_string());
        assert_eq!(get("memswap"), (256u64 << 20).to_string());
        assert_eq!(get("cpuquota"), "50000");
        assert_eq!(get("cpuperiod"), "100000");
        assert_eq!(get("networkmode"), "NetworkDisabled");
        let ns: Value = serde_json::from_str(get("nsoptions")).expect("nsoptions");
        assert_eq!(ns, json!([{"Name": "network", "Host": false, "Path": ""}]));
        let online = query(&request(true));
        assert!(online.contains(&("networkmode".into(), "NetworkEnabled".into())));
    }

    #[test]
    fn messages_split_across_chunks_or_sharing_one_are_read() {
        let mut lines = Lines::default();
        assert!(lines.push(br#"{"stream":"STEP 1/2: FR"#).is_empty());
        let got = lines.push(b"OM x\\n\"}\n{\"stream\":\"a\\n\"}\n{\"stream\":");
        assert_eq!(
            got,
            vec![
                json!({"stream": "STEP 1/2: FROM x\n"}),
                json!({"stream": "a\n"})
            ]
        );
        assert!(lines.push(b"\"b\"}").is_empty());
        assert_eq!(lines.finish(), Some(json!({"stream": "b"})));
        assert_eq!(lines.finish(), None);
    }

    #[test]
    fn the_final_id_is_kept_and_not_reported_as_output() {
        let events = Mutex::new(Vec::new());
        let sink = |e: BuildEvent| events.lock().expect("lock").push(e);
        let mut tracker = StepTracker::default();
        let id = "e7c0e9085252de8b780107d6f0623f057fdc2fce66e6143a3a966a8a4839c062";
        let cached = "76f7b50cf690d8b7798084a37e30d18cc3ca2bcad869f0111fd61eeaa2e83325";
        for m in [
            json!({"stream": "STEP 1/3: FROM base\n"}),
            json!({"stream": "STEP 2/3: RUN echo cached\n"}),
            json!({"stream": format!("--> Using cache {cached}\n")}),
            json!({"stream": "--> 76f7b50cf69\n"}),
            json!({"stream": "STEP 3/3: RUN echo hi\n"}),
            json!({"stream": "hi\n"}),
            json!({"stream": "COMMIT t\n--> e7c0e908525\n"}),
            json!({"stream": format!("{id}\n")}),
        ] {
            take_message(&mut tracker, &m, &sink);
        }
        tracker.finish(&sink);
        assert_eq!(tracker.out.image_id.as_deref(), Some(id));
        // The cached step's image is someone else's.
        assert_eq!(tracker.step_images(), vec!["e7c0e908525"]);
        let events = events.into_inner().expect("events");
        assert_eq!(events.len(), 6, "{events:?}");
        assert_eq!(events[2], BuildEvent::Cached);
        assert_eq!(events[4], BuildEvent::Output("hi".into()));
    }
    #[test]
    fn engine_faults_are_told_from_a_step_that_failed() {
        let killed = "building at STEP \"RUN x\": while running runtime: signal: killed";
        assert_eq!(Rerun::of(killed, Some((4, 3))), Some(Rerun::KilledRuntime));
        assert_eq!(Rerun::of(killed, None), Some(Rerun::KilledRuntime));
        // Fixed from 4.6: a kill there is someone else's doing.
        assert_eq!(Rerun::of(killed, Some((4, 6))), None);
        assert_eq!(Rerun::of(killed, Some((5, 0))), None);
        let lost = "creating build container: layer not known";
        assert_eq!(Rerun::of(lost, Some((5, 2))), Some(Rerun::LostLayer));
        // A step that exits non-zero, or is OOM-killed inside, is the build's own failure.
        let own = "building at STEP \"RUN false\": while running runtime: exit status 1";
        assert_eq!(Rerun::of(own, Some((4, 3))), None);
        let oom = "building at STEP \"RUN x\": while running runtime: exit status 137";
        assert_eq!(Rerun::of(oom, Some((4, 3))), None);
    }

    #[test]
    fn versions_are_read_to_their_minor() {
        assert_eq!(major_minor("4.3.1"), Some((4, 3)));
        assert_eq!(major_minor("5.0.0-dev"), Some((5, 0)));
        assert_eq!(major_minor("4.10"), Some((4, 10)));
        assert_eq!(major_minor(""), None);
        assert_eq!(major_minor("v4"), None);
    }
}
