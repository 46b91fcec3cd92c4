//! fasad on the bus: the connection (name, ObjectManager at `/`, the manager), the event pump
//! that turns the worker's events into job properties and unicast signals, and the watch on
//! callers leaving the bus, whose jobs are cancelled and removed.
pub mod auth;
pub mod job;
pub mod manager;
pub mod task;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fasa_dbus::{Error, FinishReason, BUS_NAME, MANAGER_PATH, OBJECT_MANAGER_PATH};
use fasa_engine::EngineError;
use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;
use zbus::names::{BusName, OwnedUniqueName};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

use crate::config::BusKind;
use crate::memory::{Ask, HeadroomReader};
use crate::models::{LoadSpec, ModelStatus, ProfileState};
use crate::scheduler::{Event, JobId, Load, Outcome, SubmitError, WorkerHandle};
use job::{Job, SharedJobData};
use manager::Manager;

#[cfg(test)]
mod tests;

/// State the interfaces and the pump share.
pub struct Shared {
    pub worker: WorkerHandle,
    pub default_max_tokens: u32,
    pub max_queue: usize,
    /// How long a finished job stays on the bus for its caller to read.
    pub linger: Duration,
    pub next_id: AtomicU64,
    jobs: Mutex<HashMap<JobId, JobEntry>>,
    load: Mutex<Load>,
    pub settings: Settings,
    /// The loaded model; `None` while unloaded.
    model: Mutex<Option<ModelStatus>>,
    /// How the current (or last) model was loaded: its shapes plan `Plan()` calls, and
    /// calibration loads a second instance from it.
    pub spec: Mutex<Option<LoadSpec>>,
    /// The live plan (or why nothing fits).
    pub plan: Mutex<Option<Result<fasa_engine::plan::Plan, fasa_engine::plan::PlanError>>>,
    /// A calibration is running.
    pub calibrating: std::sync::atomic::AtomicBool,
}

/// What the bus side needs to know of the configuration.
pub struct Settings {
    pub bus: BusKind,
    pub models_dir: std::path::PathBuf,
    pub headroom: HeadroomReader,
    /// What the owner asked for (the plan may give less).
    pub ask: Ask,
}

impl Settings {
    #[cfg(test)]
    /// For tests: session bus, live headroom, 4 × trained context asked.
    pub fn session() -> Self {
        Settings { bus: BusKind::Session, models_dir: fasa_engine::paths::models_dir(), headroom: HeadroomReader::new(None), ask: Ask { context: 0, sessions: 4 } }
    }
}

pub struct JobEntry {
    pub owner: OwnedUniqueName,
    pub path: OwnedObjectPath,
    pub data: SharedJobData,
    /// The caller left the bus: remove the job as soon as it ends, and send it nothing.
    pub caller_gone: bool,
}

impl Shared {
    pub fn new(worker: WorkerHandle, default_max_tokens: u32, max_queue: usize, linger: Duration, settings: Settings) -> Self {
        Shared {
            worker,
            default_max_tokens,
            max_queue,
            linger,
            next_id: AtomicU64::new(1),
            jobs: Mutex::new(HashMap::new()),
            load: Mutex::new(Load::default()),
            settings,
            model: Mutex::new(None),
            spec: Mutex::new(None),
            plan: Mutex::new(None),
            calibrating: Default::default(),
        }
    }

    pub fn model(&self) -> Option<ModelStatus> {
        self.model.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_model(&self, m: Option<ModelStatus>) {
        *self.model.lock().unwrap_or_else(|e| e.into_inner()) = m;
    }

    /// Marks the loaded model's profile state.
    pub fn set_profile_state(&self, state: ProfileState) {
        if let Some(m) = self.model.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            m.profile = state;
        }
    }

