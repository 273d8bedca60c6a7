//! `colima-e2b`: the server and its helper commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use colima_e2b::client::Failure;
use colima_e2b::config::{self, BackendKind, CliOverrides};

/// Self-hosted E2B-compatible code sandboxes on Docker, Colima and Podman.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags shared by the commands that read the configuration.
#[derive(clap::Args, Debug)]
struct ConfigArgs {
    /// TOML configuration file (default: $XDG_CONFIG_HOME/colima-e2b/config.toml if present).
    #[arg(long, env = "COLIMA_E2B_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1; sandboxes can reach 0.0.0.0 listeners).
    #[arg(long, global = true)]
    host: Option<String>,
    /// Port to listen on (default 8000).
    #[arg(long, global = true)]
    port: Option<u16>,
    /// Container engine backend.
    #[arg(long, value_enum, global = true)]
    backend: Option<BackendKind>,
    /// Log filter, e.g. `debug` or `colima_e2b=debug,info`.
    #[arg(long, global = true)]
    log_level: Option<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<config::Config, String> {
        config::load(
            self.config.as_deref(),
            &CliOverrides {
                host: self.host.clone(),
                port: self.port,
                backend: self.backend,
                log_level: self.log_level.clone(),
            },
        )
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the API server.
    Server(ConfigArgs),
    /// Print the effective configuration (all layers merged) as TOML.
    Config(ConfigArgs),
    /// Print the OpenAPI document (YAML).
    Openapi,
    /// Print the shell exports that point the official E2B SDKs at this server:
    /// `eval "$(colima-e2b env)"`.
    Env(ConfigArgs),
    /// Check the deployment and explain each finding with its fix (engine, auth and
    /// exposure, disk quotas, isolation, cgroups, templates, state directory); exits 1
    /// when a check fails.
    Doctor(ConfigArgs),
    /// Build the `code-interpreter-v1` template's image offline on the configured engine
    /// (wheels downloaded on the host, cached); does nothing when it is present.
    Prepare {
        #[command(flatten)]
        config: ConfigArgs,
        /// Build it again even when it is present.
        #[arg(long)]
        force: bool,
    },
    /// Drive a running server's sandboxes: `ls`, `create`, `exec`, `shell`, `logs`,
    /// `kill`, `kill-processes` (exit codes: 0 done, 1 refused, 2 usage, 3 no server).
    Sandbox {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(subcommand)]
        command: colima_e2b::sandbox_cli::SandboxCommand,
    },
    /// Print a shell completion script: `colima-e2b completions bash > /etc/bash_completion.d/colima-e2b`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Build templates on a running server from a Dockerfile (`build NAME [-f FILE]
    /// [CONTEXT]`, with its live log), list them (`ls`) and remove them (`rm NAME`).
    Template {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(subcommand)]
        command: colima_e2b::template_cli::TemplateCommand,
    },
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Runs a command against a running server (the one recorded on the configured port, see
/// `running::adopt`) and exits with its code, or its failure's after the message.
fn run_client<F, Fut>(args: &ConfigArgs, command: F) -> ExitCode
where
    F: FnOnce(config::Config) -> Fut,
    Fut: std::future::Future<Output = Result<u8, Failure>>,
{
    let outcome = args.load().map_err(Failure::from).and_then(|mut config| {
        colima_e2b::running::adopt(&mut config);
        // One worker: `template build` packs its context with block_in_place.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))?;
        let outcome = rt.block_on(command(config));
        // `shell` leaves a read of stdin that cannot be cancelled: do not wait for it.
        rt.shutdown_background();
        outcome
    });
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("colima-e2b: error: {}", f.message);
            ExitCode::from(f.exit)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Openapi => {
            print!("{}", sandbox_api::spec_yaml());
            Ok(())
        }
        Command::Config(args) => args.load().and_then(|c| {
            toml::to_string_pretty(&c)
                .map(|s| print!("{s}"))
                .map_err(|e| e.to_string())
        }),
        Command::Env(args) => args.load().and_then(|mut c| {
            colima_e2b::running::adopt(&mut c);
            if !c.e2b.enabled {
                return Err("the E2B compatibility layer is disabled (e2b.enabled = false)".into());
            }
            c.e2b_env().map(|s| print!("{s}"))
        }),
        Command::Doctor(args) => args.load().and_then(|config| {
            init_logging("warn");
            let healthy = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?
                .block_on(colima_e2b::doctor::run(&config))?;
            if healthy {
                Ok(())
            } else {
                Err("some checks failed (see above)".into())
            }
        }),
        Command::Prepare { config, force } => config.load().and_then(|config| {
            init_logging("warn");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?
                .block_on(colima_e2b::prepare::run(&config, force))
        }),
        Command::Sandbox { config, command } => {
            return run_client(&config, |c| async move {
                colima_e2b::sandbox_cli::run(&c, command).await
            });
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "colima-e2b", &mut std::io::stdout());
            Ok(())
        }
        Command::Template { config, command } => {
            return run_client(&config, |c| async move {
                colima_e2b::template_cli::run(&c, command).await
            });
        }
        Command::Server(args) => args.load().and_then(|config| {
            init_logging(&config.log_level);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?
                .block_on(colima_e2b::server::run(config))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("colima-e2b: error: {e}");
            ExitCode::FAILURE
        }
    }
}
