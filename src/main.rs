//! The `failover-proxy` binary: parse the command line, run the command, map the result
//! to an exit code (0 success, 2 bad usage or config, 1 any other failure).

fn main() {
    let code = match failover_proxy::cli::commands::run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("failover-proxy: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}
