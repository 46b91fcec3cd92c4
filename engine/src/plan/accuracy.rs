//! What a smaller FC pool or chunk count costs, read from the calibration profile.
//!
//! Each (layer, KV head) of the profile ranks its FCs by contextual agreement (CA, mean at
//! `ca_k`), best first. Keeping the top `n` of a head keeps `Σ_{i<n} ca_i`; the share kept
//! relative to the top `of` is the planner's measure of what dropping FCs costs. FCs ranked
//! low agree with the dense top-K only by chance, so dropping them is nearly free; dropping a
//! head's leading FCs is not.
use crate::attention::Profile;

/// Mean over the sparse (layer, KV head)s of `Σ_{i<n} ca_i / Σ_{i<of} ca_i`; the first
/// `dense_layers` layers are skipped (they attend densely). `None` when the profile is
/// uncalibrated or carries no CA values.
pub fn ca_share(profile: &Profile, n: usize, of: usize, dense_layers: usize) -> Option<f64> {
    if profile.uncalibrated {
        return None;
    }
    let (mut sum, mut count) = (0.0f64, 0usize);
    for layer in profile.layers.iter().skip(dense_layers) {
        for h in &layer.kv_heads {
            if h.ca.is_empty() {
                continue;
            }
            let kept: f64 = h.ca.iter().take(n).map(|&c| c.max(0.0) as f64).sum();
            let full: f64 = h.ca.iter().take(of).map(|&c| c.max(0.0) as f64).sum();
            sum += if full > 0.0 { (kept / full).min(1.0) } else { 1.0 };
            count += 1;
        }
    }
    (count > 0).then(|| sum / count as f64)
}
