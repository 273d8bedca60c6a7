//! `colima-e2b sandbox ...`: a running server's sandboxes from the command line, as
//! `docker ps|run|exec|logs|rm` do containers. Tables for people, `--json` for scripts,
//! exit codes scripts can branch on: 0 done, 1 the server refused (its message on
//! stderr), 2 usage, 3 no server answers; `exec` and `shell` exit with the command's
//! own status (124 when `exec --timeout` ran out, 130 when interrupted, 255 when a
//! signal ended the command).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{encode, print_json, print_table, refused, Api, Failure};
use crate::config::Config;
use crate::terminal_mode::RawMode;

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SandboxCommand {
    /// List the server's sandboxes (id, state, template, age, deadline).
    #[command(visible_alias = "list")]
    Ls {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create a sandbox and print its id.
    Create {
        /// Template name (default: the server's default template).
        template: Option<String>,
        /// Seconds until the sandbox is removed (default: the server's, 300).
        #[arg(long)]
        timeout: Option<u64>,
        /// Environment variable for every command, `KEY=VALUE` (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = key_value)]
        envs: Vec<(String, String)>,
        /// Metadata, `KEY=VALUE` (repeatable).
        #[arg(long, value_name = "KEY=VALUE", value_parser = key_value)]
        metadata: Vec<(String, String)>,
        /// Cut the sandbox off the internet.
        #[arg(long)]
        no_internet: bool,
        /// Print the API's JSON instead of the id.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a sandbox, streaming its output; exits with its exit code.
    ///
    /// One argument is a shell command line (`exec ID 'ls | wc -l'`); several are one
    /// command and its arguments, each passed as is (`exec ID -- python3 -c 'print(1)'`).
    Exec {
        /// Sandbox id.
        id: String,
        /// Working directory (default: the user's home).
        #[arg(long)]
        cwd: Option<String>,
        /// User to run as (default `user`).
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Environment variable, `KEY=VALUE` (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = key_value)]
        envs: Vec<(String, String)>,
        /// Kill the command after this many seconds (exit code 124).
        #[arg(long)]
        timeout: Option<u64>,
        /// The command.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// An interactive login shell in a sandbox, over its pty (`exit` or Ctrl-D leaves).
    Shell {
        /// Sandbox id.
        id: String,
        /// User to log in as (default `user`).
        #[arg(long, short = 'u')]
        user: Option<String>,
    },
    /// Kill a sandbox and remove it.
    #[command(visible_alias = "rm")]
    Kill {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// End every process in a sandbox but its agent (the sandbox keeps running).
    KillProcesses {
        /// Sandbox id.
        id: String,
    },
    /// A sandbox's log: what the server did to it and what its agent saw inside.
    Logs {
        /// Sandbox id.
        id: String,
        /// Keep printing new entries until the sandbox ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Print the API's JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// `arg` quoted for bash, so it reaches the command as one argument.
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The command line `exec` runs for its arguments.
fn command_line(args: &[String]) -> String {
    match args {
        [one] => one.clone(),
        many => many
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// How long ago an RFC 3339 time was, or how long until it comes, in words (`3m`, `1h`).
fn span(rfc3339: &str, now: OffsetDateTime, future: bool) -> String {
    let Ok(t) = OffsetDateTime::parse(rfc3339, &Rfc3339) else {
        return "-".into();
    };
    let secs = if future {
        (t - now).whole_seconds()
    } else {
        (now - t).whole_seconds()
    };
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d", s / 86_400),
    }
}

/// A remote command's exit code as this process's: 255 for one a signal ended (-1).
fn exit_status(code: i64) -> u8 {
    u8::try_from(code).unwrap_or(255)
}

/// Runs `command` against the server `config` describes; `Ok` is the exit code.
pub async fn run(config: &Config, command: SandboxCommand) -> Result<u8, Failure> {
    let api = Api::new(config)?;
    match command {
        SandboxCommand::Ls { json } => {
            let body = api.get("/sandboxes").await?;
            if json {
                print_json(&body);
                return Ok(0);
            }
            let now = OffsetDateTime::now_utc();
            let rows: Vec<Vec<String>> = body
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|s| {
                    let text = |k: &str| s[k].as_str().unwrap_or("").to_string();
                    vec![
                        text("sandbox_id"),
                        text("state"),
                        text("template_id"),
                        span(&text("started_at"), now, false),
                        span(&text("end_at"), now, true),
                    ]
                })
                .collect();
            print_table(&["SANDBOX", "STATE", "TEMPLATE", "AGE", "ENDS IN"], &rows);
            Ok(0)
        }
        SandboxCommand::Create {
            template,
            timeout,
            envs,
            metadata,
            no_internet,
            json,
        } => {
            let mut body = json!({
                "envs": envs.into_iter().collect::<BTreeMap<_, _>>(),
                "metadata": metadata.into_iter().collect::<BTreeMap<_, _>>(),
            });
            if let Some(t) = template {
                body["template"] = t.into();
            }
            if let Some(t) = timeout {
                body["timeout"] = t.into();
            }
            if no_internet {
                body["internet"] = false.into();
            }
            let created = api
                .send(api.request(Method::POST, "/sandboxes").json(&body))
                .await?;
            if json {
                print_json(&created);
            } else {
                println!("{}", created["sandbox_id"].as_str().unwrap_or(""));
            }
            Ok(0)
        }
        SandboxCommand::Exec {
            id,
            cwd,
            user,
            envs,
            timeout,
            command,
        } => {
            let body = json!({
                "cmd": command_line(&command),
                "cwd": cwd,
                "user": user,
                "envs": envs.into_iter().collect::<BTreeMap<_, _>>(),
            });
            exec(&api, &id, body, timeout.map(Duration::from_secs)).await
        }
        SandboxCommand::Shell { id, user } => shell(&api, &id, user).await,
        SandboxCommand::Kill { ids } => {
            let mut failed = None;
            for id in ids {
                let req = api.request(Method::DELETE, &format!("/sandboxes/{}", encode(&id)));
                match api.send(req).await {
                    Ok(_) => println!("{id}"),
                    Err(f) => {
                        eprintln!("colima-e2b: error: {id}: {}", f.message);
                        failed = Some(f.exit);
                    }
                }
            }
            Ok(failed.unwrap_or(0))
        }
        SandboxCommand::KillProcesses { id } => {
            let path = format!("/sandboxes/{}/commands", encode(&id));
            let body = api.send(api.request(Method::DELETE, &path)).await?;
            println!(
                "killed {} processes in {id}",
                body["killed"].as_u64().unwrap_or(0)
            );
            Ok(0)
        }
        SandboxCommand::Logs { id, follow, json } => logs(&api, &id, follow, json).await,
    }
}

/// Runs `body` in the background and follows its output stream to the exit.
async fn exec(api: &Api, id: &str, body: Value, timeout: Option<Duration>) -> Result<u8, Failure> {
    let sandbox = encode(id);
    let started = api
        .send(
            api.request(
                Method::POST,
                &format!("/sandboxes/{sandbox}/commands/run/background"),
            )
            .json(&body),
        )
        .await?;
    let pid = started["pid"]
        .as_u64()
        .ok_or_else(|| format!("the server started no process: {started}"))?;
    let mut ws = connect(api, &format!("/sandboxes/{sandbox}/commands/stream/{pid}")).await?;
    let kill = || async {
        let path = format!("/sandboxes/{sandbox}/commands/{pid}");
        let _ = api.send(api.request(Method::DELETE, &path)).await;
    };
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        let msg = tokio::select! {
            msg = ws.next() => msg,
            () = &mut deadline => {
                kill().await;
                eprintln!("colima-e2b: the command ran past its timeout and was killed");
                return Ok(124);
            }
            _ = tokio::signal::ctrl_c() => {
                kill().await;
                return Ok(130);
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => {
                return Err("the server closed the output stream before the exit"
                    .to_string()
                    .into())
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("the output stream broke: {e}").into()),
        };
        let event: Value = serde_json::from_str(&text).unwrap_or_default();
        let data = event["data"].as_str().unwrap_or_default().as_bytes();
        match event["type"].as_str() {
            Some("stdout") => {
                let _ = stdout.write_all(data).await;
                let _ = stdout.flush().await;
            }
            Some("stderr") => {
                let _ = stderr.write_all(data).await;
                let _ = stderr.flush().await;
            }
            Some("exit") => {
                let code = event["code"].as_i64().unwrap_or(-1);
                return Ok(exit_status(code));
            }
            Some("error") => {
                return Err(event["message"]
                    .as_str()
                    .unwrap_or("the command failed")
                    .to_string()
                    .into())
            }
            _ => {}
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the WebSocket at `path` with the key. A refusal before the upgrade is the
/// server's JSON error.
async fn connect(api: &Api, path: &str) -> Result<Socket, Failure> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}{path}", api.base.replacen("http", "ws", 1));
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad address {url}: {e}"))?;
    let auth = format!("Bearer {}", api.key)
        .parse()
        .map_err(|_| "the API key is not a valid header value".to_string())?;
    req.headers_mut().insert("authorization", auth);
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body: Value = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default();
            Err(refused(
                resp.status(),
                &body,
                "the server refused the connection",
            ))
        }
        Err(tokio_tungstenite::tungstenite::Error::Io(e)) => Err(api.unreachable(e)),
        Err(e) => Err(format!("cannot open {url}: {e}").into()),
    }
}

/// How long a terminal whose piped input ended stays quiet before it is sent Ctrl-D.
const EOF_QUIET: Duration = Duration::from_millis(300);

/// An interactive shell: the local terminal in raw mode, typed bytes to the sandbox's
/// pty, its output to stdout, window size changes passed on.
async fn shell(api: &Api, id: &str, user: Option<String>) -> Result<u8, Failure> {
    let (cols, rows) = crate::terminal_mode::size().unwrap_or((80, 24));
    let mut path = format!("/sandboxes/{}/terminal?cols={cols}&rows={rows}", encode(id));
    if let Some(u) = &user {
        path.push_str(&format!("&user={}", encode(u)));
    }
    let ws = connect(api, &path).await?;
    // Raw only once connected, so refusals print normally; restored on every way out.
    let _raw = RawMode::enable();
    let (mut sink, mut stream) = ws.split();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .map_err(|e| format!("cannot watch the window size: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let mut stdin_open = true;
    // Piped input that ended: Ctrl-D each time the terminal goes quiet, until the shell
    // exits. A single one can be lost: typed before the shell reads its terminal, or
    // while a command runs, the pty turns it into a NUL or hands it to that command.
    let quiet = tokio::time::sleep(EOF_QUIET);
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => match n {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    quiet.as_mut().reset(tokio::time::Instant::now() + EOF_QUIET);
                }
                Ok(n) => {
                    if sink.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return Err("the terminal connection broke".to_string().into());
                    }
                }
            },
            () = &mut quiet, if !stdin_open => {
                let _ = sink.send(Message::Binary(vec![4u8].into())).await;
                quiet.as_mut().reset(tokio::time::Instant::now() + EOF_QUIET);
            }
            _ = winch.recv() => {
                if let Some((cols, rows)) = crate::terminal_mode::size() {
                    let resize = json!({"type": "resize", "cols": cols, "rows": rows});
                    let _ = sink.send(Message::Text(resize.to_string().into())).await;
                }
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    let _ = stdout.write_all(&b).await;
                    let _ = stdout.flush().await;
                    quiet.as_mut().reset(tokio::time::Instant::now() + EOF_QUIET);
                }
                Some(Ok(Message::Text(t))) => {
                    let event: Value = serde_json::from_str(&t).unwrap_or_default();
                    match event["type"].as_str() {
                        Some("exit") => {
                            let code = event["exit_code"].as_i64().unwrap_or(-1);
                            return Ok(exit_status(code));
                        }
                        Some("error") => {
                            return Err(event["message"].as_str().unwrap_or("the terminal failed").to_string().into())
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    return Err("the server closed the terminal".to_string().into())
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("the terminal connection broke: {e}").into()),
            },
        }
    }
}

/// Prints a sandbox's log; with `follow`, polls for new entries until it is gone.
async fn logs(api: &Api, id: &str, follow: bool, json: bool) -> Result<u8, Failure> {
    let sandbox = encode(id);
    let mut cursor: Option<i64> = None;
    loop {
        let mut path = format!("/sandboxes/{sandbox}/logs?limit=1000");
        if let Some(c) = cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let body = match api.get(&path).await {
            Ok(b) => b,
            // Followed to its end: the sandbox and its log are gone.
            Err(_) if follow && cursor.is_some() => return Ok(0),
            Err(e) => return Err(e),
        };
        for line in body["logs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if json {
                println!("{line}");
            } else {
                let fields: Vec<String> = line["fields"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "{} {:5} {}{}",
                    line["timestamp"].as_str().unwrap_or_default(),
                    line["level"].as_str().unwrap_or_default().to_uppercase(),
                    line["message"].as_str().unwrap_or_default(),
                    if fields.is_empty() {
                        String::new()
                    } else {
                        format!("  {}", fields.join(" "))
                    }
                );
            }
            if let Some(ts) = line["timestamp_ms"].as_i64() {
                cursor = Some(cursor.map_or(ts + 1, |c| c.max(ts + 1)));
            }
        }
        if !follow {
            return Ok(0);
        }
        cursor.get_or_insert(0);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_quotes_each_of_several_arguments_and_keeps_one_as_a_command_line() {
        assert_eq!(command_line(&["ls | wc -l".into()]), "ls | wc -l");
        assert_eq!(
            command_line(&["python3".into(), "-c".into(), "print('a b')".into()]),
            r"python3 -c 'print('\''a b'\'')'"
        );
        assert_eq!(command_line(&["echo".into(), String::new()]), "echo ''");
    }

    #[test]
    fn spans_read_like_docker_ps() {
        let now = OffsetDateTime::parse("2026-01-01T12:00:00Z", &Rfc3339).expect("time");
        assert_eq!(span("2026-01-01T11:59:30Z", now, false), "30s");
        assert_eq!(span("2026-01-01T12:05:00Z", now, true), "5m");
        assert_eq!(span("2026-01-01T10:30:00Z", now, false), "1h30m");
        assert_eq!(span("nonsense", now, false), "-");
    }

    #[test]
    fn key_values_need_a_key() {
        assert_eq!(key_value("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(key_value("=x").is_err());
        assert!(key_value("x").is_err());
    }
}
