//! The agent's side of `sudo`: who may, what runs, and its lifetime (see [`super`]).

use std::ffi::OsString;
use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener as StdListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use super::{address, Preserve, Request, MAX_REQUEST, SECURE_PATH, SUDO_GROUPS};
use crate::server::Agent;
use crate::supervisor::Spec;
use crate::sys::{self, Creds, ExitKind};
use crate::users::User;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After the client is gone and the command killed, how long to wait for its end.
const END_WAIT: Duration = Duration::from_secs(5);
/// Caller variables a fresh environment keeps (terminal and locale, as sudo's env_keep).
const KEEP: [&str; 9] = [
    "TERM",
    "COLORTERM",
    "LANG",
    "LANGUAGE",
    "TZ",
    "DISPLAY",
    "COLUMNS",
    "LINES",
    "PYTHONUNBUFFERED",
];

/// Serves sudo requests on the abstract socket `name` until the agent ends. A socket that
/// cannot be bound leaves the agent without sudo (said once on stderr).
pub async fn serve(agent: Arc<Agent>, name: String) {
    let listener = match address(&name)
        .and_then(|a| StdListener::bind_addr(&a))
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        }) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sandbox-agent: no sudo service on @{name}: {e}");
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            if let Err(message) = handle(&agent, &mut stream).await {
                let line = format!("error {}\n", message.replace('\n', " "));
                let _ = stream.write_all(line.as_bytes()).await;
            }
        });
    }
}

/// One request: check, start, relay, report. `Err` is the message the client prints.
async fn handle(agent: &Arc<Agent>, stream: &mut UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot tell who is asking: {e}"))?;
    // The whole request first, refused or not: a client still sending when the answer
    // comes would see a broken pipe instead of the reason.
    let (req, fds) = tokio::time::timeout(REQUEST_TIMEOUT, receive(stream))
        .await
        .map_err(|_| "the request did not arrive in time".to_string())?
        .map_err(|e| format!("reading the request: {e}"))?;
    let caller = caller(agent, cred.uid()).await?;
    let [stdin, stdout, stderr]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|_| "the request must carry stdin, stdout and stderr".to_string())?;
    let target_name = req.user.clone().unwrap_or_else(|| "root".into());
    let target = agent
        .users
        .lookup(&target_name)
        .ok_or_else(|| format!("unknown user {target_name:?}"))?;
    let spec = spec_for(&req, &caller, &target);
    let parent = cred
        .pid()
        .and_then(|p| u32::try_from(p).ok())
        .and_then(|p| agent.procs.supervisor_of(p));
    let stdio = [Stdio::from(stdin), Stdio::from(stdout), Stdio::from(stderr)];
    let started = agent
        .procs
        .start_escalated(&spec, stdio, parent)
        .await
        .map_err(|e| e.message)?;
    let (supervisor, pid, mut status) = (started.supervisor, started.pid, started.status);
    let exit = status.exit();
    tokio::pin!(exit);
    let mut buf = [0u8; 64];
    let mut pending = Vec::with_capacity(64);
    loop {
        tokio::select! {
            end = &mut exit => {
                let line = match end {
                    Some(ExitKind::Code(c)) => format!("exit code {c}\n"),
                    Some(ExitKind::Signal(s)) => format!("exit signal {s}\n"),
                    None => "error the command's supervisor ended without a status\n".into(),
                };
                let _ = stream.write_all(line.as_bytes()).await;
                return Ok(());
            }
            n = stream.read(&mut buf) => {
                let n = n.unwrap_or(0);
                if n == 0 {
                    // The client is gone (killed, or its command was): so is what it ran.
                    agent.procs.kill_escalated(supervisor).await;
                    let _ = tokio::time::timeout(END_WAIT, &mut exit).await;
                    return Ok(());
                }
                relay_signals(&mut pending, &buf[..n], pid);
            }
        }
    }
}

/// Sends the command the signals named by complete `signal N` lines; a line too long to
/// be one is dropped.
fn relay_signals(pending: &mut Vec<u8>, data: &[u8], pid: u32) {
    for &b in data {
        if b != b'\n' {
            if pending.len() < 64 {
                pending.push(b);
            }
            continue;
        }
        let line = String::from_utf8_lossy(pending).into_owned();
        pending.clear();
        let sig = line
            .strip_prefix("signal ")
            .and_then(|n| n.trim().parse::<i32>().ok())
            .and_then(Signal::from_named_raw);
        if let Some(sig) = sig {
            let _ = sys::kill_group(pid, sig);
        }
    }
}

