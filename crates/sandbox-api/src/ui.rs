//! The built-in dashboard at `/ui`: static files embedded in the binary. They hold no
//! data, so the perimeter lets anyone fetch them; the page asks for the API key and
//! sends it with every call it makes (and as a subprotocol on its terminal's WebSocket).

use poem::http::{header, StatusCode};
use poem::web::Path;
use poem::{handler, IntoResponse, Response};

/// Where the dashboard is served.
pub const BASE: &str = "/ui";

const INDEX: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");
const XTERM_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xterm.js"));
const XTERM_CSS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xterm.css"));
const FIT_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/addon-fit.js"));

/// Whether this build embeds xterm.js (deploy/ui-assets.sh ran before it).
pub fn has_terminal() -> bool {
    !XTERM_JS.is_empty()
}

/// The file `name` of the dashboard and its content type.
fn asset(name: &str) -> Option<(&'static [u8], &'static str)> {
    let js = "text/javascript; charset=utf-8";
    let css = "text/css; charset=utf-8";
    Some(match name {
        "" | "index.html" => (INDEX.as_bytes(), "text/html; charset=utf-8"),
        "app.js" => (APP_JS.as_bytes(), js),
        "app.css" => (APP_CSS.as_bytes(), css),
        // An empty xterm.js is left out: the page then says its terminal is missing.
        "xterm.js" if has_terminal() => (XTERM_JS, js),
        "xterm.css" => (XTERM_CSS, css),
        "addon-fit.js" if !FIT_JS.is_empty() => (FIT_JS, js),
        _ => return None,
    })
}

fn serve(name: &str) -> Response {
    let Some((body, content_type)) = asset(name) else {
        let missing = sandbox_core::Error::not_found(format!("dashboard file {name}"));
        return crate::error::ApiError::from(missing).into_response();
    };
    Response::builder()
        .status(StatusCode::OK)
        .content_type(content_type)
        // Its own files and calls only; no framing (clickjacking), no sniffing.
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        )
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::X_FRAME_OPTIONS, "DENY")
        .header(header::REFERRER_POLICY, "no-referrer")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
}

/// `GET /ui`: the page.
#[handler]
pub fn index() -> Response {
    serve("")
}

/// `GET /ui/{file}`: its scripts and styles.
#[handler]
pub fn file(Path(name): Path<String>) -> Response {
    serve(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_own_files_are_served_and_nothing_else() {
        for name in ["", "index.html", "app.js", "app.css", "xterm.css"] {
            assert!(asset(name).is_some(), "{name}");
        }
        for name in ["../Cargo.toml", "package.json", "node_modules", "build.rs"] {
            assert!(asset(name).is_none(), "{name}");
        }
        assert!(INDEX.contains("/ui/app.js"));
    }
}
