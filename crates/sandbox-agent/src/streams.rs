//! The streaming RPCs (Start, Connect, StreamInput, WatchDir) and the pumps that feed
//! them.
//!
//! Slow clients: each stream's pump hands frames to its response through a queue of two
//! and waits at most the stall timeout for room; a client that takes nothing for that
//! long is dropped, its stream ended with `deadline_exceeded` ("the reader stalled")
//! ahead of anything still queued, which it gets if it ever reads again. Output never
//! waits for a reader: a command's output goes to its buffer, each reader has a cursor.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Response;
use rustix::process::Signal;

use crate::connect::{self, AgentBody, SendError, StreamSender, MAX_MESSAGE};
use crate::output::{Next, Reader};
use crate::process::{self, Proc, SpawnSpec};
use crate::rpc::new_watcher;
use crate::server::{Agent, StreamGuard, MAX_KEEPALIVE};
use crate::users::User;
use envd_proto::codec;
use envd_proto::messages::*;
use envd_proto::{Code, EnvdError};

/// Start: spawns the command and streams its events.
pub(crate) async fn start(
    agent: &Arc<Agent>,
    user: User,
    body: Incoming,
    timeout: Option<Duration>,
    keepalive: Option<Duration>,
) -> Result<Response<AgentBody>, EnvdError> {
    let r: StartRequest = connect::read_stream_request(body).await?;
    if r.process.cmd.is_empty() || r.process.cmd.contains('\0') {
        return Err(EnvdError::new(
            Code::InvalidArgument,
            "cmd is empty or contains NUL",
        ));
    }
    if r.process.args.iter().any(|a| a.contains('\0')) {
        return Err(EnvdError::new(
            Code::InvalidArgument,
            "argument contains NUL",
        ));
    }
    let init = agent.init_state();
    let cwd = process::resolve_cwd(
        &user,
        r.process.cwd.as_deref(),
        init.default_workdir.as_deref(),
    )?;
    let mut base_env = agent.base_env.clone();
    base_env.extend(init.envs.iter().map(|(k, v)| (k.into(), v.into())));
    let pty = r.pty.as_ref().map(|p| {
        let s = p.size.unwrap_or(PtySize { cols: 80, rows: 24 });
        (
            u16::try_from(s.cols).unwrap_or(u16::MAX),
            u16::try_from(s.rows).unwrap_or(u16::MAX),
        )
    });
    let deadline = timeout.map(|t| Instant::now() + t);
    let spec = SpawnSpec {
        config: r.process,
        user,
        cwd,
        base_env,
        pty,
        stdin: r.stdin.unwrap_or(true),
        tag: r.tag,
        deadline,
    };
    let (proc, reader) = agent.procs.start(spec).await?;
    Ok(spawn_pump(agent, proc, reader, keepalive, deadline, true))
}

/// Connect: streams an existing command's events from what is still buffered.
pub(crate) async fn connect_proc(
    agent: &Arc<Agent>,
    body: Incoming,
    timeout: Option<Duration>,
    keepalive: Option<Duration>,
) -> Result<Response<AgentBody>, EnvdError> {
    let r: SelectRequest = connect::read_stream_request(body).await?;
    let proc = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
    let reader = proc.reader(true);
    let dropped = proc.output.dropped();
    let mut resp = spawn_pump(
        agent,
        proc,
        reader,
        keepalive,
        timeout.map(|t| Instant::now() + t),
        false,
    );
    if let Ok(v) = dropped.to_string().parse() {
        // Output evicted from the bounded buffer before this client connected.
        resp.headers_mut().insert(envd_proto::DROPPED_HEADER, v);
    }
    Ok(resp)
}

fn spawn_pump(
    agent: &Arc<Agent>,
    proc: Arc<Proc>,
    reader: Reader,
    keepalive: Option<Duration>,
    deadline: Option<Instant>,
    is_start: bool,
) -> Response<AgentBody> {
    let (tx, resp) = connect::stream_channel(agent.cfg.stall_timeout);
    let guard = StreamGuard::new(agent);
    let a = agent.clone();
    tokio::spawn(async move {
        let _guard = guard;
        pump(&a, proc, reader, tx, keepalive, deadline, is_start).await;
    });
    resp
}

