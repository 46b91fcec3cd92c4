//! Decode attention over the paged FC-plane cache: FC scores (TIP), dense attention, and exact
//! attention over a chosen set of rows (FASA's focused attention).
use std::ops::Range;

use super::prefetch_slice;
use super::quant::{fc_scores_q8_heads, Q8View};

/// Read-only view of one (layer, KV head) cache.
///
/// K is kept twice: as FC planes, so TIP streams only the planes it scores, and as rows, so
/// focused attention reads B whole rows (256 B each at d = 64, f32) instead of touching one
/// cache line per FC per row (measured: gathering rows from planes read most of K).
#[derive(Clone, Copy)]
pub struct HeadView<'a> {
    /// Each `(n_fc, page, 2)`: FC plane `f` of the page's tokens (rotated K).
    pub k_pages: &'a [&'a [f32]],
    /// Each `(page, d)`: rotated K rows in FC-pair order (`(n_fc, 2)` per token).
    pub kr_pages: &'a [&'a [f32]],
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
    pub fn k_row(&self, t: usize) -> &[f32] {
        let d = self.head_dim();
        let (p, i) = (t / self.page, t % self.page);
        &self.kr_pages[p][i * d..(i + 1) * d]
    }

    /// K of token `t` as `(n_fc, 2)` pairs, copied.
    pub fn k_pairs(&self, t: usize, out: &mut [f32]) {
        out[..self.head_dim()].copy_from_slice(self.k_row(t));
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

/// `fc_scores` (overwriting) over the tokens `range` only: `out[t − start]`.
fn plane_scores(view: &HeadView, q_fc: &[f32], fcs: &[usize], range: Range<usize>, out: &mut [f32]) {
    let (page, t0) = (view.page, range.start);
    for t in range {
        let (kp, i) = (view.k_pages[t / page], t % page);
        out[t - t0] = fcs.iter().fold(0.0, |s, &f| s + (q_fc[2 * f] * kp[(f * page + i) * 2] + q_fc[2 * f + 1] * kp[(f * page + i) * 2 + 1]));
    }
}

/// Stage-1 score of a KV group's query heads over tokens `0..n` from the FC planes `fcs`:
/// `out[t] = Σ_h softmax_t(scale·ŝ_h)(t)`, `ŝ_h(t) = Σ_{f ∈ fcs} q_{h,f}·k_{t,f}`: the attention
/// mass each head would give the token by its FC scores, summed. Summing the raw scores instead
/// lets the head with the largest logits choose for the group (FIDELITY.md: 0.10 → 0.07 KL at 8k).
/// With `q8`, the FC scores come from the int8 scoring planes (`fc_scores_q8`).
/// `tip_mass_part` over one range and `tip_mass_merge`: callers with threads split the range.
pub fn tip_group_mass(view: &HeadView, q8: Option<&Q8View>, qs: &[&[f32]], fcs: &[usize], n: usize, scale: f32, out: &mut [f32]) {
    let mut e = vec![0f32; qs.len() * n];
    let part = tip_mass_part(view, q8, qs, fcs, 0..n, scale, &mut e);
    tip_mass_merge(&[(&e, &part)], scale, &mut out[..n]);
}

/// Per-head softmax state of a range of tokens: the largest scaled-by-nothing FC score `max` and
/// `sum = Σ_t exp(scale·(ŝ(t) − max))` over the range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MassPart {
    pub max: f32,
    pub sum: f32,
}

avx2_dispatch! {
    /// Stage 1 of `tip_group_mass` over the tokens `range` (its start a multiple of `QB`): writes
    /// `e[h·m + t − start] = exp(scale·(ŝ_h(t) − max_h))` (`(heads, m)`, `m = range.len()`) and
    /// returns each head's `MassPart` over the range.
    pub fn tip_mass_part / mass_part_avx2 => mass_part(view: &HeadView, q8: Option<&Q8View>, qs: &[&[f32]], fcs: &[usize], range: Range<usize>, scale: f32, e: &mut [f32]) -> Vec<MassPart>
}

