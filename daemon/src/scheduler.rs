//! The inference worker: one dedicated thread owns the model (ONNX Runtime runs block, and
//! `Model` is not `Sync`) and steps the running sequences round-robin, one token each, so
//! concurrent jobs interleave fairly. Between two steps it reads its commands (submit, cancel,
//! limits, model changes, shutdown), so a cancelled job's cache slot is freed after at most one
//! step.
//!
//! Jobs beyond the free sessions wait in a bounded FIFO queue; when it is full, a submit is
//! refused (the bus answers `Busy`). The number of sessions and the context a new job may use
//! come from the memory plan ([`Limits`]) and may shrink under pressure: running jobs keep
//! what they hold. The model itself may be absent (unloaded by `UnloadModel`, or after the
//! keep-alive: then it is reloaded transparently on the next submit). Everything the worker
//! does is reported as [`Event`]s on an unbounded channel that the bus side turns into
//! properties and signals.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fasa_engine::{AttnConfig, EngineError, FinishReason, GenerateRequest, Model, Sequence, Step};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::models::{self, LoadSpec, Loaded, ModelStatus};

pub type JobId = u64;

/// What new jobs may take, from the memory plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Jobs that generate at once (at most the cache pool's slots).
    pub sessions: usize,
    /// Tokens a new job's prompt may hold; 0 = the model's allocated context.
    pub context: usize,
    /// Why every job is refused (no memory plan fits), if it is.
    pub refuse: Option<String>,
}

impl Limits {
    pub fn slots(sessions: usize) -> Self {
        Limits { sessions, context: 0, refuse: None }
    }
}

/// Where a submitted job went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It holds a cache slot and is being stepped.
    Running,
    /// It waits for a slot.
    Queued,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("all {running} sessions are busy and {queued} jobs are waiting, the most fasad queues; retry when a job finishes")]
    QueueFull { running: usize, queued: usize },
    #[error("the inference worker has stopped (fasad is shutting down)")]
    Stopped,
    #[error("no model is loaded: load one with `fasactl load NAME` (LoadModel)")]
    NoModel,
    #[error("{0}")]
    DoesNotFit(String),
    #[error("{0}")]
    Busy(String),
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done(FinishReason),
    Cancelled,
    /// The engine's error message.
    Failed(String),
}

/// Counters of the worker, reported whenever they change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub running: usize,
    pub queued: usize,
    pub free_slots: usize,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The job got a cache slot; its prompt is tokenized.
    Started { id: JobId, prompt_tokens: usize },
    /// One step: the text it made final (maybe empty) and the job's counters.
    Progress { id: JobId, text: String, generated: usize, tokens_per_second: f64 },
    /// The job ended and its slot is free.
    Finished { id: JobId, outcome: Outcome, generated: usize, tokens_per_second: f64 },
    Load(Load),
    /// The model was loaded, replaced or unloaded (`None`).
    Model(Option<Box<ModelStatus>>),
}

enum Command {
    Submit {
        id: JobId,
        request: Box<GenerateRequest>,
        /// The caller left max_tokens to the service: shorten it to what the context leaves.
        clamp_max_tokens: bool,
        reply: oneshot::Sender<Result<Admission, SubmitError>>,
    },
    Cancel { id: JobId, done: oneshot::Sender<()> },
    Limits(Limits),
    Attention(AttnConfig),
    /// Replaces the model (only while no job runs or waits).
    Install { loaded: Box<Loaded>, reply: oneshot::Sender<Result<(), SubmitError>> },
    /// Drops the model (only while no job runs or waits); no transparent reload afterwards.
    Unload { reply: oneshot::Sender<Result<(), SubmitError>> },
    Shutdown,
}

/// The bus side's handle on the worker; cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: mpsc::Sender<Command>,
    heartbeat: Arc<Heartbeat>,
}

