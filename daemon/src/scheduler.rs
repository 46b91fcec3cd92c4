//! The inference worker: one dedicated thread owns the model (ONNX Runtime runs block, and
//! `Model` is not `Sync`) and steps the running sequences round-robin, one token each, so
//! concurrent jobs interleave fairly. Between two steps it reads its commands (submit, cancel,
//! shutdown), so a cancelled job's cache slot is freed after at most one step.
//!
//! Jobs beyond the free cache slots wait in a bounded FIFO queue; when it is full, a submit is
//! refused (the bus answers `Busy`). Everything the worker does is reported as [`Event`]s on an
//! unbounded channel that the bus side turns into properties and signals.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fasa_engine::{EngineError, FinishReason, GenerateRequest, Step};
use tokio::sync::{mpsc as tmpsc, oneshot};

pub type JobId = u64;

/// What the worker needs of a model; implemented by [`fasa_engine::Model`] and, in tests, by a
/// fake that needs no weights.
pub trait Engine: Send + 'static {
    type Sequence: Send + 'static;
    /// Validates, tokenizes and takes a cache slot (see `fasa_engine::Model::start`).
    fn start(&self, request: GenerateRequest) -> Result<Self::Sequence, EngineError>;
    /// Prefill on the first call, one token after.
    fn step(&mut self, seq: &mut Self::Sequence) -> Result<Step, EngineError>;
    fn free_slots(&self) -> usize;
    fn prompt_tokens(seq: &Self::Sequence) -> usize;
    fn generated_tokens(seq: &Self::Sequence) -> usize;
}

impl Engine for fasa_engine::Model {
    type Sequence = fasa_engine::Sequence;
    fn start(&self, request: GenerateRequest) -> Result<Self::Sequence, EngineError> {
        fasa_engine::Model::start(self, request)
    }
    fn step(&mut self, seq: &mut Self::Sequence) -> Result<Step, EngineError> {
        fasa_engine::Model::step(self, seq)
    }
    fn free_slots(&self) -> usize {
        fasa_engine::Model::free_slots(self)
    }
    fn prompt_tokens(seq: &Self::Sequence) -> usize {
        seq.prompt_tokens()
    }
    fn generated_tokens(seq: &Self::Sequence) -> usize {
        seq.generated_tokens()
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
    #[error("all {running} cache slots are busy and {queued} jobs are waiting, the most fasad queues; retry when a job finishes")]
    QueueFull { running: usize, queued: usize },
    #[error("the inference worker has stopped (fasad is shutting down)")]
    Stopped,
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

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The job got a cache slot; its prompt is tokenized.
    Started { id: JobId, prompt_tokens: usize },
    /// One step: the text it made final (maybe empty) and the job's counters.
    Progress { id: JobId, text: String, generated: usize, tokens_per_second: f64 },
    /// The job ended and its slot is free.
    Finished { id: JobId, outcome: Outcome, generated: usize, tokens_per_second: f64 },
    Load(Load),
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
    pub thread: JoinHandle<()>,
}

/// Moves `engine` onto its own thread.
pub fn spawn<E: Engine>(engine: E, max_queue: usize) -> std::io::Result<Worker> {
    let (tx, rx) = mpsc::channel();
    let (events_tx, events) = tmpsc::unbounded_channel();
    let heartbeat = Arc::new(Heartbeat { origin: Instant::now(), millis: AtomicU64::new(0) });
    let beat = heartbeat.clone();
    let state = State { engine, running: VecDeque::new(), waiting: VecDeque::new(), max_queue, events: events_tx, load: None };
    let thread = std::thread::Builder::new().name("fasa-worker".into()).spawn(move || state.run(rx, &beat))?;
    Ok(Worker { handle: WorkerHandle { tx, heartbeat }, events, thread })
}

struct Running<S> {
    id: JobId,
    seq: S,
    /// When the first token came (prefill, maybe in several steps, ended): decode speed is
    /// counted from there.
    first_token: Option<Instant>,
}

impl<S> Running<S> {
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

struct State<E: Engine> {
    engine: E,
    /// Stepped front to back; a stepped sequence goes to the back.
    running: VecDeque<Running<E::Sequence>>,
    waiting: VecDeque<Waiting>,
    max_queue: usize,
    events: tmpsc::UnboundedSender<Event>,
    /// Last load reported.
    load: Option<Load>,
}

impl<E: Engine> State<E> {
    fn run(mut self, rx: mpsc::Receiver<Command>, heartbeat: &Heartbeat) {
        self.publish_load();
        loop {
            heartbeat.beat();
            // Idle: block for the next command (waking each second for the heartbeat).
            // Busy: take only what already arrived, then step.
            let mut next = if self.running.is_empty() {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(cmd) => Some(cmd),
                    Err(RecvTimeoutError::Timeout) => continue,
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
                    Command::Shutdown => {
                        let ids: Vec<JobId> =
                            self.running.iter().map(|r| r.id).chain(self.waiting.iter().map(|w| w.id)).collect();
                        for id in ids {
                            self.cancel(id);
                        }
                        self.publish_load();
                        return;
                    }
                }
            }
            self.step_one();
            self.publish_load();
        }
    }

