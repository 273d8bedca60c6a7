//! The local terminal for `sandbox shell`: raw mode while the remote shell owns it, and
//! its size.

use rustix::termios::{self, OptionalActions, Termios};

/// Raw mode on stdin while alive; the previous settings come back when it drops. Does
/// nothing when stdin is not a terminal (input piped in).
#[derive(Debug)]
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    /// Puts stdin's terminal in raw mode (no echo, no line editing, no signals from
    /// keys: Ctrl-C goes to the sandbox).
    pub fn enable() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return Self { saved: None };
        };
        let mut raw = saved.clone();
        raw.make_raw();
        match termios::tcsetattr(&stdin, OptionalActions::Flush, &raw) {
            Ok(()) => Self { saved: Some(saved) },
            Err(_) => Self { saved: None },
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Flush, saved);
        }
    }
}

/// Columns and rows of the terminal on stdout (else stdin), if either is one.
pub fn size() -> Option<(u16, u16)> {
    let ws = termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}
