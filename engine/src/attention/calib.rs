//! Contextual agreement (CA) recording for calibration: during dense decoding, for each query
//! head (and each KV group, heads summed) and each FC `f`,
//! `CA_K(f) = |TopK(q·Kᵀ) ∩ TopK(q_f·K_fᵀ)| / K` with raw post-RoPE dot products over all cached
//! keys, accumulated at several K.
use fasa_kernels::cpu::{fc_scores, HeadView};

/// Running CA sums. Index `((layer · heads + head) · n_fc + fc) · |K| + ki`.
#[derive(Debug, Clone)]
pub struct CaRecorder {
    pub k_values: Vec<usize>,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub n_fc: usize,
    pub q_sum: Vec<f64>,
    pub kv_sum: Vec<f64>,
    /// Queries counted per (layer, ki) — the same for every head of the layer.
    pub count: Vec<u64>,
}

/// Indices of `s` in descending order, first `k_max` only.
fn ranking(s: &[f32], k_max: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..s.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| s[*b as usize].partial_cmp(&s[*a as usize]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b));
    let k = k_max.min(idx.len());
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

impl CaRecorder {
    pub fn new(k_values: Vec<usize>, n_layers: usize, n_heads: usize, n_kv_heads: usize, n_fc: usize) -> Self {
        let nk = k_values.len();
        Self {
            n_layers,
            n_heads,
            n_kv_heads,
            n_fc,
            q_sum: vec![0.0; n_layers * n_heads * n_fc * nk],
            kv_sum: vec![0.0; n_layers * n_kv_heads * n_fc * nk],
            count: vec![0; n_layers * nk],
            k_values,
        }
    }

    /// Adds `CA_K(f)` of one score vector against its per-FC parts to `sums[fc · |K| + ki]`.
    fn add(&self, exact: &[f32], per_fc: &[Vec<f32>], sums: &mut [f64]) {
        let n = exact.len();
        let k_max = self.k_values.iter().copied().filter(|&k| k <= n / 2).max().unwrap_or(0);
        if k_max == 0 {
            return;
        }
        // rank_true[t] = position of t in the exact ranking (usize::MAX beyond k_max).
        let mut rank_true = vec![u32::MAX; n];
        for (r, &t) in ranking(exact, k_max).iter().enumerate() {
            rank_true[t as usize] = r as u32;
        }
        let nk = self.k_values.len();
        for (f, s) in per_fc.iter().enumerate() {
            let mut hits = vec![0u32; nk];
            for (i, &t) in ranking(s, k_max).iter().enumerate() {
                let r = rank_true[t as usize];
                for (ki, &k) in self.k_values.iter().enumerate() {
                    if i < k && (r as usize) < k {
                        hits[ki] += 1;
                    }
                }
            }
            for (ki, &k) in self.k_values.iter().enumerate() {
                if k <= n / 2 {
                    sums[f * nk + ki] += hits[ki] as f64 / k as f64;
                }
            }
        }
    }

    /// Records one decode query of `layer`: `qs[i]` is query head `heads[i]` (`(n_fc, 2)`), all in
    /// KV group `kv_head` whose cache `view` holds `n` tokens.
    pub fn observe(&mut self, layer: usize, kv_head: usize, heads: &[usize], qs: &[&[f32]], view: &HeadView, n: usize) {
        let nf = self.n_fc;
        let nk = self.k_values.len();
        let mut group_fc = vec![vec![0f32; n]; nf];
        let mut group_exact = vec![0f32; n];
        for (&h, q) in heads.iter().zip(qs) {
            let per_fc: Vec<Vec<f32>> = (0..nf)
                .map(|f| {
                    let mut s = vec![0f32; n];
                    fc_scores(view, q, &[f], n, &mut s, false);
                    s
                })
                .collect();
            let mut exact = vec![0f32; n];
            for s in &per_fc {
                exact.iter_mut().zip(s).for_each(|(e, v)| *e += v);
            }
            let base = (layer * self.n_heads + h) * nf * nk;
            let mut sums = std::mem::take(&mut self.q_sum);
            self.add(&exact, &per_fc, &mut sums[base..base + nf * nk]);
            self.q_sum = sums;
            for (g, s) in group_fc.iter_mut().zip(&per_fc) {
                g.iter_mut().zip(s).for_each(|(a, b)| *a += b);
            }
            group_exact.iter_mut().zip(&exact).for_each(|(a, b)| *a += b);
        }
        let base = (layer * self.n_kv_heads + kv_head) * nf * nk;
        let mut sums = std::mem::take(&mut self.kv_sum);
        self.add(&group_exact, &group_fc, &mut sums[base..base + nf * nk]);
        self.kv_sum = sums;
        if kv_head == 0 {
            for (ki, &k) in self.k_values.iter().enumerate() {
                if k <= n / 2 {
                    self.count[layer * nk + ki] += 1;
                }
            }
        }
    }

    /// Mean CA of (layer, head, fc) at `k_values[ki]`; `kv` selects the KV-group table.
    pub fn mean(&self, kv: bool, layer: usize, head: usize, fc: usize, ki: usize) -> f32 {
        let nk = self.k_values.len();
        let heads = if kv { self.n_kv_heads } else { self.n_heads };
        let sums = if kv { &self.kv_sum } else { &self.q_sum };
        let c = self.count[layer * nk + ki];
        if c == 0 {
            return 0.0;
        }
        (sums[((layer * heads + head) * self.n_fc + fc) * nk + ki] / c as f64) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_one_for_the_fc_that_carries_all_the_signal() {
        // 2 FCs; FC 1 carries all of q·k, FC 0 ranks tokens in reverse.
        let (n, page) = (40, 64);
        let mut k = vec![0f32; 2 * page * 2];
        for t in 0..n {
            k[t * 2] = -(t as f32) * 1e-3; // FC 0: tiny, reversed
            k[(page + t) * 2] = t as f32; // FC 1
        }
        let v = vec![0f32; page * 4];
        let (kr, vr) = ([&k[..]], [&v[..]]);
        let rows = vec![0f32; page * 4];
        let krr = [&rows[..]];
        let view = HeadView { k_pages: &kr, kr_pages: &krr, v_pages: &vr, page, n_fc: 2, len: n };
        let q = [1.0, 0.0, 1.0, 0.0];
        let mut r = CaRecorder::new(vec![4, 8, 32], 1, 1, 1, 2);
        r.observe(0, 0, &[0], &[&q], &view, n);
        assert_eq!(r.mean(false, 0, 0, 1, 0), 1.0);
        assert_eq!(r.mean(false, 0, 0, 0, 0), 0.0);
        assert_eq!(r.mean(true, 0, 0, 1, 1), 1.0);
        // K = 32 > n/2: not recorded.
        assert_eq!(r.count[2], 0);
    }
}
