//! Client proxies of `dev.fasa.Fasa1.Manager` and `dev.fasa.Fasa1.Job` (async only: the
//! workspace builds zbus without its blocking API). Method calls return the typed [`Error`].
use std::collections::HashMap;

use zbus::proxy;
use zbus::zvariant::{OwnedObjectPath, Value};

use crate::Error;
pub use task::TaskProxy;

#[proxy(
    interface = "dev.fasa.Fasa1.Manager",
    default_service = "dev.fasa.Fasa1",
    default_path = "/dev/fasa/Fasa1",
    gen_blocking = false
)]
pub trait Manager {
    /// Starts a chat job: `messages` are `(role, content)` pairs rendered with the model's chat
    /// template. Returns the job's object path.
    fn generate(
        &self,
        messages: &[(&str, &str)],
        options: &HashMap<&str, Value<'_>>,
    ) -> Result<OwnedObjectPath, Error>;

    /// Starts a raw completion job: `prompt` is fed to the model as is.
    fn complete(&self, prompt: &str, options: &HashMap<&str, Value<'_>>) -> Result<OwnedObjectPath, Error>;

    /// Starts a calibration task on `texts` (files the daemon reads; empty: the defaults).
    /// Options: output (s), max_tokens, prefix, stride (u).
    fn calibrate(&self, texts: &[&str], options: &HashMap<&str, Value<'_>>) -> Result<OwnedObjectPath, Error>;

    /// The memory plan as JSON for the options headroom (t or s), context, sessions (u).
    fn plan(&self, options: &HashMap<&str, Value<'_>>) -> Result<String, Error>;

    /// (name, path, license, installed, size) of every model fasad knows.
    fn list_models(&self) -> Result<Vec<(String, String, String, bool, u64)>, Error>;

    /// Loads a model by catalog name, file name in the models folder, or absolute path.
    fn load_model(&self, name_or_path: &str) -> Result<(), Error>;

    /// Unloads the model; jobs get ModelNotLoaded until the next LoadModel.
    fn unload_model(&self) -> Result<(), Error>;

    /// Starts a task that installs a catalog model.
    fn pull_model(&self, name: &str) -> Result<OwnedObjectPath, Error>;

    #[zbus(property)]
    fn activations(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn execution_provider(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn attention_mode(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn token_budget(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn dominant_chunks(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn profile_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn variant(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn memory_headroom(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn max_context(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn max_sessions(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn model(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn model_name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn shapes(&self) -> zbus::Result<HashMap<String, u64>>;
    #[zbus(property)]
    fn active_jobs(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn queued_jobs(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn free_slots(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn max_queued_jobs(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

#[proxy(interface = "dev.fasa.Fasa1.Job", default_service = "dev.fasa.Fasa1", gen_blocking = false)]
pub trait Job {
    /// Stops the job and frees its cache slot; only the job's creator may call it.
    fn cancel(&self) -> Result<(), Error>;

    /// The text generated so far; only the job's creator may call it.
    fn get_text(&self) -> Result<String, Error>;

    /// A socket to read the job's text from (so far, then as it comes; EOF at the end).
    fn open_stream(&self) -> Result<zbus::zvariant::OwnedFd, Error>;

    /// Text made final by the model (unicast to the creator).
    #[zbus(signal)]
    fn chunk(&self, text: String) -> zbus::Result<()>;

    /// The job ended; `reason` as in `FinishReason`, `error` empty unless it failed.
    #[zbus(signal)]
    fn finished(&self, reason: String, error: String) -> zbus::Result<()>;

    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn prompt_tokens(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn tokens_generated(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn tokens_per_second(&self) -> zbus::Result<f64>;
    #[zbus(property)]
    fn finish_reason(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;
}

/// The Task proxy in its own module: its `Finished` signal types would clash with the Job's.
pub mod task {
    use zbus::proxy;

    use crate::Error;

    #[proxy(interface = "dev.fasa.Fasa1.Task", default_service = "dev.fasa.Fasa1", gen_blocking = false)]
    pub trait Task {
        /// Stops the task.
        fn cancel(&self) -> Result<(), Error>;

        #[zbus(signal)]
        fn finished(&self, state: String, result: String, error: String) -> zbus::Result<()>;

        #[zbus(property)]
        fn kind(&self) -> zbus::Result<String>;
        #[zbus(property)]
        fn state(&self) -> zbus::Result<String>;
        #[zbus(property)]
        fn progress(&self) -> zbus::Result<f64>;
        #[zbus(property)]
        fn result(&self) -> zbus::Result<String>;
        #[zbus(property)]
        fn error(&self) -> zbus::Result<String>;
    }
}
