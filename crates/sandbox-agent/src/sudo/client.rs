//! The `sudo` command: parses sudo's usual options, hands the request and its stdio to
//! the agent's sudo service, relays signals, and exits with the command's status.
//!
//! Wire: one message carrying the three descriptors (SCM_RIGHTS) and a 4-byte big-endian
//! length, then that many bytes of JSON [`Request`]. The service answers one line:
//! `exit code N`, `exit signal N` or `error MESSAGE`; meanwhile the client may send
//! `signal N` lines.

use std::io::{self, IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::{address, env_name, socket_name, Preserve, Request, MAX_REQUEST};

const USAGE: &str =
    "usage: sudo [-EHiknSs] [-u user] [--preserve-env[=list]] [VAR=value] [--] command [args...]
       sudo -i | -s [command]
       sudo -l | -v | -k | -K | -V | -h

The sandbox's sudo: the agent runs the command as root (or -u user) for root and for
members of group sudo or wheel, without a password.
";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Run a command.
    Run(Request),
    /// Print this (to stdout) and exit with this status.
    Exit(i32, String),
}

/// A flag that, without a command, only informs: list, validate, version or help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Info {
    List,
    Validate,
    Version,
    Help,
}

/// Parses sudo's arguments (without the program name).
pub fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut req = Request::default();
    let mut info = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--" {
            i += 1;
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            i = long_option(long, args, i, &mut req, &mut info)?;
        } else if let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) {
            i = short_flags(flags, args, i, &mut req, &mut info)?;
        } else {
            break;
        }
        i += 1;
    }
    while let Some((name, value)) = args.get(i).and_then(|a| a.split_once('=')) {
        if !env_name(name) {
            break;
        }
        req.assignments.push((name.to_string(), value.to_string()));
        i += 1;
    }
    req.command = args[i..].to_vec();
    if !req.command.is_empty() || ((req.login || req.shell) && info.is_none()) {
        return Ok(Parsed::Run(req));
    }
    Ok(match info {
        Some(Info::List) => Parsed::Exit(
            0,
            "User may run the following commands in this sandbox:\n    (ALL : ALL) NOPASSWD: ALL\n"
                .into(),
        ),
        Some(Info::Validate) => Parsed::Exit(0, String::new()),
        Some(Info::Version) => Parsed::Exit(
            0,
            format!("sudo (colima-e2b sandbox agent {})\n", crate::ENVD_VERSION),
        ),
        Some(Info::Help) => Parsed::Exit(0, USAGE.into()),
        None => Parsed::Exit(1, USAGE.into()),
    })
}

/// One `--name[=value]` option at `args[i]`; returns the index of its last word.
fn long_option(
    long: &str,
    args: &[String],
    mut i: usize,
    req: &mut Request,
    info: &mut Option<Info>,
) -> Result<usize, String> {
    let (name, value) = match long.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (long, None),
    };
    match name {
        "user" => {
            let v = match value {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i).cloned().ok_or("option --user needs a user")?
                }
            };
            req.user = Some(v);
        }
        "preserve-env" => {
            req.preserve = match value {
                None => Preserve::All,
                Some(list) => Preserve::Names(
                    list.split(',')
                        .filter(|n| !n.is_empty())
                        .map(str::to_string)
                        .collect(),
                ),
            }
        }
        "login" => req.login = true,
        "shell" => req.shell = true,
        "set-home" | "non-interactive" | "stdin" | "askpass" | "preserve-groups" | "bell" => {}
        "list" => *info = Some(Info::List),
        "validate" | "remove-timestamp" | "reset-timestamp" => *info = Some(Info::Validate),
        "version" => *info = Some(Info::Version),
        "help" => *info = Some(Info::Help),
        _ => return Err(format!("option --{name} is not supported here")),
    }
    Ok(i)
}

/// Clustered short flags at `args[i]` (`-nE`, `-uroot`); returns the index of its last word.
fn short_flags(
    flags: &str,
    args: &[String],
    mut i: usize,
    req: &mut Request,
    info: &mut Option<Info>,
) -> Result<usize, String> {
    for (at, c) in flags.char_indices() {
        match c {
            'u' => {
                let rest = &flags[at + 1..];
                let v = if rest.is_empty() {
                    i += 1;
                    args.get(i).cloned().ok_or("option -u needs a user")?
                } else {
                    rest.to_string()
                };
                req.user = Some(v);
                break;
            }
            'E' => req.preserve = Preserve::All,
            'i' => req.login = true,
            's' => req.shell = true,
            'H' | 'n' | 'S' | 'A' | 'P' | 'B' => {}
            'l' => *info = Some(Info::List),
            'v' | 'K' | 'k' => *info = Some(Info::Validate),
            'V' => *info = Some(Info::Version),
            'h' => *info = Some(Info::Help),
            _ => return Err(format!("option -{c} is not supported here")),
        }
    }
    Ok(i)
}

