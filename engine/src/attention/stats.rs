//! Per-sequence attention counters: K/V bytes read against what dense attention would read, rows
//! kept, and (when measuring) top-B recall against the oracle and the attention mass kept.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttnStats {
    /// (layer, decode step) pairs attended sparsely.
    pub sparse_layer_steps: u64,
    /// (layer, decode step) pairs attended densely (dense layers, short contexts, dense mode).
    pub dense_layer_steps: u64,
    /// K/V bytes dense attention would have read, per KV group (its query heads read together).
    pub bytes_dense: u64,
    /// K/V bytes actually read (FC planes scored, bounds, re-rank K, selected K/V rows).
    pub bytes_read: u64,
    /// Rows attended per KV group, summed.
    pub rows: u64,
    /// Measured probes: (query head, layer, step) triples.
    pub probes: u64,
    /// Σ |selected ∩ oracle top-B| / B over probes.
    pub recall_sum: f64,
    /// Σ softmax mass (full attention) of the selected rows over probes.
    pub mass_sum: f64,
}

impl AttnStats {
    pub fn merge(&mut self, o: &AttnStats) {
        self.sparse_layer_steps += o.sparse_layer_steps;
        self.dense_layer_steps += o.dense_layer_steps;
        self.bytes_dense += o.bytes_dense;
        self.bytes_read += o.bytes_read;
        self.rows += o.rows;
        self.probes += o.probes;
        self.recall_sum += o.recall_sum;
        self.mass_sum += o.mass_sum;
    }
    /// Bytes read relative to dense (1.0 when nothing was sparse).
    pub fn read_fraction(&self) -> f64 {
        if self.bytes_dense == 0 {
            1.0
        } else {
            self.bytes_read as f64 / self.bytes_dense as f64
        }
    }
    pub fn recall(&self) -> f64 {
        self.recall_sum / self.probes.max(1) as f64
    }
    pub fn mass(&self) -> f64 {
        self.mass_sum / self.probes.max(1) as f64
    }
}
