//! Loading a model the way fasad serves it: the engine's `Model::load`, then the calibration
//! profile saved for that model in the state folder (when it fits the model), then the default
//! attention from the memory plan. Also where things live: the state folder and its profiles,
//! and the models the catalog names or the models folder holds.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fasa_engine::attention::{CachePool, Profile};
use fasa_engine::{AttnConfig, EngineError, LoadOptions, Model, ModelInfo};

/// `ProfileState` on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileState {
    Calibrated,
    Uncalibrated,
    Calibrating,
}

impl ProfileState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileState::Calibrated => "calibrated",
            ProfileState::Uncalibrated => "uncalibrated",
            ProfileState::Calibrating => "calibrating",
        }
    }
}

/// How to (re)load a model.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub options: LoadOptions,
    /// Where `profiles/<sha256>.json` are read from.
    pub state_dir: PathBuf,
    /// Default attention of requests that name none (from the plan); `None`: the engine's.
    pub attention: Option<AttnConfig>,
}

/// What the bus shows of a loaded model.
#[derive(Clone)]
pub struct ModelStatus {
    pub info: ModelInfo,
    pub pool: Arc<CachePool>,
    pub profile: ProfileState,
    pub attention: AttnConfig,
}

impl std::fmt::Debug for ModelStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStatus").field("model", &self.info.path).field("profile", &self.profile).field("attention", &self.attention).finish()
    }
}

pub struct Loaded {
    pub model: Model,
    pub spec: LoadSpec,
    pub status: ModelStatus,
}

/// The state folder: `$STATE_DIRECTORY` (systemd's `StateDirectory=`, first entry), else
/// `$XDG_STATE_HOME/fasa`, else `~/.local/state/fasa`.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        let first = d.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return PathBuf::from(first);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("fasa");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    PathBuf::from(home).join(".local").join("state").join("fasa")
}

/// Where the profile of the model with this sha256 is kept.
pub fn profile_path(state_dir: &Path, sha256: &str) -> PathBuf {
    state_dir.join("profiles").join(format!("{sha256}.json"))
}

/// The saved profile of `info`'s model, if there is one that fits it (else logs why not).
pub fn saved_profile(state_dir: &Path, info: &ModelInfo) -> Option<Profile> {
    let path = profile_path(state_dir, &info.sha256);
    if !path.exists() {
        return None;
    }
    match Profile::load(&path) {
        Ok(p) => match p.check(&info.config, &info.sha256) {
            Ok(()) => {
                // A ranking from the other activations is used as it is (the FC ranks come from
                // attention, which the matmul rounding barely moves); said once, for provenance.
                if let Some(a) = p.activations.filter(|&a| a != info.activations) {
                    log::info!("the profile {} was calibrated with {} activations; the model runs {}", path.display(), a.as_str(), info.activations.as_str());
                }
                Some(p)
            }
            Err(why) => {
                log::warn!("ignoring the profile {}: {why}; calibrate again (`fasactl calibrate`)", path.display());
                None
            }
        },
        Err(e) => {
            log::warn!("ignoring the profile {}: {e}; calibrate again (`fasactl calibrate`)", path.display());
            None
        }
    }
}

/// Loads the model, applies its saved profile and the default attention.
pub fn load(spec: &LoadSpec) -> Result<Loaded, EngineError> {
    let mut model = Model::load(&spec.options)?;
    if let Some(a) = &spec.attention {
        let fitted = model.pool().fit_config(a.clone());
        model.set_default_attention(fitted)?;
    }
    let profile = match saved_profile(&spec.state_dir, model.info()) {
        Some(p) => {
            log::info!("using the calibration profile {}", profile_path(&spec.state_dir, &model.info().sha256).display());
            model.pool().set_profile(p);
            ProfileState::Calibrated
        }
        None => ProfileState::Uncalibrated,
    };
    let status = ModelStatus { info: model.info().clone(), pool: model.pool().clone(), profile, attention: model.default_attention().clone() };
    Ok(Loaded { model, spec: spec.clone(), status })
}

/// A model fasad can load: from the catalog (maybe not installed) or a GGUF in the models folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    pub name: String,
    pub path: PathBuf,
    pub license: String,
    pub installed: bool,
    pub size: u64,
}

/// The catalog's models, then the other `.gguf` files of `models_dir`.
pub fn available(models_dir: &Path) -> Vec<Available> {
    let mut out: Vec<Available> = fasa_engine::catalog::CATALOG
        .iter()
        .map(|m| {
            let path = models_dir.join(m.file);
            let installed = std::fs::metadata(&path).map(|md| md.len() == m.size).unwrap_or(false);
            Available { name: m.name.into(), path, license: m.license.into(), installed, size: m.size }
        })
        .collect();
    let mut others: Vec<Available> = std::fs::read_dir(models_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf") && !out.iter().any(|a| &a.path == p))
        .map(|p| {
            let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            Available { name, path: p, license: String::new(), installed: true, size }
        })
        .collect();
    others.sort_by(|a, b| a.name.cmp(&b.name));
    out.extend(others);
    out
}

/// The file a name or path means: a catalog name, a file name in the models folder, or a path.
pub fn resolve(name_or_path: &str, models_dir: &Path) -> Result<PathBuf, String> {
    if let Some(m) = fasa_engine::catalog::by_name(name_or_path) {
        let path = models_dir.join(m.file);
        if !path.exists() {
            return Err(format!("model {} is not installed: pull it first (`fasactl models pull {}`)", m.name, m.name));
        }
        return Ok(path);
    }
    if let Some(a) = available(models_dir).into_iter().find(|a| a.name == name_or_path) {
        return Ok(a.path);
    }
    let path = PathBuf::from(name_or_path);
    if path.is_absolute() && path.is_file() {
        return Ok(path);
    }
    let names: Vec<String> = available(models_dir).into_iter().map(|a| a.name).collect();
    let shown: String = name_or_path.chars().take(200).flat_map(char::escape_debug).collect();
    Err(format!("no model '{shown}': give a name ({}) or an absolute path to a GGUF file", names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_models_are_listed_and_resolved() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.gguf"), b"x").unwrap();
        let list = available(dir.path());
        assert_eq!(list[0].name, "smollm2-135m");
        assert!(!list[0].installed);
        assert!(list.iter().any(|a| a.name == "mine" && a.installed && a.size == 1));
        assert!(resolve("smollm2-135m", dir.path()).unwrap_err().contains("pull"));
        assert_eq!(resolve("mine", dir.path()).unwrap(), dir.path().join("mine.gguf"));
        assert!(resolve("nope", dir.path()).unwrap_err().contains("smollm2-135m"));
    }
}
