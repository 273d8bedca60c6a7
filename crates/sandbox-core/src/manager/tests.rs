//! Manager unit tests over an in-memory backend (the engine suites use real engines).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::agent::AgentBinary;
use crate::backend::{
    AgentAddress, Capabilities, ContainerInfo, ContainerSpec, DeriveImage, EngineInfo,
};
use crate::error::{Error, Result};
use crate::labels;
use crate::manager::{ManagerConfig, SandboxManager};
use crate::template::Template;
use crate::types::{Lifecycle, OnTimeout, SandboxId, SandboxInfo, SandboxSpec, SandboxState};
use crate::InMemoryBackend;
use crate::SandboxBackend;

/// The in-memory backend with the faults and records these tests need.
#[derive(Debug)]
struct TestEngine {
    inner: InMemoryBackend,
    fail_start: AtomicBool,
    create_delay_ms: AtomicUsize,
    creates: AtomicUsize,
    derived: Mutex<Vec<DeriveImage>>,
    specs: Mutex<Vec<ContainerSpec>>,
}

impl Default for TestEngine {
    fn default() -> Self {
        Self {
            inner: InMemoryBackend::new().with_image("img/base", &["sleep"]),
            fail_start: AtomicBool::new(false),
            create_delay_ms: AtomicUsize::new(0),
            creates: AtomicUsize::new(0),
            derived: Mutex::default(),
            specs: Mutex::default(),
        }
    }
}

impl std::fmt::Display for TestEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("memory (test)")
    }
}

impl TestEngine {
    fn names(&self) -> Vec<String> {
        self.inner
            .containers()
            .into_iter()
            .map(|c| c.name)
            .collect()
    }
    fn insert(&self, info: ContainerInfo) {
        self.inner.insert(info);
    }
    fn set_agent(&self, addr: SocketAddr) {
        self.inner.set_agent_address(Some(addr));
    }
}

#[async_trait]
impl SandboxBackend for TestEngine {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn check(&self) -> Result<EngineInfo> {
        // A small host: 2 CPUs, 4 GiB.
        Ok(EngineInfo {
            cpus: Some(2),
            memory_bytes: Some(4 << 30),
            ..self.inner.check().await?
        })
    }
    async fn image_info(&self, image: &str) -> Result<Option<crate::backend::ImageInfo>> {
        self.inner.image_info(image).await
    }
    async fn ensure_image(&self, image: &str) -> Result<crate::backend::ImageInfo> {
        self.inner.ensure_image(image).await
    }
    async fn derive_image(&self, req: &DeriveImage) -> Result<()> {
        self.derived.lock().expect("lock").push(req.clone());
        self.inner.derive_image(req).await
    }
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerInfo> {
        self.creates.fetch_add(1, Ordering::SeqCst);
        self.specs.lock().expect("lock").push(spec.clone());
        let delay = self.create_delay_ms.load(Ordering::SeqCst) as u64;
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let created = self.inner.create(spec).await?;
        if self.fail_start.load(Ordering::SeqCst) {
            // Like an engine whose start fails after the container came to exist.
            return Err(Error::backend("memory", "start failed"));
        }
        Ok(created)
    }
    async fn inspect(&self, name: &str) -> Result<ContainerInfo> {
        self.inner.inspect(name).await
    }
    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>> {
        self.inner.list(labels).await
    }
    async fn pause(&self, name: &str) -> Result<()> {
        self.inner.pause(name).await
    }
    async fn resume(&self, name: &str) -> Result<()> {
        self.inner.resume(name).await
    }
    async fn remove(&self, name: &str) -> Result<()> {
        self.inner.remove(name).await
    }
    async fn stop(&self, name: &str) -> Result<()> {
        self.inner.stop(name).await
    }
    async fn start(&self, name: &str) -> Result<ContainerInfo> {
        self.inner.start(name).await
    }
    async fn snapshot(
        &self,
        name: &str,
        image: &str,
        labels: &BTreeMap<String, String>,
        running: bool,
    ) -> Result<crate::backend::ImageInfo> {
        self.inner.snapshot(name, image, labels, running).await
    }
    async fn agent_address(&self, name: &str, port: u16) -> Result<AgentAddress> {
        self.inner.agent_address(name, port).await
    }
}