/// The portable body of `tip_mass_part`, inlined into its AVX2 wrapper (8-wide `exp_neg`).
#[inline(always)]
fn mass_part(view: &HeadView, q8: Option<&Q8View>, qs: &[&[f32]], fcs: &[usize], range: Range<usize>, scale: f32, e: &mut [f32]) -> Vec<MassPart> {
    let m = range.len();
    if m == 0 {
        return vec![MassPart { max: f32::NEG_INFINITY, sum: 0.0 }; qs.len()];
    }
    // Every head's FC scores `(heads, m)` first: the int8 planes are read once for all heads.
    let e = &mut e[..qs.len() * m];
    match q8 {
        Some(q8) => fc_scores_q8_heads(view, q8, qs, fcs, range, e),
        None => qs.iter().zip(e.chunks_exact_mut(m)).for_each(|(q, h)| plane_scores(view, q, fcs, range.clone(), h)),
    }
    // A plain loop, not an iterator closure: a closure's body compiled out of line would not
    // get the AVX2 wrapper's target features (measured: 1.4× slower stage 1).
    let mut parts = Vec::with_capacity(qs.len());
    for h in e.chunks_exact_mut(m) {
        // Eight independent lanes for the max and the sum, so both vectorize.
        let max = max8(h);
        let mut acc = [0f32; 8];
        let mut chunks = h.chunks_exact_mut(8);
        for c in &mut chunks {
            for j in 0..8 {
                c[j] = exp_neg((c[j] - max) * scale);
                acc[j] += c[j];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_neg((*v - max) * scale);
            sum += *v;
        }
        parts.push(MassPart { max, sum });
    }
    parts
}

/// Joins `tip_mass_part`s of consecutive ranges, in order, into the group's stage-1 score `out`
/// (their ranges' tokens, concatenated): each head's exponentials rescaled to the head's overall
/// max and divided by its overall sum (the online-softmax merge), summed over heads.
pub fn tip_mass_merge(parts: &[(&[f32], &[MassPart])], scale: f32, out: &mut [f32]) {
    let heads = parts.first().map_or(0, |p| p.1.len());
    out.fill(0.0);
    for h in 0..heads {
        let max = parts.iter().map(|p| p.1[h].max).fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = parts.iter().map(|p| p.1[h].sum * exp_neg((p.1[h].max - max) * scale)).sum();
        let inv = 1.0 / sum;
        let mut o = 0;
        for (e, part) in parts {
            let m = e.len() / heads;
            let c = exp_neg((part[h].max - max) * scale) * inv;
            out[o..o + m].iter_mut().zip(&e[h * m..(h + 1) * m]).for_each(|(x, p)| *x += p * c);
            o += m;
        }
    }
}

/// `e^x` for `x ≤ 0` to ~4e-6 relative (the f32 argument reduction; 0 below −87), in straight-line arithmetic the compiler
/// vectorizes: stage 1 takes one per cached token and query head, where a libm call each cost
/// more than the FC scores themselves. `2^i · 2^f` with `i` the nearest integer to `t = x·log2 e`,
/// `f ∈ [−½, ½]`, and a degree-6 Taylor polynomial of `2^f`.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    // Nearest integer of `t` (|t| < 2^22) by the 1.5·2^23 trick, not an `as i32` cast, which
    // adds saturation and NaN fix-ups to every vector lane.
    const MAGIC: f32 = 12_582_912.0;
    let t = x.max(-87.0) * std::f32::consts::LOG2_E;
    let r = t + MAGIC;
    let i = r.to_bits() as i32 - MAGIC.to_bits() as i32;
    let f = (t - (r - MAGIC)) * std::f32::consts::LN_2;
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    f32::from_bits(((i + 127) << 23) as u32) * p
}

