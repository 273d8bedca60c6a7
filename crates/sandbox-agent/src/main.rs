//! `sandbox-agent`: see the library docs and `--help`.

use sandbox_agent::config::{Config, SECRET_ENV, SECRET_FILE_ENV, USAGE};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Installed as `sudo` too (a link to this binary).
    let called = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&called).file_name() == Some(std::ffi::OsStr::new("sudo")) {
        sandbox_agent::sudo::client::main(&args);
    }
    if args.first().map(String::as_str) == Some(sandbox_agent::supervisor::SUPERVISE_ARG) {
        sandbox_agent::supervisor::main(&args[1..]);
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return;
    }
    if args.iter().any(|a| a == "--version") {
        println!("{}", sandbox_agent::ENVD_VERSION);
        return;
    }
    let cfg = match Config::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sandbox-agent: {e}");
            std::process::exit(2);
        }
    };
    // Commands must not inherit the secret; still single-threaded here, so this is safe.
    std::env::remove_var(SECRET_ENV);
    std::env::remove_var(SECRET_FILE_ENV);
    let agent = sandbox_agent::server::Agent::new(cfg);
    // Blocking threads never retire: at the pids limit no new one can start, and tokio
    // panics when it needs a thread and has none (an idle one is reused instead).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .thread_keep_alive(std::time::Duration::from_secs(u64::from(u32::MAX)))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandbox-agent: runtime: {e}");
            std::process::exit(1);
        }
    };
    let warm = rt.block_on(async { tokio::task::spawn_blocking(|| ()).await });
    if warm.is_err() {
        eprintln!("sandbox-agent: cannot start a worker thread");
        std::process::exit(1);
    }
    if let Err(e) = rt.block_on(sandbox_agent::server::run(agent)) {
        eprintln!("sandbox-agent: {e}");
        std::process::exit(1);
    }
}
