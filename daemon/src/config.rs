//! fasad's settings: command-line flags over the TOML file (`/etc/fasa/fasad.toml` by default)
//! over built-in defaults, validated once at start so that a bad value stops the daemon with a
//! message naming it.
use std::path::{Path, PathBuf};
use std::time::Duration;

use fasa_engine::{Activations, ExecutionProvider};
use clap::Parser;
use serde::Deserialize;

/// The file read when `--config` is not given; its absence is not an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/fasa/fasad.toml";

#[derive(Debug, Parser)]
#[command(name = "fasad", version, about = "The FASA inference daemon: serves an LLM over D-Bus as dev.fasa.Fasa1")]
pub struct Args {
    /// Serve on the session bus.
    #[arg(long, conflicts_with = "system")]
    pub session: bool,
    /// Serve on the system bus (the default).
    #[arg(long)]
    pub system: bool,
    /// TOML configuration file [default: /etc/fasa/fasad.toml when it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// GGUF model file [default: the default model in the fasa cache folder, or $FASA_MODEL].
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// ONNX Runtime library (libonnxruntime.so.*) [default: the one in the fasa cache folder, or $FASA_ORT_LIB].
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Jobs that generate at once (KV-cache slots) [default: 4].
    #[arg(long, value_name = "N")]
    pub max_sequences: Option<usize>,
    /// Jobs that may wait for a slot; beyond that Generate answers Busy [default: 16].
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,
    /// Tokens per sequence; 0 = the model's trained context [default: 0].
    #[arg(long, value_name = "TOKENS")]
    pub max_context: Option<usize>,
    /// ONNX Runtime threads; 0 = all cores [default: 0].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Activations of the weight matmuls: int8 (as llama.cpp; faster) or f32 (exact products
    /// with the GGUF weights) [default: int8].
    #[arg(long, value_name = "int8|f32")]
    pub activations: Option<Activations>,
    /// ONNX Runtime execution provider: auto (CUDA when the ONNX Runtime library has it and a
    /// GPU is usable), cpu, or cuda (refuse to start without it) [default: auto].
    #[arg(long, value_name = "auto|cpu|cuda")]
    pub execution_provider: Option<ExecutionProvider>,
    /// max_tokens of a job whose caller did not set it [default: 256].
    #[arg(long, value_name = "N")]
    pub default_max_tokens: Option<u32>,
    /// Seconds a finished job stays on the bus for its caller to read [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub job_linger: Option<u64>,
    /// Do not calibrate the model in the background when it has no saved profile.
    #[arg(long)]
    pub no_calibrate_on_load: bool,
    /// Tokens of each text the calibration on first load uses (fewer: faster, less precise)
    /// [default: 896].
    #[arg(long, value_name = "N")]
    pub calibrate_max_tokens: Option<usize>,
    /// KV-cache headroom to plan with instead of the live reading (MemAvailable and the
    /// cgroup limit), e.g. 512MiB: for testing, and for operators who want a cap. Weights and
    /// workspace are accounted apart.
    #[arg(long, value_name = "SIZE")]
    pub headroom: Option<String>,
    /// Slow-tier budget for FASA-M, e.g. 4GiB: a file-backed mapping under the cache folder that
    /// the kernel can page out. With it the planner may keep only the dominant K planes in memory
    /// when the whole cache does not fit [default: none, FASA-M off].
    #[arg(long, value_name = "SIZE")]
    pub slow_tier: Option<String>,
    /// Unload the model after this many seconds without jobs (reloaded on the next request);
    /// 0 = never [default: 0].
    #[arg(long, value_name = "SECONDS")]
    pub keep_alive: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    Session,
    System,
}

impl BusKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BusKind::Session => "session",
            BusKind::System => "system",
        }
    }
}

