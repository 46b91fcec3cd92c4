//! Token selection for sparse decode attention: top-B over scores, forced sink/recent rows,
//! per-step FC choice by query chunk norms, and Quest's page bounds.

/// Indices of the `b` largest of `scores` (ties → lower index), ascending, into `out`.
/// With `b >= scores.len()` every index is kept. O(n) selection, no full sort: a sample of the
/// scores gives a bound that somewhat more than `b` scores reach; one scan keeps those (as
/// `(order key, index)` pairs, branch-light: few pass), a selection among them finds the `b`-th,
/// and a scan of the kept ones (in index order) takes it and all above. Where the bound lets
/// fewer than `b` through, every score is kept instead. (Selecting among all 8k scores cost ~3.5
/// ns a score; the scan about a quarter of that.)
pub fn top_b(scores: &[f32], b: usize, out: &mut Vec<u32>) {
    out.clear();
    let n = scores.len();
    if b >= n {
        out.extend(0..n as u32);
        return;
    }
    if b == 0 {
        return;
    }
    let lo = sample_bound(scores, b);
    let mut kept = keep_from(scores, lo);
    if kept.len() < b {
        kept = keep_from(scores, 0);
    }
    // Descending by key, then ascending by index: `pair` makes that one integer order.
    let m = kept.len();
    let cut = *kept.clone().select_nth_unstable(m - b).1;
    out.extend(kept.iter().filter(|&&v| v >= cut).map(|&v| !(v as u32)));
}

/// The order key of `v` (`partial_cmp`'s order with NaN last: NaN below −∞, −0 equal to +0)
/// above its index's complement: the `u64` order is by score, then by lower index.
#[inline(always)]
fn pair(v: f32, i: usize) -> u64 {
    let v = if v.is_nan() { f32::from_bits(0xFFC0_0000) } else { v + 0.0 };
    let b = v.to_bits();
    let key = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    (key as u64) << 32 | !(i as u32) as u64
}

/// The pairs of `scores` not below `lo`, in index order.
fn keep_from(scores: &[f32], lo: u64) -> Vec<u64> {
    #[cfg(target_arch = "x86_64")]
    if let Some(lo_f) = bound_score(lo) {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { keep_from_avx2(scores, lo, lo_f) };
        }
    }
    keep_from_scalar(scores, lo)
}

/// The score whose order key is `lo`'s, when it is a number: every pair `≥ lo` has a score
/// `≥` it (the key follows the float order, with −0 as +0); `None` where `lo`'s key is at or
/// below NaN's (there every score may pass).
fn bound_score(lo: u64) -> Option<f32> {
    let key = (lo >> 32) as u32;
    let f = f32::from_bits(if key >> 31 == 1 { key & 0x7FFF_FFFF } else { !key });
    (!f.is_nan()).then_some(f)
}