/// What the stand-in agent saw: (request line, X-Access-Token, body) per request.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A stand-in agent: answers every HTTP/1.1 request with 204 and records it.
async fn fake_agent() -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut len, mut token) = (0usize, String::new());
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            match k.to_ascii_lowercase().as_str() {
                                "content-length" => len = v.trim().parse().unwrap_or(0),
                                "x-access-token" => token = v.trim().to_string(),
                                _ => {}
                            }
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    log.lock().expect("lock").push((
                        line.trim_end().to_string(),
                        token,
                        String::from_utf8_lossy(&body).into_owned(),
                    ));
                    if w.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn agent_config() -> ManagerConfig {
    ManagerConfig {
        agent: Some(AgentBinary::from_bytes(b"\x7fELF fake agent".to_vec())),
        agent_ready_timeout: Duration::from_millis(300),
        ..config(None)
    }
}

fn config(state_dir: Option<std::path::PathBuf>) -> ManagerConfig {
    let mut templates = BTreeMap::new();
    templates.insert("base".to_string(), Template::new("img/base"));
    ManagerConfig {
        templates,
        max_concurrent_creates: 2,
        max_sandboxes: 5,
        state_dir,
        ..ManagerConfig::default()
    }
}

fn manager(state_dir: Option<std::path::PathBuf>) -> (Arc<TestEngine>, SandboxManager) {
    let backend = Arc::new(TestEngine::default());
    let m = SandboxManager::new(backend.clone(), config(state_dir));
    (backend, m)
}

fn spec(secs: u64) -> SandboxSpec {
    SandboxSpec::new("base", Duration::from_secs(secs))
}

