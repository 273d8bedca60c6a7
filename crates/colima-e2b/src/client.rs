//! How the command-line tools talk to a running server: its native API, with the key
//! `colima-e2b env` prints, and failures that carry the exit code scripts see.

use serde_json::Value;

use crate::config::Config;

/// Exit code when the server answered with an error (the message says which).
pub const EXIT_REFUSED: u8 = 1;
/// Exit code when no server answers at the configured address.
pub const EXIT_UNREACHABLE: u8 = 3;

/// A command that failed, with the exit code it ends the process with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Exit code.
    pub exit: u8,
    /// What to print.
    pub message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self {
            exit: EXIT_REFUSED,
            message,
        }
    }
}

/// A running server's native API.
#[derive(Debug, Clone)]
pub struct Api {
    /// `http://host:port`.
    pub base: String,
    /// The API key.
    pub key: String,
    http: reqwest::Client,
}

impl Api {
    /// The API of the server `config` describes.
    pub fn new(config: &Config) -> Result<Self, Failure> {
        Ok(Self {
            base: config.client_base_url(),
            key: config.e2b_api_key()?,
            http: reqwest::Client::new(),
        })
    }

    /// A request to `path` (absolute, e.g. `/sandboxes`), with the key.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Sends `req` and reads its JSON answer; an error status is a [`Failure`] with the
    /// server's `code` and `message`.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        answer(resp).await
    }

    /// The failure of a request that reached no server.
    pub fn unreachable(&self, e: impl std::fmt::Display) -> Failure {
        Failure {
            exit: EXIT_UNREACHABLE,
            message: format!(
                "cannot reach the server at {}: {e} (is it running?)",
                self.base
            ),
        }
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }
}

/// The JSON of an answer, or the failure its error status and body describe.
pub async fn answer(resp: reqwest::Response) -> Result<Value, Failure> {
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("unreadable answer ({status}): {e}"))?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        return Err(refused(status, &body, "no message"));
    }
    Ok(body)
}

/// The failure of an answer with error `status` and the API's `{code, message}` body
/// (`fallback` when it has no message).
pub fn refused(status: impl std::fmt::Display, body: &Value, fallback: &str) -> Failure {
    let code = body["code"]
        .as_str()
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    let message = body["message"].as_str().unwrap_or(fallback);
    format!("{status}{code}: {message}").into()
}

/// `s` as one URL path segment.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Prints `rows` under `header` in columns as wide as their widest cell (the last column
/// is not padded).
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints `value` as pretty JSON.
pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
        assert_eq!(encode("ok-1.2_~"), "ok-1.2_~");
    }
}