/// The TOML file: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    bus: Option<BusKind>,
    model: Option<PathBuf>,
    ort_library: Option<PathBuf>,
    max_sequences: Option<usize>,
    max_queue: Option<usize>,
    max_context: Option<usize>,
    threads: Option<usize>,
    activations: Option<Activations>,
    execution_provider: Option<ExecutionProvider>,
    default_max_tokens: Option<u32>,
    job_linger_secs: Option<u64>,
    calibrate_on_load: Option<bool>,
    calibrate_max_tokens: Option<usize>,
    headroom: Option<String>,
    slow_tier: Option<String>,
    keep_alive_s: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusKind,
    pub model: PathBuf,
    pub ort_library: PathBuf,
    pub max_sequences: usize,
    pub max_queue: usize,
    pub max_context: usize,
    pub threads: usize,
    pub activations: Activations,
    pub execution_provider: ExecutionProvider,
    pub default_max_tokens: u32,
    pub job_linger: Duration,
    pub calibrate_on_load: bool,
    pub calibrate_max_tokens: usize,
    /// `--headroom` in bytes.
    pub headroom: Option<u64>,
    /// `--slow-tier` in bytes (0 = no slow tier).
    pub slow_tier: u64,
    /// `None`: keep the model loaded.
    pub keep_alive: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("headroom {0}: flag --headroom or key `headroom`")]
    Headroom(String),
    #[error("{what} must be between {min} and {max}, got {got} (flag --{flag} or key `{key}`)")]
    OutOfRange { what: &'static str, flag: &'static str, key: &'static str, min: u64, max: u64, got: u64 },
}

impl Config {
    /// Reads the configuration file (the one named by `--config`, else the default one when it
    /// exists) and lets the flags override it.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => read_file(Path::new(DEFAULT_CONFIG_PATH))?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    fn merge(args: &Args, file: FileConfig) -> Result<Config, ConfigError> {
        let bus = if args.session {
            BusKind::Session
        } else if args.system {
            BusKind::System
        } else {
            file.bus.unwrap_or(BusKind::System)
        };
        let config = Config {
            bus,
            model: args.model.clone().or(file.model).unwrap_or_else(fasa_engine::paths::default_model),
            ort_library: args
                .ort_lib
                .clone()
                .or(file.ort_library)
                .unwrap_or_else(fasa_engine::paths::default_ort_library),
            max_sequences: args.max_sequences.or(file.max_sequences).unwrap_or(4),
            max_queue: args.max_queue.or(file.max_queue).unwrap_or(16),
            max_context: args.max_context.or(file.max_context).unwrap_or(0),
            threads: args.threads.or(file.threads).unwrap_or(0),
            activations: args.activations.or(file.activations).unwrap_or_default(),
            execution_provider: args.execution_provider.or(file.execution_provider).unwrap_or_default(),
            default_max_tokens: args.default_max_tokens.or(file.default_max_tokens).unwrap_or(256),
            job_linger: Duration::from_secs(args.job_linger.or(file.job_linger_secs).unwrap_or(60)),
            calibrate_on_load: !args.no_calibrate_on_load && file.calibrate_on_load.unwrap_or(true),
            calibrate_max_tokens: args.calibrate_max_tokens.or(file.calibrate_max_tokens).unwrap_or(896),
            headroom: match args.headroom.clone().or(file.headroom) {
                Some(s) => Some(fasa_engine::headroom::parse_size(&s).map_err(|e| ConfigError::Headroom(e.to_string()))?),
                None => None,
            },
            slow_tier: match args.slow_tier.clone().or(file.slow_tier) {
                Some(s) => fasa_engine::headroom::parse_size(&s).map_err(|e| ConfigError::Headroom(e.to_string()))?,
                None => 0,
            },
            keep_alive: match args.keep_alive.or(file.keep_alive_s).unwrap_or(0) {
                0 => None,
                s => Some(Duration::from_secs(s)),
            },
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let checks: [(&str, &str, &str, u64, u64, u64); 8] = [
            ("calibration tokens", "calibrate-max-tokens", "calibrate_max_tokens", 64, 1 << 20, self.calibrate_max_tokens as u64),
            ("the keep-alive", "keep-alive", "keep_alive_s", 0, 86_400 * 365, self.keep_alive.map_or(0, |d| d.as_secs())),
            ("sequences", "max-sequences", "max_sequences", 1, 256, self.max_sequences as u64),
            ("the queue length", "max-queue", "max_queue", 0, 4096, self.max_queue as u64),
            ("the context", "max-context", "max_context", 0, 1 << 24, self.max_context as u64),
            ("threads", "threads", "threads", 0, 1024, self.threads as u64),
            ("the default max_tokens", "default-max-tokens", "default_max_tokens", 1, 1 << 20, self.default_max_tokens as u64),
            ("the job linger time", "job-linger", "job_linger_secs", 0, 86_400, self.job_linger.as_secs()),
        ];
        for (what, flag, key, min, max, got) in checks {
            if !(min..=max).contains(&got) {
                return Err(ConfigError::OutOfRange { what, flag, key, min, max, got });
            }
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse(path, &text)
}

fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    // toml's messages span several lines (a snippet with a caret); keep them on one line.
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::parse_from(std::iter::once("fasad").chain(list.iter().copied()))
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(Path::new("t.toml"), "bus = \"session\"\nmax_sequences = 2\nmax_queue = 3\nmodel = \"/m.gguf\"\n").unwrap();
        let c = Config::merge(&args(&["--max-sequences", "5"]), file).unwrap();
        assert_eq!(c.bus, BusKind::Session);
        assert_eq!(c.max_sequences, 5);
        assert_eq!(c.max_queue, 3);
        assert_eq!(c.model, PathBuf::from("/m.gguf"));
        let c = Config::merge(&args(&["--system"]), FileConfig { bus: Some(BusKind::Session), ..Default::default() }).unwrap();
        assert_eq!(c.bus, BusKind::System);
        assert_eq!(Config::merge(&args(&[]), FileConfig::default()).unwrap().bus, BusKind::System);
    }

