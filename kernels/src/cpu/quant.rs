//! Int8 scoring planes: a second, quantised copy of K's FC planes that TIP reads instead of the
//! f32 planes (a quarter of the bytes per pair; stage 1 only ranks candidates, and the re-rank
//! and focused attention still read exact f32 K and V).
//!
//! Layout per cache page of `page` tokens: values `(n_fc, 2, page)` i8 (plane `f`: the first
//! element of every token's pair, then the second), scales `(n_fc, page / QB)` f32. One scale
//! per FC and block of `QB` tokens, shared by the pair's two elements (RoPE rotates them into
//! each other): K quantised per channel over a token group, as KIVI does, because K's outliers
//! sit in channels, not in tokens. Only whole blocks are quantised; the block being filled is
//! read from the f32 planes, so an append never rescales what was written before it.
use std::ops::Range;

use super::attention::HeadView;
use super::prefetch_slice;

/// Tokens per quantisation block.
pub const QB: usize = 32;

/// Read-only view of one (layer, KV head)'s int8 planes: the first `blocks · QB` tokens.
#[derive(Clone, Copy)]
pub struct Q8View<'a> {
    /// Each `(n_fc, 2, page)` i8.
    pub pages: &'a [&'a [i8]],
    /// Each `(n_fc, page / QB)`: the dequantisation factor of each FC and block.
    pub scales: &'a [&'a [f32]],
    /// Whole blocks quantised (tokens from `blocks · QB` on are read from the f32 planes).
    pub blocks: usize,
    /// Bits of the values' grid: 8, or 4 (`quantize_block_bits`; still one value per `i8`).
    pub bits: u32,
}

/// Quantises one block of one FC: `x`, `y` are the pair's two elements for `QB` tokens. Returns
/// the scale `absmax / 127` (0 for an all-zero block); `q = round(v · 127 / absmax)`. The GPU's
/// quantiser follows the same arithmetic so both read the same int8 values.
pub fn quantize_block(x: &[f32], y: &[f32], qx: &mut [i8], qy: &mut [i8]) -> f32 {
    quantize_block_bits(x, y, qx, qy, 8)
}

/// Largest magnitude of a `bits`-bit scoring value: 127 (int8) or 7 (int4; -8 is never used, so
/// the grid is symmetric as int8's is).
pub fn q_levels(bits: u32) -> f32 {
    ((1u32 << (bits - 1)) - 1) as f32
}

/// `quantize_block` on a grid of `bits` bits (8 or 4): scale `absmax / L`, `q = round(v · L /
/// absmax)`, `L = q_levels(bits)`. Int4 values are held one per `i8` here; the GPU packs two per
/// byte (fasa.cu's `quant_block`), with the same values.
pub fn quantize_block_bits(x: &[f32], y: &[f32], qx: &mut [i8], qy: &mut [i8], bits: u32) -> f32 {
    let amax = x.iter().chain(y).fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        qx.fill(0);
        qy.fill(0);
        return if amax == 0.0 { 0.0 } else { f32::NAN };
    }
    let levels = q_levels(bits);
    let inv = levels / amax;
    for (q, v) in qx.iter_mut().zip(x).chain(qy.iter_mut().zip(y)) {
        *q = (v * inv).round() as i8;
    }
    amax / levels
}

/// Quantises block `b` (tokens `b·QB .. (b+1)·QB` of the cache) from the f32 planes page `kp`
/// (`(n_fc, page, 2)`) into the int8 page `q8` and its `scales`. The values are rounded to fp16
/// first, as the GPU stores K: both devices then quantise the same numbers and hold the same int8
/// planes bit for bit, so their stage 1 ranks tokens alike (an int8 step, absmax/127, is ~16× an
/// fp16 rounding: quantising the unrounded f32 moved rows across the candidate cut on the GPU
/// operator test). The fp16 rounding costs nothing next to the int8 step.
pub fn quantize_page_block(kp: &[f32], page: usize, n_fc: usize, block_in_page: usize, q8: &mut [i8], scales: &mut [f32]) {
    quantize_page_block_bits(kp, page, n_fc, block_in_page, q8, scales, 8);
}

