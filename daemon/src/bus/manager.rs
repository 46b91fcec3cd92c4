//! `dev.fasa.Fasa1.Manager` at `/dev/fasa/Fasa1`: the loaded model and its shapes, the load
//! counters, and `Generate`/`Complete`, which create job objects and hand the work to the
//! scheduler. The object stays thin: checking arguments and registering the job is all it does.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fasa_dbus::{job_path, Error, GenerateOptions};
use fasa_engine::{AttnOverrides, GenerateRequest, Message, ModelInfo, Mode, Prompt, SamplingParams};
use zbus::message::Header;
use zbus::names::OwnedUniqueName;
use zbus::object_server::ObjectServer;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

use super::job::Job;
use super::{submit_error, JobEntry, Shared};

/// Longest prompt accepted, in bytes of UTF-8: far beyond any context, short of the bus's
/// message limit, so tokenizing a hostile prompt stays cheap.
pub const MAX_PROMPT_BYTES: usize = 1 << 20;
const ROLES: [&str; 3] = ["system", "user", "assistant"];

pub struct Manager {
    pub shared: Arc<Shared>,
    pub info: ModelInfo,
}

impl Manager {
    async fn start_job(
        &self,
        header: &Header<'_>,
        server: &ObjectServer,
        prompt: Prompt,
        options: &HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, Error> {
        let owner: OwnedUniqueName = header
            .sender()
            .ok_or_else(|| Error::NotPermitted("calls without a sender (peer-to-peer) cannot own jobs".into()))?
            .to_owned()
            .into();
        let opts = GenerateOptions::from_dict(options)?;
        let clamp_max_tokens = opts.max_tokens.is_none();
        let attention = attention_overrides(&opts)?;
        let request = GenerateRequest {
            prompt,
            sampling: SamplingParams {
                temperature: opts.temperature.unwrap_or(0.0) as f32,
                top_k: opts.top_k.unwrap_or(0) as usize,
                top_p: opts.top_p.unwrap_or(1.0) as f32,
                seed: opts.seed.unwrap_or(0),
            },
            max_tokens: opts.max_tokens.unwrap_or(self.shared.default_max_tokens) as usize,
            stop: opts.stop,
            attention,
        };

        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let path = OwnedObjectPath::try_from(job_path(id)).map_err(|e| Error::Failed(e.to_string()))?;
        let job = Job { id, owner: owner.clone(), data: Default::default(), worker: self.shared.worker.clone() };
        let data = job.data.clone();
        // The object exists before the worker can report on it, so no event finds it missing.
        server.at(&path, job).await.map_err(|e| Error::Failed(format!("cannot export job {id}: {e}")))?;
        self.shared.jobs().insert(id, JobEntry { owner: owner.clone(), path: path.clone(), data, caller_gone: false });

        match self.shared.worker.submit(id, request, clamp_max_tokens).await {
            Ok(admission) => {
                log::info!(job = id, caller = owner.as_str(); "job {id} {admission:?} for {owner}");
                Ok(path)
            }
            Err(e) => {
                self.shared.jobs().remove(&id);
                let _ = server.remove::<Job, _>(&path).await;
                let error = submit_error(e);
                log::info!(caller = owner.as_str(); "refused a job for {owner}: {}", error.message());
                Err(error)
            }
        }
    }
}

/// The engine's attention overrides from the caller's options.
fn attention_overrides(opts: &GenerateOptions) -> Result<AttnOverrides, Error> {
    let mode = match &opts.attention {
        None => None,
        Some(name) => Some(Mode::parse(name).ok_or_else(|| {
            let shown: String = name.chars().flat_map(char::escape_debug).collect();
            let modes: Vec<&str> = Mode::ALL.iter().map(|m| m.as_str()).collect();
            Error::InvalidArgument(format!("unknown attention mode '{shown}'; modes: {}", modes.join(", ")))
        })?),
    };
    let knob = |v: Option<u32>| v.map(|v| v as usize);
    Ok(AttnOverrides {
        mode,
        budget: knob(opts.budget),
        chunks: knob(opts.chunks),
        sinks: knob(opts.sinks),
        recent: knob(opts.recent),
        ..Default::default()
    })
}

fn check_prompt_size(bytes: usize) -> Result<(), Error> {
    if bytes > MAX_PROMPT_BYTES {
        return Err(Error::ContextTooLong(format!(
            "the prompt is {bytes} bytes; fasad takes at most {MAX_PROMPT_BYTES}, far more than any context holds"
        )));
    }
    Ok(())
}

#[zbus::interface(name = "dev.fasa.Fasa1.Manager")]
impl Manager {
    /// Starts a chat job. `messages` are (role, content) pairs, role one of system, user,
    /// assistant, rendered with the model's chat template. `options`: max_tokens (u),
    /// temperature (d), top_k (u), top_p (d), seed (t), stop (as), attention (s: mode),
    /// budget, chunks, sinks, recent (u). Returns the job's path; subscribe to its Chunk and
    /// Finished signals before calling.
    #[zbus(out_args("job"))]
    async fn generate(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        messages: Vec<(String, String)>,
        options: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, Error> {
        if messages.is_empty() {
            return Err(Error::InvalidArgument("messages is empty: give at least one (role, content) pair".into()));
        }
        check_prompt_size(messages.iter().map(|(r, c)| r.len() + c.len()).sum())?;
        if let Some((role, _)) = messages.iter().find(|(role, _)| !ROLES.contains(&role.as_str())) {
            let shown: String = role.chars().take(32).flat_map(char::escape_debug).collect();
            return Err(Error::InvalidArgument(format!("unknown role '{shown}'; roles are {}", ROLES.join(", "))));
        }
        let messages = messages.into_iter().map(|(role, content)| Message { role, content }).collect();
        self.start_job(&header, server, Prompt::Chat(messages), &options).await
    }

    /// Starts a raw completion job: `prompt` is fed to the model as is. Options and result as
    /// for Generate.
    #[zbus(out_args("job"))]
    async fn complete(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        prompt: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, Error> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("prompt is empty".into()));
        }
        check_prompt_size(prompt.len())?;
        self.start_job(&header, server, Prompt::Raw(prompt), &options).await
    }

