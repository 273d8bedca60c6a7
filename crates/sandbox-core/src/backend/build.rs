//! Image builds: what the core asks of an engine's build API ([`BuildRequest`]), the
//! events a build reports ([`BuildEvent`]), and the reading of the engines' build output,
//! which both Docker's classic builder and Podman's (buildah) stream as JSON objects
//! `{"stream": "..."}` ending in `{"error": "..."}` on failure; the following of a
//! build's steps ([`StepTracker`]) and the classification of its failures
//! ([`build_failure`], [`is_build_context_problem`]), which the engine backends share.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use super::{ImageInfo, SandboxBackend};
use crate::{Error, Result};

/// One image build: a Dockerfile in a build context.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildRequest {
    /// Reference (`repo:tag`) the built image gets.
    pub tag: String,
    /// The build context: a tar archive (plain or gzip) on the server's disk.
    pub context: PathBuf,
    /// Path of the Dockerfile inside the context.
    pub dockerfile: String,
    /// Labels added to the image.
    pub labels: BTreeMap<String, String>,
    /// Memory of each build step's container, bytes.
    pub memory_bytes: u64,
    /// CPUs of each build step's container.
    pub cpus: f64,
    /// Whether RUN steps may reach the network (the engine's default bridge).
    pub network: bool,
    /// Build every step again, ignoring the engine's layer cache.
    pub no_cache: bool,
}

/// What a running build reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildEvent {
    /// The engine started Dockerfile instruction `number` (1-based, `FROM` is 1) of
    /// `total`; `text` is the instruction as the engine prints it.
    Step {
        /// 1-based instruction number.
        number: u32,
        /// Instructions in the Dockerfile.
        total: u32,
        /// The instruction.
        text: String,
    },
    /// The step was answered from the engine's layer cache.
    Cached,
    /// A line of output (a RUN step's, or the engine's own).
    Output(String),
}

/// Where a backend sends a build's events as they happen; must not block.
pub type BuildSink<'a> = &'a (dyn Fn(BuildEvent) + Send + Sync);

/// Reads an engine's build stream: turns its `stream` texts into events, remembers the
/// image ids the steps produced (so a failed build's images can be removed) and the
/// error that ends a failed build.
#[derive(Debug, Default)]
pub struct BuildOutput {
    partial: String,
    /// Image ids produced by steps so far, oldest first (short or full).
    pub images: Vec<String>,
    /// The engine's error, when the build failed.
    pub error: Option<String>,
    /// The built image's id, when the engine said.
    pub image_id: Option<String>,
}

/// Longest line kept from a build's output; longer ones are cut (the rest is dropped).
pub const MAX_LINE: usize = 8 * 1024;

impl BuildOutput {
    /// Takes one JSON message of the engine's build stream.
    pub fn message(&mut self, msg: &serde_json::Value, sink: BuildSink<'_>) {
        if let Some(err) = msg.get("error").and_then(|e| e.as_str()) {
            self.flush(sink);
            self.error = Some(err.trim_end().to_string());
            return;
        }
        if let Some(id) = msg
            .get("aux")
            .and_then(|a| a.get("ID"))
            .and_then(|i| i.as_str())
        {
            self.image_id = Some(id.to_string());
        }
        if let Some(text) = msg.get("stream").and_then(|s| s.as_str()) {
            self.text(text, sink);
        }
    }

    /// Takes raw `stream` text: whole lines become events; a partial line waits.
    pub fn text(&mut self, text: &str, sink: BuildSink<'_>) {
        for piece in text.split_inclusive('\n') {
            if self.partial.len() < MAX_LINE {
                let room = MAX_LINE - self.partial.len();
                let mut cut = piece.len().min(room);
                while !piece.is_char_boundary(cut) {
                    cut -= 1;
                }
                self.partial.push_str(&piece[..cut]);
            }
            // Docker prints "Step 1/4 : FROM x" and its newline as two messages.
            if piece.ends_with('\n') {
                self.flush(sink);
            }
        }
    }

