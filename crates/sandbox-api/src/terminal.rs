//! `WS /sandboxes/{id}/terminal`: an interactive login shell in the sandbox's pty, for the
//! CLI's `sandbox shell` and the dashboard's terminal.
//!
//! Client to server: binary frames are typed bytes; text frames are JSON, either
//! `{"type":"input","data":"ls\r"}` or `{"type":"resize","cols":120,"rows":40}`.
//! Server to client: binary frames are the pty's output; text frames are JSON:
//! `{"type":"started","pid":N}` first, `{"type":"exit","exit_code":N}` when the shell
//! ends, `{"type":"error","message":...}` when something breaks. The shell is killed when
//! the client leaves (or stops reading for the stall timeout).

use std::time::Duration;

use envd_proto::messages::{DataEvent, ProcessEvent};
use futures_util::{SinkExt, StreamExt};
use poem::web::websocket::{Message, WebSocket};
use poem::web::{Data, Query};
use poem::{handler, IntoResponse};
use sandbox_core::manager::{Terminal, TerminalRequest};
use serde::Deserialize;

use crate::error::{parse_id, ApiError};
use crate::AppState;

/// Largest client frame taken (typed input is small; a paste is bounded by this).
const MAX_INPUT_FRAME: usize = 64 << 10;

/// The query of a terminal's upgrade.
#[derive(Debug, Deserialize)]
pub struct TerminalQuery {
    /// Columns (default 80).
    cols: Option<u16>,
    /// Rows (default 24).
    rows: Option<u16>,
    /// User to log in as (default: the sandbox's default user).
    user: Option<String>,
}

/// What a client's text frame asks.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Control {
    Input { data: String },
    Resize { cols: u16, rows: u16 },
}

fn text(value: serde_json::Value) -> Message {
    Message::Text(value.to_string())
}

fn error_text(message: impl std::fmt::Display) -> Message {
    text(serde_json::json!({"type": "error", "message": message.to_string()}))
}

/// Opens the shell before the upgrade, so a wrong id or size is an HTTP error with a JSON
/// body (404, 400, 409 for a paused sandbox), not a socket that closes.
#[handler]
pub async fn terminal(
    poem::web::Path(sandbox_id): poem::web::Path<String>,
    Query(query): Query<TerminalQuery>,
    ws: WebSocket,
    state: Data<&AppState>,
) -> poem::Response {
    let defaults = TerminalRequest::default();
    let req = TerminalRequest {
        cols: query.cols.unwrap_or(defaults.cols),
        rows: query.rows.unwrap_or(defaults.rows),
        user: query.user,
    };
    let opened = async {
        let id = parse_id(&sandbox_id)?;
        Ok::<_, ApiError>(state.manager.open_terminal(&id, &req).await?)
    };
    let opened = match opened.await {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let stall = state.limits.stall_timeout;
    // The upgrade's callback must be Sync; the output stream is not (it is only moved).
    let opened = std::sync::Mutex::new(opened);
    // A browser offered its key as a subprotocol: the upgrade must name one back.
    ws.protocols(vec![crate::auth::WS_PROTOCOL])
        .on_upgrade(move |socket| async move {
            if let Ok(opened) = opened.into_inner() {
                serve(socket, opened, stall).await;
            }
        })
        .into_response()
}

type Sink = futures_util::stream::SplitSink<poem::web::websocket::WebSocketStream, Message>;

/// Sends `m`; false when the client took nothing for `stall` (it is dropped, never
/// buffered for) or left.
async fn send_within(sink: &mut Sink, m: Message, stall: Duration) -> bool {
    matches!(tokio::time::timeout(stall, sink.send(m)).await, Ok(Ok(())))
}

async fn serve(socket: poem::web::websocket::WebSocketStream, opened: Terminal, stall: Duration) {
    let Terminal {
        control,
        mut output,
    } = opened;
    let (mut sink, mut incoming) = socket.split();
    let gauge = metrics::gauge!("colima_e2b_websockets_open");
    gauge.increment(1.0);
    let started = text(serde_json::json!({"type": "started", "pid": control.pid()}));
    let mut open = send_within(&mut sink, started, stall).await;
    while open {
        tokio::select! {
            event = output.next() => match event {
                Some(Ok(ProcessEvent::Data(DataEvent::Pty(bytes) | DataEvent::Stdout(bytes) | DataEvent::Stderr(bytes)))) => {
                    open = send_within(&mut sink, Message::Binary(bytes), stall).await;
                }
                Some(Ok(ProcessEvent::End(end))) => {
                    let _ = send_within(&mut sink, text(serde_json::json!({"type": "exit", "exit_code": end.exit_code})), stall).await;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = send_within(&mut sink, error_text(e), stall).await;
                    break;
                }
                None => {
                    let _ = send_within(&mut sink, error_text("the terminal ended without an exit"), stall).await;
                    break;
                }
            },
            message = incoming.next() => {
                let done = match message {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(Message::Binary(b))) if b.len() <= MAX_INPUT_FRAME => control.input(b).await,
                    Some(Ok(Message::Text(t))) if t.len() <= MAX_INPUT_FRAME => match serde_json::from_str::<Control>(&t) {
                        Ok(Control::Input { data }) => control.input(data.into_bytes()).await,
                        Ok(Control::Resize { cols, rows }) => control.resize(cols, rows).await,
                        Err(e) => {
                            open = send_within(&mut sink, error_text(format!("unreadable frame: {e}")), stall).await;
                            Ok(())
                        }
                    },
                    Some(Ok(Message::Binary(_) | Message::Text(_))) => {
                        open = send_within(&mut sink, error_text(format!("frames are at most {MAX_INPUT_FRAME} bytes")), stall).await;
                        Ok(())
                    }
                    Some(Ok(_)) => Ok(()),
                };
                if let Err(e) = done {
                    // A bad resize is the client's mistake; anything else ends the terminal.
                    let fatal = !matches!(e, sandbox_core::Error::InvalidArgument(_));
                    open = send_within(&mut sink, error_text(e), stall).await && !fatal;
                }
            }
        }
    }
    let _ = control.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    gauge.decrement(1.0);
}
