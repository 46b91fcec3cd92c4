//! The memory plan as fasad uses it (docs/plan.md): a headroom source (the live reading,
//! `MinOf[MemInfo, Cgroup]`, or a fixed `--headroom SIZE`), the plan at start that sizes the
//! cache pool and the default attention, `Plan()` for any headroom/context/sessions, and the
//! re-plan under PSI pressure.
use std::path::Path;

use fasa_engine::headroom::{read_headroom, Cgroup, Fixed, Headroom, HeadroomSource, MemInfo, MinOf, PressureLevel, PsiMonitor};
use fasa_engine::plan::{self, workspace_bytes, Objective, Plan, PlanError, PlanInput, Shapes, DEFAULT_DENSE_LAYERS};
use fasa_engine::{ModelConfig, ModelInfo};

/// Fast bytes left to everything else when planning from the live reading.
pub const SAFETY_MARGIN: u64 = 256 << 20;
/// KV elements are f32 in the CPU cache.
const ELEMENT_BYTES: usize = 4;

/// Where headroom readings come from.
pub struct HeadroomReader {
    source: Box<dyn HeadroomSource>,
    /// FASA-M's slow-tier budget (0: none).
    slow_bytes: u64,
    /// `--headroom SIZE`: the KV cache's headroom, weights and workspace accounted apart.
    fixed: bool,
}


impl HeadroomReader {
    pub fn new(fixed: Option<u64>) -> Self {
        match fixed {
            Some(bytes) => HeadroomReader { source: Box::new(Fixed(bytes)), slow_bytes: 0, fixed: true },
            None => HeadroomReader {
                source: Box::new(MinOf { sources: vec![Box::new(MemInfo::default()), Box::new(Cgroup::default())], margin: 0 }),
                slow_bytes: 0,
                fixed: false,
            },
        }
    }

    /// Gives the planner a slow tier of `bytes` for FASA-M.
    pub fn with_slow_tier(mut self, bytes: u64) -> Self {
        self.slow_bytes = bytes;
        self
    }

    pub fn read(&self, pressure: PressureLevel) -> Result<Headroom, String> {
        let mut h = read_headroom(self.source.as_ref(), None, None).map_err(|e| e.to_string())?;
        h.pressure = pressure;
        h.slow_bytes = h.slow_bytes.max(self.slow_bytes);
        Ok(h)
    }

    pub fn is_fixed(&self) -> bool {
        self.fixed
    }
}

/// What a plan is asked for.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub context: usize,
    pub sessions: usize,
}

/// Whether the model's GPU decode mirror will take its bytes from the host's memory (a GPU
/// sharing it, Jetson): the plan counts them then.
fn gpu_mirror(config: &ModelConfig) -> bool {
    fasa_engine::attention::gpu::mirror_in_host_memory(config.head_dim, config.n_heads, config.n_kv_heads, true)
}

/// Plans for a model of `config` with `weight_bytes` of weights. `before_load`: the reading
/// includes what the model will take (live reading before loading).
pub fn plan_for(config: &ModelConfig, weight_bytes: u64, headroom: Headroom, kv_only: bool, ask: Ask) -> Result<Plan, PlanError> {
    let shapes = Shapes::from_config(config);
    let context = if ask.context == 0 { config.context_length } else { ask.context.min(config.context_length) };
    let input = PlanInput {
        shapes,
        weight_bytes,
        workspace_bytes: workspace_bytes(&shapes, fasa_engine::model::PREFILL_CHUNK, context),
        element_bytes: ELEMENT_BYTES,
        gpu_mirror: gpu_mirror(config),
        profile: None,
        requested_context: ask.context,
        requested_sessions: ask.sessions.max(1),
        headroom,
        safety_margin: if kv_only { 0 } else { SAFETY_MARGIN },
        model_in_headroom: !kv_only,
        objective: Objective::Accuracy,
        dense_layers: DEFAULT_DENSE_LAYERS,
    };
    plan::plan(&input)
}

