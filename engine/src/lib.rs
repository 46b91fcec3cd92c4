//! fasa-engine: loads a GGUF model, builds its decoder as an ONNX Runtime graph whose attention
//! is our `FasaAttention` operator, and generates text.
//!
//! Reading order: `gguf` (file) → `config` (shapes) → `tokenizer`/`chat` → `graph` (ONNX model)
//! → `attention` (operator + KV cache) → `model` (Model + Sequence) → `sampler`/`detok`.
pub mod attention;
pub mod calibrate;
pub mod catalog;
pub mod config;
pub mod error;
pub mod gguf;
pub mod headroom;
pub mod graph;
pub mod paths;
pub mod plan;
pub mod pull;
pub mod reference;
pub mod request;
pub mod runtime;
pub mod tokenizer;
pub mod chat;
pub mod sampler;
pub mod detok;
pub mod model;

pub use graph::Activations;
pub use runtime::ExecutionProvider;
pub use model::{LoadOptions, Model, ModelInfo, Sequence};

pub use config::{ModelConfig, RopeLayout};
pub use error::{EngineError, Result};
pub use attention::{AttnConfig, AttnStats, Mode};
pub use request::{AttnOverrides, FinishReason, GenerateRequest, Message, Prompt, SamplingParams, Step};