    /// Path of the loaded GGUF file.
    #[zbus(property(emits_changed_signal = "const"))]
    fn model(&self) -> String {
        self.info.path.display().to_string()
    }

    /// The model's name from its metadata.
    #[zbus(property(emits_changed_signal = "const"))]
    fn model_name(&self) -> String {
        self.info.config.name.clone()
    }

    /// layers, hidden, heads, kv_heads, head_dim, ffn_hidden, vocab, context (trained),
    /// max_context (per sequence), max_sequences.
    #[zbus(property(emits_changed_signal = "const"))]
    fn shapes(&self) -> HashMap<String, u64> {
        let c = &self.info.config;
        let values = [
            c.n_layers,
            c.hidden,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.ffn_hidden,
            c.vocab_size,
            c.context_length,
            self.info.max_context,
            self.info.max_sequences,
        ];
        fasa_dbus::SHAPE_KEYS.iter().zip(values).map(|(k, v)| (k.to_string(), v as u64)).collect()
    }

    /// Jobs holding a cache slot.
    #[zbus(property)]
    fn active_jobs(&self) -> u32 {
        self.shared.load().running as u32
    }

    /// Jobs waiting for a cache slot.
    #[zbus(property)]
    fn queued_jobs(&self) -> u32 {
        self.shared.load().queued as u32
    }

    /// Cache slots not held by any job.
    #[zbus(property)]
    fn free_slots(&self) -> u32 {
        self.shared.load().free_slots as u32
    }

    /// Jobs that may wait; beyond that Generate answers Busy.
    #[zbus(property(emits_changed_signal = "const"))]
    fn max_queued_jobs(&self) -> u32 {
        self.shared.max_queue as u32
    }

    /// fasad's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }
}
