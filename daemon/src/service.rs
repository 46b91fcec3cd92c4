//! The daemon's life: load the model, start the worker, serve on the bus, tell systemd, and on
//! SIGTERM/SIGINT cancel every job (their callers get `Finished("cancelled")`) and return.
use std::sync::Arc;
use std::time::Duration;

use fasa_engine::{LoadOptions, Model, ModelInfo};
use tokio::signal::unix::{signal, SignalKind};

use crate::bus::{self, manager::Manager, BusError, Shared};
use crate::config::Config;
use crate::scheduler::{self, Load, Worker};
use crate::systemd;

/// How long the worker may take to cancel its jobs and the pump to send their signals.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A worker busy in one step for longer than this counts as hung: the watchdog stops pinging.
const WORKER_STALL: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Load(#[from] fasa_engine::EngineError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot start {what}: {source}")]
    Start { what: &'static str, source: std::io::Error },
    #[error("the inference worker stopped unexpectedly ({0}); restarting fasad may help")]
    WorkerDied(String),
}

// Returned once, at exit: its size does not matter.
#[allow(clippy::result_large_err)]
pub fn run(config: Config) -> Result<(), ServiceError> {
    systemd::notify(&format!("STATUS=loading {}", config.model.display()));
    log::info!("loading {}", config.model.display());
    let mut options = LoadOptions::new(&config.model, &config.ort_library);
    options.max_sequences = config.max_sequences;
    options.max_context = config.max_context;
    options.threads = config.threads;
    let model = Model::load(&options)?;
    let info = model.info().clone();
    let worker = scheduler::spawn(model, config.max_queue).map_err(|source| ServiceError::Start { what: "the worker thread", source })?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fasad-bus")
        .enable_all()
        .build()
        .map_err(|source| ServiceError::Start { what: "the async runtime", source })?;
    let result = runtime.block_on(serve(config, info, worker));
    // Jobs are reported cancelled by now; the worker thread may still be inside a step and is
    // not waited for.
    runtime.shutdown_background();
    result
}

async fn serve(config: Config, info: ModelInfo, worker: Worker) -> Result<(), ServiceError> {
    let Worker { handle, events, thread } = worker;
    let shared = Arc::new(Shared::new(handle.clone(), config.default_max_tokens, config.max_queue, config.job_linger));
    let manager = Manager { shared: shared.clone(), info: info.clone() };
    let conn = bus::connect(config.bus, manager).await?;

    let name = info.config.name.clone();
    let bus_name = config.bus.as_str();
    let status = move |load: Load| {
        systemd::notify(&format!(
            "STATUS=serving {name} on the {bus_name} bus: {} running, {} queued, {} free slots",
            load.running, load.queued, load.free_slots
        ))
    };
    let mut pump = tokio::spawn(bus::pump(conn.clone(), shared.clone(), events, status));
    let watcher = tokio::spawn({
        let (conn, shared) = (conn.clone(), shared.clone());
        async move {
            if let Err(e) = bus::watch_callers(conn, shared).await {
                log::error!("cannot watch callers leaving the bus, their jobs will run to the end: {e}");
            }
        }
    });
    if let Some(every) = systemd::watchdog_interval() {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if handle.last_beat() < WORKER_STALL {
                    systemd::notify("WATCHDOG=1");
                } else {
                    log::error!("the worker has been stuck in one step for {:?}", handle.last_beat());
                }
            }
        });
    }

    systemd::notify(&format!("READY=1\nSTATUS=serving {} on the {bus_name} bus", info.config.name));
    log::info!(
        model = info.config.name.as_str();
        "serving {} ({} layers, {} sequences x {} tokens) as {} on the {bus_name} bus",
        info.path.display(), info.config.n_layers, info.max_sequences, info.max_context, fasa_dbus::BUS_NAME
    );

    let mut term = signal(SignalKind::terminate()).map_err(|source| ServiceError::Start { what: "the SIGTERM handler", source })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| ServiceError::Start { what: "the SIGINT handler", source })?;
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = &mut pump => {
            watcher.abort();
            // The pump ends when the worker thread has returned: join it for its panic message.
            let why = match thread.join() {
                Err(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "it panicked".into()),
                Ok(()) => "it returned".into(),
            };
            return Err(ServiceError::WorkerDied(why));
        }
    };

    log::info!("{why}: cancelling jobs and stopping");
    systemd::notify("STOPPING=1\nSTATUS=stopping: cancelling jobs");
    handle.shutdown();
    // The pump ends once the worker has reported every job cancelled and the signals are out.
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut pump).await.is_err() {
        log::warn!("jobs did not stop within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    watcher.abort();
    Ok(())
}