#[tokio::test]
async fn create_get_list_kill_round_trip() {
    let (backend, m) = manager(None);
    let mut s = spec(60);
    s.metadata.insert("purpose".into(), "test".into());
    let info = m.create(s).await.expect("create");
    assert_eq!(info.state, SandboxState::Running);
    assert_eq!(backend.names(), vec![labels::container_name(&info.id)]);
    assert_eq!(m.get(&info.id).await.expect("get").id, info.id);

    let mut filter = BTreeMap::new();
    filter.insert("purpose".to_string(), "test".to_string());
    assert_eq!(m.list(&filter).len(), 1);
    filter.insert("purpose".to_string(), "other".to_string());
    assert!(m.list(&filter).is_empty());

    m.kill(&info.id).await.expect("kill");
    // Killed at once, deleted in the background.
    for _ in 0..100 {
        if backend.names().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(backend.names().is_empty());
    assert!(matches!(m.get(&info.id).await, Err(Error::NotFound { .. })));
    assert!(matches!(
        m.kill(&info.id).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn unknown_template_and_bad_timeout_are_invalid() {
    let (backend, m) = manager(None);
    let err = m
        .create(SandboxSpec::new("nope", Duration::from_secs(5)))
        .await
        .expect_err("unknown template");
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(
        err.to_string().contains("base"),
        "error lists known templates"
    );
    assert!(matches!(
        m.create(spec(0)).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        m.create(spec(10 * 24 * 3600)).await,
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(backend.creates.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn failed_create_leaves_nothing_behind() {
    let (backend, m) = manager(None);
    backend.fail_start.store(true, Ordering::SeqCst);
    assert!(m.create(spec(60)).await.is_err());
    assert!(backend.names().is_empty(), "half-created container left");
    assert!(m.list(&BTreeMap::new()).is_empty());
}

#[tokio::test]
async fn creates_beyond_the_concurrency_limit_wait_in_a_bounded_queue() {
    let backend = Arc::new(TestEngine::default());
    let m = SandboxManager::new(
        backend.clone(),
        ManagerConfig {
            max_queued_creates: 1,
            ..config(None)
        },
    );
    backend.create_delay_ms.store(300, Ordering::SeqCst);
    // Two run, one waits for a turn and gets it, one finds the queue full.
    let results = futures_util::future::join_all((0..4).map(|_| m.create(spec(60)))).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(Error::ResourceExhausted {
                    retry_after: Some(_),
                    ..
                })
            )
        })
        .count();
    assert_eq!((ok, refused), (3, 1));
    assert_eq!(backend.names().len(), 3);
}

#[tokio::test]
async fn a_create_that_waits_too_long_for_its_turn_is_refused() {
    let backend = Arc::new(TestEngine::default());
    let m = SandboxManager::new(
        backend.clone(),
        ManagerConfig {
            create_queue_wait: Duration::from_millis(50),
            ..config(None)
        },
    );
    backend.create_delay_ms.store(500, Ordering::SeqCst);
    let results = futures_util::future::join_all((0..3).map(|_| m.create(spec(60)))).await;
    let refused: Vec<&Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 1, "{results:?}");
    assert!(
        matches!(refused[0], Error::ResourceExhausted { message, .. } if message.contains("create_queue_wait")),
        "{refused:?}"
    );
    assert_eq!(backend.names().len(), 2);
}

#[tokio::test]
async fn sandbox_count_limit_is_enforced() {
    let (_backend, m) = manager(None);
    for _ in 0..5 {
        m.create(spec(60)).await.expect("create");
    }
    assert!(matches!(
        m.create(spec(60)).await,
        Err(Error::ResourceExhausted { .. })
    ));
}

#[tokio::test]
async fn reaper_removes_an_expired_sandbox() {
    let (backend, m) = manager(None);
    m.start().await.expect("start");
    let info = m.create(spec(1)).await.expect("create");
    let keep = m.create(spec(600)).await.expect("create");
    // Bounded wait for the behaviour, not a timing assertion.
    for _ in 0..100 {
        if m.list(&BTreeMap::new()).len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = m.list(&BTreeMap::new());
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, keep.id);
    assert_eq!(backend.names(), vec![labels::container_name(&keep.id)]);
    assert!(matches!(m.get(&info.id).await, Err(Error::NotFound { .. })));
}

#[tokio::test]
async fn set_timeout_can_shorten_and_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("colima-e2b-test-{}", SandboxId::generate()));
    let (backend, m) = manager(Some(dir.clone()));
    let info = m.create(spec(600)).await.expect("create");
    let updated = m
        .set_timeout(&info.id, Duration::from_secs(3000))
        .expect("set timeout");
    assert!(updated.expires_at > info.expires_at);
    drop(m);

    // A new manager over the same engine and state dir keeps the updated deadline.
    let m2 = SandboxManager::new(backend.clone(), config(Some(dir.clone())));
    let report = m2.start().await.expect("start");
    assert_eq!(report.adopted, 1);
    let adopted = m2.get(&info.id).await.expect("adopted");
    assert_eq!(
        adopted.expires_at.unix_timestamp(),
        updated.expires_at.unix_timestamp()
    );
    assert!(matches!(
        m2.set_timeout(&info.id, Duration::ZERO),
        Err(Error::InvalidArgument(_))
    ));
    let _ = std::fs::remove_dir_all(dir);
}

fn foreign_container(owner: &str, state: SandboxState, expires_in: i64) -> ContainerInfo {
    let now = OffsetDateTime::now_utc();
    let info = SandboxInfo {
        id: SandboxId::generate(),
        template: "base".into(),
        image: "img/base".into(),
        state,
        metadata: BTreeMap::new(),
        started_at: now,
        expires_at: now + time::Duration::seconds(expires_in),
        limits: Default::default(),
        internet: true,
        secure: false,
        volume_mounts: Vec::new(),
    };
    ContainerInfo {
        id: info.id.to_string(),
        name: labels::container_name(&info.id),
        image: "img/base".into(),
        labels: labels::for_sandbox(owner, &info),
        state,
        created_at: None,
        limits: None,
        env: Vec::new(),
    }
}

#[tokio::test]
async fn restart_adopts_live_and_removes_expired_and_half_created() {
    let (backend, m) = manager(None);
    let live = foreign_container("default", SandboxState::Running, 600);
    let paused = foreign_container("default", SandboxState::Paused, 600);
    let expired = foreign_container("default", SandboxState::Running, -5);
    let half = foreign_container("default", SandboxState::Created, 600);
    let other_owner = foreign_container("someone-else", SandboxState::Running, -5);
    let mut broken = foreign_container("default", SandboxState::Running, 600);
    broken.labels.remove(labels::SANDBOX_ID);
    for c in [&live, &paused, &expired, &half, &other_owner, &broken] {
        backend.insert(c.clone());
    }
    let report = m.start().await.expect("start");
    assert_eq!((report.adopted, report.expired, report.broken), (2, 1, 2));
    let mut names = backend.names();
    names.sort();
    let mut want = vec![live.name, paused.name, other_owner.name];
    want.sort();
    assert_eq!(
        names, want,
        "only live sandboxes and other owners' containers remain"
    );
}

#[tokio::test]
async fn pause_and_resume_track_state_and_conflicts() {
    let (_backend, m) = manager(None);
    let info = m.create(spec(60)).await.expect("create");
    assert!(matches!(
        m.resume(&info.id, None, false).await,
        Err(Error::Conflict(_))
    ));
    let paused = m.pause(&info.id, true).await.expect("pause");
    assert_eq!(paused.state, SandboxState::Paused);
    // A paused sandbox's deadline is the paused retention, not its timeout.
    let retention = ManagerConfig::default().paused_retention;
    assert!(paused.expires_at > OffsetDateTime::now_utc() + retention - Duration::from_secs(60));
    assert!(matches!(
        m.pause(&info.id, true).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        m.pause(&info.id, false).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        m.get(&info.id).await.expect("get").state,
        SandboxState::Paused
    );
    assert_eq!(m.paused_with_memory(&info.id), Some(true));
    let resumed = m
        .resume(&info.id, Some(Duration::from_secs(30)), false)
        .await
        .expect("resume");
    assert_eq!(resumed.state, SandboxState::Running);
    let left = resumed.expires_at - OffsetDateTime::now_utc();
    assert!(left <= time::Duration::seconds(30) && left > time::Duration::seconds(20));
    assert_eq!(m.paused_with_memory(&info.id), None);
}

#[tokio::test]
async fn a_filesystem_pause_stops_the_container_and_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("colima-e2b-test-{}", SandboxId::generate()));
    let (backend, m) = manager(Some(dir.clone()));
    let info = m.create(spec(60)).await.expect("create");
    let name = labels::container_name(&info.id);
    m.pause(&info.id, false).await.expect("pause");
    assert_eq!(
        backend.inspect(&name).await.expect("inspect").state,
        SandboxState::Exited,
        "the container is stopped: its memory is freed"
    );
    assert_eq!(
        m.get(&info.id).await.expect("get").state,
        SandboxState::Paused
    );
    assert_eq!(m.paused_with_memory(&info.id), Some(false));

    // A new server over the same engine and state: the stopped container is a paused
    // sandbox, not a dead one.
    let m2 = SandboxManager::new(backend.clone(), config(Some(dir.clone())));
    let report = m2.start().await.expect("start");
    assert_eq!((report.adopted, report.broken), (1, 0));
    assert_eq!(
        m2.info(&info.id).expect("adopted").state,
        SandboxState::Paused
    );
    assert_eq!(m2.paused_with_memory(&info.id), Some(false));
    // Resuming with no timeout gives it its create's timeout again.
    let resumed = m2.resume(&info.id, None, false).await.expect("resume");
    assert_eq!(resumed.state, SandboxState::Running);
    assert_eq!(
        backend.inspect(&name).await.expect("inspect").state,
        SandboxState::Running
    );
    let left = resumed.expires_at - OffsetDateTime::now_utc();
    assert!(left <= time::Duration::seconds(60) && left > time::Duration::seconds(50));

    // A stopped container without a pause record is still a dead one.
    m2.pause(&info.id, false).await.expect("pause again");
    std::fs::remove_dir_all(dir.join("lifecycle")).expect("drop the records");
    let m3 = SandboxManager::new(backend.clone(), config(Some(dir.clone())));
    let report = m3.start().await.expect("start");
    assert_eq!((report.adopted, report.broken), (0, 1));
    assert!(backend.names().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn on_timeout_pause_pauses_at_the_deadline_and_auto_resume_wakes_it() {
    let (backend, m) = manager(None);
    let mut s = spec(1);
    s.lifecycle = Lifecycle {
        on_timeout: OnTimeout::Pause,
        keep_memory: true,
        auto_resume: true,
    };
    let info = m.create(s).await.expect("create");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(m.reap_expired().await, 0, "nothing is removed");
    let now = m.info(&info.id).expect("still there");
    assert_eq!(now.state, SandboxState::Paused);
    assert_eq!(
        backend
            .inspect(&labels::container_name(&info.id))
            .await
            .expect("inspect")
            .state,
        SandboxState::Paused,
        "frozen, with its memory"
    );
    // A request into it resumes it first (this server runs no agent, so the request
    // itself then fails, after the wake).
    let _ = m.agent(&info.id).await;
    let woke = m.info(&info.id).expect("still there");
    assert_eq!(woke.state, SandboxState::Running);
    assert!(woke.expires_at > OffsetDateTime::now_utc());

    // Without auto-resume a request finds it paused.
    let mut s = spec(1);
    s.lifecycle.on_timeout = OnTimeout::Pause;
    s.lifecycle.keep_memory = false;
    let plain = m.create(s).await.expect("create");
    m.pause(&plain.id, false).await.expect("pause");
    assert!(matches!(m.agent(&plain.id).await, Err(Error::Conflict(_))));
    assert_eq!(
        m.info(&plain.id).expect("there").state,
        SandboxState::Paused
    );
}

#[tokio::test]
async fn a_paused_sandbox_is_removed_after_the_retention_and_bad_lifecycles_are_refused() {
    let backend = Arc::new(TestEngine::default());
    let m = SandboxManager::new(
        backend.clone(),
        ManagerConfig {
            paused_retention: Duration::from_secs(1),
            ..config(None)
        },
    );
    let info = m.create(spec(60)).await.expect("create");
    m.pause(&info.id, false).await.expect("pause");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(m.reap_expired().await, 1);
    assert!(m.info(&info.id).is_err());

    for lifecycle in [
        Lifecycle {
            auto_resume: true,
            ..Lifecycle::default()
        },
        Lifecycle {
            on_timeout: OnTimeout::Pause,
            keep_memory: false,
            auto_resume: true,
        },
    ] {
        let mut s = spec(60);
        s.lifecycle = lifecycle;
        assert!(matches!(m.create(s).await, Err(Error::InvalidArgument(_))));
    }
}

#[tokio::test]
async fn bad_envs_metadata_and_users_are_rejected_before_the_engine() {
    let (backend, m) = manager(None);
    let mut s = spec(60);
    s.envs.insert("BAD-NAME".into(), "x".into());
    assert!(matches!(m.create(s).await, Err(Error::InvalidArgument(_))));
    let mut s = spec(60);
    s.envs
        .insert("COLIMA_E2B_AGENT_SECRET".into(), "mine".into());
    assert!(matches!(m.create(s).await, Err(Error::InvalidArgument(_))));
    let mut s = spec(60);
    s.user = Some("root;rm".into());
    assert!(matches!(m.create(s).await, Err(Error::InvalidArgument(_))));
    let mut s = spec(60);
    s.metadata.insert("k".into(), "\u{0}".into());
    assert!(matches!(m.create(s).await, Err(Error::InvalidArgument(_))));
    assert_eq!(backend.creates.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn agent_sandboxes_run_a_derived_image_and_get_their_secret_and_envs_through_init() {
    let backend = Arc::new(TestEngine::default());
    let (addr, seen) = fake_agent().await;
    backend.set_agent(addr);
    let m = SandboxManager::new(backend.clone(), agent_config());
    let mut s = spec(60);
    s.envs.insert("GREETING".into(), "hi".into());
    let a = m.create(s.clone()).await.expect("create");
    m.create(s).await.expect("second create");

    let derived = backend.derived.lock().expect("lock").clone();
    assert_eq!(derived.len(), 1, "the template is derived once and reused");
    assert_eq!(derived[0].base, "img/base");
    assert_eq!(
        derived[0].entrypoint,
        vec![crate::agent::AGENT_PATH.to_string()]
    );
    assert_eq!(derived[0].files[0].mode, 0o755);
    let spec0 = backend.specs.lock().expect("lock")[0].clone();
    assert_eq!(spec0.image, derived[0].tag);
    assert!(
        spec0.command.is_empty(),
        "the image's entrypoint (the agent) runs"
    );
    assert_eq!(spec0.agent_port, Some(crate::agent::AGENT_PORT));
    let secret = spec0
        .env
        .iter()
        .find_map(|e| e.strip_prefix("COLIMA_E2B_AGENT_SECRET="))
        .expect("secret in the container env")
        .to_string();
    assert_eq!(secret.len(), 32);

    let requests = seen.lock().expect("lock").clone();
    let init = requests
        .iter()
        .find(|(line, _, _)| line.starts_with("POST /init"))
        .expect("init was sent");
    let body: serde_json::Value = serde_json::from_str(&init.2).expect("json");
    assert_eq!(body["envVars"]["GREETING"], "hi");
    assert_eq!(body["accessToken"], secret.as_str());
    assert_eq!(body["defaultUser"], "user");
    assert!(
        body["defaultWorkdir"].is_null(),
        "without a template workdir the agent starts in the user's home: {body}"
    );

    // A restarted server rebuilds the client from the container's env.
    let m2 = SandboxManager::new(backend.clone(), agent_config());
    m2.start().await.expect("start");
    m2.agent(&a.id)
        .await
        .expect("agent after restart")
        .list()
        .await
        .expect("list");
    // The metrics sampler also calls the agent in the background, so the
    // list is found by its line rather than by being the last request.
    let list = seen
        .lock()
        .expect("lock")
        .iter()
        .rev()
        .find(|(line, _, _)| line.starts_with("POST /process.Process/List"))
        .cloned()
        .expect("the list reached the agent");
    assert_eq!(
        list.1, secret,
        "the recovered client sends the sandbox's secret"
    );
}

#[tokio::test]
async fn create_times_out_and_leaves_nothing_when_the_agent_never_answers() {
    let backend = Arc::new(TestEngine::default());
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    backend.set_agent(closed);
    let m = SandboxManager::new(backend.clone(), agent_config());
    let err = m.create(spec(60)).await.expect_err("no agent answers");
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert!(
        backend.names().is_empty(),
        "left behind: {:?}",
        backend.names()
    );
    assert!(m.list(&BTreeMap::new()).is_empty());
}

#[tokio::test]
async fn agent_of_an_unknown_sandbox_is_not_found() {
    let (_backend, m) = manager(None);
    let id: SandboxId = "clmnosuch".parse().expect("id");
    assert!(matches!(m.agent(&id).await, Err(Error::NotFound { .. })));
}

#[tokio::test]
async fn creates_in_flight_count_against_the_sandbox_limit() {
    let backend = Arc::new(TestEngine::default());
    backend.create_delay_ms.store(200, Ordering::SeqCst);
    let m = SandboxManager::new(
        backend.clone(),
        ManagerConfig {
            max_concurrent_creates: 10,
            max_sandboxes: 3,
            ..config(None)
        },
    );
    let results = futures_util::future::join_all((0..6).map(|_| m.create(spec(60)))).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 3, "{results:?}");
    assert_eq!(backend.names().len(), 3);
    assert_eq!(m.list(&BTreeMap::new()).len(), 3);
    // Once one is gone, there is room again.
    let first = results
        .iter()
        .find_map(|r| r.as_ref().ok())
        .expect("one ok");
    m.kill(&first.id).await.expect("kill");
    m.create(spec(60)).await.expect("room again");
}

#[tokio::test]
async fn asking_for_more_than_the_engine_host_has_is_invalid_and_names_the_limit() {
    let (backend, m) = manager(None);
    m.start().await.expect("start");
    for (cpus, memory_mb, names) in [
        (Some(64.0), None, "max_cpus"),
        (None, Some(100_000), "max_memory_mb"),
    ] {
        let mut s = spec(60);
        s.cpus = cpus;
        s.memory_mb = memory_mb;
        match m.create(s).await {
            Err(Error::InvalidArgument(why)) => assert!(why.contains(names), "{why}"),
            other => panic!("{cpus:?}/{memory_mb:?} gave {other:?}"),
        }
    }
    let mut s = spec(60);
    s.cpus = Some(2.0);
    s.memory_mb = Some(4096);
    m.create(s).await.expect("exactly what the host has");
    assert_eq!(backend.creates.load(Ordering::SeqCst), 1);
    let limited = SandboxManager::new(
        backend.clone(),
        ManagerConfig {
            max_cpus: Some(1.0),
            ..config(None)
        },
    );
    limited.start().await.expect("start");
    let mut s = spec(60);
    s.cpus = Some(1.5);
    assert!(matches!(
        limited.create(s).await,
        Err(Error::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn a_create_that_never_finished_is_removed_at_restart() {
    let dir = std::env::temp_dir().join(format!("colima-e2b-test-{}", SandboxId::generate()));
    let (backend, m) = manager(Some(dir.clone()));
    let done = m.create(spec(600)).await.expect("a finished create");
    // A create the server was killed in the middle of: noted, its container made.
    let cut = foreign_container("default", SandboxState::Running, 600);
    let cut_id: SandboxId = cut.labels[labels::SANDBOX_ID].parse().expect("id");
    m.inner.journal.begin(&cut_id).expect("note");
    backend.insert(cut.clone());
    drop(m);

    let m2 = SandboxManager::new(backend.clone(), config(Some(dir.clone())));
    let report = m2.start().await.expect("start");
    assert_eq!((report.adopted, report.unfinished), (1, 1), "{report:?}");
    assert_eq!(backend.names(), vec![labels::container_name(&done.id)]);
    assert!(matches!(m2.info(&cut_id), Err(Error::NotFound { .. })));
    // The engine finishes the create it was asked for before the crash only now.
    backend.insert(cut.clone());
    m2.sweep_unfinished().await;
    assert_eq!(backend.names(), vec![labels::container_name(&done.id)]);
    // Another restart adopts the finished sandbox only.
    let m3 = SandboxManager::new(backend.clone(), config(Some(dir.clone())));
    assert_eq!(m3.start().await.expect("start").unfinished, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn snapshots_start_sandboxes_and_a_fork_capture_goes_with_its_last_sandbox() {
    let (backend, m) = manager(None);
    let source = m.create(spec(60)).await.expect("create");
    let snap = m
        .snapshot(&source.id, Some("my-snap"))
        .await
        .expect("snapshot");
    assert_eq!(snap.snapshot_of.as_deref(), Some(source.id.as_str()));
    assert_eq!(m.snapshots(Some(source.id.as_str())).len(), 1);
    assert!(m.snapshots(Some("other")).is_empty());
    // Again under the same name: the same snapshot, a new capture.
    let again = m
        .snapshot(&source.id, Some("my-snap"))
        .await
        .expect("again");
    assert_eq!(again.id, snap.id);
    assert_eq!(again.builds.len(), 2);
    let from = m
        .create(SandboxSpec::new("my-snap", Duration::from_secs(60)))
        .await
        .expect("create from the snapshot");
    assert!(
        from.image.starts_with("colima-e2b-template/"),
        "{}",
        from.image
    );
    assert!(matches!(
        m.remove_template(&snap.id).await,
        Err(Error::Conflict(_))
    ));

    let forks = m
        .fork(&source.id, 3, Duration::from_secs(30))
        .await
        .expect("fork");
    assert_eq!(forks.len(), 3);
    let forks: Vec<SandboxInfo> = forks.into_iter().map(|f| f.expect("a fork")).collect();
    let capture = forks[0].template.clone();
    assert!(forks.iter().all(|f| f.template == capture));
    assert!(
        m.snapshots(None).iter().all(|s| s.id != capture),
        "a fork's capture is not listed as a snapshot"
    );
    assert!(matches!(
        m.fork(&source.id, 0, Duration::from_secs(30)).await,
        Err(Error::InvalidArgument(_))
    ));
    for f in &forks {
        m.kill(&f.id).await.expect("kill a fork");
    }
    let mut gone = false;
    for _ in 0..200 {
        if m.templates().find(&capture).is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the fork's capture outlived its sandboxes");
    m.kill(&from.id).await.expect("kill");
    m.remove_template(&snap.id)
        .await
        .expect("remove the snapshot");
    assert!(m.snapshots(None).is_empty());
    let _ = backend;
}