    pub fn spec(&self) -> Option<LoadSpec> {
        self.spec.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn plan(&self) -> Option<Result<fasa_engine::plan::Plan, fasa_engine::plan::PlanError>> {
        self.plan.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn jobs(&self) -> MutexGuard<'_, HashMap<JobId, JobEntry>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn load(&self) -> Load {
        *self.load.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The typed D-Bus error for an engine error: the caller's fault or the service's.
pub fn engine_error(e: &EngineError) -> Error {
    let message = e.to_string();
    match e {
        EngineError::InvalidRequest(_) | EngineError::Tokenizer(_) => Error::InvalidArgument(message),
        EngineError::ContextTooLong { .. } => Error::ContextTooLong(message),
        EngineError::NoFreeSlot(_) => Error::Busy(message),
        EngineError::Io { .. }
        | EngineError::BadModel { .. }
        | EngineError::Unsupported(_)
        | EngineError::MissingRuntime { .. }
        | EngineError::Runtime(_) => Error::Failed(message),
    }
}

pub fn submit_error(e: SubmitError) -> Error {
    match e {
        SubmitError::Engine(e) => engine_error(&e),
        e @ SubmitError::QueueFull { .. } => Error::Busy(e.to_string()),
        e @ SubmitError::Stopped => Error::Failed(e.to_string()),
        e @ SubmitError::NoModel => Error::ModelNotLoaded(e.to_string()),
        SubmitError::DoesNotFit(m) => Error::DoesNotFit(m),
        SubmitError::Busy(m) => Error::Busy(m),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to the {bus} bus: {source}{hint}")]
    Connect { bus: &'static str, source: zbus::Error, hint: &'static str },
    #[error("{BUS_NAME} is already owned on the {bus} bus: another fasad is running (stop it, or use --session/--system)")]
    NameTaken { bus: &'static str },
    #[error("{BUS_NAME} on the {bus} bus: {source}")]
    Serve { bus: &'static str, source: zbus::Error },
}

/// Connects to the system or session bus and serves there.
pub async fn connect(bus: BusKind, manager: Manager) -> Result<Connection, BusError> {
    let hint = match bus {
        BusKind::System => " (is dbus running? for a private instance use --session)",
        BusKind::Session => " (is DBUS_SESSION_BUS_ADDRESS set? try dbus-run-session)",
    };
    let builder = match bus {
        BusKind::Session => zbus::connection::Builder::session(),
        BusKind::System => zbus::connection::Builder::system(),
    }
    .map_err(|source| BusError::Connect { bus: bus.as_str(), source, hint })?;
    serve(builder, bus.as_str(), hint, manager).await
}

/// Exports `/` (ObjectManager) and the manager, then requests the name, so that a caller that
/// activated us finds everything in place.
pub async fn serve(
    builder: zbus::connection::Builder<'_>,
    bus: &'static str,
    hint: &'static str,
    manager: Manager,
) -> Result<Connection, BusError> {
    let serve = |source| BusError::Serve { bus, source };
    builder
        .serve_at(OBJECT_MANAGER_PATH, zbus::fdo::ObjectManager)
        .map_err(serve)?
        .serve_at(MANAGER_PATH, manager)
        .map_err(serve)?
        .name(BUS_NAME)
        .map_err(serve)?
        .build()
        .await
        .map_err(|source| match source {
            zbus::Error::NameTaken => BusError::NameTaken { bus },
            zbus::Error::InputOutput(_) | zbus::Error::Address(_) | zbus::Error::Handshake(_) => {
                BusError::Connect { bus, source, hint }
            }
            source => BusError::Serve { bus, source },
        })
}

/// Applies the worker's events to the job objects and sends their signals, until the worker
/// stops. `on_load` sees every new load (for systemd's STATUS line).
pub async fn pump(conn: Connection, shared: Arc<Shared>, mut events: UnboundedReceiver<Event>, on_load: impl Fn(Load)) {
    while let Some(event) = events.recv().await {
        if let Err(e) = apply(&conn, &shared, event, &on_load).await {
            log::warn!("cannot report a job event on the bus: {e}");
        }
    }
}

async fn apply(conn: &Connection, shared: &Arc<Shared>, event: Event, on_load: &impl Fn(Load)) -> zbus::Result<()> {
    let server = conn.object_server();
    match event {
        Event::Load(load) => {
            let before = std::mem::replace(&mut *shared.load.lock().unwrap_or_else(|e| e.into_inner()), load);
            on_load(load);
            let iface = server.interface::<_, Manager>(MANAGER_PATH).await?;
            let manager = iface.get().await;
            let emitter = iface.signal_emitter();
            if before.running != load.running {
                manager.active_jobs_changed(emitter).await?;
            }
            if before.queued != load.queued {
                manager.queued_jobs_changed(emitter).await?;
            }
            if before.free_slots != load.free_slots {
                manager.free_slots_changed(emitter).await?;
            }
        }
        Event::Model(status) => {
            if let Some(s) = &status {
                let mut spec = shared.spec.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(spec) = spec.as_mut() {
                    spec.options.model_path = s.info.path.clone();
                }
            }
            let calibrating = shared.calibrating.load(std::sync::atomic::Ordering::SeqCst);
            shared.set_model(status.map(|s| {
                let mut s = *s;
                // A reload (keep-alive) during a calibration: the calibration still runs.
                if calibrating && s.profile == ProfileState::Uncalibrated {
                    s.profile = ProfileState::Calibrating;
                }
                s
            }));
            manager_changed(conn).await?;
        }
        Event::Started { id, prompt_tokens } => {
            let Some((path, data, _, _)) = entry(shared, id) else { return Ok(()) };
            {
                let mut d = job::lock(&data);
                d.state = fasa_dbus::JobState::Running;
                d.prompt_tokens = prompt_tokens as u32;
            }
            let iface = server.interface::<_, Job>(&path).await?;
            let job = iface.get().await;
            job.state_changed(iface.signal_emitter()).await?;
            job.prompt_tokens_changed(iface.signal_emitter()).await?;
        }
        Event::Progress { id, text, generated, tokens_per_second } => {
            let Some((path, data, owner, gone)) = entry(shared, id) else { return Ok(()) };
            {
                let mut d = job::lock(&data);
                d.tokens_generated = generated as u32;
                d.tokens_per_second = tokens_per_second;
                d.push_text(&text);
            }
            if !text.is_empty() && !gone {
                Job::chunk(&unicast(conn, &path, &owner)?, &text).await?;
            }
        }
        Event::Finished { id, outcome, generated, tokens_per_second } => {
            let Some((path, data, owner, gone)) = entry(shared, id) else { return Ok(()) };
            let (reason, error) = match outcome {
                Outcome::Done(r) => (from_engine(r), String::new()),
                Outcome::Cancelled => (FinishReason::Cancelled, String::new()),
                Outcome::Failed(e) => (FinishReason::Failed, e),
            };
            {
                let mut d = job::lock(&data);
                d.state = reason.state();
                d.finish_reason = Some(reason);
                d.error = error.clone();
                d.tokens_generated = generated as u32;
                d.tokens_per_second = tokens_per_second;
                // Closes the fd stream, once it has written what it holds.
                d.stream = None;
            }
            // Under systemd these become journal fields JOB=, MODEL=, TOKENS_PER_SECOND=, VARIANT=.
            let model = shared.model().map(|m| m.info.config.name).unwrap_or_default();
            let variant = match shared.plan() {
                Some(Ok(p)) => p.variant.as_str(),
                _ => "none",
            };
            log::info!(
                job = id, model = model.as_str(), variant = variant, caller = owner.as_str(), reason = reason.as_str(), tokens = generated,
                tokens_per_second = (tokens_per_second * 10.0).round() / 10.0;
                "job {id} {reason}{}{error}", if error.is_empty() { "" } else { ": " }
            );
            let iface = server.interface::<_, Job>(&path).await?;
            {
                let job = iface.get().await;
                job.state_changed(iface.signal_emitter()).await?;
                job.finish_reason_changed(iface.signal_emitter()).await?;
                job.error_changed(iface.signal_emitter()).await?;
            }
            if gone {
                remove_job(conn, shared, id).await;
            } else {
                Job::finished(&unicast(conn, &path, &owner)?, reason.as_str(), &error).await?;
                let (conn, shared, linger) = (conn.clone(), shared.clone(), shared.linger);
                tokio::spawn(async move {
                    tokio::time::sleep(linger).await;
                    remove_job(&conn, &shared, id).await;
                });
            }
        }
    }
    Ok(())
}

/// Signals PropertiesChanged for every changing Manager property that depends on the model or the plan.
pub async fn manager_changed(conn: &Connection) -> zbus::Result<()> {
    let iface = conn.object_server().interface::<_, Manager>(MANAGER_PATH).await?;
    let m = iface.get().await;
    let e = iface.signal_emitter();
    m.model_changed(e).await?;
    m.model_name_changed(e).await?;
    m.shapes_changed(e).await?;
    m.activations_changed(e).await?;
    m.execution_provider_changed(e).await?;
    m.attention_mode_changed(e).await?;
    m.token_budget_changed(e).await?;
    m.dominant_chunks_changed(e).await?;
    m.profile_state_changed(e).await?;
    m.variant_changed(e).await?;
    m.memory_headroom_changed(e).await?;
    m.max_context_changed(e).await?;
    m.max_sessions_changed(e).await?;
    Ok(())
}

fn from_engine(r: fasa_engine::FinishReason) -> FinishReason {
    match r {
        fasa_engine::FinishReason::Eos => FinishReason::Eos,
        fasa_engine::FinishReason::Stop => FinishReason::Stop,
        fasa_engine::FinishReason::Length => FinishReason::Length,
        fasa_engine::FinishReason::ContextFull => FinishReason::ContextFull,
    }
}

fn entry(shared: &Shared, id: JobId) -> Option<(OwnedObjectPath, SharedJobData, OwnedUniqueName, bool)> {
    let jobs = shared.jobs();
    let e = jobs.get(&id)?;
    Some((e.path.clone(), e.data.clone(), e.owner.clone(), e.caller_gone))
}

/// An emitter of the job's signals addressed to its creator only.
fn unicast<'a>(conn: &Connection, path: &'a OwnedObjectPath, owner: &'a OwnedUniqueName) -> zbus::Result<SignalEmitter<'a>> {
    Ok(SignalEmitter::new(conn, path.as_ref())?.set_destination(BusName::Unique(owner.as_ref())))
}

/// Takes a job off the bus (InterfacesRemoved follows) and forgets it.
pub async fn remove_job(conn: &Connection, shared: &Shared, id: JobId) {
    let Some(entry) = shared.jobs().remove(&id) else { return };
    if let Err(e) = conn.object_server().remove::<Job, _>(&entry.path).await {
        log::debug!("removing {}: {e}", entry.path.as_str());
    }
}

/// Cancels and removes the jobs of callers that leave the bus (NameOwnerChanged with no new
/// owner), so a crashed client frees its cache slots within a step.
pub async fn watch_callers(conn: Connection, shared: Arc<Shared>) -> zbus::Result<()> {
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    let mut changes = dbus.receive_name_owner_changed().await?;
    while let Some(change) = changes.next().await {
        let Ok(args) = change.args() else { continue };
        if args.new_owner().is_some() || !args.name().starts_with(':') {
            continue;
        }
        let gone = args.name().as_str();
        let (running, ended): (Vec<JobId>, Vec<JobId>) = {
            let mut jobs = shared.jobs();
            let mine = jobs.iter_mut().filter(|(_, e)| e.owner.as_str() == gone);
            let mut running = vec![];
            let mut ended = vec![];
            for (id, e) in mine {
                e.caller_gone = true;
                if job::lock(&e.data).state.is_terminal() {
                    ended.push(*id);
                } else {
                    running.push(*id);
                }
            }
            (running, ended)
        };
        if !running.is_empty() {
            log::info!(caller = gone; "{gone} left the bus: cancelling its jobs {running:?}");
        }
        for id in running {
            shared.worker.cancel_nowait(id);
        }
        for id in ended {
            remove_job(&conn, &shared, id).await;
        }
    }
    Ok(())
}