/// The caller, if it may use sudo: root, or a member of a [`SUDO_GROUPS`] group.
async fn caller(agent: &Arc<Agent>, uid: u32) -> Result<User, String> {
    let names = crate::files::names(&agent.users).await;
    let name = names.user(uid);
    let user = agent
        .users
        .lookup(&name)
        .ok_or_else(|| format!("uid {uid} has no entry in /etc/passwd"))?;
    let allowed = uid == 0
        || user
            .groups
            .iter()
            .any(|g| SUDO_GROUPS.contains(&names.group(*g).as_str()));
    if allowed {
        Ok(user)
    } else {
        Err(format!(
            "{name} may not use sudo in this sandbox: only root and members of group sudo or \
             wheel may (as root: add the user to one in /etc/group)"
        ))
    }
}

/// Reads the request: the length and the descriptors in the first message, then the JSON.
async fn receive(stream: &mut UnixStream) -> io::Result<(Request, Vec<OwnedFd>)> {
    let mut len = [0u8; 4];
    let (got, fds) = loop {
        stream.readable().await?;
        let r = stream.try_io(Interest::READABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                &*stream,
                &mut [IoSliceMut::new(&mut len)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = m {
                    fds.extend(received);
                }
            }
            if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
                return Err(io::Error::other("too many descriptors"));
            }
            Ok((msg.bytes, fds))
        });
        match r {
            Ok(v) => break v,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    if got == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no request"));
    }
    stream.read_exact(&mut len[got..]).await?;
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_REQUEST {
        return Err(io::Error::other(format!("larger than {MAX_REQUEST} bytes")));
    }
    let mut body = vec![0u8; n];
    stream.read_exact(&mut body).await?;
    let req = serde_json::from_slice(&body).map_err(io::Error::other)?;
    Ok((req, fds))
}

/// What the supervisor runs for `req`, as `target`, asked by `caller`.
pub fn spec_for(req: &Request, caller: &User, target: &User) -> Spec {
    let caller_env = |name: &str| {
        req.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let target_shell = if target.shell.is_empty() {
        "/bin/sh".to_string()
    } else {
        target.shell.clone()
    };
    let (program, mut args) = if req.login {
        (target_shell.clone(), vec!["-l".to_string()])
    } else if req.shell {
        (
            caller_env("SHELL").unwrap_or_else(|| target_shell.clone()),
            Vec::new(),
        )
    } else {
        (
            req.command.first().cloned().unwrap_or_default(),
            req.command.iter().skip(1).cloned().collect(),
        )
    };
    if (req.login || req.shell) && !req.command.is_empty() {
        args.push("-c".into());
        args.push(shell_words(&req.command));
    }

    let mut env: Vec<(String, String)> = match &req.preserve {
        Preserve::All => req.env.clone(),
        Preserve::Reset | Preserve::Names(_) => {
            let extra: &[String] = match &req.preserve {
                Preserve::Names(n) => n,
                _ => &[],
            };
            req.env
                .iter()
                .filter(|(k, _)| {
                    KEEP.contains(&k.as_str()) || k.starts_with("LC_") || extra.contains(k)
                })
                .cloned()
                .collect()
        }
    };
    let mut set = |k: &str, v: String| {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v));
    };
    if req.preserve != Preserve::All {
        set("PATH", SECURE_PATH.into());
        set("HOME", target.home.to_string_lossy().into_owned());
        set("SHELL", target_shell);
    }
    set("USER", target.name.clone());
    set("LOGNAME", target.name.clone());
    set("SUDO_USER", caller.name.clone());
    set("SUDO_UID", caller.uid.to_string());
    set("SUDO_GID", caller.gid.to_string());
    let mut command = req.command.join(" ");
    command.truncate(4096);
    set("SUDO_COMMAND", command);
    for (k, v) in &req.assignments {
        set(k, v.clone());
    }
    let cwd = if req.login {
        target.home.clone()
    } else {
        PathBuf::from(&req.cwd)
    };
    Spec {
        program: program.into(),
        args: args.into_iter().map(OsString::from).collect(),
        env: env
            .into_iter()
            .filter(|(k, v)| !k.is_empty() && !k.contains(['=', '\0']) && !v.contains('\0'))
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
        cwd,
        creds: target.switch.then(|| Creds {
            uid: target.uid,
            gid: target.gid,
            groups: target.groups.clone(),
        }),
        pty: false,
    }
}

