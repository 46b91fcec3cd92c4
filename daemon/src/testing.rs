//! Test support: the real default model and ONNX Runtime (from the fasa cache folder, as
//! scripts/setup leaves them), loaded once per test binary and lent to one test at a time (the
//! tests share two cores anyway). A test takes the model, hands it to a worker, and gives it
//! back with `Worker::stop`; a test that panics loses it and the next one loads it anew.
use std::sync::{Mutex, MutexGuard};

use fasa_engine::{LoadOptions, Model};

use crate::models::{LoadSpec, Loaded, ModelStatus, ProfileState};

/// Cache slots and context of the test model.
pub const SLOTS: usize = 2;
pub const CONTEXT: usize = 1024;

static MODEL: Mutex<Option<Model>> = Mutex::new(None);

pub struct TestModel {
    guard: MutexGuard<'static, Option<Model>>,
}

pub fn spec() -> LoadSpec {
    let mut options = LoadOptions::new(fasa_engine::paths::default_model(), fasa_engine::paths::default_ort_library());
    options.max_sequences = SLOTS;
    options.max_context = CONTEXT;
    options.threads = 2;
    LoadSpec { options, state_dir: std::env::temp_dir().join("fasad-test-state-unused"), attention: None }
}

/// Waits for the model to be free and lends it.
pub fn lease() -> TestModel {
    TestModel { guard: MODEL.lock().unwrap_or_else(|e| e.into_inner()) }
}

impl TestModel {
    /// The model, ready to hand to a worker (loaded on first use).
    pub fn take(&mut self) -> Loaded {
        let model = match self.guard.take() {
            Some(m) => m,
            None => Model::load(&spec().options).unwrap_or_else(|e| panic!("the tests need the default model and ONNX Runtime (scripts/setup): {e}")),
        };
        let status = ModelStatus { info: model.info().clone(), pool: model.pool().clone(), profile: ProfileState::Uncalibrated, attention: model.default_attention().clone() };
        Loaded { model, spec: spec(), status }
    }

    pub fn put(&mut self, model: Option<Model>) {
        *self.guard = model;
    }
}
