//! The command line: clap's parsing and each command (`commands`: `serve`, `check`,
//! `mock`), the larger commands in files of their own (`demo`, `import_qcc`, `status`),
//! the error whose kind is the exit code (`error`), and `serve`'s logger (`logging`).

pub mod commands;
pub mod demo;
pub mod error;
pub mod import_qcc;
pub mod logging;
pub mod status;
