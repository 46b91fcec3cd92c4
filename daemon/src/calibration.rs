//! Calibration as fasad runs it: on a second instance of the loaded model (one slot, loaded on
//! the task's own thread), so generation goes on meanwhile; the profile is saved to the state
//! folder as `profiles/<model sha256>.json` (and to `output` when asked) and installed in the
//! serving model's cache pool.
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fasa_engine::attention::CachePool;
use fasa_engine::calibrate::{calibrate, default_calibration_texts, CalibrateOptions};
use fasa_engine::Model;

use crate::bus::task::{Ctl, Outcome};
use crate::models::{profile_path, LoadSpec};

/// A calibration to run.
#[derive(Debug, Clone)]
pub struct Request {
    /// `(source name, text)`; empty: the engine's defaults.
    pub texts: Vec<(String, String)>,
    pub options: CalibrateOptions,
    /// A copy of the profile is written here too.
    pub output: Option<PathBuf>,
}

/// Unwinds out of `calibrate` when the task is cancelled (never reaches the panic hook).
struct Cancelled;

/// Runs `req` for the model `spec` loads and installs the profile in `pool`; the result is the
/// saved profile's path.
pub fn run(spec: &LoadSpec, pool: &Arc<CachePool>, req: Request, ctl: Ctl<'_>) -> Outcome {
    let Ctl { cancel, progress } = ctl;
    let mut options = spec.options.clone();
    options.max_sequences = 1;
    options.max_context = req.options.max_tokens.max(req.options.prefix + 2) + 1;
    let mut model = Model::load(&options).map_err(|e| Some(format!("cannot load a second instance of the model to calibrate: {e}")))?;
    if cancel.load(Ordering::Relaxed) {
        return Err(None);
    }
    let texts = if req.texts.is_empty() { default_calibration_texts() } else { req.texts };
    let mut report = |f: f32| {
        if cancel.load(Ordering::Relaxed) {
            resume_unwind(Box::new(Cancelled));
        }
        progress(f as f64);
    };
    let profile = match catch_unwind(AssertUnwindSafe(|| calibrate(&mut model, &texts, &req.options, &mut report))) {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(Some(format!("calibration failed: {e}"))),
        Err(payload) if payload.is::<Cancelled>() => return Err(None),
        Err(payload) => resume_unwind(payload),
    };
    let path = profile_path(&spec.state_dir, &model.info().sha256);
    profile.save(&path).map_err(|e| Some(format!("cannot save the profile: {e}")))?;
    if let Some(out) = &req.output {
        profile.save(out).map_err(|e| Some(format!("the profile is saved as {} but the copy failed: {e}", path.display())))?;
    }
    pool.set_profile(profile);
    log::info!(model = model.info().config.name.as_str(); "calibrated {}: profile saved as {}", model.info().config.name, path.display());
    Ok(path.display().to_string())
}