    fn send(&self, event: Event) {
        // The bus side only goes away when the daemon exits.
        let _ = self.events.send(event);
    }

    fn publish_load(&mut self) {
        let load = Load { running: self.running.len(), queued: self.waiting.len(), free_slots: self.engine.free_slots() };
        if self.load != Some(load) {
            self.load = Some(load);
            self.send(Event::Load(load));
        }
    }

    fn submit(&mut self, job: Waiting) -> Result<Admission, SubmitError> {
        // First come, first served: while others wait, a new job waits behind them.
        if self.engine.free_slots() == 0 || !self.waiting.is_empty() {
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
        let retry = clamp_max_tokens.then(|| request.clone());
        let seq = match (self.engine.start(request), retry) {
            (Ok(seq), _) => Ok(seq),
            // The default max_tokens did not fit: use what the context leaves, if anything.
            (Err(EngineError::ContextTooLong { prompt, limit }), Some(mut request)) if prompt < limit => {
                request.max_tokens = request.max_tokens.min(limit - prompt);
                self.engine.start(request)
            }
            (Err(e), _) => Err(e),
        }
        .map_err(|e| (id, e))?;
        self.send(Event::Started { id, prompt_tokens: E::prompt_tokens(&seq) });
        self.running.push_back(Running { id, seq, first_token: None });
        Ok(())
    }

    /// Starts waiting jobs while slots are free; one that cannot start fails alone.
    fn admit_waiting(&mut self) {
        while self.engine.free_slots() > 0 {
            let Some(job) = self.waiting.pop_front() else { break };
            if let Err((id, e)) = self.start(job) {
                self.send(Event::Finished { id, outcome: Outcome::Failed(e.to_string()), generated: 0, tokens_per_second: 0.0 });
            }
        }
    }

    fn cancel(&mut self, id: JobId) {
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            let job = self.running.remove(i).expect("index from position");
            let generated = E::generated_tokens(&job.seq);
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
        let step = self.engine.step(&mut job.seq);
        let generated = E::generated_tokens(&job.seq);
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
pub mod fake {
    //! A model without weights: it "generates" the words of its prompt, one per step.
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use fasa_engine::{EngineError, FinishReason, GenerateRequest, Prompt, Step};

    pub struct FakeEngine {
        pub slots: usize,
        pub used: Arc<AtomicUsize>,
        /// Time one step takes.
        pub step_time: Duration,
        pub context: usize,
    }

    impl FakeEngine {
        pub fn new(slots: usize, step_time: Duration) -> Self {
            FakeEngine { slots, used: Arc::new(AtomicUsize::new(0)), step_time, context: 64 }
        }
    }

    pub struct FakeSequence {
        words: Vec<String>,
        generated: usize,
        max_tokens: usize,
        used: Arc<AtomicUsize>,
    }

    impl Drop for FakeSequence {
        fn drop(&mut self) {
            self.used.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl super::Engine for FakeEngine {
        type Sequence = FakeSequence;
        fn start(&self, request: GenerateRequest) -> Result<FakeSequence, EngineError> {
            let text = match request.prompt {
                Prompt::Raw(t) => t,
                Prompt::Chat(m) => m.into_iter().map(|m| m.content).collect::<Vec<_>>().join(" "),
            };
            if text == "invalid" {
                return Err(EngineError::InvalidRequest("the fake refuses 'invalid'".into()));
            }
            let words: Vec<String> = text.split_whitespace().map(|w| format!("{w} ")).collect();
            if words.len() + request.max_tokens > self.context {
                return Err(EngineError::ContextTooLong { prompt: words.len(), limit: self.context });
            }
            if self.used.load(Ordering::SeqCst) >= self.slots {
                return Err(EngineError::NoFreeSlot(self.slots));
            }
            self.used.fetch_add(1, Ordering::SeqCst);
            Ok(FakeSequence { words, generated: 0, max_tokens: request.max_tokens, used: self.used.clone() })
        }
        fn step(&mut self, seq: &mut FakeSequence) -> Result<Step, EngineError> {
            std::thread::sleep(self.step_time);
            let word = seq.words.get(seq.generated).cloned();
            seq.generated += 1;
            Ok(match word {
                None => Step::Finished { text: String::new(), reason: FinishReason::Eos },
                Some(w) if seq.generated >= seq.max_tokens => Step::Finished { text: w, reason: FinishReason::Length },
                Some(w) => Step::Text(w),
            })
        }
        fn free_slots(&self) -> usize {
            self.slots - self.used.load(Ordering::SeqCst)
        }
        fn prompt_tokens(seq: &FakeSequence) -> usize {
            seq.words.len()
        }
        fn generated_tokens(seq: &FakeSequence) -> usize {
            seq.generated
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeEngine;
    use super::*;

    fn request(text: &str, max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            prompt: fasa_engine::Prompt::Raw(text.into()),
            sampling: Default::default(),
            max_tokens,
            stop: vec![],
            attention: Default::default(),
        }
    }

    /// Collects events until job `id` finishes; returns its text, its outcome and all events.
    async fn until_finished(events: &mut tmpsc::UnboundedReceiver<Event>, id: JobId, seen: &mut Vec<Event>) -> (String, Outcome) {
        let mut text = String::new();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("no event in 10 s").expect("worker gone");
            seen.push(ev.clone());
            match ev {
                Event::Progress { id: i, text: t, .. } if i == id => text.push_str(&t),
                Event::Finished { id: i, outcome, .. } if i == id => return (text, outcome),
                _ => {}
            }
        }
    }

    #[tokio::test]
    async fn runs_a_job_to_its_end() {
        let mut w = spawn(FakeEngine::new(2, Duration::ZERO), 4).unwrap();
        assert_eq!(w.handle.submit(1, request("a b c", 10), false).await.unwrap(), Admission::Running);
        let mut seen = vec![];
        let (text, outcome) = until_finished(&mut w.events, 1, &mut seen).await;
        assert_eq!(text, "a b c ");
        assert_eq!(outcome, Outcome::Done(FinishReason::Eos));
        assert!(seen.contains(&Event::Started { id: 1, prompt_tokens: 3 }));
        let (text, outcome) = {
            w.handle.submit(2, request("a b c d", 2), false).await.unwrap();
            until_finished(&mut w.events, 2, &mut seen).await
        };
        assert_eq!((text.as_str(), outcome), ("a b ", Outcome::Done(FinishReason::Length)));
        w.handle.shutdown();
        w.thread.join().unwrap();
    }

    #[tokio::test]
    async fn jobs_interleave_round_robin() {
        let mut w = spawn(FakeEngine::new(2, Duration::from_millis(2)), 4).unwrap();
        w.handle.submit(1, request("a a a a a a", 20), false).await.unwrap();
        w.handle.submit(2, request("b b b b b b", 20), false).await.unwrap();
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
        // After both started, no job takes two steps in a row.
        let from = order.iter().position(|&i| i == 2).unwrap();
        let tail = &order[from.saturating_sub(1)..];
        assert!(tail.windows(2).filter(|p| p[0] == p[1]).count() <= 1, "{order:?}");
    }

    #[tokio::test]
    async fn cancel_frees_the_slot_and_admits_the_queue() {
        let engine = FakeEngine::new(1, Duration::from_millis(5));
        let used = engine.used.clone();
        let mut w = spawn(engine, 1).unwrap();
        let long = vec!["w"; 50].join(" ");
        assert_eq!(w.handle.submit(1, request(&long, 60), true).await.unwrap(), Admission::Running);
        assert_eq!(w.handle.submit(2, request("x y", 5), false).await.unwrap(), Admission::Queued);
        let full = w.handle.submit(3, request("z", 5), false).await.unwrap_err();
        assert!(matches!(full, SubmitError::QueueFull { running: 1, queued: 1 }), "{full:?}");
        let t = Instant::now();
        w.handle.cancel(1).await;
        assert!(t.elapsed() < Duration::from_millis(100), "cancel took {:?}", t.elapsed());
        let mut seen = vec![];
        let (_, outcome) = until_finished(&mut w.events, 1, &mut seen).await;
        assert_eq!(outcome, Outcome::Cancelled);
        let (text, outcome) = until_finished(&mut w.events, 2, &mut seen).await;
        assert_eq!((text.as_str(), outcome), ("x y ", Outcome::Done(FinishReason::Eos)));
        assert!(seen.contains(&Event::Started { id: 2, prompt_tokens: 2 }));
        // Cancelling a job that ended, or never was, does nothing.
        w.handle.cancel(1).await;
        w.handle.cancel(99).await;
        w.handle.shutdown();
        w.thread.join().unwrap();
        assert_eq!(used.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn bad_requests_are_refused_and_the_default_max_tokens_is_clamped() {
        let mut w = spawn(FakeEngine::new(1, Duration::ZERO), 1).unwrap();
        let e = w.handle.submit(1, request("invalid", 5), false).await.unwrap_err();
        assert!(matches!(e, SubmitError::Engine(EngineError::InvalidRequest(_))), "{e:?}");
        let e = w.handle.submit(2, request("a b", 100), false).await.unwrap_err();
        assert!(matches!(e, SubmitError::Engine(EngineError::ContextTooLong { .. })), "{e:?}");
        // The same request with max_tokens left to the service runs, shortened.
        w.handle.submit(3, request("a b", 100), true).await.unwrap();
        let (_, outcome) = until_finished(&mut w.events, 3, &mut vec![]).await;
        assert_eq!(outcome, Outcome::Done(FinishReason::Eos));
        w.handle.shutdown();
        w.thread.join().unwrap();
    }

    #[tokio::test]
    async fn shutdown_cancels_everything() {
        let mut w = spawn(FakeEngine::new(1, Duration::from_millis(5)), 4).unwrap();
        let long = vec!["w"; 50].join(" ");
        w.handle.submit(1, request(&long, 60), true).await.unwrap();
        w.handle.submit(2, request(&long, 60), true).await.unwrap();
        w.handle.shutdown();
        let mut cancelled = vec![];
        while let Some(ev) = w.events.recv().await {
            if let Event::Finished { id, outcome: Outcome::Cancelled, .. } = ev {
                cancelled.push(id);
            }
        }
        cancelled.sort();
        assert_eq!(cancelled, vec![1, 2]);
        w.thread.join().unwrap();
        assert!(matches!(w.handle.submit(3, request("a", 1), false).await, Err(SubmitError::Stopped)));
    }
}
