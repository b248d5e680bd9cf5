//! The error of a command: which kind, and the exit code the contract gives it. Its own
//! module so that the commands (`import_qcc`) use it without importing the command line.

use crate::config::load::ConfigError;
use std::fmt;

/// A failed command; `exit_code` maps its kind to the contract's exit codes.
#[derive(Debug)]
pub enum CliError {
    Config(ConfigError),
    /// A command-line value clap cannot check by itself.
    Usage(String),
    /// Anything else that stops start-up (port taken, thread limit, log file).
    Startup(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) | CliError::Usage(_) => 2,
            CliError::Startup(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Config(e) => write!(f, "{e}"),
            CliError::Usage(e) => write!(f, "{e}"),
            CliError::Startup(e) => write!(f, "{e}"),
        }
    }
}