/// `keep_from` 8 scores at a time: one compare of the block with the bound's score, and the
/// exact pair test only for the few that pass it (at the sampled bound about 1 score in 10).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn keep_from_avx2(scores: &[f32], lo: u64, lo_f: f32) -> Vec<u64> {
    use std::arch::x86_64::*;
    let n = scores.len();
    let mut kept = Vec::with_capacity(n);
    let spare = &mut kept.spare_capacity_mut()[..n];
    let mut len = 0;
    let t = _mm256_set1_ps(lo_f);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`; an ordered compare leaves NaN out (NaN's key is below any
        // bound that has a score).
        let x = unsafe { _mm256_loadu_ps(scores.as_ptr().add(i)) };
        let mut m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(x, t)) as u32;
        while m != 0 {
            let j = i + m.trailing_zeros() as usize;
            keep_pair(spare, &mut len, scores[j], j, lo);
            m &= m - 1;
        }
        i += 8;
    }
    for (j, &x) in scores.iter().enumerate().skip(i) {
        keep_pair(spare, &mut len, x, j, lo);
    }
    // SAFETY: the first `len` slots were written (each kept pair before `len` moved past it).
    unsafe { kept.set_len(len) };
    kept
}

/// Writes score `x`'s pair at `len` and moves `len` past it only when it is kept (`≥ lo`):
/// branch-free, since which scores pass is data, not a pattern.
#[inline(always)]
fn keep_pair(spare: &mut [std::mem::MaybeUninit<u64>], len: &mut usize, x: f32, j: usize, lo: u64) {
    let p = pair(x, j);
    spare[*len].write(p);
    *len += usize::from(p >= lo);
}

fn keep_from_scalar(scores: &[f32], lo: u64) -> Vec<u64> {
    let mut kept = Vec::with_capacity(scores.len());
    let spare = &mut kept.spare_capacity_mut()[..scores.len()];
    let mut len = 0;
    for (j, &x) in scores.iter().enumerate() {
        keep_pair(spare, &mut len, x, j, lo);
    }
    // SAFETY: the first `len` slots were written (each kept pair before `len` moved past it).
    unsafe { kept.set_len(len) };
    kept
}

/// A pair that, judged from every `n/256`-th score, about `1.5·b` scores reach (0: all of them,
/// when the sample is too small to judge).
fn sample_bound(scores: &[f32], b: usize) -> u64 {
    let n = scores.len();
    if n < 2048 {
        return 0;
    }
    let step = n / 256;
    let mut sample: Vec<u64> = scores.iter().step_by(step).enumerate().map(|(j, &x)| pair(x, j * step)).collect();
    let m = sample.len();
    let r = (b as f64 * 1.5 * m as f64 / n as f64) as usize + 8;
    if r >= m {
        return 0;
    }
    *sample.select_nth_unstable(m - 1 - r).1
}

/// Raises the first `sinks` and last `recent` of `scores[..n]` to +∞ so `top_b` keeps them.
pub fn force_rows(scores: &mut [f32], sinks: usize, recent: usize) {
    let n = scores.len();
    scores[..sinks.min(n)].fill(f32::INFINITY);
    scores[n.saturating_sub(recent)..].fill(f32::INFINITY);
}

/// The `k` FCs of `pool` with the largest `Σ_h ‖q_{h,f}‖` over the given query heads
/// (`(n_fc, 2)` each), ties → earlier in `pool`. SparQ's idea at FC granularity.
pub fn choose_fcs(qs: &[&[f32]], pool: &[usize], k: usize) -> Vec<usize> {
    let mut w: Vec<(f32, usize)> = pool
        .iter()
        .enumerate()
        .map(|(i, &f)| (qs.iter().map(|q| (q[2 * f] * q[2 * f] + q[2 * f + 1] * q[2 * f + 1]).sqrt()).sum::<f32>(), i))
        .collect();
    w.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)));
    w.iter().take(k).map(|&(_, i)| pool[i]).collect()
}

/// K moments of one FC over the cached tokens: `[Σx, Σy, Σxx, Σxy, Σyy]` of its rotated pair
/// `(x, y)`. f64: the variance is a difference of sums over up to 10^5 tokens.
pub type FcMoments = [f64; 5];

/// Adds one token's pair of one FC to `m`.
pub fn add_moments(m: &mut FcMoments, x: f32, y: f32) {
    let (x, y) = (x as f64, y as f64);
    m[0] += x;
    m[1] += y;
    m[2] += x * x;
    m[3] += x * y;
    m[4] += y * y;
}

/// The `k` FCs of `pool` that explain the most variance of the query heads' logits over the `n`
/// cached tokens: `w_f = Σ_h q_{h,f}ᵀ Cov_t(k_{t,f}) q_{h,f}` (population covariance from
/// `moments`, indexed by FC id), ties → earlier in `pool`. An FC whose K barely moves across
/// tokens adds a near-constant to every score and ranks nothing, however large `‖q_f‖` is: this
/// is `choose_fcs` with the query norm replaced by the spread it causes (FIDELITY.md).
pub fn choose_fcs_var(qs: &[&[f32]], pool: &[usize], k: usize, moments: &[FcMoments], n: usize) -> Vec<usize> {
    let nf = n.max(1) as f64;
    let mut w: Vec<(f64, usize)> = pool
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            let m = &moments[f];
            let (mx, my) = (m[0] / nf, m[1] / nf);
            let (cxx, cxy, cyy) = (m[2] / nf - mx * mx, m[3] / nf - mx * my, m[4] / nf - my * my);
            let v: f64 = qs
                .iter()
                .map(|q| {
                    let (a, b) = (q[2 * f] as f64, q[2 * f + 1] as f64);
                    a * a * cxx + 2.0 * a * b * cxy + b * b * cyy
                })
                .sum();
            (v, i)
        })
        .collect();
    w.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)));
    w.iter().take(k).map(|&(_, i)| pool[i]).collect()
}

/// Quest page score of one query: `Σ_j max(q_j·min_j, q_j·max_j)` over a page's elementwise K
/// bounds. `bounds` is `(2, d)`: mins then maxs, in the same `(n_fc, 2)` order as `q_fc`.
pub fn quest_score(q_fc: &[f32], bounds: &[f32]) -> f32 {
    let d = q_fc.len();
    let (lo, hi) = bounds.split_at(d);
    q_fc.iter().zip(lo).zip(hi).map(|((q, a), b)| (q * a).max(q * b)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded LCG of `u32`s for the random cases.
    fn lcg(seed: u64) -> impl FnMut() -> u32 {
        let mut st = seed;
        move || {
            st = st.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (st >> 33) as u32
        }
    }

    /// The special scores the random cases mix in: NaN, +∞, −∞, −0, +0 for `k` 0..5, else `None`.
    fn special(k: u32) -> Option<f32> {
        [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0].get(k as usize).copied()
    }

    #[test]
    fn top_b_keeps_largest_ascending_with_stable_ties() {
        let s = [0.1, 5.0, -1.0, 5.0, 3.0, f32::NAN, 2.0];
        let mut out = Vec::new();
        top_b(&s, 3, &mut out);
        assert_eq!(out, vec![1, 3, 4]);
        top_b(&s, 2, &mut out);
        assert_eq!(out, vec![1, 3]);
        top_b(&[1.0, 1.0, 1.0], 2, &mut out);
        assert_eq!(out, vec![0, 1]);
        top_b(&s, 10, &mut out);
        assert_eq!(out.len(), 7);
    }

    /// Against a full sort by (score desc, NaN last, index asc) on random scores with many ties,
    /// NaNs, infinities and signed zeros.
    #[test]
    fn top_b_equals_a_full_sort() {
        let mut next = lcg(11);
        for round in 0..200 {
            // Every fourth round long and continuous: many histogram buckets, a crowded boundary.
            let n = 1 + (next() % if round % 4 == 3 { 9000 } else { 300 }) as usize;
            let s: Vec<f32> = (0..n)
                .map(|_| match special(next() % 10) {
                    Some(x) => x,
                    None if round % 4 == 3 => ((next() % 100_000) as f32 * 1e-5).exp2() * 1e-4,
                    None => (next() % 7) as f32 - 3.0 + if round % 2 == 0 { 0.0 } else { (next() % 1000) as f32 / 1000.0 },
                })
                .collect();
            let b = (next() as usize) % (n + 2);
            let mut idx: Vec<u32> = (0..n as u32).collect();
            idx.sort_by(|&a, &c| {
                let (x, y) = (s[a as usize], s[c as usize]);
                y.partial_cmp(&x).unwrap_or_else(|| x.is_nan().cmp(&y.is_nan())).then(a.cmp(&c))
            });
            let mut want: Vec<u32> = idx[..b.min(n)].to_vec();
            want.sort_unstable();
            let mut got = Vec::new();
            top_b(&s, b, &mut got);
            assert_eq!(got, want, "round {round}: {s:?} b={b}");
        }
    }

    /// The vector scan keeps exactly the scalar scan's pairs, at bounds taken from the scores
    /// themselves (ties on the key, so the index decides), from NaN, ±0 and ±∞, and at 0.
    #[test]
    fn keep_from_vector_equals_scalar() {
        let mut next = lcg(5);
        for round in 0..300 {
            let n = (next() % 3000) as usize;
            let s: Vec<f32> = (0..n)
                .map(|_| match special(next() % 12) {
                    Some(x) => x,
                    None => (next() % 9) as f32 - 4.0 + if round % 2 == 0 { 0.0 } else { (next() % 1000) as f32 / 997.0 },
                })
                .collect();
            let mut bounds = vec![0, u64::MAX, pair(f32::NAN, 0), pair(0.0, 7), pair(-0.0, 0), pair(f32::INFINITY, 3), pair(f32::NEG_INFINITY, 0)];
            bounds.extend((0..4).filter(|_| n > 0).map(|_| {
                let j = next() as usize % n;
                pair(s[j], j)
            }));
            for lo in bounds {
                assert_eq!(keep_from(&s, lo), keep_from_scalar(&s, lo), "round {round}, n {n}, lo {lo:#x}");
            }
        }
    }

    #[test]
    fn forced_rows_survive_selection() {
        let mut s: Vec<f32> = (0..20).map(|i| i as f32).collect();
        s.reverse(); // oldest tokens score highest
        force_rows(&mut s, 2, 3);
        let mut out = Vec::new();
        top_b(&s, 7, &mut out);
        assert_eq!(out, vec![0, 1, 2, 3, 17, 18, 19]);
    }

    #[test]
    fn fc_choice_follows_query_chunk_norms() {
        // FC norms: f0 = 1, f1 = 5, f2 = 0, f3 = 3.
        let q = [1.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 3.0];
        assert_eq!(choose_fcs(&[&q], &[0, 1, 2, 3], 2), vec![1, 3]);
        assert_eq!(choose_fcs(&[&q], &[0, 2, 3], 2), vec![3, 0]);
        // Summed over two heads.
        let q2 = [9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(choose_fcs(&[&q, &q2], &[0, 1, 2, 3], 1), vec![0]);
    }

    #[test]
    fn fc_choice_by_variance_ignores_constant_chunks() {
        // FC 0: large q, K constant over tokens; FC 1: small q, K varies; FC 2: zero q.
        let ks = [[(3.0, 1.0), (0.5, -0.5), (1.0, 1.0)], [(3.0, 1.0), (-0.5, 0.5), (-1.0, 1.0)], [(3.0, 1.0), (0.4, 0.1), (2.0, 0.0)]];
        let mut m = vec![[0f64; 5]; 3];
        for t in &ks {
            for (f, &(x, y)) in t.iter().enumerate() {
                add_moments(&mut m[f], x, y);
            }
        }
        let q = [10.0, 10.0, 1.0, 1.0, 0.0, 0.0];
        assert_eq!(choose_fcs_var(&[&q], &[0, 1, 2], 1, &m, 3), vec![1]);
        assert_eq!(choose_fcs(&[&q], &[0, 1, 2], 1), vec![0], "by norm the constant chunk would win");
        // w_1 = qᵀ Cov q by hand: x = (0.5, −0.5, 0.4), y = (−0.5, 0.5, 0.1), q = (1, 1): Var(x + y).
        let s: [f64; 3] = [0.0, 0.0, 0.5];
        let mean = s.iter().sum::<f64>() / 3.0;
        let var = s.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 3.0;
        let mm = &m[1];
        let (mx, my) = (mm[0] / 3.0, mm[1] / 3.0);
        let w = (mm[2] / 3.0 - mx * mx) + 2.0 * (mm[3] / 3.0 - mx * my) + (mm[4] / 3.0 - my * my);
        assert!((w - var).abs() < 1e-7, "{w} vs {var}"); // the pairs went through f32
    }

    #[test]
    fn quest_score_bounds_the_dot_product() {
        let q = [1.0, -2.0];
        let bounds = [-1.0, -1.0, 2.0, 3.0]; // min (−1, −1), max (2, 3)
        // max over corners: 1·2 + (−2)·(−1) = 4.
        assert_eq!(quest_score(&q, &bounds), 4.0);
    }
}
