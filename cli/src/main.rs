//! fasactl: the command-line client of fasad, over the fasa-dbus proxies.
//!
//! Exit codes scripts can rely on: 0 ok, 1 fasad answered with an error (or the job or task
//! failed), 2 usage, 3 fasad not reachable, 4 no memory plan fits, 130 interrupted by Ctrl-C
//! (the job or task is cancelled).
mod args;
mod commands;
mod connect;
mod manage;
mod stream;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};
use connect::Bus;

/// Why fasactl stops short; each maps to an exit code.
#[derive(Debug)]
pub enum Failure {
    /// fasad answered with an error, or the bus did.
    Daemon(fasa_dbus::Error),
    /// fasad is not on the named bus (`None`: on neither).
    NotRunning(Option<Bus>),
    Usage(String),
    Interrupted,
    Other(String),
}

impl From<fasa_dbus::Error> for Failure {
    fn from(e: fasa_dbus::Error) -> Self {
        Failure::Daemon(e)
    }
}

impl From<zbus::Error> for Failure {
    fn from(e: zbus::Error) -> Self {
        Failure::Daemon(e.into())
    }
}

impl From<zbus::fdo::Error> for Failure {
    fn from(e: zbus::fdo::Error) -> Self {
        Failure::Daemon(e.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fasactl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let choice = match (cli.session, cli.system) {
        (true, _) => Some(Bus::Session),
        (_, true) => Some(Bus::System),
        _ => None,
    };
    match runtime.block_on(run(cli.command, choice)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => report(failure, choice),
    }
}

async fn run(command: Command, choice: Option<Bus>) -> Result<(), Failure> {
    let (conn, bus) = connect::connect(choice).await?;
    match command {
        Command::Generate(args) => commands::generate(conn, args).await,
        Command::Chat(sampling) => commands::chat(conn, sampling).await,
        Command::Status { json } => commands::status(conn, bus, json).await,
        Command::Cancel { job } => commands::cancel(conn, &job).await,
        Command::Calibrate { texts, output, max_tokens, prefix } => manage::calibrate(conn, texts, output, max_tokens, prefix).await,
        Command::Plan { headroom, context, sessions, json } => manage::plan(conn, headroom, context, sessions, json).await,
        Command::Models { action } => manage::models(conn, action).await,
        Command::Load { model } => manage::load(conn, &model).await,
        Command::Unload => manage::unload(conn).await,
    }
}

fn report(failure: Failure, choice: Option<Bus>) -> ExitCode {
    match failure {
        Failure::Daemon(e) if e.is_service_unknown() => report(Failure::NotRunning(choice), choice),
        Failure::Daemon(e @ fasa_dbus::Error::DoesNotFit(_)) => {
            eprintln!("fasactl: {} (DoesNotFit)", e.message());
            ExitCode::from(4)
        }
        Failure::Daemon(e) => {
            match e.dbus_name() {
                Some(name) => eprintln!("fasactl: {} ({})", e.message(), name.rsplit('.').next().unwrap_or(&name)),
                None => eprintln!("fasactl: {}", e.message()),
            }
            ExitCode::from(1)
        }
        Failure::NotRunning(bus) => {
            let on = match bus {
                Some(b) => format!("the {} bus", b.as_str()),
                None => "the system or the session bus".into(),
            };
            eprintln!("fasactl: fasad is not running on {on}; start it with `systemctl start fasad` or `fasad --session`");
            ExitCode::from(3)
        }
        Failure::Usage(m) => {
            eprintln!("fasactl: {m}");
            ExitCode::from(2)
        }
        Failure::Interrupted => ExitCode::from(130),
        Failure::Other(m) => {
            eprintln!("fasactl: {m}");
            ExitCode::from(1)
        }
    }
}
