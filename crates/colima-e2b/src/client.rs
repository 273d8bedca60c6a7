//! `colima-e2b sandbox ...`: a running server driven from the command line, through its
//! native API with the key `colima-e2b env` prints.

use serde_json::Value;

use crate::config::Config;

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SandboxCommand {
    /// List the server's sandboxes.
    List,
    /// Kill a sandbox and remove it.
    Kill {
        /// Sandbox id.
        id: String,
    },
    /// End every process in a sandbox but its agent (the sandbox keeps running).
    KillProcesses {
        /// Sandbox id.
        id: String,
    },
}

/// Runs `command` against the server `config` describes; prints its answer.
pub async fn run(config: &Config, command: SandboxCommand) -> Result<(), String> {
    let base = config.client_base_url();
    let key = config.e2b_api_key()?;
    let http = reqwest::Client::new();
    let request = match &command {
        SandboxCommand::List => http.get(format!("{base}/sandboxes/")),
        SandboxCommand::Kill { id } => http.delete(format!("{base}/sandboxes/{id}")),
        SandboxCommand::KillProcesses { id } => {
            http.delete(format!("{base}/sandboxes/{id}/commands/"))
        }
    };
    let resp = request
        .bearer_auth(key)
        .send()
        .await
        .map_err(|e| format!("cannot reach the server at {base}: {e} (is it running?)"))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .map_err(|e| format!("unreadable answer ({status}): {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "{status}: {}",
            body["message"].as_str().unwrap_or("no message")
        ));
    }
    match command {
        SandboxCommand::List => {
            for s in body.as_array().map(Vec::as_slice).unwrap_or_default() {
                println!(
                    "{}  {:8} {:10} ends {}",
                    s["sandbox_id"].as_str().unwrap_or(""),
                    s["state"].as_str().unwrap_or(""),
                    s["template_id"].as_str().unwrap_or(""),
                    s["end_at"].as_str().unwrap_or("")
                );
            }
        }
        SandboxCommand::Kill { id } => println!("killed {id}"),
        SandboxCommand::KillProcesses { id } => println!(
            "killed {} processes in {id}",
            body["killed"].as_u64().unwrap_or(0)
        ),
    }
    Ok(())
}