    /// Ends the stream: a partial last line becomes an event too.
    pub fn flush(&mut self, sink: BuildSink<'_>) {
        let line = std::mem::take(&mut self.partial);
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            return;
        }
        if let Some((number, total, text)) = parse_step(line) {
            sink(BuildEvent::Step {
                number,
                total,
                text,
            });
            return;
        }
        // Layer ids: Docker " ---> 1a2b3c", Podman "--> 1a2b3c"; cache hits say so.
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed
            .strip_prefix("---> ")
            .or_else(|| trimmed.strip_prefix("--> "))
        {
            let rest = rest.trim();
            if rest == "Using cache" {
                sink(BuildEvent::Cached);
                return;
            }
            if let Some(id) = rest.strip_prefix("Using cache ") {
                sink(BuildEvent::Cached);
                self.images.push(id.trim().to_string());
                return;
            }
            if rest.starts_with("Running in ") {
                return;
            }
            if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.images.push(rest.to_string());
                return;
            }
        }
        if trimmed.starts_with("Removing intermediate container ") {
            return;
        }
        sink(BuildEvent::Output(strip_ansi(line)));
    }
}

/// `line` without terminal escape sequences (Docker's builder colours a step's stderr).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates, then one final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// `Step 3/7 : RUN x` (Docker) or `STEP 3/7: RUN x` (Podman).
fn parse_step(line: &str) -> Option<(u32, u32, String)> {
    let rest = line
        .strip_prefix("Step ")
        .or_else(|| line.strip_prefix("STEP "))?;
    let (counts, text) = rest.split_once(':')?;
    let (n, total) = counts.trim().split_once('/')?;
    Some((
        n.parse().ok()?,
        total.parse().ok()?,
        text.trim().to_string(),
    ))
}

/// Bytes of a build context sent per chunk.
pub const CONTEXT_CHUNK: usize = 64 * 1024;

/// The build context `file`'s bytes in chunks of at most [`CONTEXT_CHUNK`], read as the
/// engine takes them.
pub fn context_chunks(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::try_unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; CONTEXT_CHUNK];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((buf, file)))
    })
}

/// Follows a build's stream: the engine's messages go through [`BuildOutput`] to the
/// caller's sink, while the tracker notes the step being run and the images the `FROM`
/// steps gave (the bases, which are never removed).
#[derive(Debug, Default)]
pub struct StepTracker {
    /// The stream read so far.
    pub out: BuildOutput,
    /// The step being run.
    step: Mutex<Step>,
    /// Images the `FROM` steps gave.
    bases: HashSet<String>,
    /// Images of steps answered from the cache: someone else's.
    reused: HashSet<String>,
}

/// The step being run, as its events said.
#[derive(Debug, Default)]
struct Step {
    /// Its instruction.
    text: Option<String>,
    /// It was answered from the cache.
    cached: bool,
}

impl StepTracker {
    /// Takes one JSON message of the build stream.
    pub fn message(&mut self, msg: &serde_json::Value, sink: BuildSink<'_>) {
        let before = self.out.images.len();
        let step = &self.step;
        self.out.message(msg, &|event| follow(step, sink, event));
        self.note_images(before);
    }

    /// Ends the stream (a partial last line becomes an event).
    pub fn finish(&mut self, sink: BuildSink<'_>) {
        let before = self.out.images.len();
        let step = &self.step;
        self.out.flush(&|event| follow(step, sink, event));
        self.note_images(before);
    }

    /// Images that appeared while a `FROM` step runs are bases; those of a step answered
    /// from the cache are reused.
    fn note_images(&mut self, before: usize) {
        let new = self.out.images.iter().skip(before).cloned();
        if self.running_from().is_some() {
            self.bases.extend(new);
        } else if self
            .step
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cached
        {
            self.reused.extend(new);
        }
    }

    /// The image of the step being run, when that step is a `FROM`.
    pub fn running_from(&self) -> Option<String> {
        let step = self.step.lock().unwrap_or_else(PoisonError::into_inner);
        from_image(step.text.as_deref()?)
    }

    /// The images this build's steps made, newest first (bases and images answered from
    /// the cache left out): what a failed build removes (the engine keeps any that a tag
    /// or another image still needs).
    pub fn step_images(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for id in self.out.images.iter().rev() {
            if !self.bases.contains(id) && !self.reused.contains(id) && !out.contains(id) {
                out.push(id.clone());
            }
        }
        out
    }

    /// The image a finished build of `tag` made, as `backend` describes it: the image
    /// whose id the engine said, else the one `tag` names. No such image is the
    /// backend's failure.
    pub async fn built_image<B: SandboxBackend + ?Sized>(
        &self,
        backend: &B,
        tag: &str,
    ) -> Result<ImageInfo> {
        let built = self.out.image_id.as_deref().unwrap_or(tag);
        backend.image_info(built).await?.ok_or_else(|| {
            Error::backend(
                backend.name(),
                format!("the build of {tag} ended without an image"),
            )
        })
    }
}