impl WorkerHandle {
    /// Starts the job now, or queues it; refuses it when the request is invalid or the queue full.
    pub async fn submit(&self, id: JobId, request: GenerateRequest, clamp_max_tokens: bool) -> Result<Admission, SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Command::Submit { id, request: Box::new(request), clamp_max_tokens, reply }).map_err(|_| SubmitError::Stopped)?;
        answer.await.map_err(|_| SubmitError::Stopped)?
    }

    /// Cancels the job (running or queued; nothing if it already ended) and returns once its
    /// slot is free.
    pub async fn cancel(&self, id: JobId) {
        let (done, finished) = oneshot::channel();
        if self.tx.send(Command::Cancel { id, done }).is_ok() {
            let _ = finished.await;
        }
    }

    /// Like [`cancel`](Self::cancel), without waiting.
    pub fn cancel_nowait(&self, id: JobId) {
        let (done, _) = oneshot::channel();
        let _ = self.tx.send(Command::Cancel { id, done });
    }

    /// New limits for jobs admitted from now on; running jobs keep their memory.
    pub fn set_limits(&self, limits: Limits) {
        let _ = self.tx.send(Command::Limits(limits));
    }

    /// The attention settings of requests that name none, from now on.
    pub fn set_attention(&self, attention: AttnConfig) {
        let _ = self.tx.send(Command::Attention(attention));
    }

    /// Installs a loaded model in place of the current one; `Busy` while jobs run or wait.
    pub async fn install(&self, loaded: Loaded) -> Result<(), SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Command::Install { loaded: Box::new(loaded), reply }).map_err(|_| SubmitError::Stopped)?;
        answer.await.map_err(|_| SubmitError::Stopped)?
    }

    /// Unloads the model; `Busy` while jobs run or wait, `NoModel` when none is loaded.
    pub async fn unload(&self) -> Result<(), SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Command::Unload { reply }).map_err(|_| SubmitError::Stopped)?;
        answer.await.map_err(|_| SubmitError::Stopped)?
    }

    /// Cancels every job and stops the thread; its event channel closes after the last
    /// `Finished`.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    /// How long ago the worker last went round its loop (it does at least once a second when
    /// idle, and once per step when busy).
    pub fn last_beat(&self) -> Duration {
        self.heartbeat.age()
    }
}

/// Time of the worker's last loop, for the systemd watchdog.
struct Heartbeat {
    origin: Instant,
    millis: AtomicU64,
}

impl Heartbeat {
    fn beat(&self) {
        self.millis.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn age(&self) -> Duration {
        self.origin.elapsed().saturating_sub(Duration::from_millis(self.millis.load(Ordering::Relaxed)))
    }
}

pub struct Worker {
    pub handle: WorkerHandle,
    pub events: tmpsc::UnboundedReceiver<Event>,
    /// Returns the model the worker held when it stopped.
    pub thread: JoinHandle<Option<Model>>,
}

#[cfg(test)]
impl Worker {
    /// Stops the worker and hands back its model (tests reuse one model across workers).
    pub fn stop(self) -> Option<Model> {
        self.handle.shutdown();
        self.thread.join().ok().flatten()
    }
}

/// How the worker runs, besides its model.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub max_queue: usize,
    pub limits: Limits,
    /// Unload the model after this long without jobs (`None`: never); it is reloaded from
    /// `reload` on the next submit.
    pub keep_alive: Option<Duration>,
    /// How to load the model again after an idle unload.
    pub reload: Option<LoadSpec>,
}

/// Moves `model` (already loaded, or `None`) onto its own thread.
pub fn spawn(model: Option<Loaded>, config: WorkerConfig) -> std::io::Result<Worker> {
    let (tx, rx) = mpsc::channel();
    let (events_tx, events) = tmpsc::unbounded_channel();
    let heartbeat = Arc::new(Heartbeat { origin: Instant::now(), millis: AtomicU64::new(0) });
    let beat = heartbeat.clone();
    let state = State {
        model: None,
        running: VecDeque::new(),
        waiting: VecDeque::new(),
        max_queue: config.max_queue,
        limits: config.limits,
        keep_alive: config.keep_alive,
        reload: config.reload,
        idle_since: Instant::now(),
        events: events_tx,
        load: None,
    };
    let thread = std::thread::Builder::new().name("fasa-worker".into()).spawn(move || state.run(model, rx, &beat))?;
    Ok(Worker { handle: WorkerHandle { tx, heartbeat }, events, thread })
}

