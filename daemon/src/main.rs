//! fasad: serves a small LLM over D-Bus as `dev.fasa.Fasa1` (see fasa-dbus for the API).
//!
//! Reading order: `config` (flags and file) → `service` (life cycle) → `scheduler` (the worker
//! thread that owns the model) → `bus` (manager and job objects, signals) → `systemd`, `logging`.
mod bus;
mod config;
mod logging;
mod scheduler;
mod service;
mod systemd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = config::Args::parse();
    logging::init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            log::error!("{e:#}");
            systemd::notify(&format!("STATUS=failed: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &config::Args) -> anyhow::Result<()> {
    let config = config::Config::load(args)?;
    service::run(config)?;
    Ok(())
}