/// `quantize_page_block` on a grid of `bits` bits (`quantize_block_bits`): the int4 scoring
/// planes' values, one per `i8`, in the same page layout.
pub fn quantize_page_block_bits(kp: &[f32], page: usize, n_fc: usize, block_in_page: usize, q8: &mut [i8], scales: &mut [f32], bits: u32) {
    let (mut x, mut y) = ([0f32; QB], [0f32; QB]);
    let blocks = page / QB;
    for f in 0..n_fc {
        let src = &kp[(f * page + block_in_page * QB) * 2..(f * page + (block_in_page + 1) * QB) * 2];
        for (j, p) in src.chunks_exact(2).enumerate() {
            (x[j], y[j]) = (fp16(p[0]), fp16(p[1]));
        }
        let o = f * 2 * page + block_in_page * QB;
        let (qx, rest) = q8[o..].split_at_mut(page);
        scales[f * blocks + block_in_page] = quantize_block_bits(&x, &y, &mut qx[..QB], &mut rest[..QB], bits);
    }
}

/// `v` rounded to the nearest fp16 value (saturating at ±65504 rather than becoming ∞).
fn fp16(v: f32) -> f32 {
    half::f16::from_f32(v.clamp(-65504.0, 65504.0)).to_f32()
}

/// `out[t] (+)= Σ_{f ∈ fcs} q_f · k̂_{t,f}` for tokens `0..n`, `k̂` the dequantised int8 pair for
/// tokens in whole quantised blocks and the f32 pair after them: TIP's FC score read from the
/// scoring planes. Same contract as `fc_scores`.
pub fn fc_scores_q8(view: &HeadView, q8: &Q8View, q_fc: &[f32], fcs: &[usize], n: usize, out: &mut [f32], accumulate: bool) {
    let out = &mut out[..n];
    if accumulate {
        let mut s = vec![0f32; n];
        fc_scores_q8_heads(view, q8, &[q_fc], fcs, 0..n, &mut s);
        out.iter_mut().zip(&s).for_each(|(o, v)| *o += v);
    } else {
        fc_scores_q8_heads(view, q8, &[q_fc], fcs, 0..n, out);
    }
}

avx2_dispatch! {
    /// `out[h·m + (t − t0)] = Σ_{f ∈ fcs} q_{h,f} · k̂_{t,f}` for the query heads `qs` and tokens
    /// `t ∈ range` (`m = range.len()`, `out` is `(heads, m)`; `range.start` a multiple of `QB`),
    /// `k̂` as in `fc_scores_q8`. Each int8 pair is loaded and converted once for up to four
    /// heads, and a tile of tokens accumulates over all of `fcs` in registers: stage 1 of a KV
    /// group's heads in one pass over the planes (per head, the conversions and the
    /// read-modify-writes of `out` per FC cost more than the FMAs).
    pub fn fc_scores_q8_heads / scores_q8_heads_avx2 => scores_q8_heads(view: &HeadView, q8: &Q8View, qs: &[&[f32]], fcs: &[usize], range: Range<usize>, out: &mut [f32])
}

/// The portable body; inlined into the AVX2 wrapper so the tiles compile to 8-wide conversions
/// and FMAs there.
#[inline(always)]
fn scores_q8_heads(view: &HeadView, q8: &Q8View, qs: &[&[f32]], fcs: &[usize], range: Range<usize>, out: &mut [f32]) {
    assert_eq!(range.start % QB, 0, "TIP ranges start on a quantisation block");
    let m = range.len();
    for (c, qc) in qs.chunks(4).enumerate() {
        let o = &mut out[c * 4 * m..(c * 4 + qc.len()) * m];
        match qc.len() {
            1 => heads_q8::<1>(view, q8, qc, fcs, range.clone(), o),
            2 => heads_q8::<2>(view, q8, qc, fcs, range.clone(), o),
            3 => heads_q8::<3>(view, q8, qc, fcs, range.clone(), o),
            _ => heads_q8::<4>(view, q8, qc, fcs, range.clone(), o),
        }
    }
}

/// Pages ahead whose planes `heads_q8` prefetches.
const AHEAD_PAGES: usize = 2;

/// Tokens per register tile of `heads_q8` (divides `QB`: a tile shares its block's scale).
const TILE: usize = 16;

