//! The engine's typed errors: each says what failed and what to do about it.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("model file {path}: {reason}")]
    BadModel { path: PathBuf, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("ONNX Runtime library not usable at {path}: {reason} (run scripts/setup or set FASA_ORT_LIB)")]
    MissingRuntime { path: PathBuf, reason: String },
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("prompt has {prompt} tokens; with max_tokens it must fit the context of {limit} tokens")]
    ContextTooLong { prompt: usize, limit: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("all {0} sequence slots are in use; retry when a job finishes")]
    NoFreeSlot(usize),
}

impl From<ort::Error> for EngineError {
    fn from(e: ort::Error) -> Self {
        EngineError::Runtime(e.to_string())
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
