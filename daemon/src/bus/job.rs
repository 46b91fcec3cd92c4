//! `dev.fasa.Fasa1.Job` at `/dev/fasa/Fasa1/Job/<n>`: one generation, as systemd and
//! PackageKit model long operations: properties, `Cancel()`, and signals. `Chunk` and
//! `Finished` carry the caller's text, so they go unicast to the job's creator, and only the
//! creator may cancel the job or read its text.
use std::sync::{Arc, Mutex, MutexGuard};

use fasa_dbus::{Error, FinishReason, JobState};
use zbus::message::Header;
use zbus::names::OwnedUniqueName;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedFd;

use crate::scheduler::{JobId, WorkerHandle};

/// What the job object shows; written by the event pump, read by the interface.
#[derive(Debug, Clone)]
pub struct JobData {
    pub state: JobState,
    pub prompt_tokens: u32,
    pub tokens_generated: u32,
    pub tokens_per_second: f64,
    pub finish_reason: Option<FinishReason>,
    pub error: String,
    /// Everything generated so far (bounded by max_tokens).
    pub text: String,
    /// The fd stream opened by `OpenStream`, if any: chunks go there as well.
    pub stream: Option<UnboundedSender<String>>,
}

impl JobData {
    /// Records a chunk and passes it to the fd stream. Under the same lock as `OpenStream`'s
    /// snapshot, so a stream sees every chunk exactly once.
    pub fn push_text(&mut self, text: &str) {
        self.text.push_str(text);
        if let Some(stream) = &self.stream {
            let _ = stream.send(text.to_string());
        }
    }
}

impl Default for JobData {
    fn default() -> Self {
        JobData {
            state: JobState::Queued,
            prompt_tokens: 0,
            tokens_generated: 0,
            tokens_per_second: 0.0,
            finish_reason: None,
            error: String::new(),
            text: String::new(),
            stream: None,
        }
    }
}

pub type SharedJobData = Arc<Mutex<JobData>>;

pub fn lock(data: &SharedJobData) -> MutexGuard<'_, JobData> {
    // A panic while holding this lock cannot leave it inconsistent: every write is one field.
    data.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Job {
    pub id: JobId,
    /// Unique bus name of the caller that created the job.
    pub owner: OwnedUniqueName,
    pub data: SharedJobData,
    pub worker: WorkerHandle,
}

impl Job {
    fn check_owner(&self, header: &Header<'_>, action: &str) -> Result<(), Error> {
        match header.sender() {
            Some(sender) if *sender == *self.owner => Ok(()),
            _ => Err(Error::NotPermitted(format!(
                "only the caller that created job {} may {action} it",
                self.id
            ))),
        }
    }

    fn data(&self) -> MutexGuard<'_, JobData> {
        lock(&self.data)
    }
}

#[zbus::interface(name = "dev.fasa.Fasa1.Job")]
impl Job {
    /// Stops the job and frees its cache slot; returns once the slot is free. Cancelling a
    /// job that already ended does nothing.
    async fn cancel(&self, #[zbus(header)] header: Header<'_>) -> Result<(), Error> {
        self.check_owner(&header, "cancel")?;
        if !lock(&self.data).state.is_terminal() {
            self.worker.cancel(self.id).await;
        }
        Ok(())
    }

    /// The text generated so far.
    #[zbus(out_args("text"))]
    async fn get_text(&self, #[zbus(header)] header: Header<'_>) -> Result<String, Error> {
        self.check_owner(&header, "read the text of")?;
        Ok(lock(&self.data).text.clone())
    }

    /// A socket to read the job's text from, as UTF-8 bytes: what was generated so far, then
    /// each chunk as it comes; end of file when the job ends. A pull-free path for bulk
    /// streaming (the Finished signal and properties still say how it ended).
    #[zbus(out_args("fd"))]
    async fn open_stream(&self, #[zbus(header)] header: Header<'_>) -> Result<OwnedFd, Error> {
        self.check_owner(&header, "stream")?;
        let failed = |e: std::io::Error| Error::Failed(format!("cannot open a stream: {e}"));
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(failed)?;
        theirs.shutdown(std::net::Shutdown::Write).map_err(failed)?;
        ours.set_nonblocking(true).map_err(failed)?;
        let mut ours = tokio::net::UnixStream::from_std(ours).map_err(failed)?;
        let (tx, mut chunks) = unbounded_channel::<String>();
        {
            let mut data = self.data();
            let _ = tx.send(data.text.clone());
            if !data.state.is_terminal() {
                data.stream = Some(tx);
            }
        }
        // Writes at the reader's pace; ends when the job does (the sender is dropped) or the
        // reader closes its end.
        tokio::spawn(async move {
            while let Some(chunk) = chunks.recv().await {
                if ours.write_all(chunk.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        Ok(OwnedFd::from(std::os::fd::OwnedFd::from(theirs)))
    }

    /// Text the model made final, in order (unicast to the creator).
    #[zbus(signal)]
    pub async fn chunk(emitter: &SignalEmitter<'_>, text: &str) -> zbus::Result<()>;

    /// The job ended: `reason` is its FinishReason, `error` says what failed (else empty).
    #[zbus(signal)]
    pub async fn finished(emitter: &SignalEmitter<'_>, reason: &str, error: &str) -> zbus::Result<()>;

    /// queued, running, finished, cancelled or failed.
    #[zbus(property)]
    fn state(&self) -> String {
        self.data().state.as_str().into()
    }

    /// Tokens of the prompt after the chat template; 0 while queued.
    #[zbus(property)]
    fn prompt_tokens(&self) -> u32 {
        self.data().prompt_tokens
    }

    /// Changes every token: read it, no signal is sent.
    #[zbus(property(emits_changed_signal = "false"))]
    fn tokens_generated(&self) -> u32 {
        self.data().tokens_generated
    }

    /// Decode speed after the first token.
    #[zbus(property(emits_changed_signal = "false"))]
    fn tokens_per_second(&self) -> f64 {
        self.data().tokens_per_second
    }

    /// eos, stop, length, context-full, cancelled or failed; empty until the job ends.
    #[zbus(property)]
    fn finish_reason(&self) -> String {
        self.data().finish_reason.map(|r| r.as_str().to_string()).unwrap_or_default()
    }

    /// What failed, when the job failed; else empty.
    #[zbus(property)]
    fn error(&self) -> String {
        self.data().error.clone()
    }
}