fn event_envelope(e: ProcessEvent) -> Bytes {
    codec::message_envelope(&ProcessEventMessage { event: e })
}

/// The end of a stream whose client stopped reading.
fn stalled(tx: StreamSender) {
    let err = EnvdError::new(
        Code::DeadlineExceeded,
        format!(
            "the reader stalled: it took nothing for {} ms, so the agent dropped it",
            tx.stall().as_millis()
        ),
    );
    crate::events::record("warn", &err.message, &[]);
    tx.abandon(codec::end_stream(Some(&err)));
}

/// The end of a stream whose reader fell behind what the agent keeps of the output.
/// `data_loss`, not `resource_exhausted`: the SDK reads that as a rate limit to retry.
fn fell_behind(agent: &Agent, missed: u64, spill_error: Option<&str>) -> EnvdError {
    let cfg = &agent.cfg;
    let ring = cfg.output_buffer_bytes;
    let kept = match (cfg.spill_bytes.min(cfg.spill_total_bytes), spill_error) {
        (0, _) => format!("the agent keeps {ring} bytes of a command's output"),
        (spill, None) => format!(
            "the agent keeps {ring} bytes of a command's output in memory and up to {spill} \
             bytes on disk"
        ),
        (_, Some(e)) => format!(
            "the agent keeps {ring} bytes of a command's output in memory; spilling to disk \
             stopped: {e}"
        ),
    };
    EnvdError::new(
        Code::DataLoss,
        format!(
            "the reader fell behind the command's output: {missed} bytes were dropped before \
             it read them ({kept}); Connect again to resume from what is still buffered"
        ),
    )
}

/// Sends one frame; on a stall the stream is abandoned. False when the stream is over.
async fn send_or_drop(tx: &mut Option<StreamSender>, b: Bytes) -> bool {
    let Some(s) = tx.as_ref() else {
        return false;
    };
    match s.send(b).await {
        Ok(()) => true,
        Err(SendError::Gone) => false,
        Err(SendError::Stalled) => {
            if let Some(s) = tx.take() {
                stalled(s);
            }
            false
        }
    }
}

/// Streams a command's events to one client until the end, a deadline, or disconnect.
/// The client reads from the shared ring at its own pace (see [`crate::output`]).
async fn pump(
    agent: &Arc<Agent>,
    proc: Arc<Proc>,
    mut reader: Reader,
    tx: StreamSender,
    keepalive: Option<Duration>,
    deadline: Option<Instant>,
    is_start: bool,
) {
    let mut tx = Some(tx);
    if !send_or_drop(
        &mut tx,
        event_envelope(ProcessEvent::Start { pid: proc.pid }),
    )
    .await
    {
        return;
    }
    let ka = keepalive.unwrap_or(MAX_KEEPALIVE);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + ka, ka);
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let stream_deadline = tokio::time::sleep_until(deadline.unwrap_or(far).into());
    tokio::pin!(stream_deadline);
    let mut deadline_fired = false;
    loop {
        let Some(sender) = tx.as_ref() else { return };
        tokio::select! {
            next = reader.next() => match next {
                Next::Frame(b) => {
                    if !send_or_drop(&mut tx, b).await { return; }
                }
                Next::End(end) => {
                    let err = (is_start && proc.timed_out.load(Ordering::SeqCst)).then(|| {
                        EnvdError::new(Code::DeadlineExceeded, "command timed out: deadline exceeded")
                    });
                    if send_or_drop(&mut tx, event_envelope(ProcessEvent::End(end))).await {
                        send_or_drop(&mut tx, codec::end_stream(err.as_ref())).await;
                    }
                    return;
                }
                Next::Behind { missed, spill_error } => {
                    let err = fell_behind(agent, missed, spill_error.as_deref());
                    send_or_drop(&mut tx, codec::end_stream(Some(&err))).await;
                    return;
                }
            },
            _ = ticker.tick(), if keepalive.is_some() => {
                if !send_or_drop(&mut tx, event_envelope(ProcessEvent::Keepalive {})).await { return; }
            }
            () = &mut stream_deadline, if deadline.is_some() && !deadline_fired => {
                deadline_fired = true;
                if is_start {
                    // The command's own timer kills it too; the end event follows.
                    proc.timed_out.store(true, Ordering::SeqCst);
                    let (procs, p) = (agent.procs.clone(), proc.clone());
                    tokio::spawn(async move { procs.signal(&p, Signal::KILL).await });
                } else {
                    let err = EnvdError::new(Code::DeadlineExceeded, "stream deadline exceeded");
                    send_or_drop(&mut tx, codec::end_stream(Some(&err))).await;
                    return;
                }
            }
            () = sender.closed() => return,
        }
    }
}

