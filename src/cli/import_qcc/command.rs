//! The `import-qcc` command: reads qcc's cache, has it translated (`translate`), writes the
//! config (mode 0600, never over the cache itself) or prints it, and prints the notes.

use crate::cli::error::CliError;
use crate::cli::import_qcc::translate::{Imported, translate};
use crate::config::load::ConfigError;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The `import-qcc` command line.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    failover-proxy import-qcc --profile work --output config.json\n  \
    failover-proxy import-qcc ~/backup/cache.json --profile work --keys-to-env --output config.json\n  \
    failover-proxy check --config config.json")]
pub struct Args {
    /// qcc's config cache [default: ~/.fastcc/cache.json].
    pub path: Option<PathBuf>,
    /// The profile to import; may be left out when the cache holds exactly one.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Write `api_key_env` references (QCC_<PROFILE>_<N>_KEY) instead of the keys; the
    /// variable names are printed, and you export the keys yourself.
    #[arg(long)]
    pub keys_to_env: bool,
    /// Write the config to this file (mode 0600) instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Reads the cache, translates the profile, writes the config, prints the notes to stderr.
pub fn run(args: &Args) -> Result<(), CliError> {
    let path = match &args.path {
        Some(path) => path.clone(),
        None => default_cache_path()?,
    };
    let file = path.display().to_string();
    let config_error = |message: String| {
        CliError::Config(ConfigError {
            file: file.clone(),
            message,
        })
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        config_error(format!(
            "cannot read qcc's config cache: {e} (give the path of qcc's cache.json)"
        ))
    })?;
    let imported =
        translate(&text, args.profile.as_deref(), args.keys_to_env).map_err(config_error)?;
    match &args.output {
        Some(out) if same_file(out, &path) => {
            return Err(config_error(format!(
                "--output {} is qcc's cache itself; writing there would destroy it",
                out.display()
            )));
        }
        Some(out) => write_private(out, &imported.config)?,
        None => print!("{}", imported.config),
    }
    for note in &imported.notes {
        eprintln!("{note}");
    }
    eprintln!("{}", summary(&imported, args));
    Ok(())
}

/// True when both paths name one existing file (a link or `./` does not hide it).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `~/.fastcc/cache.json`, where qcc keeps its profiles.
fn default_cache_path() -> Result<PathBuf, CliError> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            CliError::Config(ConfigError {
                file: "~/.fastcc/cache.json".into(),
                message: "HOME is not set; give the path of qcc's cache.json".into(),
            })
        })?;
    Ok(PathBuf::from(home).join(".fastcc").join("cache.json"))
}

/// The last line on stderr: what was imported and where it went, and what to do next.
fn summary(imported: &Imported, args: &Args) -> String {
    let ids: Vec<String> = imported.ids.iter().map(|id| id.to_string()).collect();
    let place = match &args.output {
        Some(out) => format!("wrote {} (mode 0600)", out.display()),
        None => "printed the config".to_string(),
    };
    let mut line = format!(
        "{place}: profile {:?}, {} endpoint(s), ids {}",
        imported.profile,
        ids.len(),
        ids.join(" ")
    );
    if args.output.is_none() && !args.keys_to_env {
        line += "\nthe config holds the API keys: keep the file it goes to private (chmod 600)";
    }
    line
}

/// Writes the config readable by its owner only: it may hold keys.
fn write_private(path: &Path, text: &str) -> Result<(), CliError> {
    let fail =
        |e: std::io::Error| CliError::Startup(format!("cannot write {}: {e}", path.display()));
    let file = open_private(path).map_err(fail)?;
    write_all(file, text).map_err(fail)
}

/// Opens for writing with mode 0600; the mode is set before any content goes in, also when
/// the file already existed with a wider one.
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(file)
}

fn write_all(mut file: std::fs::File, text: &str) -> std::io::Result<()> {
    file.write_all(text.as_bytes())?;
    file.sync_all()
}
