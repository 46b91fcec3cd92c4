//! fasactl's command line.
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "fasactl",
    version,
    about = "Talk to fasad, the FASA inference daemon, over D-Bus",
    after_help = "Exit codes: 0 ok, 1 fasad answered with an error (or a task failed), 2 usage, 3 fasad not reachable, 4 no memory plan fits, 130 interrupted."
)]
pub struct Cli {
    /// Use the session bus.
    #[arg(long, global = true, conflicts_with = "system")]
    pub session: bool,
    /// Use the system bus. With neither flag: the system bus when fasad is there, else the session bus.
    #[arg(long, global = true)]
    pub system: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an answer to TEXT and print it as it streams.
    Generate(GenerateArgs),
    /// Chat interactively; the conversation is kept until /reset. Ctrl-C stops an answer, Ctrl-D or /exit leaves.
    Chat(SamplingArgs),
    /// Show the loaded model, its shapes and the jobs.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job of yours (a path /dev/fasa/Fasa1/Job/N, or N).
    Cancel {
        #[arg(value_name = "JOB")]
        job: String,
    },
    /// Calibrate the loaded model's dominant frequency chunks (a daemon task with a progress bar);
    /// the profile is saved in fasad's state folder and applied.
    Calibrate {
        /// A text file fasad can read (repeatable) [default: the system's licence texts].
        #[arg(long = "text", value_name = "FILE")]
        texts: Vec<std::path::PathBuf>,
        /// Also write the profile here (a path fasad can write).
        #[arg(long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
        /// Tokens of each text used (smaller is faster, less precise).
        #[arg(long, value_name = "N")]
        max_tokens: Option<u32>,
        /// Tokens prefilled before the first measured step.
        #[arg(long, value_name = "N")]
        prefix: Option<u32>,
    },
    /// Print the memory plan for the loaded model's shapes (live headroom, or --headroom).
    Plan {
        /// KV-cache headroom to plan for, e.g. 512MiB or 2G [default: the live reading].
        #[arg(long, value_name = "SIZE")]
        headroom: Option<String>,
        /// Tokens per sequence.
        #[arg(long, value_name = "N")]
        context: Option<u32>,
        /// Sequences at once.
        #[arg(long, value_name = "N")]
        sessions: Option<u32>,
        /// The plan as JSON (with a `variant` field).
        #[arg(long)]
        json: bool,
    },
    /// List the models fasad knows, or pull one by name.
    Models {
        #[command(subcommand)]
        action: Option<ModelsAction>,
    },
    /// Load a model by name or path in place of the current one.
    Load {
        #[arg(value_name = "NAME|PATH")]
        model: String,
    },
    /// Unload the model (jobs are refused until the next load).
    Unload,
}

#[derive(Debug, Subcommand)]
pub enum ModelsAction {
    /// List the models (default).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Install a catalog model, with a progress bar.
    Pull {
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Feed TEXT to the model as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Print one JSON object per line (events "job", "chunk", "finished") instead of text.
    #[arg(long)]
    pub json: bool,
    /// Load this model first (a name or path) unless it is the one loaded.
    #[arg(long, value_name = "NAME|PATH")]
    pub model: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The question or prompt (several words are joined with spaces).
    #[arg(value_name = "TEXT", required = true)]
    pub text: Vec<String>,
}

#[derive(Debug, Clone, Args)]
#[command(allow_negative_numbers = true)]
pub struct SamplingArgs {
    /// Most tokens to generate [default: fasad's].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: Option<u32>,
    /// 0 = greedy (default).
    #[arg(long, value_name = "T")]
    pub temperature: Option<f64>,
    /// Keep the K most likely tokens; 0 = off.
    #[arg(long, value_name = "K")]
    pub top_k: Option<u32>,
    /// Nucleus sampling mass in (0, 1]; 1 = off.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// Sampling seed.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long, value_name = "STR")]
    pub stop: Vec<String>,
    /// Attention mode (dense, fasa, fasa-paper, oracle, streaming, quest, random-fc) [default: fasad's].
    #[arg(long, value_name = "MODE")]
    pub attention: Option<String>,
    /// Tokens attended per step by the sparse modes.
    #[arg(long, value_name = "TOKENS")]
    pub budget: Option<u32>,
    /// Frequency chunks (RoPE pairs) per head scored per step by the FASA modes.
    #[arg(long, value_name = "K")]
    pub chunks: Option<u32>,
    /// Calibrated FCs the per-step choice picks the chunks from (fasa mode).
    #[arg(long, value_name = "P")]
    pub pool: Option<u32>,
    /// First tokens always attended.
    #[arg(long, value_name = "N")]
    pub sinks: Option<u32>,
    /// Most recent tokens always attended.
    #[arg(long, value_name = "N")]
    pub recent: Option<u32>,
    /// Candidates re-scored exactly before the budget is kept (0 = off).
    #[arg(long, value_name = "C")]
    pub rerank: Option<u32>,
    /// One token set per query head instead of per KV group.
    #[arg(long)]
    pub per_head: bool,
    /// The first N layers always attend densely.
    #[arg(long, value_name = "N")]
    pub dense_layers: Option<u32>,
    /// A system message before the conversation (chat template only).
    #[arg(long, value_name = "TEXT")]
    pub system_prompt: Option<String>,
}

impl SamplingArgs {
    pub fn options(&self) -> fasa_dbus::GenerateOptions {
        fasa_dbus::GenerateOptions {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.clone(),
            attention: self.attention.clone(),
            budget: self.budget,
            chunks: self.chunks,
            pool: self.pool,
            sinks: self.sinks,
            recent: self.recent,
            rerank: self.rerank,
            per_group: self.per_head.then_some(false),
            dense_layers: self.dense_layers,
        }
    }
}