/// Runs as `sudo`; never returns.
pub fn main(args: &[String]) -> ! {
    let req = match parse(args) {
        Ok(Parsed::Run(r)) => r,
        Ok(Parsed::Exit(code, text)) => {
            if code == 0 {
                print!("{text}");
            } else {
                eprint!("{text}");
            }
            std::process::exit(code)
        }
        Err(e) => {
            eprintln!("sudo: {e}\n{USAGE}");
            std::process::exit(1)
        }
    };
    let code = match run(req) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sudo: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn run(mut req: Request) -> io::Result<i32> {
    req.env = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    req.cwd = std::env::current_dir()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "/".into());
    let body = serde_json::to_vec(&req).map_err(io::Error::other)?;
    if body.len() > MAX_REQUEST {
        return Err(io::Error::other(
            "the command and its environment are too large",
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Signals are relayed from before the command can start.
        let signals = relay_from_now()?;
        let name = socket_name();
        let sock = UnixStream::connect_addr(&address(&name)?).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the sandbox agent's sudo service ({name}) is not reachable: {e}"),
            )
        })?;
        send(&sock, &body)?;
        sock.set_nonblocking(true)?;
        wait(sock, signals).await
    })
}

/// Sends the descriptors with the length, then the rest.
fn send(sock: &UnixStream, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(io::Error::other)?
        .to_be_bytes();
    let (stdin, stdout, stderr) = (io::stdin(), io::stdout(), io::stderr());
    let fds = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("descriptor message too large"));
    }
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&len)],
        &mut control,
        SendFlags::empty(),
    )?;
    let mut w = sock;
    w.write_all(&len[sent..])?;
    w.write_all(body)?;
    Ok(())
}

/// Catches the signals sudo relays; their numbers arrive on the receiver.
fn relay_from_now() -> io::Result<tokio::sync::mpsc::UnboundedReceiver<i32>> {
    use tokio::signal::unix::{signal, SignalKind};
    let kinds = [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::quit(),
        SignalKind::user_defined1(),
        SignalKind::user_defined2(),
        SignalKind::window_change(),
    ];
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    for kind in kinds {
        let mut s = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(kind.as_raw_value()).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}

/// Relays signals until the service reports the end.
async fn wait(
    sock: UnixStream,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<i32>,
) -> io::Result<i32> {
    let sock = tokio::net::UnixStream::from_std(sock)?;
    let (r, mut w) = sock.into_split();
    let mut lines = tokio::io::BufReader::new(r).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let line = line?.unwrap_or_default();
                let mut f = line.splitn(3, ' ');
                return match (f.next(), f.next(), f.next()) {
                    (Some("exit"), Some("code"), Some(n)) => Ok(n.parse().unwrap_or(1)),
                    (Some("exit"), Some("signal"), Some(n)) => Ok(128 + n.parse::<i32>().unwrap_or(0)),
                    (Some("error"), _, _) => Err(io::Error::other(line.strip_prefix("error ").unwrap_or("the sudo service refused").to_string())),
                    _ => Err(io::Error::other("the sudo service ended without an exit status")),
                };
            }
            Some(sig) = rx.recv() => {
                // The command may be gone already; the exit line follows.
                let _ = w.write_all(format!("signal {sig}\n").as_bytes()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn run_of(s: &str) -> Request {
        match parse(&args(s)) {
            Ok(Parsed::Run(r)) => r,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn options_users_assignments_and_the_command() {
        let r = run_of("-n -u user -E FOO=1 BAR=x=y id -un");
        assert_eq!(r.user.as_deref(), Some("user"));
        assert_eq!(r.preserve, Preserve::All);
        assert_eq!(
            r.assignments,
            vec![("FOO".into(), "1".into()), ("BAR".into(), "x=y".into())]
        );
        assert_eq!(r.command, args("id -un"));
        let r = run_of("-uuser -- -weird arg");
        assert_eq!(
            (r.user.as_deref(), r.command),
            (Some("user"), args("-weird arg"))
        );
        let r = run_of("--user=nobody --preserve-env=A,B sh -c x");
        assert_eq!(r.preserve, Preserve::Names(vec!["A".into(), "B".into()]));
        assert_eq!(r.user.as_deref(), Some("nobody"));
        // Words after the command are its own, options included.
        assert_eq!(run_of("ls -u x").command, args("ls -u x"));
        // A login shell needs no command.
        let r = run_of("-i");
        assert!(r.login && r.command.is_empty());
        assert!(run_of("-nE -s").shell);
    }

    #[test]
    fn informational_flags_and_mistakes() {
        assert!(matches!(parse(&args("-l")), Ok(Parsed::Exit(0, t)) if t.contains("NOPASSWD")));
        assert!(matches!(parse(&args("-v")), Ok(Parsed::Exit(0, _))));
        assert!(matches!(parse(&args("-k")), Ok(Parsed::Exit(0, _))));
        assert_eq!(run_of("-k true").command, args("true"));
        assert!(matches!(parse(&args("")), Ok(Parsed::Exit(1, t)) if t.contains("usage")));
        assert!(parse(&args("-g wheel id")).is_err());
        assert!(parse(&args("-u")).is_err());
        assert!(parse(&args("--frobnicate id")).is_err());
    }
}
