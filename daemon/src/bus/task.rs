//! `dev.fasa.Fasa1.Task` at `/dev/fasa/Fasa1/Task/<n>`: a long operation that is not a
//! generation (calibration, a model pull), as systemd and PackageKit model them: `Kind`,
//! `State`, `Progress` (PropertiesChanged at most about once a second), `Result`, `Error`, a
//! `Cancel()` method and a `Finished` signal sent unicast to the caller that started it.
//!
//! The work runs on a blocking thread; it reports progress through a closure and polls the
//! cancel flag.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fasa_dbus::{Error, JobState};
use zbus::message::Header;
use zbus::names::{BusName, OwnedUniqueName};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

use super::Shared;

/// How often `Progress` may change on the bus.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct TaskData {
    pub state: JobState,
    pub progress: f64,
    pub result: String,
    pub error: String,
}

pub struct Task {
    pub id: u64,
    pub kind: &'static str,
    /// The caller that started it; `None` for fasad's own (calibration on first load).
    pub owner: Option<OwnedUniqueName>,
    pub data: Arc<Mutex<TaskData>>,
    pub cancel: Arc<AtomicBool>,
}

fn lock(d: &Mutex<TaskData>) -> MutexGuard<'_, TaskData> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the work may do while it runs.
pub struct Ctl<'a> {
    pub cancel: &'a AtomicBool,
    pub progress: &'a mut dyn FnMut(f64),
}

/// How the work ended: `Ok(result)`, or `Err(None)` when cancelled, `Err(Some(message))`.
pub type Outcome = Result<String, Option<String>>;

/// Exports a task object, runs `work` on a blocking thread and reports it; `on_end` runs on the
/// bus side after the work ended, before `Finished` is sent.
pub async fn start<W, E>(conn: &Connection, shared: &Arc<Shared>, owner: Option<OwnedUniqueName>, kind: &'static str, work: W, on_end: E) -> Result<OwnedObjectPath, Error>
where
    W: FnOnce(Ctl<'_>) -> Outcome + Send + 'static,
    E: FnOnce(&Outcome) + Send + 'static,
{
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let path = OwnedObjectPath::try_from(fasa_dbus::task_path(id)).map_err(|e| Error::Failed(e.to_string()))?;
    let data = Arc::new(Mutex::new(TaskData { state: JobState::Running, progress: 0.0, result: String::new(), error: String::new() }));
    let cancel = Arc::new(AtomicBool::new(false));
    let task = Task { id, kind, owner: owner.clone(), data: data.clone(), cancel: cancel.clone() };
    conn.object_server().at(&path, task).await.map_err(|e| Error::Failed(format!("cannot export task {id}: {e}")))?;

    let (tx, rx) = tokio::sync::watch::channel(0.0f64);
    let handle = tokio::task::spawn_blocking(move || {
        let mut report = |p: f64| {
            let _ = tx.send(p.clamp(0.0, 1.0));
        };
        work(Ctl { cancel: &cancel, progress: &mut report })
    });
    let (conn, shared, p) = (conn.clone(), shared.clone(), path.clone());
    tokio::spawn(async move {
        let path = p;
        let mut handle = handle;
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let mut shown = 0.0;
        let outcome = loop {
            tokio::select! {
                r = &mut handle => break r.unwrap_or_else(|e| Err(Some(format!("the task panicked: {e}")))),
                _ = tick.tick() => {
                    let now = *rx.borrow();
                    if now != shown {
                        shown = now;
                        lock(&data).progress = now;
                        if let Ok(iface) = conn.object_server().interface::<_, Task>(&path).await {
                            let _ = iface.get().await.progress_changed(iface.signal_emitter()).await;
                        }
                    }
                }
            }
        };
        on_end(&outcome);
        let (state, result, error) = match &outcome {
            Ok(r) => (JobState::Finished, r.clone(), String::new()),
            Err(None) => (JobState::Cancelled, String::new(), String::new()),
            Err(Some(e)) => (JobState::Failed, String::new(), e.clone()),
        };
        {
            let mut d = lock(&data);
            d.state = state;
            if state == JobState::Finished {
                d.progress = 1.0;
            }
            d.result = result.clone();
            d.error = error.clone();
        }
        log::info!(task = id, kind = kind, state = state.as_str(); "task {id} ({kind}) {state}{}{error}", if error.is_empty() { "" } else { ": " });
        if let Ok(iface) = conn.object_server().interface::<_, Task>(&path).await {
            let t = iface.get().await;
            let e = iface.signal_emitter();
            let _ = t.progress_changed(e).await;
            let _ = t.state_changed(e).await;
            let _ = t.result_changed(e).await;
            let _ = t.error_changed(e).await;
        }
        if let Some(owner) = &owner {
            if let Ok(emitter) = SignalEmitter::new(&conn, path.as_ref()) {
                let emitter = emitter.set_destination(BusName::Unique(owner.as_ref()));
                let _ = Task::finished(&emitter, state.as_str(), &result, &error).await;
            }
        }
        tokio::time::sleep(shared.linger).await;
        let _ = conn.object_server().remove::<Task, _>(&path).await;
    });
    Ok(path)
}

#[zbus::interface(name = "dev.fasa.Fasa1.Task")]
impl Task {
    /// Stops the task; its state becomes cancelled shortly after (Finished says when). Only
    /// the caller that started it (or, for fasad's own tasks, any permitted caller) may.
    async fn cancel(&self, #[zbus(header)] header: Header<'_>) -> Result<(), Error> {
        if let Some(owner) = &self.owner {
            if header.sender().map(|s| s.as_str()) != Some(owner.as_str()) {
                return Err(Error::NotPermitted(format!("only the caller that started task {} may cancel it", self.id)));
            }
        }
        self.cancel.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The task ended: `state` is finished, cancelled or failed; `result` what it made (e.g. a
    /// path); `error` what failed (else empty). Unicast to the caller that started it.
    #[zbus(signal)]
    pub async fn finished(emitter: &SignalEmitter<'_>, state: &str, result: &str, error: &str) -> zbus::Result<()>;

    /// What the task does: calibrate or pull.
    #[zbus(property(emits_changed_signal = "const"))]
    fn kind(&self) -> String {
        self.kind.into()
    }

    /// running, finished, cancelled or failed.
    #[zbus(property)]
    fn state(&self) -> String {
        lock(&self.data).state.as_str().into()
    }

    /// Fraction done, 0 to 1; changes are signalled at most about once a second.
    #[zbus(property)]
    fn progress(&self) -> f64 {
        lock(&self.data).progress
    }

    /// What the task made once finished (calibrate: the profile's path; pull: the model's path).
    #[zbus(property)]
    fn result(&self) -> String {
        lock(&self.data).result.clone()
    }

    /// What failed, when the task failed; else empty.
    #[zbus(property)]
    fn error(&self) -> String {
        lock(&self.data).error.clone()
    }
}
