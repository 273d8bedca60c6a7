//! Embeds the dashboard's third-party files (xterm.js and its fit addon, installed into
//! `ui/node_modules` by deploy/ui-assets.sh). Without them the server still builds: the
//! dashboard works and says its terminal is missing.

use std::path::Path;

const VENDORED: [(&str, &str); 3] = [
    ("@xterm/xterm/lib/xterm.js", "xterm.js"),
    ("@xterm/xterm/css/xterm.css", "xterm.css"),
    ("@xterm/addon-fit/lib/addon-fit.js", "addon-fit.js"),
];

fn main() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let modules = Path::new("ui/node_modules");
    println!("cargo:rerun-if-changed=ui/package-lock.json");
    for (from, to) in VENDORED {
        let src = modules.join(from);
        println!("cargo:rerun-if-changed={}", src.display());
        let bytes = std::fs::read(&src).unwrap_or_default();
        if bytes.is_empty() {
            println!(
                "cargo:warning=the dashboard's {to} is missing ({}): run deploy/ui-assets.sh",
                src.display()
            );
        }
        std::fs::write(Path::new(&out).join(to), bytes).expect("write into OUT_DIR");
    }
}
