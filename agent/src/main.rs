//! `novabackup`: the agent daemon and the command-line interface. This file
//! only parses arguments, sets up logging and dispatches.

mod cli;
mod config;
mod daemon;
mod sigpipe;
mod tlsopts;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Every file novabackup creates (packs, manifests, restored images,
    // state) is its owner's alone unless a mode says otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let args = cli::Cli::parse();
    if !args.is_agent() {
        sigpipe::default_action();
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("NOVABACKUP_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(if args.is_agent() { "info" } else { "warn" })
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(cli::exit_code(&e))
        }
    }
}
