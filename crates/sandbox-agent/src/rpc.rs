//! Connect RPCs: who acts, the request's timeouts, and the unary methods of the process
//! and filesystem services; the streaming ones are in [`crate::streams`].

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use rustix::process::Signal;

use crate::auth;
use crate::connect::{self, AgentBody, MAX_MESSAGE};
use crate::files;
use crate::server::{drain, header_u64, is_stream, Agent, MAX_KEEPALIVE};
use crate::streams::{connect_proc, start, stream_input, watch_dir};
use crate::users::User;
use crate::watch::{WatchOptions, Watcher};
use envd_proto::messages::*;
use envd_proto::{Code, EnvdError};

/// Answers one Connect RPC at `path`.
pub(crate) async fn rpc_dispatch(
    agent: Arc<Agent>,
    req: Request<Incoming>,
    path: &str,
) -> Response<AgentBody> {
    let stream = is_stream(&req);
    let method = path.rsplit('/').next().unwrap_or_default().to_string();
    let service = if path.starts_with("/process.") {
        "process"
    } else {
        "filesystem"
    };
    let user = match auth::basic_user(req.headers()) {
        Err(e) => Err(EnvdError::new(Code::Unauthenticated, e)),
        Ok(u) => agent.acting_user(u),
    };
    let user = match user {
        Ok(u) => u,
        Err(e) => {
            drain(req.into_body()).await;
            return if stream {
                connect::stream_err(&e)
            } else {
                connect::unary_err(&e)
            };
        }
    };
    let timeout = header_u64(&req, "connect-timeout-ms")
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    let keepalive = header_u64(&req, "keepalive-ping-interval")
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s).min(MAX_KEEPALIVE));
    if req.method() != Method::POST {
        return connect::unary_err(&EnvdError::new(Code::Unimplemented, "use POST"));
    }

    let res: Result<Response<AgentBody>, EnvdError> = match (service, method.as_str(), stream) {
        ("process", "Start", true) => {
            start(&agent, user, req.into_body(), timeout, keepalive).await
        }
        ("process", "Connect", true) => {
            connect_proc(&agent, req.into_body(), timeout, keepalive).await
        }
        ("process", "StreamInput", true) => stream_input(&agent, req.into_body()).await,
        ("filesystem", "WatchDir", true) => {
            watch_dir(&agent, user, req.into_body(), timeout, keepalive).await
        }
        (_, _, true) => Err(EnvdError::new(
            Code::Unimplemented,
            format!("{path} is not a streaming method"),
        )),
        (svc, m, false) => match connect::read_body(req.into_body(), MAX_MESSAGE).await {
            Err(e) => Err(e),
            Ok(body) => unary(&agent, &user, svc, m, &body).await,
        },
    };
    match res {
        Ok(r) => r,
        Err(e) if stream => connect::stream_err(&e),
        Err(e) => connect::unary_err(&e),
    }
}