/// StreamInput: a client stream of start / data / keepalive envelopes.
pub(crate) async fn stream_input(
    agent: &Arc<Agent>,
    mut body: Incoming,
) -> Result<Response<AgentBody>, EnvdError> {
    let mut dec = codec::EnvelopeDecoder::new(MAX_MESSAGE);
    let mut target: Option<Arc<Proc>> = None;
    'outer: while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| EnvdError::new(Code::Canceled, format!("reading request: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        dec.push(&data);
        while let Some(envelope) = dec.next_envelope()? {
            if envelope.is_end() {
                break 'outer;
            }
            let m: StreamInputRequest = connect::parse_json(&envelope.payload)?;
            match m.event {
                StreamInputEvent::Start { process } => {
                    target = Some(agent.procs.find(process.pid, process.tag.as_deref())?);
                }
                StreamInputEvent::Data { input } => {
                    let Some(p) = &target else {
                        return Err(EnvdError::new(
                            Code::FailedPrecondition,
                            "data before start",
                        ));
                    };
                    match &input {
                        ProcessInput::Stdin(b) => p.write_input(false, b).await?,
                        ProcessInput::Pty(b) => p.write_input(true, b).await?,
                    }
                }
                StreamInputEvent::Keepalive {} => {}
            }
        }
    }
    let mut body = codec::message_envelope(&serde_json::json!({})).to_vec();
    body.extend_from_slice(&codec::end_stream(None));
    let mut r = Response::new(AgentBody::full(body));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(envd_proto::STREAM_CONTENT_TYPE),
    );
    Ok(r)
}

/// WatchDir: streams a directory's events until the deadline or disconnect.
pub(crate) async fn watch_dir(
    agent: &Arc<Agent>,
    user: User,
    body: Incoming,
    timeout: Option<Duration>,
    keepalive: Option<Duration>,
) -> Result<Response<AgentBody>, EnvdError> {
    let r: WatchDirRequest = connect::read_stream_request(body).await?;
    let mut w = new_watcher(agent, &user, &r).await?;
    let (tx, resp) = connect::stream_channel(agent.cfg.stall_timeout);
    let guard = StreamGuard::new(agent);
    tokio::spawn(async move {
        let _guard = guard;
        let mut tx = Some(tx);
        let msg = |m: WatchDirResponse| codec::message_envelope(&m);
        if !send_or_drop(&mut tx, msg(WatchDirResponse::Start {})).await {
            return;
        }
        let ka = keepalive.unwrap_or(MAX_KEEPALIVE);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + ka, ka);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let dl =
            tokio::time::sleep_until(timeout.map(|t| Instant::now() + t).unwrap_or(far).into());
        tokio::pin!(dl);
        loop {
            let Some(sender) = tx.as_ref() else { return };
            tokio::select! {
                ev = w.next() => match ev {
                    Ok(batch) => {
                        for e in batch {
                            if !send_or_drop(&mut tx, msg(WatchDirResponse::Filesystem(Box::new(e)))).await { return; }
                        }
                    }
                    Err(e) => {
                        send_or_drop(&mut tx, codec::end_stream(Some(&e))).await;
                        return;
                    }
                },
                _ = ticker.tick(), if keepalive.is_some() => {
                    if !send_or_drop(&mut tx, msg(WatchDirResponse::Keepalive {})).await { return; }
                }
                () = &mut dl, if timeout.is_some() => {
                    let err = EnvdError::new(Code::DeadlineExceeded, "watch deadline exceeded");
                    send_or_drop(&mut tx, codec::end_stream(Some(&err))).await;
                    return;
                }
                () = sender.closed() => return,
            }
        }
    });
    Ok(resp)
}
