//! Decode attention over the paged FC-plane cache: FC scores (TIP), dense attention, and exact
//! attention over a chosen set of rows (FASA's focused attention).

/// Read-only view of one (layer, KV head) cache.
#[derive(Clone, Copy)]
pub struct HeadView<'a> {
    /// Each `(n_fc, page, 2)`: FC plane `f` of the page's tokens (rotated K).
    pub k_pages: &'a [&'a [f32]],
    /// Each `(page, d)`.
    pub v_pages: &'a [&'a [f32]],
    /// Tokens per page.
    pub page: usize,
    pub n_fc: usize,
    /// Tokens cached.
    pub len: usize,
}

impl HeadView<'_> {
    pub fn head_dim(&self) -> usize {
        2 * self.n_fc
    }

    /// K of token `t` as `(n_fc, 2)` pairs.
    pub fn k_pairs(&self, t: usize, out: &mut [f32]) {
        let (p, i) = (t / self.page, t % self.page);
        let kp = self.k_pages[p];
        for f in 0..self.n_fc {
            let o = (f * self.page + i) * 2;
            out[2 * f] = kp[o];
            out[2 * f + 1] = kp[o + 1];
        }
    }

    /// V row of token `t`, `(d,)`.
    pub fn v_row(&self, t: usize) -> &[f32] {
        let d = self.head_dim();
        let (p, i) = (t / self.page, t % self.page);
        &self.v_pages[p][i * d..(i + 1) * d]
    }
}

/// `out[t] (+)= Σ_{f ∈ fcs} q_f · k_{t,f}` for tokens `0..n`: the FC score of TIP, reading only the
/// planes in `fcs`. `q_fc` is `(n_fc, 2)`. With `accumulate`, adds to `out` (summing the query
/// heads of a KV group); else overwrites.
pub fn fc_scores(view: &HeadView, q_fc: &[f32], fcs: &[usize], n: usize, out: &mut [f32], accumulate: bool) {
    let out = &mut out[..n];
    if !accumulate {
        out.fill(0.0);
    }
    for (p, kp) in view.k_pages.iter().enumerate() {
        let t0 = p * view.page;
        if t0 >= n {
            break;
        }
        let cnt = (n - t0).min(view.page);
        let o = &mut out[t0..t0 + cnt];
        for &f in fcs {
            let (q0, q1) = (q_fc[2 * f], q_fc[2 * f + 1]);
            let plane = &kp[f * view.page * 2..f * view.page * 2 + cnt * 2];
            for (s, k) in o.iter_mut().zip(plane.chunks_exact(2)) {
                *s += q0 * k[0] + q1 * k[1];
            }
        }
    }
}

/// Numerically stable softmax over `x`.
pub fn softmax_in_place(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Exact attention of one query head over tokens `0..n`: `out (d,) = softmax(scale·q·Kᵀ) V`.
/// `scores` is scratch of at least `n`.
pub fn attend_dense(view: &HeadView, q_fc: &[f32], n: usize, scale: f32, out: &mut [f32], scores: &mut [f32]) {
    let all: Vec<usize> = (0..view.n_fc).collect();
    fc_scores(view, q_fc, &all, n, scores, false);
    let s = &mut scores[..n];
    s.iter_mut().for_each(|v| *v *= scale);
    softmax_in_place(s);
    let d = view.head_dim();
    out[..d].fill(0.0);
    for (t, &w) in s.iter().enumerate() {
        for (o, v) in out[..d].iter_mut().zip(view.v_row(t)) {
            *o += w * v;
        }
    }
}

/// Exact attention of one query head over the given `rows` only (FASA stage 2, full dims).
/// `scores` is scratch of at least `rows.len()`.
pub fn attend_rows(view: &HeadView, q_fc: &[f32], rows: &[u32], scale: f32, out: &mut [f32], scores: &mut [f32]) {
    let d = view.head_dim();
    let mut k = vec![0.0f32; d];
    for (s, &t) in scores.iter_mut().zip(rows) {
        view.k_pairs(t as usize, &mut k);
        *s = scale * q_fc.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>();
    }
    let s = &mut scores[..rows.len()];
    softmax_in_place(s);
    out[..d].fill(0.0);
    for (&w, &t) in s.iter().zip(rows) {
        for (o, v) in out[..d].iter_mut().zip(view.v_row(t as usize)) {
            *o += w * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Builds a paged view from plain `(len, d)` K (pairs adjacent) and V.
    fn paged(k: &[f32], v: &[f32], len: usize, d: usize, page: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let n_fc = d / 2;
        let n_pages = len.div_ceil(page);
        let mut kp = vec![vec![0.0; n_fc * page * 2]; n_pages];
        let mut vp = vec![vec![0.0; page * d]; n_pages];
        for t in 0..len {
            let (p, i) = (t / page, t % page);
            for f in 0..n_fc {
                kp[p][(f * page + i) * 2] = k[t * d + 2 * f];
                kp[p][(f * page + i) * 2 + 1] = k[t * d + 2 * f + 1];
            }
            vp[p][i * d..(i + 1) * d].copy_from_slice(&v[t * d..(t + 1) * d]);
        }
        (kp, vp)
    }

    #[test]
    fn paged_attention_matches_plain_softmax() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (len, d, page) = (45, 8, 16);
        let k: Vec<f32> = (0..len * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v: Vec<f32> = (0..len * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let q: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (kp, vp) = paged(&k, &v, len, d, page);
        let kr: Vec<&[f32]> = kp.iter().map(|p| p.as_slice()).collect();
        let vr: Vec<&[f32]> = vp.iter().map(|p| p.as_slice()).collect();
        let view = HeadView { k_pages: &kr, v_pages: &vr, page, n_fc: d / 2, len };
        let scale = 0.35;
        // Plain reference.
        let mut s: Vec<f32> = (0..len).map(|t| scale * (0..d).map(|j| q[j] * k[t * d + j]).sum::<f32>()).collect();
        softmax_in_place(&mut s);
        let want: Vec<f32> = (0..d).map(|j| (0..len).map(|t| s[t] * v[t * d + j]).sum()).collect();
        let (mut out, mut scratch) = (vec![0.0; d], vec![0.0; len]);
        attend_dense(&view, &q, len, scale, &mut out, &mut scratch);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // All rows through the sparse path equal dense.
        let rows: Vec<u32> = (0..len as u32).collect();
        let mut out2 = vec![0.0; d];
        attend_rows(&view, &q, &rows, scale, &mut out2, &mut scratch);
        for (a, b) in out2.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn fc_scores_are_sums_of_per_fc_dots() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (len, d, page) = (70, 16, 32);
        let k: Vec<f32> = (0..len * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v = vec![0.0; len * d];
        let q: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (kp, vp) = paged(&k, &v, len, d, page);
        let kr: Vec<&[f32]> = kp.iter().map(|p| p.as_slice()).collect();
        let vr: Vec<&[f32]> = vp.iter().map(|p| p.as_slice()).collect();
        let view = HeadView { k_pages: &kr, v_pages: &vr, page, n_fc: d / 2, len };
        let fcs = [1usize, 5, 6];
        let mut got = vec![0.0; len];
        fc_scores(&view, &q, &fcs, len, &mut got, false);
        for t in 0..len {
            let want: f32 = fcs.iter().map(|&f| q[2 * f] * k[t * d + 2 * f] + q[2 * f + 1] * k[t * d + 2 * f + 1]).sum();
            assert!((got[t] - want).abs() < 1e-5);
        }
    }
}