async fn unary(
    agent: &Arc<Agent>,
    user: &User,
    svc: &str,
    m: &str,
    body: &[u8],
) -> Result<Response<AgentBody>, EnvdError> {
    let empty = serde_json::json!({});
    match (svc, m) {
        ("process", "List") => Ok(connect::unary_ok(&ListResponse {
            processes: agent.procs.list(),
        })),
        ("process", "SendInput") => {
            let r: SendInputRequest = connect::parse_json(body)?;
            let p = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
            match &r.input {
                ProcessInput::Stdin(b) => p.write_input(false, b).await?,
                ProcessInput::Pty(b) => p.write_input(true, b).await?,
            }
            Ok(connect::unary_ok(&empty))
        }
        ("process", "CloseStdin") => {
            let r: SelectRequest = connect::parse_json(body)?;
            let p = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
            p.close_stdin().await?;
            Ok(connect::unary_ok(&empty))
        }
        ("process", "SendSignal") => {
            let r: SendSignalRequest = connect::parse_json(body)?;
            let p = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
            let sig = match r.signal {
                envd_proto::messages::Signal::Kill => Signal::KILL,
                envd_proto::messages::Signal::Term => Signal::TERM,
                envd_proto::messages::Signal::Unspecified => {
                    return Err(EnvdError::new(Code::InvalidArgument, "unsupported signal"))
                }
            };
            // As envd: a command that has ended is gone for signals (the SDK's kill()
            // then returns false), though Connect still replays its end; but while
            // processes it left behind still run, the signal ends those.
            if p.ended() && !agent.procs.has_leftovers(&p) {
                return Err(EnvdError::new(
                    Code::NotFound,
                    format!("process with pid {} has already ended", p.pid),
                ));
            }
            agent.procs.signal(&p, sig).await;
            Ok(connect::unary_ok(&empty))
        }
        ("process", "Update") => {
            let r: UpdateRequest = connect::parse_json(body)?;
            let p = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
            if let Some(size) = r.pty.and_then(|p| p.size) {
                p.resize(size.cols, size.rows)?;
            }
            Ok(connect::unary_ok(&empty))
        }
        ("filesystem", "Stat") | ("filesystem", "MakeDir") | ("filesystem", "Remove") => {
            let r: PathRequest = connect::parse_json(body)?;
            let path = files::resolve(user, &r.path)?;
            let names = files::names(&agent.users).await;
            match m {
                "Stat" => {
                    let entry = files::run_as(user, move || files::stat(&path, &names)).await?;
                    Ok(connect::unary_ok(&EntryResponse { entry }))
                }
                "MakeDir" => {
                    let entry = files::run_as(user, move || files::make_dir(&path, &names)).await?;
                    Ok(connect::unary_ok(&EntryResponse { entry }))
                }
                _ => {
                    files::run_as(user, move || files::remove(&path)).await?;
                    Ok(connect::unary_ok(&empty))
                }
            }
        }
        ("filesystem", "ListDir") => {
            let r: ListDirRequest = connect::parse_json(body)?;
            let path = files::resolve(user, if r.path.is_empty() { "~" } else { &r.path })?;
            let names = files::names(&agent.users).await;
            let answer =
                files::run_as(user, move || files::list_dir(&path, r.depth, &names)).await?;
            Ok(connect::unary_json(answer))
        }
        ("filesystem", "Move") => {
            let r: MoveRequest = connect::parse_json(body)?;
            let src = files::resolve(user, &r.source)?;
            let dst = files::resolve(user, &r.destination)?;
            let names = files::names(&agent.users).await;
            let entry = files::run_as(user, move || files::rename(&src, &dst, &names)).await?;
            Ok(connect::unary_ok(&EntryResponse { entry }))
        }
        ("filesystem", "CreateWatcher") => {
            let r: WatchDirRequest = connect::parse_json(body)?;
            let w = new_watcher(agent, user, &r).await?;
            let id = agent.watchers.create(w)?;
            Ok(connect::unary_ok(&WatcherIdMessage { watcher_id: id }))
        }
        ("filesystem", "GetWatcherEvents") | ("filesystem", "RemoveWatcher") => {
            let r: WatcherIdMessage = connect::parse_json(body)?;
            if m == "RemoveWatcher" {
                agent.watchers.remove(&r.watcher_id)?;
                Ok(connect::unary_ok(&empty))
            } else {
                let events = agent.watchers.take(&r.watcher_id)?;
                Ok(connect::unary_ok(&WatcherEventsResponse { events }))
            }
        }
        _ => Err(EnvdError::new(
            Code::Unimplemented,
            format!("{svc}.{m} is not implemented"),
        )),
    }
}

pub(crate) async fn new_watcher(
    agent: &Arc<Agent>,
    user: &User,
    r: &WatchDirRequest,
) -> Result<Watcher, EnvdError> {
    let path = files::resolve(user, &r.path)?;
    let names = files::names(&agent.users).await;
    let opts = WatchOptions {
        recursive: r.recursive,
        include_entry: r.include_entry,
        allow_network_mounts: r.allow_network_mounts,
    };
    files::run_as(user, move || Watcher::new(path, opts, names)).await
}
