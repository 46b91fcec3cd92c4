//! The calibration profile: per layer and per KV/query head, FCs ranked by contextual agreement.
//!
//! JSON schema (version 1), documented in docs/profile.md:
//! `{ schema, model_sha256, model_name, rope_layout, head_dim, k_values, ca_k, queries,
//!    sources: [{path, sha256, tokens}], layers: [{ kv_heads: [Head], q_heads: [Head] }] }`,
//! `Head = { ranked_fcs: [fc] (best first), ca: [mean CA at K = ca_k, same order],
//!           ca_by_k: {K: [mean CA, same order]} }`.
//! FC `i` is the rotation pair at frequency `theta^(-2i/d)`, whatever the tensor layout.
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Activations, EngineError, ModelConfig, Result, RopeLayout};

pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadProfile {
    /// FC indices, best first.
    pub ranked_fcs: Vec<usize>,
    /// Mean CA at `Profile::ca_k`, in `ranked_fcs` order.
    pub ca: Vec<f32>,
    /// Mean CA at every calibrated K, in `ranked_fcs` order.
    #[serde(default)]
    pub ca_by_k: BTreeMap<usize, Vec<f32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerProfile {
    pub kv_heads: Vec<HeadProfile>,
    pub q_heads: Vec<HeadProfile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub path: String,
    pub sha256: String,
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub schema: u32,
    pub model_sha256: String,
    pub model_name: String,
    pub rope_layout: RopeLayout,
    pub head_dim: usize,
    /// K values CA was measured at.
    pub k_values: Vec<usize>,
    /// The K that `ca` and the ranking use.
    pub ca_k: usize,
    /// Decode queries averaged per head.
    pub queries: usize,
    pub sources: Vec<Source>,
    pub layers: Vec<LayerProfile>,
    /// True for the built-in ranking used before any calibration.
    #[serde(default)]
    pub uncalibrated: bool,
    /// How the weight matmuls took their activations while the profile was calibrated (`None`:
    /// not recorded, profiles from before 2026-11-30, and the heuristic ranking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<Activations>,
}

impl Profile {
    /// Before calibration: lowest frequencies first (FC d/2−1 down to 0), which dominate on the
    /// models we measured; marked `uncalibrated`.
    pub fn heuristic(c: &ModelConfig, model_sha256: &str) -> Self {
        let head = HeadProfile { ranked_fcs: (0..c.n_fcs()).rev().collect(), ca: vec![], ca_by_k: BTreeMap::new() };
        let layer = LayerProfile { kv_heads: vec![head.clone(); c.n_kv_heads], q_heads: vec![head; c.n_heads] };
        Profile {
            schema: SCHEMA,
            model_sha256: model_sha256.into(),
            model_name: c.name.clone(),
            rope_layout: c.rope_layout,
            head_dim: c.head_dim,
            k_values: vec![],
            ca_k: 0,
            queries: 0,
            sources: vec![],
            layers: vec![layer; c.n_layers],
            uncalibrated: true,
            activations: None,
        }
    }

    /// Checks the profile fits the model (shapes and sha256).
    pub fn check(&self, c: &ModelConfig, model_sha256: &str) -> std::result::Result<(), String> {
        if self.schema != SCHEMA {
            return Err(format!("profile schema {} (this build reads {SCHEMA})", self.schema));
        }
        if self.model_sha256 != model_sha256 {
            return Err(format!("profile is for model {} not {model_sha256}", self.model_sha256));
        }
        if self.layers.len() != c.n_layers || self.head_dim != c.head_dim {
            return Err("profile shapes differ from the model's".into());
        }
        for l in &self.layers {
            if l.kv_heads.len() != c.n_kv_heads || l.q_heads.len() != c.n_heads {
                return Err("profile head counts differ from the model's".into());
            }
            for h in l.kv_heads.iter().chain(&l.q_heads) {
                let mut seen = vec![false; c.n_fcs()];
                for &f in &h.ranked_fcs {
                    if f >= c.n_fcs() || std::mem::replace(&mut seen[f], true) {
                        return Err(format!("profile ranks FC {f} twice or out of range"));
                    }
                }
                if h.ranked_fcs.len() != c.n_fcs() {
                    return Err("profile does not rank every FC".into());
                }
            }
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io { path: path.into(), source })?;
        serde_json::from_str(&text).map_err(|e| EngineError::InvalidRequest(format!("profile {}: {e}", path.display())))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| EngineError::Io { path: path.into(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}
