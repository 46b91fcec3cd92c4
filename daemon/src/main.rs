//! fasad: serves a small LLM over D-Bus as `dev.fasa.Fasa1` (see fasa-dbus for the API).
//!
//! Reading order: `config` (flags and file) → `service` (life cycle) → `memory` (the plan) →
//! `models` (loading, profiles, the models folder) → `scheduler` (the worker thread that owns the
//! model) → `bus` (manager, job and task objects, signals, authorization) → `calibration` →
//! `systemd`, `logging`.
mod bus;
mod calibration;
mod config;
mod logging;
mod memory;
mod models;
mod scheduler;
mod service;
mod systemd;
#[cfg(test)]
mod testing;

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