struct Running {
    id: JobId,
    seq: Sequence,
    /// When the first token came (prefill, maybe in several steps, ended): decode speed is
    /// counted from there.
    first_token: Option<Instant>,
}

impl Running {
    fn note_progress(&mut self, generated: usize) {
        if generated >= 1 && self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
    }

    /// Decode tokens per second after the first token.
    fn rate(&self, generated: usize) -> f64 {
        match self.first_token {
            Some(t) if generated > 1 => {
                let secs = t.elapsed().as_secs_f64();
                if secs > 0.0 { (generated - 1) as f64 / secs } else { 0.0 }
            }
            _ => 0.0,
        }
    }
}

struct Waiting {
    id: JobId,
    request: GenerateRequest,
    clamp_max_tokens: bool,
}

struct State {
    model: Option<Model>,
    /// Stepped front to back; a stepped sequence goes to the back.
    running: VecDeque<Running>,
    waiting: VecDeque<Waiting>,
    max_queue: usize,
    limits: Limits,
    keep_alive: Option<Duration>,
    reload: Option<LoadSpec>,
    /// When the last job ended (for the keep-alive).
    idle_since: Instant,
    events: tmpsc::UnboundedSender<Event>,
    /// Last load reported.
    load: Option<Load>,
}

impl State {
    fn run(mut self, initial: Option<Loaded>, rx: mpsc::Receiver<Command>, heartbeat: &Heartbeat) -> Option<Model> {
        if let Some(loaded) = initial {
            // The bus side was told of this one by whoever loaded it.
            self.reload = Some(loaded.spec);
            self.model = Some(loaded.model);
        }
        self.publish_load();
        loop {
            heartbeat.beat();
            // Idle: block for the next command (waking each second for the heartbeat and the
            // keep-alive). Busy: take only what already arrived, then step.
            let mut next = if self.running.is_empty() {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(cmd) => Some(cmd),
                    Err(RecvTimeoutError::Timeout) => {
                        self.expire_idle_model();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => Some(Command::Shutdown),
                }
            } else {
                None
            };
            loop {
                let cmd = match next.take() {
                    Some(cmd) => cmd,
                    None => match rx.try_recv() {
                        Ok(cmd) => cmd,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => Command::Shutdown,
                    },
                };
                match cmd {
                    Command::Submit { id, request, clamp_max_tokens, reply } => {
                        let admitted = self.submit(Waiting { id, request: *request, clamp_max_tokens });
                        let _ = reply.send(admitted);
                    }
                    Command::Cancel { id, done } => {
                        self.cancel(id);
                        let _ = done.send(());
                    }
                    Command::Limits(limits) => {
                        self.limits = limits;
                        self.admit_waiting();
                    }
                    Command::Attention(a) => {
                        if let Some(m) = &mut self.model {
                            if let Err(e) = m.set_default_attention(a) {
                                log::warn!("the plan's attention settings do not suit the model: {e}");
                            }
                        }
                    }
                    Command::Install { loaded, reply } => {
                        let _ = reply.send(if self.busy() { Err(self.busy_error("load a model")) } else {
                            self.install(*loaded);
                            Ok(())
                        });
                    }
                    Command::Unload { reply } => {
                        let answer = if self.busy() {
                            Err(self.busy_error("unload the model"))
                        } else if self.model.is_none() && self.reload.is_none() {
                            Err(SubmitError::NoModel)
                        } else {
                            self.model = None;
                            self.reload = None;
                            self.send(Event::Model(None));
                            Ok(())
                        };
                        let _ = reply.send(answer);
                    }
                    Command::Shutdown => {
                        let ids: Vec<JobId> =
                            self.running.iter().map(|r| r.id).chain(self.waiting.iter().map(|w| w.id)).collect();
                        for id in ids {
                            self.cancel(id);
                        }
                        self.publish_load();
                        return self.model.take();
                    }
                }
            }
            self.step_one();
            self.publish_load();
        }
    }

