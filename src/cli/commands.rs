//! The command line: clap's parsing, and the small commands (`serve`, `check`, `mock`);
//! `demo`, `status` and `import-qcc` have files of their own. Each command is a function
//! that returns a `CliError` whose kind decides the exit code.

use crate::cli::error::CliError;
use crate::config::load::ConfigError;
use crate::config::validated::{Config, Overrides};
use crate::server::listen::{DRAIN_GRACE, Server};
use crate::state::shared::{Source, State};
use clap::{Parser, Subcommand};
use log::{LevelFilter, info, warn};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "failover-proxy",
    version,
    about = "A blocking, multithreaded failover proxy for Anthropic-API clients",
    after_help = "Examples:\n  failover-proxy demo\n  failover-proxy check --config examples/config.json --probe\n  failover-proxy serve --config examples/config.json --log-file proxy.log\n  failover-proxy status\n  failover-proxy import-qcc --profile work --output config.json\n  failover-proxy mock --name primary --fault 529"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGINT/SIGTERM; SIGHUP reloads the config file.
    #[command(
        after_help = "Example:\n  failover-proxy serve --config config.json --log-file proxy.log"
    )]
    Serve {
        /// The JSON config file.
        #[arg(long)]
        config: PathBuf,
        /// Listen address, overriding the config's `listen`.
        #[arg(long)]
        listen: Option<String>,
        /// Threads kept ready for new connections, overriding the config's `workers`.
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
        /// The JSON config file.
        #[arg(long)]
        config: PathBuf,
        /// Also send one recovery probe to each endpoint and print what it found.
        #[arg(long)]
        probe: bool,
    },
    /// Run mock upstreams, the proxy and traffic on loopback; no config, no network.
    #[command(
        after_help = "Example:\n  failover-proxy demo    # about 12 s; a live table on a terminal, plain lines otherwise"
    )]
    Demo,
    /// Run one mock upstream on 127.0.0.1 (a free port) until Ctrl-C, to try the proxy by
    /// hand; a request header `x-mock-fault` overrides the fault per request.
    #[command(
        after_help = "Examples:\n  failover-proxy mock --name primary --fault 529\n  failover-proxy mock --name backup\nFaults: none, 400-599, 429, reset, hang, slow, soft, sse-error, cut, pings"
    )]
    Mock {
        /// The fault every request gets unless its x-mock-fault header says otherwise.
        #[arg(long, default_value = "none")]
        fault: String,
        /// Sent back in the x-mock-upstream header, to see which upstream answered.
        #[arg(long, default_value = "mock")]
        name: String,
    },
    /// Print a running proxy's endpoints and counters as a table.
    #[command(after_help = "Example:\n  failover-proxy status --url http://127.0.0.1:7860")]
    Status {
        /// The proxy's base URL.
        #[arg(long, default_value = "http://127.0.0.1:7860")]
        url: String,
    },
    /// Turn a profile of qcc's config cache (~/.fastcc/cache.json) into a config.
    ImportQcc(crate::cli::import_qcc::command::Args),
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
        Command::Demo => crate::cli::demo::run().map_err(CliError::Startup),
        Command::Status { url } => crate::cli::status::run(&url),
        Command::Mock { fault, name } => mock(&fault, &name),
        Command::ImportQcc(args) => crate::cli::import_qcc::command::run(&args),
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
    crate::cli::logging::init(level, log_file.as_deref()).map_err(CliError::Startup)?;
    let state = build_state(path, config)?;
    let source = Source {
        config_path: path.to_path_buf(),
        overrides: overrides.clone(),
        log_file: log_file.clone(),
    };
    let _first_and_only = state.source.set(source);
    let state = Arc::new(state);
    // Handlers first: a SIGTERM right after start-up must drain, not kill.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| CliError::Startup(format!("cannot install signal handlers: {e}")))?;
    let server = Server::start(state.clone()).map_err(CliError::Startup)?;
    for signal in signals.forever() {
        if signal == signal_hook::consts::SIGHUP {
            reload(&state);
            continue;
        }
        info!("signal {signal}: finishing in-flight requests, then exiting");
        break;
    }
    if server.shutdown(DRAIN_GRACE) {
        info!("stopped");
    }
    log::logger().flush();
    Ok(())
}

/// SIGHUP: a valid new config replaces the old one; an invalid one changes nothing.
fn reload(state: &State) {
    match state.reload_from_source() {
        Ok(()) => info!("config reloaded"),
        Err(e) => warn!("reload refused, the running config is unchanged: {e}"),
    }
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
        "{:<16} {:<8} {:>8} {:>6} {:<8} {:<14} {:<9} base_url",
        "name", "id", "priority", "weight", "enabled", "key", "auth"
    );
    for e in &config.endpoints {
        println!(
            "{:<16} {:<8} {:>8} {:>6} {:<8} {:<14} {:<9} {}",
            e.name,
            e.id.to_string(),
            e.priority,
            e.weight,
            e.enabled,
            e.api_key.redacted(),
            e.auth.name(),
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
            .map(|e| crate::upstream::probe::run(e, probe))
            .collect()
    });
    for (e, r) in generation.endpoints.iter().zip(results) {
        let word = if r.recovered { "ok    " } else { "FAILED" };
        println!("{word} {:<16} {}  {}", e.name(), e.id(), r.detail);
    }
}

/// `mock`: one mock upstream on loopback until SIGINT/SIGTERM.
fn mock(fault: &str, name: &str) -> Result<(), CliError> {
    let parsed = crate::mock::fault::Fault::parse(fault)
        .ok_or_else(|| CliError::Usage(format!("--fault: unknown fault {fault:?}")))?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| CliError::Startup(format!("cannot install signal handlers: {e}")))?;
    let upstream = crate::mock::control::MockUpstream::start_named(name, parsed)
        .map_err(|e| CliError::Startup(format!("cannot start the mock upstream: {e}")))?;
    println!(
        "mock upstream {name:?} on {} (fault {fault}); Ctrl-C stops it",
        upstream.url()
    );
    let _ = signals.forever().next();
    println!(
        "{} requests, {} answered with a fault",
        upstream.requests(),
        upstream.failures()
    );
    Ok(())
}
