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