/// The plan at start, before the model is loaded: shapes from the GGUF header, weights
/// estimated by the file's size.
pub fn plan_before_load(model: &Path, source: &HeadroomReader, ask: Ask) -> Result<Result<Plan, PlanError>, String> {
    let file = fasa_engine::gguf::GgufFile::open(model).map_err(|e| format!("model file {}: {e}", model.display()))?;
    let config = ModelConfig::from_gguf(&file).map_err(|e| format!("model file {}: {e}", model.display()))?;
    let weights = std::fs::metadata(model).map(|m| m.len()).unwrap_or(0);
    let headroom = source.read(PressureLevel::None)?;
    Ok(plan_for(&config, weights, headroom, source.is_fixed(), ask))
}

/// A re-plan for a running daemon (the reading excludes the loaded model already).
pub fn replan(prev: Option<&Plan>, info: &ModelInfo, headroom: Headroom, ask: Ask) -> Result<Plan, PlanError> {
    let shapes = Shapes::from_config(&info.config);
    let input = PlanInput {
        shapes,
        weight_bytes: info.weight_bytes,
        workspace_bytes: workspace_bytes(&shapes, fasa_engine::model::PREFILL_CHUNK, info.max_context),
        element_bytes: ELEMENT_BYTES,
        gpu_mirror: gpu_mirror(&info.config),
        profile: None,
        requested_context: ask.context,
        requested_sessions: ask.sessions.max(1),
        headroom,
        safety_margin: 0,
        model_in_headroom: false,
        objective: Objective::Accuracy,
        dense_layers: DEFAULT_DENSE_LAYERS,
    };
    match prev {
        Some(p) => plan::replan_on_pressure(p, &input),
        None => plan::plan(&input),
    }
}

/// PSI, polled once a second; `None` where the kernel has no PSI.
pub fn psi() -> Option<PsiMonitor> {
    let mut m = PsiMonitor::system();
    m.poll().ok().map(|_| m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fasa_engine::{ModelConfig, RopeLayout};

    fn smollm2() -> ModelInfo {
        let config = ModelConfig {
            architecture: "llama".into(),
            name: "SmolLM2".into(),
            n_layers: 30,
            hidden: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn_hidden: 1536,
            vocab_size: 49152,
            context_length: 8192,
            rope_theta: 100000.0,
            rms_eps: 1e-5,
            rope_layout: RopeLayout::Adjacent,
            tied_embeddings: true,
            qkv_bias: false,
        };
        ModelInfo { path: "/m.gguf".into(), config, max_context: 8192, max_sequences: 4, weight_bytes: 98 << 20, sha256: String::new(), activations: Default::default(), execution_provider: fasa_engine::ExecutionProvider::Cpu }
    }

    fn reading(bytes: u64, pressure: PressureLevel) -> Headroom {
        Headroom { fast_bytes: bytes, slow_bytes: 0, pressure }
    }

    #[test]
    fn pressure_shrinks_the_plan_for_new_jobs_and_calm_restores_it() {
        let info = smollm2();
        let ask = Ask { context: 4096, sessions: 4 };
        let calm = replan(None, &info, reading(1 << 30, PressureLevel::None), ask).unwrap();
        assert_eq!(calm.variant.as_str(), "dense");
        let tight = replan(Some(&calm), &info, reading(1 << 30, PressureLevel::Critical), ask).unwrap();
        assert!(tight.max_sessions * tight.max_context < calm.max_sessions * calm.max_context, "{tight:?}");
        assert!(tight.reasons[0].contains("critical"), "{:?}", tight.reasons);
        // Under pressure it never grows back, even with more headroom.
        let still = replan(Some(&tight), &info, reading(4 << 30, PressureLevel::Moderate), ask).unwrap();
        assert!(still.max_sessions <= tight.max_sessions && still.max_context <= tight.max_context);
        let again = replan(Some(&tight), &info, reading(1 << 30, PressureLevel::None), ask).unwrap();
        assert_eq!((again.max_sessions, again.max_context), (calm.max_sessions, calm.max_context));
        // Nothing fits: a typed error, not a panic.
        assert!(matches!(replan(None, &info, reading(1 << 10, PressureLevel::None), ask), Err(PlanError::DoesNotFit { .. })));
    }
}