/// Notes the step an event starts or finds cached, and passes the event on.
fn follow(step: &Mutex<Step>, sink: BuildSink<'_>, event: BuildEvent) {
    {
        let mut step = step.lock().unwrap_or_else(PoisonError::into_inner);
        match &event {
            BuildEvent::Step { text, .. } => {
                *step = Step {
                    text: Some(text.clone()),
                    cached: false,
                }
            }
            BuildEvent::Cached => step.cached = true,
            BuildEvent::Output(_) => {}
        }
    }
    sink(event);
}

/// The image of a `FROM` instruction (`FROM [--platform=p] image [AS name]`).
fn from_image(instruction: &str) -> Option<String> {
    let (keyword, rest) = instruction.trim().split_once(char::is_whitespace)?;
    if !keyword.eq_ignore_ascii_case("FROM") {
        return None;
    }
    rest.split_whitespace()
        .find(|w| !w.starts_with("--"))
        .map(str::to_string)
}

/// What the engines say when an image a build needs is neither local nor pulled: libpod
/// (its builds never pull) first, then Docker's classic builder.
const MISSING: [&str; 9] = [
    "image not known",
    "initializing source",
    "did not resolve to an alias",
    "pinging container registry",
    "manifest unknown",
    "reading manifest",
    "requested access to the resource is denied",
    "pull access denied",
    "No such image",
];

/// What the engines say of a malformed image reference (Docker prefixes the second
/// with the first; libpod says either alone).
const MALFORMED: [&str; 2] = [
    "invalid reference format",
    "repository name must be lowercase",
];

/// How libpod (buildah) begins the error of a failed `FROM` step. It never pulls, so
/// such an error is a missing image only when [`MISSING`] says so.
const BUILDAH_FROM: &str = "creating build container";

/// The error of a build the engine ended with `message`, while running the `FROM` of
/// `from` when that is set.
///
/// A `FROM` of Docker's classic builder fails when its image is not local (Docker then
/// tries to pull it, whatever `pull` says, and any failure of that pull is the image's
/// absence) or when the reference is malformed; one of libpod's fails for a missing
/// image only with the texts of [`MISSING`].
pub fn build_failure(message: &str, from: Option<&str>) -> Error {
    let has = |texts: &[&str]| texts.iter().any(|t| message.contains(t));
    let missing = has(&MISSING);
    let base_missing = !has(&MALFORMED) && (missing || !message.contains(BUILDAH_FROM));
    match from {
        Some(image) if base_missing => Error::not_found(format!(
            "image {image} (not present locally; builds do not pull: {message})"
        )),
        _ if missing => Error::not_found(format!("an image the build names ({message})")),
        _ => Error::BuildFailed(message.to_string()),
    }
}