/// sudo's quoting for `-i`/`-s` with a command: every character but letters, digits,
/// `_`, `-` and `$` is escaped with a backslash, words joined by spaces.
fn shell_words(words: &[String]) -> String {
    let mut out = String::new();
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        for c in w.chars() {
            if !(c.is_alphanumeric() || matches!(c, '_' | '-' | '$')) {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, uid: u32) -> User {
        User {
            name: name.into(),
            uid,
            gid: uid,
            groups: vec![uid, 27],
            home: if uid == 0 {
                "/root".into()
            } else {
                format!("/home/{name}").into()
            },
            shell: "/bin/bash".into(),
            switch: uid != 0,
        }
    }

    fn env_of(spec: &Spec, k: &str) -> Option<String> {
        spec.env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.to_string_lossy().into_owned())
    }

    #[test]
    fn a_fresh_environment_keeps_the_terminal_and_names_the_caller() {
        let req = Request {
            command: vec!["id".into(), "-u".into()],
            env: vec![
                ("TERM".into(), "xterm".into()),
                ("SECRET".into(), "x".into()),
                ("PATH".into(), "/evil".into()),
                ("LC_ALL".into(), "C".into()),
            ],
            assignments: vec![("FOO".into(), "1".into())],
            cwd: "/tmp".into(),
            ..Request::default()
        };
        let spec = spec_for(&req, &user("user", 1000), &user("root", 0));
        assert_eq!(spec.program, OsString::from("id"));
        assert_eq!(spec.args, vec![OsString::from("-u")]);
        assert_eq!(spec.cwd, PathBuf::from("/tmp"));
        assert!(spec.creds.is_none(), "root needs no switch");
        assert_eq!(env_of(&spec, "SECRET"), None);
        assert_eq!(env_of(&spec, "PATH").as_deref(), Some(SECURE_PATH));
        assert_eq!(env_of(&spec, "TERM").as_deref(), Some("xterm"));
        assert_eq!(env_of(&spec, "LC_ALL").as_deref(), Some("C"));
        assert_eq!(env_of(&spec, "HOME").as_deref(), Some("/root"));
        assert_eq!(env_of(&spec, "SUDO_USER").as_deref(), Some("user"));
        assert_eq!(env_of(&spec, "SUDO_UID").as_deref(), Some("1000"));
        assert_eq!(env_of(&spec, "FOO").as_deref(), Some("1"));

        let kept = spec_for(
            &Request {
                preserve: Preserve::All,
                ..req.clone()
            },
            &user("user", 1000),
            &user("root", 0),
        );
        assert_eq!(env_of(&kept, "SECRET").as_deref(), Some("x"));
        assert_eq!(env_of(&kept, "PATH").as_deref(), Some("/evil"));
        let named = spec_for(
            &Request {
                preserve: Preserve::Names(vec!["SECRET".into()]),
                ..req
            },
            &user("user", 1000),
            &user("root", 0),
        );
        assert_eq!(env_of(&named, "SECRET").as_deref(), Some("x"));
        assert_eq!(env_of(&named, "PATH").as_deref(), Some(SECURE_PATH));
    }

    #[test]
    fn login_and_shell_forms_quote_the_command_as_sudo_does() {
        let req = Request {
            command: vec!["echo".into(), "a b;c".into(), "$HOME".into()],
            login: true,
            cwd: "/tmp".into(),
            ..Request::default()
        };
        let spec = spec_for(&req, &user("root", 0), &user("user", 1000));
        assert_eq!(spec.program, OsString::from("/bin/bash"));
        assert_eq!(
            spec.args,
            ["-l", "-c", r"echo a\ b\;c $HOME"]
                .map(OsString::from)
                .to_vec()
        );
        assert_eq!(
            spec.cwd,
            PathBuf::from("/home/user"),
            "a login starts at home"
        );
        assert_eq!(spec.creds.as_ref().map(|c| c.uid), Some(1000));
    }

    #[test]
    fn signal_lines_are_bounded() {
        let mut pending = Vec::new();
        // A line far longer than any `signal N` is cut, never grown.
        relay_signals(&mut pending, &[b'x'; 10_000], 0);
        assert_eq!(pending.len(), 64);
        relay_signals(&mut pending, b"\n", 0);
        assert!(pending.is_empty());
    }
}
