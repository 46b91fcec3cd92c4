//! The daemon's life: plan memory from the headroom, load the model sized by the plan (with its
//! saved calibration profile), start the worker, serve on the bus, calibrate in the background
//! when the model has no profile, re-plan on memory pressure, tell systemd, and on
//! SIGTERM/SIGINT cancel every job (their callers get `Finished("cancelled")`) and return.
use std::sync::Arc;
use std::time::Duration;

use fasa_engine::headroom::PressureLevel;
use fasa_engine::LoadOptions;
use tokio::signal::unix::{signal, SignalKind};

use crate::bus::{self, manager::Manager, BusError, Settings, Shared};
use crate::config::Config;
use crate::memory::{self, Ask, HeadroomReader};
use crate::models::{self, LoadSpec, ProfileState};
use crate::scheduler::{self, Limits, Load, Worker, WorkerConfig};
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
    #[error("cannot plan memory: {0}")]
    Plan(String),
}

// Returned once, at exit: its size does not matter.
#[allow(clippy::result_large_err)]
pub fn run(config: Config) -> Result<(), ServiceError> {
    let headroom = HeadroomReader::new(config.headroom).with_slow_tier(config.slow_tier);
    let ask = Ask { context: config.max_context, sessions: config.max_sequences };
    let plan = memory::plan_before_load(&config.model, &headroom, ask).map_err(ServiceError::Plan)?;
    let mut options = LoadOptions::new(&config.model, &config.ort_library);
    options.threads = config.threads;
    options.activations = config.activations;
    options.execution_provider = config.execution_provider;
    let limits = match &plan {
        Ok(p) => {
            options.max_sequences = p.max_sessions;
            options.max_context = p.max_context;
            if p.variant == fasa_engine::plan::Variant::FasaM {
                options.kv_variant = fasa_engine::attention::KvVariant::FasaM { resident_fcs: p.pool_fcs, row_cache_rows: p.row_cache_rows };
            }
            log::info!(variant = p.variant.as_str(); "memory plan: {} × {} tokens, {}", p.max_sessions, p.max_context, p.reasons.join("; "));
            Limits::slots(p.max_sessions)
        }
        Err(e) => {
            // Serve anyway (the smallest cache): every job gets the typed error, nobody an OOM.
            log::warn!("no memory plan fits: {e}; jobs will be refused until memory frees up");
            options.max_sequences = 1;
            options.max_context = fasa_engine::plan::MIN_CONTEXT;
            Limits { sessions: 1, context: 0, refuse: Some(e.to_string()) }
        }
    };
    let spec = LoadSpec { options, state_dir: models::state_dir(), attention: plan.as_ref().ok().map(|p| p.attention()) };
    systemd::notify(&format!("STATUS=loading {}", config.model.display()));
    log::info!("loading {}", config.model.display());
    let loaded = models::load(&spec)?;
    let status = loaded.status.clone();
    let worker = scheduler::spawn(
        Some(loaded),
        WorkerConfig { max_queue: config.max_queue, limits, keep_alive: config.keep_alive, reload: Some(spec.clone()) },
    )
    .map_err(|source| ServiceError::Start { what: "the worker thread", source })?;
    let settings = Settings { bus: config.bus, models_dir: fasa_engine::paths::models_dir(), headroom, ask };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fasad-bus")
        .enable_all()
        .build()
        .map_err(|source| ServiceError::Start { what: "the async runtime", source })?;
    let result = runtime.block_on(serve(config, settings, spec, status, plan, worker));
    // Jobs are reported cancelled by now; the worker thread may still be inside a step and is
    // not waited for.
    runtime.shutdown_background();
    result
}

async fn serve(
    config: Config,
    settings: Settings,
    spec: LoadSpec,
    status: models::ModelStatus,
    plan: Result<fasa_engine::plan::Plan, fasa_engine::plan::PlanError>,
    worker: Worker,
) -> Result<(), ServiceError> {
    let Worker { handle, events, thread } = worker;
    let info = status.info.clone();
    let uncalibrated = status.profile == ProfileState::Uncalibrated;
    let shared = Arc::new(Shared::new(handle.clone(), config.default_max_tokens, config.max_queue, config.job_linger, settings));
    shared.set_model(Some(status));
    *shared.spec.lock().unwrap_or_else(|e| e.into_inner()) = Some(spec);
    *shared.plan.lock().unwrap_or_else(|e| e.into_inner()) = Some(plan);
    let manager = Manager { shared: shared.clone() };
    let conn = bus::connect(config.bus, manager).await?;
    if uncalibrated && config.calibrate_on_load {
        log::info!("{} has no calibration profile: calibrating in the background", info.config.name);
        let mut options = fasa_engine::calibrate::CalibrateOptions::default();
        options.max_tokens = config.calibrate_max_tokens;
        options.prefix = options.prefix.min(config.calibrate_max_tokens * 2 / 3);
        options.generated_tokens = config.calibrate_max_tokens;
        let request = crate::calibration::Request { texts: vec![], options, output: None };
        if let Err(e) = bus::manager::start_calibration(&conn, &shared, None, request).await {
            log::warn!("cannot calibrate on load: {}", e.message());
        }
    }
    tokio::spawn(watch_pressure(conn.clone(), shared.clone()));

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
                Ok(_) => "it returned".into(),
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
    // Let the last signals (Finished "cancelled") leave the socket before the process exits.
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.graceful_shutdown()).await;
    Ok(())
}

/// Re-plans when PSI memory pressure changes (polled once a second): new jobs get the smaller
/// plan, running jobs keep their memory.
async fn watch_pressure(conn: zbus::Connection, shared: Arc<Shared>) {
    let Some(mut psi) = memory::psi() else {
        log::info!("no PSI (/proc/pressure/memory): memory pressure is not watched");
        return;
    };
    let mut level = PressureLevel::None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = match psi.poll() {
            Ok(l) => l,
            Err(e) => {
                log::debug!("PSI: {e}");
                continue;
            }
        };
        if now == level {
            continue;
        }
        level = now;
        let (Some(model), Ok(headroom)) = (shared.model(), shared.settings.headroom.read(now)) else { continue };
        let prev = shared.plan().and_then(|p| p.ok());
        let limits = match memory::replan(prev.as_ref(), &model.info, headroom, shared.settings.ask) {
            Ok(p) => {
                log::info!(variant = p.variant.as_str(); "memory pressure {}: new jobs get {} × {} tokens", now.as_str(), p.max_sessions, p.max_context);
                shared.worker.set_attention(p.attention());
                let limits = Limits { sessions: p.max_sessions.min(model.info.max_sequences), context: p.max_context.min(model.info.max_context), refuse: None };
                *shared.plan.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ok(p));
                limits
            }
            Err(e) => {
                log::warn!("memory pressure {}: no plan fits ({e}); new jobs are refused", now.as_str());
                let limits = Limits { sessions: model.info.max_sequences, context: 0, refuse: Some(e.to_string()) };
                *shared.plan.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(e));
                limits
            }
        };
        shared.worker.set_limits(limits);
        let _ = bus::manager_changed(&conn).await;
    }
}