/// Whether an error answer to the build request itself is about the request's context or
/// Dockerfile (the client's doing), not the engine.
pub fn is_build_context_problem(status: u16, message: &str) -> bool {
    status == 400
        || [
            "Dockerfile",
            "dockerfile",
            "Containerfile",
            "unexpected EOF",
            "archive/tar",
            "invalid tar header",
            "gzip",
        ]
        .iter()
        .any(|m| message.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn run(messages: &[&str]) -> (Vec<BuildEvent>, BuildOutput) {
        let events = Mutex::new(Vec::new());
        let sink = |e: BuildEvent| events.lock().expect("lock").push(e);
        let mut out = BuildOutput::default();
        for m in messages {
            let v: serde_json::Value = serde_json::from_str(m).expect("json");
            out.message(&v, &sink);
        }
        out.flush(&sink);
        (events.into_inner().expect("events"), out)
    }

    #[test]
    fn docker_classic_builder_output_is_read() {
        let (events, out) = run(&[
            r#"{"stream":"Step 1/3 : FROM base"}"#,
            r#"{"stream":"\n"}"#,
            r#"{"stream":" ---\u003e 1a341bb5dc4a\n"}"#,
            r#"{"stream":"Step 2/3 : RUN echo hi"}"#,
            r#"{"stream":"\n"}"#,
            r#"{"stream":" ---\u003e Running in b56cc502c8e9\n"}"#,
            r#"{"stream":"hi\n"}"#,
            r#"{"stream":"Removing intermediate container b56cc502c8e9\n"}"#,
            r#"{"stream":" ---\u003e 2e4e8dd3838e\n"}"#,
            r#"{"stream":"Step 3/3 : RUN exit 3"}"#,
            r#"{"stream":"\n"}"#,
            r#"{"stream":" ---\u003e Using cache\n"}"#,
            r#"{"errorDetail":{"code":3},"error":"The command returned a non-zero code: 3"}"#,
        ]);
        assert_eq!(
            events,
            vec![
                BuildEvent::Step {
                    number: 1,
                    total: 3,
                    text: "FROM base".into()
                },
                BuildEvent::Step {
                    number: 2,
                    total: 3,
                    text: "RUN echo hi".into()
                },
                BuildEvent::Output("hi".into()),
                BuildEvent::Step {
                    number: 3,
                    total: 3,
                    text: "RUN exit 3".into()
                },
                BuildEvent::Cached,
            ]
        );
        assert_eq!(out.images, vec!["1a341bb5dc4a", "2e4e8dd3838e"]);
        assert_eq!(
            out.error.as_deref(),
            Some("The command returned a non-zero code: 3")
        );
    }

    #[test]
    fn podman_build_output_is_read() {
        let (events, out) = run(&[
            r#"{"stream":"STEP 1/2: FROM base\n"}"#,
            r#"{"stream":"STEP 2/2: RUN echo hi\n"}"#,
            r#"{"stream":"--\u003e Using cache 5afd883f81a7aaaa\n"}"#,
            r#"{"stream":"COMMIT t\n--\u003e f348a920ee5\n"}"#,
            r#"{"stream":"partial"}"#,
        ]);
        assert_eq!(events.len(), 5, "{events:?}");
        assert_eq!(events[2], BuildEvent::Cached);
        assert_eq!(events[3], BuildEvent::Output("COMMIT t".into()));
        assert_eq!(events[4], BuildEvent::Output("partial".into()));
        assert_eq!(out.images, vec!["5afd883f81a7aaaa", "f348a920ee5"]);
        assert!(out.error.is_none());
    }

    #[test]
    fn terminal_colours_are_stripped() {
        assert_eq!(strip_ansi("\x1b[91mabout to fail\x1b[0m"), "about to fail");
        assert_eq!(strip_ansi("plain [1/2]"), "plain [1/2]");
    }

    #[test]
    fn long_lines_are_cut() {
        let long = "x".repeat(MAX_LINE * 3);
        let msg = serde_json::json!({ "stream": format!("{long}\n") }).to_string();
        let (events, _) = run(&[&msg]);
        match &events[..] {
            [BuildEvent::Output(line)] => assert_eq!(line.len(), MAX_LINE),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_the_images_a_build_made_are_its_step_images_newest_first() {
        let mut tracker = StepTracker::default();
        let sink = |_: BuildEvent| {};
        for m in [
            r#"{"stream":"Step 1/3 : FROM base"}"#,
            r#"{"stream":"\n"}"#,
            r#"{"stream":" ---> 1a341bb5dc4a\n"}"#,
            r#"{"stream":"Step 2/3 : RUN echo hi"}"#,
            r#"{"stream":"\n"}"#,
            r#"{"stream":" ---> Running in b56cc502c8e9\n"}"#,
            r#"{"stream":" ---> 2e4e8dd3838e\n"}"#,
            r#"{"stream":"Step 3/4 : COPY a /a"}"#,
            r#"{"stream":"\n"}"#,
            r#"{"stream":" ---> Using cache\n"}"#,
            r#"{"stream":" ---> 3f3f3f3f3f3f\n"}"#,
            r#"{"stream":"Step 4/4 : RUN exit 1"}"#,
            r#"{"stream":"\n"}"#,
            r#"{"stream":" ---> 4a4a4a4a4a4a\n"}"#,
        ] {
            let v: serde_json::Value = serde_json::from_str(m).expect("json");
            tracker.message(&v, &sink);
        }
        assert_eq!(tracker.running_from(), None);
        // The COPY came from the cache: its image is someone else's.
        assert_eq!(tracker.step_images(), vec!["4a4a4a4a4a4a", "2e4e8dd3838e"]);
    }

    #[tokio::test]
    async fn a_context_is_sent_whole_in_chunks() {
        use futures_util::TryStreamExt;
        let path = std::env::temp_dir().join(format!("core-ctx-{}", std::process::id()));
        let data: Vec<u8> = (0..CONTEXT_CHUNK * 2 + 7).map(|i| i as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let file = tokio::fs::File::open(&path).await.expect("open");
        let chunks: Vec<Vec<u8>> = context_chunks(file).try_collect().await.expect("read");
        let _ = std::fs::remove_file(&path);
        assert!(chunks
            .iter()
            .all(|c| !c.is_empty() && c.len() <= CONTEXT_CHUNK));
        assert_eq!(chunks.concat(), data);
    }

    #[tokio::test]
    async fn the_built_image_is_the_one_the_engine_named_else_the_tag() {
        let backend = crate::InMemoryBackend::new().with_image("t:1", &[]);
        let mut tracker = StepTracker::default();
        assert!(tracker.built_image(&backend, "t:1").await.is_ok());
        tracker.out.image_id = Some("sha256:gone".into());
        match tracker.built_image(&backend, "t:1").await {
            Err(Error::Backend { backend, .. }) => assert_eq!(backend, "memory"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_from_being_run_is_known() {
        let mut tracker = StepTracker::default();
        let sink = |_: BuildEvent| {};
        tracker.message(
            &serde_json::json!({"stream": "STEP 1/2: FROM --platform=x a:1 AS b\n"}),
            &sink,
        );
        assert_eq!(tracker.running_from().as_deref(), Some("a:1"));
        assert_eq!(
            from_image("FROM --platform=x a:1 AS b").as_deref(),
            Some("a:1")
        );
        assert_eq!(from_image("RUN x"), None);
    }

    #[test]
    fn docker_failures_are_classified() {
        assert!(matches!(
            build_failure("pull access denied for x, repository does not exist", Some("x:1")),
            Error::NotFound { what } if what.contains("x:1")
        ));
        // Docker pulls a missing base: any failure of that pull is the base's absence.
        let unreachable = "Get \"https://colima-e2b.invalid/v2/\": dial tcp: lookup \
            colima-e2b.invalid on 10.255.255.53:53: no such host";
        assert!(matches!(
            build_failure(unreachable, Some("colima-e2b.invalid/no-such-base:never")),
            Error::NotFound { what } if what.contains("no-such-base")
        ));
        assert!(matches!(
            build_failure("No such image: a:1", None),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            build_failure("invalid reference format", Some("X")),
            Error::BuildFailed(_)
        ));
        assert!(matches!(
            build_failure(
                "invalid reference format: repository name must be lowercase",
                Some("X")
            ),
            Error::BuildFailed(_)
        ));
        assert!(matches!(
            build_failure(
                "The command '/bin/sh -c exit 3' returned a non-zero code: 3",
                None
            ),
            Error::BuildFailed(m) if m.contains("non-zero code: 3")
        ));
        assert!(is_build_context_problem(
            500,
            "Cannot locate specified Dockerfile: nope"
        ));
        assert!(is_build_context_problem(400, "anything"));
        assert!(!is_build_context_problem(500, "no space left on device"));
    }

    #[test]
    fn podman_failures_are_classified() {
        let missing =
            "creating build container: colima-e2b.invalid/no-such-base:never: image not known";
        assert!(matches!(
            build_failure(missing, Some("colima-e2b.invalid/no-such-base:never")),
            Error::NotFound { what } if what.contains("no-such-base")
        ));
        assert!(matches!(
            build_failure(
                "building at STEP \"RUN exit 3\": while running runtime: exit status 3",
                None
            ),
            Error::BuildFailed(m) if m.contains("exit status 3")
        ));
        assert!(matches!(
            build_failure(
                "creating build container: invalid reference format",
                Some("X")
            ),
            Error::BuildFailed(_)
        ));
        assert!(matches!(
            build_failure(
                "creating build container: repository name must be lowercase",
                Some("Bad:Ref")
            ),
            Error::BuildFailed(_)
        ));
        // libpod never pulls: a FROM that fails otherwise is the engine's failure.
        assert!(matches!(
            build_failure(
                "creating build container: no space left on device",
                Some("a:1")
            ),
            Error::BuildFailed(_)
        ));
        assert!(is_build_context_problem(500, "unexpected EOF"));
        assert!(is_build_context_problem(
            500,
            "stat /var/tmp/libpod_builder/Containerfile: no such file or directory"
        ));
        assert!(!is_build_context_problem(500, "no space left on device"));
    }
}
