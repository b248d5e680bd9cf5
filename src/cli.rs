//! The command line: `serve`, `check`, `demo`. Parsing is clap's; each command is a
//! function that returns a `CliError` whose kind decides the exit code.

use crate::config::{Config, ConfigError, Overrides};
use crate::server::{DRAIN_GRACE, Server};
use crate::state::State;
use clap::{Parser, Subcommand};
use log::{LevelFilter, info, warn};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "failover-proxy",
    version,
    about = "A blocking, multithreaded failover proxy for Anthropic-API clients",
    after_help = "Examples:\n  failover-proxy demo\n  failover-proxy check --config examples/config.json\n  failover-proxy serve --config examples/config.json"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGINT/SIGTERM; SIGHUP reloads the config file.
    #[command(after_help = "Example:\n  failover-proxy serve --config config.json --log-file proxy.log")]
    Serve {
        /// The JSON config file.
        #[arg(long)]
        config: PathBuf,
        /// Listen address, overriding the config's `listen`.
        #[arg(long)]
        listen: Option<String>,
        /// Worker threads, overriding the config's `workers`.
        #[arg(long)]
        workers: Option<usize>,
        /// error, warn, info, debug or trace.
        #[arg(long, default_value = "info")]
        log_level: LevelFilter,
        /// Also append the log to this file.
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Validate the config and print its endpoints (keys redacted).
    #[command(after_help = "Example:\n  failover-proxy check --config config.json")]
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Also send one recovery probe to each endpoint and print what it found.
        #[arg(long)]
        probe: bool,
    },
    /// Run mock upstreams, the proxy and traffic on loopback; no config, no network.
    Demo,
}

/// A failed command; `exit_code` maps its kind to the contract's exit codes.
#[derive(Debug)]
pub enum CliError {
    Config(ConfigError),
    /// Anything else that stops start-up (port taken, thread limit, log file).
    Startup(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) => 2,
            CliError::Startup(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Config(e) => write!(f, "{e}"),
            CliError::Startup(e) => write!(f, "{e}"),
        }
    }
}

pub fn run() -> Result<(), CliError> {
    match Cli::parse().command {
        Command::Serve {
            config,
            listen,
            workers,
            log_level,
            log_file,
        } => serve(&config, Overrides { listen, workers }, log_level, log_file),
        Command::Check { config, probe } => check(&config, probe),
        Command::Demo => crate::demo::run().map_err(CliError::Startup),
    }
}

fn load(path: &Path, overrides: &Overrides) -> Result<Config, CliError> {
    Config::load(path, overrides).map_err(CliError::Config)
}

/// A config whose endpoints cannot be built (an unreadable `ca_file`, a bad `proxy`) is a
/// config error too, named with the file.
fn build_state(path: &Path, config: Config) -> Result<State, CliError> {
    State::new(config).map_err(|message| {
        CliError::Config(ConfigError {
            file: path.display().to_string(),
            message,
        })
    })
}

fn serve(
    path: &Path,
    overrides: Overrides,
    level: LevelFilter,
    log_file: Option<PathBuf>,
) -> Result<(), CliError> {
    let config = load(path, &overrides)?;
    init_logging(level, log_file.as_deref())?;
    let state = Arc::new(build_state(path, config)?);
    let server = Server::start(state.clone()).map_err(CliError::Startup)?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| CliError::Startup(format!("cannot install signal handlers: {e}")))?;
    for signal in signals.forever() {
        if signal == signal_hook::consts::SIGHUP {
            reload(&state, path, &overrides);
            continue;
        }
        info!("signal {signal}: finishing in-flight requests, then exiting");
        break;
    }
    if server.shutdown(DRAIN_GRACE) {
        info!("stopped");
    }
    Ok(())
}

/// SIGHUP: a valid new config replaces the old one; an invalid one changes nothing.
fn reload(state: &State, path: &Path, overrides: &Overrides) {
    let result = Config::load(path, overrides)
        .map_err(|e| e.to_string())
        .and_then(|config| state.reload(config));
    match result {
        Ok(()) => info!("reloaded {}", path.display()),
        Err(e) => warn!("reload refused, the running config is unchanged: {e}"),
    }
}

fn init_logging(level: LevelFilter, file: Option<&Path>) -> Result<(), CliError> {
    use simplelog::{ColorChoice, CombinedLogger, SharedLogger, TermLogger, TerminalMode, WriteLogger};
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .build();
    let mut loggers: Vec<Box<dyn SharedLogger>> = vec![TermLogger::new(
        level,
        config.clone(),
        TerminalMode::Stderr,
        ColorChoice::Auto,
    )];
    if let Some(path) = file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| CliError::Startup(format!("cannot open log file {}: {e}", path.display())))?;
        loggers.push(WriteLogger::new(level, config, f));
    }
    CombinedLogger::init(loggers).map_err(|e| CliError::Startup(format!("logging: {e}")))
}

fn check(path: &Path, probe: bool) -> Result<(), CliError> {
    let config = load(path, &Overrides::default())?;
    let state = build_state(path, config.clone())?;
    println!(
        "{}: valid; listen {}, {} workers, strategy {}",
        path.display(),
        config.listen,
        config.workers,
        config.strategy.name()
    );
    println!(
        "{:<16} {:<8} {:>8} {:>6} {:<8} {:<14} base_url",
        "name", "id", "priority", "weight", "enabled", "key"
    );
    for e in &config.endpoints {
        println!(
            "{:<16} {:<8} {:>8} {:>6} {:<8} {:<14} {}",
            e.name,
            e.id.to_string(),
            e.priority,
            e.weight,
            e.enabled,
            e.api_key.redacted(),
            e.base_url
        );
    }
    if probe {
        probe_all(&state);
    }
    Ok(())
}

/// One probe per endpoint, in parallel, each result in plain words.
fn probe_all(state: &State) {
    use rayon::prelude::*;
    let generation = state.current();
    let probe = &generation.config.probe;
    println!();
    println!("probing each endpoint once ({:?} probe)...", probe.kind);
    let results: Vec<_> = state.probe_pool.install(|| {
        generation
            .endpoints
            .par_iter()
            .map(|e| crate::probe::run(e, probe))
            .collect()
    });
    for (e, r) in generation.endpoints.iter().zip(results) {
        let word = if r.recovered { "ok    " } else { "FAILED" };
        println!("{word} {:<16} {}  {}", e.name(), e.id(), r.detail);
    }
}
