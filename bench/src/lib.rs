//! fasa-bench: benchmark harnesses linked to the engine. `fidelity` (teacher-forced KL, top-1,
//! perplexity, recall, attention mass, bytes read) and `passkey` measure how far each attention
//! mode's answers stay the model's; `capture` writes real K/V for the GPU kernel tests; `plot`
//! draws SVG line charts; `report` writes the JSON, the markdown table (bench/FIDELITY.md) and
//! the plots.
pub mod capture;
pub mod fidelity;
pub mod passkey;
pub mod plot;
pub mod report;

use fasa_engine::{Model, Result};

/// Feeds `ids` at positions `pos..` of `slot` in prefill chunks (the engine's chunk size).
pub fn prefill(model: &mut Model, ids: &[u32], pos: usize, slot: usize) -> Result<Vec<f32>> {
    let mut logits = Vec::new();
    for (i, chunk) in ids.chunks(fasa_engine::model::PREFILL_CHUNK).enumerate() {
        logits = model.forward(chunk, pos + i * fasa_engine::model::PREFILL_CHUNK, slot)?;
    }
    Ok(logits)
}

/// Index of the largest logit (lowest index on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// `log softmax(x)` in f64 (KL of near-equal distributions needs the precision).
pub fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| v as f64 - lse).collect()
}