    fn busy(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    fn busy_error(&self, what: &str) -> SubmitError {
        SubmitError::Busy(format!(
            "cannot {what} while {} jobs run and {} wait: cancel them or retry when they finish",
            self.running.len(),
            self.waiting.len()
        ))
    }

    fn install(&mut self, loaded: Loaded) {
        self.reload = Some(loaded.spec.clone());
        self.send(Event::Model(Some(Box::new(loaded.status.clone()))));
        self.model = Some(loaded.model);
        self.idle_since = Instant::now();
    }

    /// Keep-alive: drops an idle model (it comes back on the next submit).
    fn expire_idle_model(&mut self) {
        let Some(keep) = self.keep_alive else { return };
        if self.model.is_some() && !self.busy() && self.idle_since.elapsed() >= keep {
            log::info!("no job for {keep:?}: unloading the model until the next request");
            self.model = None;
            self.send(Event::Model(None));
            self.publish_load();
        }
    }

    /// The model, reloading it after an idle unload.
    fn model(&mut self) -> Result<&mut Model, SubmitError> {
        if self.model.is_none() {
            let Some(spec) = self.reload.clone() else { return Err(SubmitError::NoModel) };
            log::info!("reloading {} for a new job", spec.options.model_path.display());
            let loaded = models::load(&spec)?;
            self.install(loaded);
        }
        Ok(self.model.as_mut().expect("installed above"))
    }

    fn free_slots(&self) -> usize {
        match &self.model {
            Some(m) => m.free_slots().min(self.limits.sessions.saturating_sub(self.running.len())),
            None => self.limits.sessions.saturating_sub(self.running.len()),
        }
    }

    fn send(&self, event: Event) {
        // The bus side only goes away when the daemon exits.
        let _ = self.events.send(event);
    }

    fn publish_load(&mut self) {
        let load = Load { running: self.running.len(), queued: self.waiting.len(), free_slots: self.free_slots() };
        if self.load != Some(load) {
            self.load = Some(load);
            self.send(Event::Load(load));
        }
    }

    fn submit(&mut self, job: Waiting) -> Result<Admission, SubmitError> {
        if let Some(why) = &self.limits.refuse {
            return Err(SubmitError::DoesNotFit(why.clone()));
        }
        self.model()?;
        // First come, first served: while others wait, a new job waits behind them.
        if self.free_slots() == 0 || !self.waiting.is_empty() {
            if self.waiting.len() >= self.max_queue {
                return Err(SubmitError::QueueFull { running: self.running.len(), queued: self.waiting.len() });
            }
            self.waiting.push_back(job);
            return Ok(Admission::Queued);
        }
        match self.start(job) {
            Ok(()) => Ok(Admission::Running),
            Err((_, EngineError::NoFreeSlot(_))) => {
                Err(SubmitError::QueueFull { running: self.running.len(), queued: self.waiting.len() })
            }
            Err((_, e)) => Err(e.into()),
        }
    }

    /// Takes a slot for `job`; on error hands back its id with the engine's error.
    fn start(&mut self, job: Waiting) -> Result<(), (JobId, EngineError)> {
        let Waiting { id, request, clamp_max_tokens } = job;
        let context = self.limits.context;
        let model = match self.model() {
            Ok(m) => m,
            Err(SubmitError::Engine(e)) => return Err((id, e)),
            Err(e) => return Err((id, EngineError::InvalidRequest(e.to_string()))),
        };
        let retry = clamp_max_tokens.then(|| request.clone());
        let seq = match (model.start(request), retry) {
            (Ok(seq), _) => Ok(seq),
            // The default max_tokens did not fit: use what the context leaves, if anything.
            (Err(EngineError::ContextTooLong { prompt, limit }), Some(mut request)) if prompt < limit => {
                request.max_tokens = request.max_tokens.min(limit - prompt);
                model.start(request)
            }
            (Err(e), _) => Err(e),
        }
        .map_err(|e| (id, e))?;
        // The plan may allow less context than the cache was allocated with (pressure).
        if context > 0 && seq.prompt_tokens() >= context {
            return Err((id, EngineError::ContextTooLong { prompt: seq.prompt_tokens(), limit: context }));
        }
        self.send(Event::Started { id, prompt_tokens: seq.prompt_tokens() });
        self.running.push_back(Running { id, seq, first_token: None });
        Ok(())
    }

    /// Starts waiting jobs while slots are free; one that cannot start fails alone.
    fn admit_waiting(&mut self) {
        while self.free_slots() > 0 {
            let Some(job) = self.waiting.pop_front() else { break };
            if let Err((id, e)) = self.start(job) {
                self.send(Event::Finished { id, outcome: Outcome::Failed(e.to_string()), generated: 0, tokens_per_second: 0.0 });
            }
        }
        if !self.busy() {
            self.idle_since = Instant::now();
        }
    }

    fn cancel(&mut self, id: JobId) {
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            let job = self.running.remove(i).expect("index from position");
            let generated = job.seq.generated_tokens();
            let tokens_per_second = job.rate(generated);
            drop(job); // frees the cache slot before anyone hears of it
            self.send(Event::Finished { id, outcome: Outcome::Cancelled, generated, tokens_per_second });
            self.admit_waiting();
        } else if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(i);
            self.send(Event::Finished { id, outcome: Outcome::Cancelled, generated: 0, tokens_per_second: 0.0 });
        }
    }

    fn step_one(&mut self) {
        let Some(mut job) = self.running.pop_front() else { return };
        let Some(model) = self.model.as_mut() else {
            // Cannot happen: the model is only dropped while no job runs.
            self.send(Event::Finished { id: job.id, outcome: Outcome::Failed("the model went away".into()), generated: 0, tokens_per_second: 0.0 });
            return;
        };
        let step = model.step(&mut job.seq);
        let generated = job.seq.generated_tokens();
        job.note_progress(generated);
        let tokens_per_second = job.rate(generated);
        let id = job.id;
        match step {
            Ok(Step::Text(text)) => {
                self.send(Event::Progress { id, text, generated, tokens_per_second });
                self.running.push_back(job);
            }
            Ok(Step::Finished { text, reason }) => {
                drop(job);
                if !text.is_empty() {
                    self.send(Event::Progress { id, text, generated, tokens_per_second });
                }
                self.send(Event::Finished { id, outcome: Outcome::Done(reason), generated, tokens_per_second });
                self.admit_waiting();
            }
            Err(e) => {
                drop(job);
                self.send(Event::Finished { id, outcome: Outcome::Failed(e.to_string()), generated, tokens_per_second });
                self.admit_waiting();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The worker with the real model (crate::testing): greedy generation, interleaving,
    //! cancellation, the queue, limits, unload and transparent reload.
    use super::*;
    use crate::testing;

    fn request(text: &str, max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            prompt: fasa_engine::Prompt::Raw(text.into()),
            sampling: Default::default(),
            max_tokens,
            stop: vec![],
            attention: Default::default(),
        }
    }

    fn config(sessions: usize, max_queue: usize) -> WorkerConfig {
        WorkerConfig { max_queue, limits: Limits::slots(sessions), keep_alive: None, reload: None }
    }

    /// Collects events until job `id` finishes; returns its text and its outcome.
    async fn until_finished(events: &mut tmpsc::UnboundedReceiver<Event>, id: JobId, seen: &mut Vec<Event>) -> (String, Outcome) {
        let mut text = String::new();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(60), events.recv()).await.expect("no event in 60 s").expect("worker gone");
            seen.push(ev.clone());
            match ev {
                Event::Progress { id: i, text: t, .. } if i == id => text.push_str(&t),
                Event::Finished { id: i, outcome, .. } if i == id => return (text, outcome),
                _ => {}
            }
        }
    }

    fn started(seen: &[Event], id: JobId) -> Option<usize> {
        seen.iter().find_map(|e| match e {
            Event::Started { id: i, prompt_tokens } if *i == id => Some(*prompt_tokens),
            _ => None,
        })
    }

    #[tokio::test]
    async fn runs_greedy_jobs_to_their_end() {
        let mut lease = testing::lease();
        let mut w = spawn(Some(lease.take()), config(2, 4)).unwrap();
        w.handle.submit(1, request("The capital of France is", 6), false).await.unwrap();
        let mut seen = vec![];
        let (first, outcome) = until_finished(&mut w.events, 1, &mut seen).await;
        assert_eq!(outcome, Outcome::Done(FinishReason::Length));
        assert!(first.contains("Paris"), "{first:?}");
        assert!(started(&seen, 1).unwrap() > 3);
        // Greedy decoding is deterministic.
        w.handle.submit(2, request("The capital of France is", 6), false).await.unwrap();
        let (second, _) = until_finished(&mut w.events, 2, &mut seen).await;
        assert_eq!(first, second);
        lease.put(w.stop());
    }

    #[tokio::test]
    async fn jobs_interleave_round_robin() {
        let mut lease = testing::lease();
        let mut w = spawn(Some(lease.take()), config(2, 4)).unwrap();
        w.handle.submit(1, request("Once upon a time", 12), false).await.unwrap();
        w.handle.submit(2, request("In the beginning", 12), false).await.unwrap();
        let mut seen = vec![];
        until_finished(&mut w.events, 1, &mut seen).await;
        until_finished(&mut w.events, 2, &mut seen).await;
        let order: Vec<JobId> = seen
            .iter()
            .filter_map(|e| match e {
                Event::Progress { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        // After both started, no job takes two steps in a row (but at the end).
        let from = order.iter().position(|&i| i == 2).unwrap();
        let tail = &order[from.saturating_sub(1)..];
        assert!(tail.windows(2).filter(|p| p[0] == p[1]).count() <= 2, "{order:?}");
        lease.put(w.stop());
    }

    #[tokio::test]
    async fn cancel_frees_the_slot_and_admits_the_queue() {
        let mut lease = testing::lease();
        let loaded = lease.take();
        let pool = loaded.status.pool.clone();
        let start_free = pool.free_count();
        let mut w = spawn(Some(loaded), config(1, 1)).unwrap();
        assert_eq!(w.handle.submit(1, request("Once upon a time", 2000), false).await.unwrap(), Admission::Running);
        assert_eq!(w.handle.submit(2, request("The capital of France is", 3), false).await.unwrap(), Admission::Queued);
        let full = w.handle.submit(3, request("z", 5), false).await.unwrap_err();
        assert!(matches!(full, SubmitError::QueueFull { running: 1, queued: 1 }), "{full:?}");
        // Let job 1 generate a little, then cancel it.
        let mut seen = vec![];
        while !seen.iter().any(|e| matches!(e, Event::Progress { id: 1, generated: 2.., .. })) {
            seen.push(w.events.recv().await.unwrap());
        }
        let t = Instant::now();
        w.handle.cancel(1).await;
        assert!(t.elapsed() < Duration::from_millis(300), "cancel took {:?}", t.elapsed());
        let (_, outcome) = until_finished(&mut w.events, 1, &mut seen).await;
        assert_eq!(outcome, Outcome::Cancelled);
        let (text, outcome) = until_finished(&mut w.events, 2, &mut seen).await;
        assert_eq!(outcome, Outcome::Done(FinishReason::Length));
        assert!(!text.is_empty());
        assert!(started(&seen, 2).is_some());
        // Cancelling a job that ended, or never was, does nothing.
        w.handle.cancel(1).await;
        w.handle.cancel(99).await;
        lease.put(w.stop());
        assert_eq!(pool.free_count(), start_free);
    }

    #[tokio::test]
    async fn bad_requests_and_limits_are_refused() {
        let mut lease = testing::lease();
        let mut w = spawn(Some(lease.take()), config(1, 1)).unwrap();
        let mut bad = request("hi", 5);
        bad.attention.chunks = Some(1000);
        bad.attention.mode = Some(fasa_engine::Mode::Fasa);
        let e = w.handle.submit(1, bad, false).await.unwrap_err();
        assert!(matches!(e, SubmitError::Engine(EngineError::InvalidRequest(_))), "{e:?}");
        let long = "word ".repeat(2 * testing::CONTEXT);
        let e = w.handle.submit(2, request(&long, 5), false).await.unwrap_err();
        assert!(matches!(e, SubmitError::Engine(EngineError::ContextTooLong { .. })), "{e:?}");
        // A smaller plan: prompts beyond its context are refused, and a refusing plan refuses all.
        w.handle.set_limits(Limits { sessions: 1, context: 16, refuse: None });
        let e = w.handle.submit(3, request(&"word ".repeat(40), 5), false).await.unwrap_err();
        assert!(matches!(e, SubmitError::Engine(EngineError::ContextTooLong { limit: 16, .. })), "{e:?}");
        w.handle.set_limits(Limits { sessions: 1, context: 0, refuse: Some("nothing fits".into()) });
        let e = w.handle.submit(4, request("hi", 5), false).await.unwrap_err();
        assert!(matches!(e, SubmitError::DoesNotFit(_)), "{e:?}");
        w.handle.set_limits(Limits::slots(1));
        w.handle.submit(5, request("The capital of France is", 2), false).await.unwrap();
        let (_, outcome) = until_finished(&mut w.events, 5, &mut vec![]).await;
        assert_eq!(outcome, Outcome::Done(FinishReason::Length));
        lease.put(w.stop());
    }

    #[tokio::test]
    async fn unload_refuses_jobs_until_a_model_is_installed() {
        let mut lease = testing::lease();
        let loaded = lease.take();
        let mut w = spawn(Some(loaded), config(1, 1)).unwrap();
        w.handle.unload().await.unwrap();
        assert!(matches!(w.handle.unload().await, Err(SubmitError::NoModel)));
        assert!(matches!(w.handle.submit(1, request("hi", 2), false).await, Err(SubmitError::NoModel)));
        // Reload (what LoadModel does) and serve again.
        let loaded = tokio::task::spawn_blocking(|| crate::models::load(&testing::spec()).unwrap()).await.unwrap();
        w.handle.install(loaded).await.unwrap();
        w.handle.submit(2, request("The capital of France is", 2), false).await.unwrap();
        let mut seen = vec![];
        let (_, outcome) = until_finished(&mut w.events, 2, &mut seen).await;
        assert_eq!(outcome, Outcome::Done(FinishReason::Length));
        assert!(seen.iter().any(|e| matches!(e, Event::Model(Some(_)))));
        lease.put(w.stop());
    }

    #[tokio::test]
    async fn keep_alive_unloads_and_the_next_job_reloads() {
        let mut lease = testing::lease();
        let loaded = lease.take();
        let config = WorkerConfig { max_queue: 1, limits: Limits::slots(1), keep_alive: Some(Duration::from_millis(500)), reload: None };
        let mut w = spawn(Some(loaded), config).unwrap();
        let unloaded = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(Event::Model(None)) = w.events.recv().await {
                    return;
                }
            }
        })
        .await;
        assert!(unloaded.is_ok(), "the idle model was not unloaded");
        w.handle.submit(1, request("The capital of France is", 2), false).await.unwrap();
        let (_, outcome) = until_finished(&mut w.events, 1, &mut vec![]).await;
        assert_eq!(outcome, Outcome::Done(FinishReason::Length));
        lease.put(w.stop());
    }

    #[tokio::test]
    async fn shutdown_cancels_everything() {
        let mut lease = testing::lease();
        let mut w = spawn(Some(lease.take()), config(1, 4)).unwrap();
        w.handle.submit(1, request("Once upon a time", 2000), false).await.unwrap();
        w.handle.submit(2, request("Once upon a time", 2000), false).await.unwrap();
        w.handle.shutdown();
        let mut cancelled = vec![];
        while let Some(ev) = w.events.recv().await {
            if let Event::Finished { id, outcome: Outcome::Cancelled, .. } = ev {
                cancelled.push(id);
            }
        }
        cancelled.sort();
        assert_eq!(cancelled, vec![1, 2]);
        let handle = w.handle.clone();
        lease.put(w.thread.join().unwrap());
        assert!(matches!(handle.submit(3, request("a", 1), false).await, Err(SubmitError::Stopped)));
    }
}
