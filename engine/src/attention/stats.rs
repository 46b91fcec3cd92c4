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
    /// FASA-M: selected rows copied from the slow tier into the row cache (misses).
    #[serde(default)]
    pub rows_moved: u64,
    /// FASA-M: K+V bytes of those rows.
    #[serde(default)]
    pub bytes_moved: u64,
    /// FASA-M: selected rows already in the row cache (kept from earlier steps).
    #[serde(default)]
    pub row_hits: u64,
    /// (layer, decode step) pairs attended on the GPU (`attention::gpu`); their bytes are
    /// counted with fp16 elements (2 bytes), the CPU's with f32 (4 bytes).
    #[serde(default)]
    pub gpu_layer_steps: u64,
    /// Of those, the pairs launched on ONNX Runtime's stream (its CUDA execution provider).
    #[serde(default)]
    pub ort_stream_steps: u64,
    /// Of the GPU pairs, those replayed from a captured CUDA graph (`attention::gpu`).
    #[serde(default)]
    pub graph_steps: u64,
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
        self.rows_moved += o.rows_moved;
        self.bytes_moved += o.bytes_moved;
        self.row_hits += o.row_hits;
        self.gpu_layer_steps += o.gpu_layer_steps;
        self.ort_stream_steps += o.ort_stream_steps;
        self.graph_steps += o.graph_steps;
    }
    /// FASA-M: fraction of selected rows found in the row cache (1.0 when none were fetched).
    pub fn hit_rate(&self) -> f64 {
        let n = self.row_hits + self.rows_moved;
        if n == 0 {
            1.0
        } else {
            self.row_hits as f64 / n as f64
        }
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
