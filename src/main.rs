//! The `pginval` binary: parse the command line, load the configuration, set up
//! logging, run the command, and map the outcome to an exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use pginval::cli::{Cli, Command, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, LogFormat};
use pginval::config::{Config, LoadError};
use pginval::pipeline::{self, RunError};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    // One thread: the work is a short sequential path per message, and cross-thread
    // wake-ups between the reader and the sink cost more than they overlap.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    ExitCode::from(runtime.block_on(execute(cli)))
}

fn init_logging(cli: &Cli) {
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn load(path: &std::path::Path) -> Result<Config, u8> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        match e {
            LoadError::Read { .. } => EXIT_CONFIG,
            LoadError::Invalid(_) => EXIT_CONFIG,
        }
    })
}

async fn execute(cli: Cli) -> u8 {
    match cli.command {
        Command::Check(args) => {
            let config = match load(&args.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match pginval::check::check(&config).await {
                Ok(report) => {
                    out(report.display(&config));
                    if report.problems.is_empty() {
                        out(format_args!("{}: ok\n", config.path.display()));
                        EXIT_OK
                    } else {
                        out(format_args!(
                            "{}: {} problem(s) found\n",
                            config.path.display(),
                            report.problems.len()
                        ));
                        EXIT_CONFIG
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    EXIT_FAILURE
                }
            }
        }
        Command::Run(args) => {
            // Signals are caught from here on, also during the start-up checks.
            let shutdown = match shutdown_signal() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: cannot install signal handlers: {e}");
                    return EXIT_FAILURE;
                }
            };
            let mut config = match load(&args.config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            config.dry_run = args.dry_run;
            let path = config.path.clone();
            match pipeline::run(config, shutdown).await {
                Ok(()) => EXIT_OK,
                Err(RunError::Check(report)) => {
                    eprintln!(
                        "pginval will not start: {} has problems with the database:",
                        path.display()
                    );
                    for p in &report.problems {
                        let mut s = String::new();
                        let _ = pginval::diagnostics::write_problem(&mut s, &path, p);
                        eprint!("{s}");
                    }
                    EXIT_CONFIG
                }
                Err(e) => {
                    tracing::error!(error = %e, "pginval stopped");
                    EXIT_FAILURE
                }
            }
        }
        Command::Status(args) => {
            let config = match load(&args.config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let status = match pginval::replication::catalog::connect(&config.source).await {
                Ok(client) => pginval::status::status(&client, &config).await,
                Err(e) => Err(e),
            };
            match status {
                Ok(status) if args.json => {
                    out(format_args!(
                        "{}\n",
                        serde_json::to_string_pretty(&status).unwrap_or_default()
                    ));
                    EXIT_OK
                }
                Ok(status) => {
                    out(status);
                    EXIT_OK
                }
                Err(e) => {
                    eprintln!(
                        "error: cannot read the status of the source database: {}",
                        pginval::replication::catalog::describe_error(&e)
                    );
                    EXIT_FAILURE
                }
            }
        }
        Command::Setup(args) => {
            let config = match load(&args.config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let client = match pginval::replication::catalog::connect(&config.source).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!(
                        "error: cannot connect to the source database: {}",
                        pginval::replication::catalog::describe_error(&e)
                    );
                    return EXIT_FAILURE;
                }
            };
            let plan = match pginval::setup::plan(&client, &config).await {
                Ok(p) => p,
                Err(e) => {
                    eprintln!(
                        "error: {}",
                        pginval::replication::catalog::describe_error(&e)
                    );
                    return EXIT_FAILURE;
                }
            };
            out(plan.to_sql());
            if args.apply {
                if let Err(e) = pginval::setup::apply(&client, &plan).await {
                    eprintln!(
                        "error: {}",
                        pginval::replication::catalog::describe_error(&e)
                    );
                    return EXIT_FAILURE;
                }
                eprintln!("applied {} statement(s)", plan.statements.len());
            }
            EXIT_OK
        }
        Command::FillScript(args) => {
            let config = match load(&args.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let ttl = config.redis_durability.fence_ttl.as_millis() as u64;
            out(pginval::sink::fence::fill_script_text(ttl));
            EXIT_OK
        }
        Command::Explain(args) => {
            let config = match load(&args.config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let change = pginval::explain::Change {
                table: args.table,
                op: args.op,
                old: args.old,
                new: args.new,
            };
            match pginval::explain::explain(&config, &change) {
                Ok(text) => {
                    out(text);
                    EXIT_OK
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    EXIT_CONFIG
                }
            }
        }
    }
}

/// Writes `text` to stdout; a reader that went away (`pginval check | head`) is no
/// error worth a panic.
fn out(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = write!(std::io::stdout().lock(), "{text}");
}

/// A future that completes on SIGINT or SIGTERM; the handlers are installed now.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested");
    })
}
