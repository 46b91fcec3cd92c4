//! The process-wide ONNX Runtime: loaded once from a shared library path (ORT allows one
//! environment per process), with a typed error when the library is missing or unusable.
use std::path::Path;
use std::sync::Mutex;

use ort::environment::Environment;

use crate::{EngineError, Result};

static ENV: Mutex<Option<&'static Environment>> = Mutex::new(None);

/// The environment, loading `libonnxruntime` from `library` on first use.
pub fn environment(library: &Path) -> Result<&'static Environment> {
    let mut env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = *env {
        return Ok(e);
    }
    let missing = |reason: String| EngineError::MissingRuntime { path: library.to_path_buf(), reason };
    // `init_from` on a non-existent path would still try the dynamic loader's search path.
    if !library.is_file() {
        return Err(missing("no such file".into()));
    }
    let built = ort::init_from(library)
        .map_err(|e| missing(e.to_string()))?
        .with_name("fasa")
        .build()
        .map_err(|e| missing(e.to_string()))?;
    let leaked: &'static Environment = Box::leak(Box::new(built));
    *env = Some(leaked);
    Ok(leaked)
}

/// Which ONNX Runtime execution provider runs the decoder graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// CUDA when the ORT library has it and the GPU path is on (`FASA_GPU`, a usable device),
    /// else the CPU. The CPU wheel that scripts/setup fetches has no CUDA provider.
    #[default]
    Auto,
    /// The CPU execution provider (FasaAttention may still decode on the GPU, from host q/k/v).
    Cpu,
    /// The CUDA execution provider, or a load error saying why not. The whole graph runs on the
    /// device where ORT has CUDA kernels; FasaAttention takes host q/k/v, writes its output on
    /// the device and launches on ORT's stream.
    Cuda,
}

impl ExecutionProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Auto => "auto",
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
        }
    }
}

impl std::str::FromStr for ExecutionProvider {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(ExecutionProvider::Auto),
            "cpu" => Ok(ExecutionProvider::Cpu),
            "cuda" => Ok(ExecutionProvider::Cuda),
            _ => Err(format!("unknown execution provider {s:?} (auto, cpu or cuda)")),
        }
    }
}

/// Whether the loaded ORT library was built with the CUDA execution provider.
pub fn has_cuda_provider() -> bool {
    use ort::ep::ExecutionProvider as _;
    ort::ep::CUDA::is_available().unwrap_or(false)
}