/// `scores_q8_heads` for exactly `H` heads; `out` is `(H, range.len())`.
#[inline(always)]
fn heads_q8<const H: usize>(view: &HeadView, q8: &Q8View, qs: &[&[f32]], fcs: &[usize], range: Range<usize>, out: &mut [f32]) {
    let (page, t0, m) = (view.page, range.start, range.len());
    let blocks = page / QB;
    let quantised = (q8.blocks * QB).clamp(t0, range.end);
    // Per chosen FC: its x-plane offset in an int8 page, its first scale, the heads' query pairs.
    let plan: Vec<(usize, usize, [[f32; 2]; H])> = fcs.iter().map(|&f| (f * 2 * page, f * blocks, std::array::from_fn(|h| [qs[h][2 * f], qs[h][2 * f + 1]]))).collect();
    for t in (t0..quantised).step_by(TILE) {
        let (p, i) = (t / page, t % page);
        if i == 0 || t == t0 {
            // The planes and scales of a page ahead: pages are separate allocations, and a
            // page reads only 2·fcs scattered lines, too few for the hardware prefetchers.
            if let (Some(nq), Some(ns)) = (q8.pages.get(p + AHEAD_PAGES), q8.scales.get(p + AHEAD_PAGES)) {
                for &(xo, _, _) in &plan {
                    prefetch_slice(&nq[xo..xo + 2 * page]);
                }
                prefetch_slice(ns);
            }
        }
        let (qp, sp, b) = (q8.pages[p], q8.scales[p], i / QB);
        let mut acc = [[0f32; TILE]; H];
        for &(xo, so, qf) in &plan {
            let s = sp[so + b];
            let (px, py) = (&qp[xo + i..xo + i + TILE], &qp[xo + page + i..xo + page + i + TILE]);
            let (mut x, mut y) = ([0f32; TILE], [0f32; TILE]);
            for j in 0..TILE {
                x[j] = px[j] as f32 * s;
                y[j] = py[j] as f32 * s;
            }
            for (a, [q0, q1]) in acc.iter_mut().zip(qf) {
                for j in 0..TILE {
                    a[j] = q0.mul_add(x[j], q1.mul_add(y[j], a[j]));
                }
            }
        }
        for (h, a) in acc.iter().enumerate() {
            out[h * m + t - t0..h * m + t - t0 + TILE].copy_from_slice(a);
        }
    }
    // The block being filled (fewer than QB tokens): from the f32 planes.
    for t in quantised..range.end {
        let kp = view.k_pages[t / page];
        let i = t % page;
        for (h, q) in qs.iter().enumerate() {
            out[h * m + t - t0] = fcs.iter().map(|&f| q[2 * f] * kp[(f * page + i) * 2] + q[2 * f + 1] * kp[(f * page + i) * 2 + 1]).sum();
        }
    }
}