    #[test]
    fn bad_files_and_values_are_named() {
        let e = parse(Path::new("/etc/fasa/fasad.toml"), "max_sequencs = 2\n").unwrap_err().to_string();
        assert!(e.contains("/etc/fasa/fasad.toml") && e.contains("max_sequencs") && !e.contains('\n'), "{e}");
        let e = parse(Path::new("f"), "max_queue = \"many\"\n").unwrap_err().to_string();
        assert!(e.contains("max_queue"), "{e}");
        let e = Config::merge(&args(&["--max-sequences", "0"]), FileConfig::default()).unwrap_err().to_string();
        assert!(e.contains("--max-sequences") && e.contains("got 0"), "{e}");
        assert!(Args::try_parse_from(["fasad", "--session", "--system"]).is_err());
        let e = Config::merge(&args(&["--headroom", "lots"]), FileConfig::default()).unwrap_err().to_string();
        assert!(e.contains("--headroom") && e.contains("lots"), "{e}");
        let c = Config::merge(&args(&["--headroom", "1.5GiB", "--no-calibrate-on-load", "--keep-alive", "5"]), FileConfig::default()).unwrap();
        assert_eq!((c.headroom, c.calibrate_on_load, c.keep_alive), (Some(3 << 29), false, Some(Duration::from_secs(5))));
        assert_eq!(c.activations, Activations::Int8);
        let c = Config::merge(&args(&["--activations", "f32"]), parse(Path::new("f"), "activations = \"int8\"\n").unwrap()).unwrap();
        assert_eq!(c.activations, Activations::F32);
        let e = parse(Path::new("f"), "activations = \"int4\"\n").unwrap_err().to_string();
        assert!(e.contains("activations") && e.contains("int4"), "{e}");
        assert!(Args::try_parse_from(["fasad", "--activations", "fp16"]).is_err());
        assert_eq!(c.execution_provider, ExecutionProvider::Auto);
        let c = Config::merge(&args(&["--execution-provider", "cpu"]), parse(Path::new("f"), "execution_provider = \"cuda\"\n").unwrap()).unwrap();
        assert_eq!(c.execution_provider, ExecutionProvider::Cpu);
        let c = Config::merge(&args(&[]), parse(Path::new("f"), "execution_provider = \"cuda\"\n").unwrap()).unwrap();
        assert_eq!(c.execution_provider, ExecutionProvider::Cuda);
        let e = parse(Path::new("f"), "execution_provider = \"rocm\"\n").unwrap_err().to_string();
        assert!(e.contains("execution_provider") && e.contains("rocm"), "{e}");
        assert!(Args::try_parse_from(["fasad", "--execution-provider", "gpu"]).is_err());
    }
}