/// The largest of `x` (−∞ when empty), in eight independent lanes so it vectorizes; inlined into
/// the AVX2 wrappers that call it.
#[inline(always)]
fn max8(x: &[f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            mx[j] = mx[j].max(c[j]);
        }
    }
    chunks.remainder().iter().chain(&mx).copied().fold(f32::NEG_INFINITY, f32::max)
}

avx2_dispatch! {
    /// Numerically stable softmax over `x`; `−∞` entries (masked) get exactly 0. The exponentials
    /// are `exp_neg`'s, eight lanes wide (libm's `expf` per element cost a third of dense
    /// attention's time at long contexts).
    pub fn softmax_in_place / softmax_avx2 => softmax(x: &mut [f32])
}

#[inline(always)]
fn softmax(x: &mut [f32]) {
    let m = max8(x);
    let e = |v: f32| if v == f32::NEG_INFINITY { 0.0 } else { exp_neg(v - m) };
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for j in 0..8 {
            c[j] = e(c[j]);
            acc[j] += c[j];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = e(*v);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Inlined into the AVX2 wrappers of `logits` and `mix_values` (8-wide FMAs there).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight accumulators so the compiler vectorizes without reassociation rules.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

#[inline(always)]
fn axpy(out: &mut [f32], w: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o = w.mul_add(*x, *o);
    }
}

/// Rows ahead of the current one whose lines a gather over chosen rows prefetches.
const AHEAD: usize = 8;

avx2_dispatch! {
    /// Exact scaled logits `(heads, m)` of the query heads of one KV group over `rows` (or all of
    /// `0..n` when `rows` is None): `scale·q_h·k_t`. Each K row is read once for all heads.
    fn logits / logits_avx2 => logits_body(view: &HeadView, qs: &[&[f32]], n: usize, rows: Option<&[u32]>, scale: f32) -> Vec<f32>
}

#[inline(always)]
fn logits_body(view: &HeadView, qs: &[&[f32]], n: usize, rows: Option<&[u32]>, scale: f32) -> Vec<f32> {
    let m = rows.map_or(n, |r| r.len());
    let row = |i: usize| rows.map_or(i, |r| r[i] as usize);
    let mut s = vec![0f32; qs.len() * m];
    for i in 0..m {
        if rows.is_some() && i + AHEAD < m {
            prefetch_slice(view.k_row(row(i + AHEAD)));
        }
        let k = view.k_row(row(i));
        for (h, q) in qs.iter().enumerate() {
            s[h * m + i] = scale * dot(q, k);
        }
    }
    s
}

/// Exact scaled logits `(heads, rows.len())` of a KV group's query heads over `rows`: what a
/// re-rank stage computes, so focused attention can reuse them instead of reading K again.
pub fn row_logits(view: &HeadView, qs: &[&[f32]], rows: &[u32], scale: f32) -> Vec<f32> {
    logits(view, qs, rows.len(), Some(rows), scale)
}

avx2_dispatch! {
    /// `outs[h] (d,) = softmax(s_h) V` over `rows` (or `0..n`), `s` the `(heads, m)` logits
    /// (softmaxed in place). Each V row is read once for all heads.
    fn mix_values / mix_values_avx2 => mix_values_body(view: &HeadView, s: &mut [f32], heads: usize, n: usize, rows: Option<&[u32]>, outs: &mut [f32])
}

#[inline(always)]
fn mix_values_body(view: &HeadView, s: &mut [f32], heads: usize, n: usize, rows: Option<&[u32]>, outs: &mut [f32]) {
    let d = view.head_dim();
    let m = rows.map_or(n, |r| r.len());
    let row = |i: usize| rows.map_or(i, |r| r[i] as usize);
    for h in 0..heads {
        softmax_in_place(&mut s[h * m..(h + 1) * m]);
    }
    outs[..heads * d].fill(0.0);
    for i in 0..m {
        if rows.is_some() && i + AHEAD < m {
            prefetch_slice(view.v_row(row(i + AHEAD)));
        }
        let v = view.v_row(row(i));
        for h in 0..heads {
            axpy(&mut outs[h * d..(h + 1) * d], s[h * m + i], v);
        }
    }
}

/// Exact attention of the query heads of one KV group over `rows` (or all of `0..n` when `rows`
/// is None): `outs[h] (d,) = softmax(scale·q_h·Kᵀ) V`. Each K and V row is read once for all
/// heads of the group. `outs` is `(heads, d)`.
fn attend_group(view: &HeadView, qs: &[&[f32]], n: usize, rows: Option<&[u32]>, scale: f32, outs: &mut [f32]) {
    let mut s = logits(view, qs, n, rows, scale);
    mix_values(view, &mut s, qs.len(), n, rows, outs)
}

/// Focused attention over `rows` from logits already computed by `row_logits` (`(heads,
/// rows.len())`, consumed): reads only V. Equals `attend_rows_group` bit for bit.
pub fn attend_scored_rows_group(view: &HeadView, logits: &mut [f32], rows: &[u32], outs: &mut [f32]) {
    let heads = logits.len() / rows.len().max(1);
    mix_values(view, logits, heads, rows.len(), Some(rows), outs)
}

/// Dense attention of a KV group's query heads over tokens `0..n`; `outs` is `(heads, d)`.
pub fn attend_dense_group(view: &HeadView, qs: &[&[f32]], n: usize, scale: f32, outs: &mut [f32]) {
    attend_group(view, qs, n, None, scale, outs)
}

/// Focused attention (FASA stage 2, full dims) of a KV group's query heads over `rows`.
pub fn attend_rows_group(view: &HeadView, qs: &[&[f32]], rows: &[u32], scale: f32, outs: &mut [f32]) {
    attend_group(view, qs, rows.len(), Some(rows), scale, outs)
}

/// Exact attention of one query head over tokens `0..n`: `out (d,) = softmax(scale·q·Kᵀ) V`.
pub fn attend_dense(view: &HeadView, q_fc: &[f32], n: usize, scale: f32, out: &mut [f32]) {
    attend_group(view, &[q_fc], n, None, scale, out)
}

/// Exact attention of one query head over the given `rows` only (FASA stage 2, full dims).
pub fn attend_rows(view: &HeadView, q_fc: &[f32], rows: &[u32], scale: f32, out: &mut [f32]) {
    attend_group(view, &[q_fc], rows.len(), Some(rows), scale, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Builds a paged view from plain `(len, d)` K (pairs adjacent) and V.
    type Pages = Vec<Vec<f32>>;
    fn paged(k: &[f32], v: &[f32], len: usize, d: usize, page: usize) -> (Pages, Pages, Pages) {
        let n_fc = d / 2;
        let n_pages = len.div_ceil(page);
        let mut kp = vec![vec![0.0; n_fc * page * 2]; n_pages];
        let mut kr = vec![vec![0.0; page * d]; n_pages];
        let mut vp = vec![vec![0.0; page * d]; n_pages];
        for t in 0..len {
            let (p, i) = (t / page, t % page);
            for f in 0..n_fc {
                kp[p][(f * page + i) * 2] = k[t * d + 2 * f];
                kp[p][(f * page + i) * 2 + 1] = k[t * d + 2 * f + 1];
            }
            vp[p][i * d..(i + 1) * d].copy_from_slice(&v[t * d..(t + 1) * d]);
            kr[p][i * d..(i + 1) * d].copy_from_slice(&k[t * d..(t + 1) * d]);
        }
        (kp, kr, vp)
    }

    #[test]
    fn paged_attention_matches_plain_softmax() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (len, d, page) = (45, 8, 16);
        let k: Vec<f32> = (0..len * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v: Vec<f32> = (0..len * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let q: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (kp, krp, vp) = paged(&k, &v, len, d, page);
        let kr: Vec<&[f32]> = kp.iter().map(|p| p.as_slice()).collect();
        let krr: Vec<&[f32]> = krp.iter().map(|p| p.as_slice()).collect();
        let vr: Vec<&[f32]> = vp.iter().map(|p| p.as_slice()).collect();
        let view = HeadView { k_pages: &kr, kr_pages: &krr, v_pages: &vr, page, n_fc: d / 2, len };
        let scale = 0.35;
        // Plain reference.
        let mut s: Vec<f32> = (0..len).map(|t| scale * (0..d).map(|j| q[j] * k[t * d + j]).sum::<f32>()).collect();
        softmax_in_place(&mut s);
        let want: Vec<f32> = (0..d).map(|j| (0..len).map(|t| s[t] * v[t * d + j]).sum()).collect();
        let mut out = vec![0.0; d];
        attend_dense(&view, &q, len, scale, &mut out);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // All rows through the sparse path equal dense.
        let rows: Vec<u32> = (0..len as u32).collect();
        let mut out2 = vec![0.0; d];
        attend_rows(&view, &q, &rows, scale, &mut out2);
        for (a, b) in out2.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5);
        }
        // A group of two heads equals each head alone.
        let q2: Vec<f32> = q.iter().map(|x| -0.5 * x).collect();
        let mut both = vec![0.0; 2 * d];
        attend_rows_group(&view, &[&q, &q2], &rows[3..40], scale, &mut both);
        let (mut a, mut b) = (vec![0.0; d], vec![0.0; d]);
        attend_rows(&view, &q, &rows[3..40], scale, &mut a);
        attend_rows(&view, &q2, &rows[3..40], scale, &mut b);
        assert!(both[..d].iter().zip(&a).chain(both[d..].iter().zip(&b)).all(|(x, y)| (x - y).abs() < 1e-6));
        // Reusing a re-rank's logits reads only V and gives the same output bit for bit.
        let sel: Vec<u32> = vec![0, 4, 9, 17, 44];
        let mut lg = row_logits(&view, &[&q, &q2], &sel, scale);
        let (mut direct, mut reused) = (vec![0.0; 2 * d], vec![0.0; 2 * d]);
        attend_rows_group(&view, &[&q, &q2], &sel, scale, &mut direct);
        attend_scored_rows_group(&view, &mut lg, &sel, &mut reused);
        assert_eq!(direct, reused);
    }

    #[test]
    fn fast_exp_matches_libm_on_softmax_arguments() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -(i as f32) * 0.0005; // 0 .. −100
            let (a, b) = (exp_neg(x) as f64, (x as f64).exp());
            if x > -80.0 {
                worst = worst.max((a - b).abs() / b);
            } else {
                assert!(a <= 1e-34, "{x}: {a}");
            }
        }
        assert!(worst < 1e-5, "worst relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
    }

    #[test]
    fn fc_scores_are_sums_of_per_fc_dots() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (len, d, page) = (70, 16, 32);
        let k: Vec<f32> = (0..len * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v = vec![0.0; len * d];
        let q: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (kp, krp, vp) = paged(&k, &v, len, d, page);
        let kr: Vec<&[f32]> = kp.iter().map(|p| p.as_slice()).collect();
        let krr: Vec<&[f32]> = krp.iter().map(|p| p.as_slice()).collect();
        let vr: Vec<&[f32]> = vp.iter().map(|p| p.as_slice()).collect();
        let view = HeadView { k_pages: &kr, kr_pages: &krr, v_pages: &vr, page, n_fc: d / 2, len };
        let fcs = [1usize, 5, 6];
        let mut got = vec![0.0; len];
        fc_scores(&view, &q, &fcs, len, &mut got, false);
        for t in 0..len {
            let want: f32 = fcs.iter().map(|&f| q[2 * f] * k[t * d + 2 * f] + q[2 * f + 1] * k[t * d + 2 * f + 1]).sum();
            assert!((got[t] - want).abs() < 1e-5);
        }
    }

    /// TIP's group mass equals per-head softmax of plain FC dot products, summed (std `exp`),
    /// over f32 planes and over int8 planes (against their dequantised pairs).
    #[test]
    fn tip_group_mass_matches_plain_softmax_sums() {
        use crate::cpu::quant::{quantize_page_block, Q8View, QB};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (len, d, page) = (64 * 2 + 41, 16, 64);
        let k: Vec<f32> = (0..len * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let (kp, krp, vp) = paged(&k, &k, len, d, page);
        let kr: Vec<&[f32]> = kp.iter().map(|p| &p[..]).collect();
        let krr: Vec<&[f32]> = krp.iter().map(|p| &p[..]).collect();
        let vr: Vec<&[f32]> = vp.iter().map(|p| &p[..]).collect();
        let view = HeadView { k_pages: &kr, kr_pages: &krr, v_pages: &vr, page, n_fc: d / 2, len };
        let mut q8 = vec![vec![0i8; d * page]; kp.len()];
        let mut sc = vec![vec![0f32; d / 2 * page / QB]; kp.len()];
        for b in 0..len / QB {
            quantize_page_block(&kp[b * QB / page], page, d / 2, (b * QB % page) / QB, &mut q8[b * QB / page], &mut sc[b * QB / page]);
        }
        let (qp, sp): (Vec<&[i8]>, Vec<&[f32]>) = (q8.iter().map(|p| &p[..]).collect(), sc.iter().map(|p| &p[..]).collect());
        let qv = Q8View { pages: &qp, scales: &sp, blocks: len / QB, bits: 8 };
        let qs: Vec<Vec<f32>> = (0..3).map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
        let qr: Vec<&[f32]> = qs.iter().map(|q| &q[..]).collect();
        let (fcs, scale) = ([0usize, 3, 5, 6], 0.7f32);
        for quantised in [false, true] {
            let pair = |t: usize, f: usize| -> (f32, f32) {
                let (p, i) = (t / page, t % page);
                if quantised && t < len / QB * QB {
                    let s = sc[p][f * (page / QB) + i / QB];
                    (q8[p][f * 2 * page + i] as f32 * s, q8[p][(f * 2 + 1) * page + i] as f32 * s)
                } else {
                    (k[t * d + 2 * f], k[t * d + 2 * f + 1])
                }
            };
            let mut want = vec![0f32; len];
            for q in &qs {
                let s: Vec<f32> = (0..len).map(|t| fcs.iter().map(|&f| q[2 * f] * pair(t, f).0 + q[2 * f + 1] * pair(t, f).1).sum::<f32>() * scale).collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = s.iter().map(|v| (v - m).exp()).sum();
                want.iter_mut().zip(&s).for_each(|(w, v)| *w += (v - m).exp() / z);
            }
            let mut got = vec![f32::NAN; len];
            tip_group_mass(&view, quantised.then_some(&qv), &qr, &fcs, len, scale, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 + 1e-4 * w, "quantised {quantised}: {g} vs {w}");
            }
            // In parts (as the engine splits it over threads), merged: the same scores.
            for cuts in [vec![0, 64, len], vec![0, 32, 96, 160, len], vec![0, len - 9, len]] {
                let q8 = quantised.then_some(&qv);
                let parts: Vec<(Vec<f32>, Vec<MassPart>)> = cuts
                    .windows(2)
                    .map(|w| {
                        let mut e = vec![f32::NAN; 3 * (w[1] - w[0])];
                        let m = tip_mass_part(&view, q8, &qr, &fcs, w[0]..w[1], scale, &mut e);
                        (e, m)
                    })
                    .collect();
                let views: Vec<(&[f32], &[MassPart])> = parts.iter().map(|(e, m)| (&e[..], &m[..])).collect();
                let mut merged = vec![f32::NAN; len];
                tip_mass_merge(&views, scale, &mut merged);
                for (m, g) in merged.iter().zip(&got) {
                    assert!((m - g).abs() <= 1e-6 * g.max(1e-3), "cuts {cuts:?}: {m} vs {g}");
                }
            }
        }
    }
}