/// Bytes TIP reads for `fcs` FC planes over `n` tokens: `bits`-bit pairs (int4 counted packed
/// two values a byte, as the GPU holds them) and one f32 scale per whole block, pairs of
/// `elem`-byte elements after them (`blocks`, `bits` as in `Q8View`; f32 on the CPU, fp16 on the
/// GPU).
pub fn q8_plane_bytes(n: usize, blocks: usize, bits: u32, fcs: usize, elem: usize) -> u64 {
    let q = (blocks * QB).min(n);
    (fcs * (q * 2 * bits as usize / 8 + q / QB * 4 + (n - q) * 2 * elem)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(s: &mut u64) -> f32 {
        *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn quantized_block_round_trips_within_half_a_step() {
        let mut s = 7;
        let x: Vec<f32> = (0..QB).map(|_| lcg(&mut s) * 3.0).collect();
        let y: Vec<f32> = (0..QB).map(|_| lcg(&mut s) * 0.1).collect();
        let (mut qx, mut qy) = ([0i8; QB], [0i8; QB]);
        let sc = quantize_block(&x, &y, &mut qx, &mut qy);
        let amax = x.iter().chain(&y).fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(sc, amax / 127.0);
        for (v, q) in x.iter().zip(&qx).chain(y.iter().zip(&qy)) {
            assert!((v - *q as f32 * sc).abs() <= sc * 0.5 + 1e-6, "{v} vs {q}·{sc}");
        }
        assert!(qx.iter().chain(&qy).any(|q| q.abs() == 127));
        assert_eq!(quantize_block(&[0.0; QB], &[0.0; QB], &mut qx, &mut qy), 0.0);
        assert!(qx.iter().all(|&q| q == 0));
    }

    #[test]
    fn int4_block_round_trips_within_half_a_step() {
        let mut s = 11;
        let x: Vec<f32> = (0..QB).map(|_| lcg(&mut s) * 2.0).collect();
        let y: Vec<f32> = (0..QB).map(|_| lcg(&mut s) * 0.5).collect();
        let (mut qx, mut qy) = ([0i8; QB], [0i8; QB]);
        let sc = quantize_block_bits(&x, &y, &mut qx, &mut qy, 4);
        let amax = x.iter().chain(&y).fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(sc, amax / 7.0);
        for (v, q) in x.iter().zip(&qx).chain(y.iter().zip(&qy)) {
            assert!((-7..=7).contains(q), "{q} outside the int4 grid");
            assert!((v - *q as f32 * sc).abs() <= sc * 0.5 + 1e-6, "{v} vs {q}·{sc}");
        }
        assert!(qx.iter().chain(&qy).any(|q| q.abs() == 7));
        // The 8-bit path is quantize_block's.
        let (mut ax, mut ay, mut bx, mut by) = ([0i8; QB], [0i8; QB], [0i8; QB], [0i8; QB]);
        assert_eq!(quantize_block_bits(&x, &y, &mut ax, &mut ay, 8), quantize_block(&x, &y, &mut bx, &mut by));
        assert_eq!((ax, ay), (bx, by));
    }

    /// Scores from the int8 planes equal a plain sum over dequantised pairs (whole blocks) and the
    /// f32 pairs (the tail), with and without accumulation, over a page boundary.
    #[test]
    fn q8_scores_equal_the_dequantised_dot_products() {
        let (page, n_fc, len): (usize, usize, usize) = (64, 8, 64 + 45);
        let mut s = 3;
        let pages = len.div_ceil(page);
        let k: Vec<Vec<f32>> = (0..pages).map(|_| (0..n_fc * page * 2).map(|_| lcg(&mut s)).collect()).collect();
        let mut q8 = vec![vec![0i8; n_fc * 2 * page]; pages];
        let mut sc = vec![vec![0f32; n_fc * page / QB]; pages];
        let blocks = len / QB;
        for b in 0..blocks {
            let (p, bi) = (b * QB / page, (b * QB % page) / QB);
            quantize_page_block(&k[p], page, n_fc, bi, &mut q8[p], &mut sc[p]);
        }
        let kr: Vec<&[f32]> = k.iter().map(|p| p.as_slice()).collect();
        let view = HeadView { k_pages: &kr, kr_pages: &[], v_pages: &[], page, n_fc, len };
        let qp: Vec<&[i8]> = q8.iter().map(|p| p.as_slice()).collect();
        let sp: Vec<&[f32]> = sc.iter().map(|p| p.as_slice()).collect();
        let qv = Q8View { pages: &qp, scales: &sp, blocks, bits: 8 };
        let q: Vec<f32> = (0..2 * n_fc).map(|_| lcg(&mut s)).collect();
        let fcs = [1, 4, 6];
        let mut want = vec![0f32; len];
        for (t, w) in want.iter_mut().enumerate() {
            let (p, i) = (t / page, t % page);
            for &f in &fcs {
                let (x, y) = if t < blocks * QB {
                    let s = sc[p][f * (page / QB) + i / QB];
                    (q8[p][f * 2 * page + i] as f32 * s, q8[p][(f * 2 + 1) * page + i] as f32 * s)
                } else {
                    (k[p][(f * page + i) * 2], k[p][(f * page + i) * 2 + 1])
                };
                *w += q[2 * f] * x + q[2 * f + 1] * y;
            }
        }
        let mut got = vec![0f32; len];
        fc_scores_q8(&view, &qv, &q, &fcs, len, &mut got, false);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
        let mut twice = got.clone();
        fc_scores_q8(&view, &qv, &q, &fcs, len, &mut twice, true);
        for (t, g) in twice.iter().zip(&got) {
            assert!((t - 2.0 * g).abs() <= 1e-5 * (1.0 + g.abs()));
        }
        // And close to the exact f32 scores: the int8 step is absmax/127 per block.
        use crate::cpu::fc_scores;
        let mut exact = vec![0f32; len];
        fc_scores(&view, &q, &fcs, len, &mut exact, false);
        for (g, e) in got.iter().zip(&exact) {
            assert!((g - e).abs() <= 0.03, "{g} vs {e}");
        }
        assert_eq!(q8_plane_bytes(len, blocks, 8, 3, 4), (3 * (96 * 2 + 3 * 4 + 13 * 8)) as u64);
    }
}
