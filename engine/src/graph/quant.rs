//! Exact conversion of GGUF block-quantized weights into ONNX Runtime `MatMulNBits` form, so
//! weights stay 4-bit in the graph and decode runs on ORT's prepacked fast path.
//!
//! ORT's CPU `MatMulNBits` is fast only for 4-bit weights with no or integer zero points (float
//! zero points and 8 bits fall back to dequantizing the whole matrix every run: ~100× slower at
//! M = 1, measured). So every GGUF block is written as a sum of symmetric 4-bit planes plus a
//! per-block constant:
//!   `W[n, k] = Σ_p scale_p[n, b] · (u_p[n, k] − 8) + corr[n, b]`,  `b = k / B`, `u_p ∈ [0, 15]`
//! and the graph computes `A·Wᵀ = Σ_p MatMulNBits(A, plane_p) + BlockSum(A) · corrᵀ` (the last
//! term in one `BlockCorrection` node, `corr_op`), exact in
//! f32. `B` is 32, or 16 for Q6_K (its scales change every 16 elements). A plane's bytes are
//! `(n, k/B, B/2)`, element `2i` in the low nibble of byte `i`; scales are f32.
//!
//! A value of more than 4 bits, `q = 16·h + lo`, is two planes: `lo` with scale `s`, and `h`
//! through `u = 2h + c` with scale `8s`, so `8s·(2h + c − 8) = 16s·h + 8s·(c − 8)`: the
//! constant `c` absorbs the type's offset where it can (Q5_0: c = 7, Q6_K: c = 5, no `corr`).
//!
//! Graph bytes per 32 weights (f32 scales) against the GGUF form:
//! | type | GGUF | planes | here | ×    |
//! |------|------|--------|------|------|
//! | Q4_0 | 18   | 1      | 20   | 1.11 |
//! | Q4_1 | 20   | 1+corr | 24   | 1.20 |
//! | Q5_0 | 22   | 2      | 40   | 1.82 |
//! | Q5_1 | 24   | 2+corr | 44   | 1.83 |
//! | Q8_0 | 34   | 2+corr | 44   | 1.29 |
//! | Q4_K | 18   | 1+corr | 24   | 1.33 |
//! | Q5_K | 22   | 2+corr | 44   | 2.00 |
//! | Q6_K | 26.25| 2 (B=16)| 48  | 1.83 |
//! The f32 fallback (any other type) is 128 bytes per 32.
use half::f16;

use crate::gguf::GgmlType;

/// The usual `MatMulNBits` block (all types but Q6_K).
pub const BLOCK: usize = 32;

/// One symmetric 4-bit plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Plane {
    /// `(n, k/block, block/2)`.
    pub packed: Vec<u8>,
    /// `(n, k/block)`.
    pub scales: Vec<f32>,
}

/// A weight `(n = out, k = in)` as 4-bit planes plus a per-block constant.
#[derive(Debug, Clone, PartialEq)]
pub struct Decomposed {
    pub n: usize,
    pub k: usize,
    /// Elements per scale: 32, or 16 (Q6_K).
    pub block: usize,
    pub planes: Vec<Plane>,
    /// `(n, k/block)`, when some block has a non-zero constant.
    pub correction: Option<Vec<f32>>,
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Packs `u.len()` values in `[0, 15]` as `(2i, 2i+1)` nibble pairs.
fn pack(u: &[u8], out: &mut [u8]) {
    for (o, pair) in out.iter_mut().zip(u.chunks_exact(2)) {
        *o = pair[0] | (pair[1] << 4);
    }
}

/// How a GGUF type maps to planes.
struct Form {
    /// Elements and bytes of one GGUF block.
    elems: usize,
    bytes: usize,
    /// `MatMulNBits` block (elements per scale).
    block: usize,
    planes: usize,
}

fn form(ty: GgmlType) -> Option<Form> {
    let (elems, bytes, block, planes) = match ty {
        GgmlType::Q4_0 => (32, 18, 32, 1),
        GgmlType::Q4_1 => (32, 20, 32, 1),
        GgmlType::Q5_0 => (32, 22, 32, 2),
        GgmlType::Q5_1 => (32, 24, 32, 2),
        GgmlType::Q8_0 => (32, 34, 32, 2),
        GgmlType::Q4K => (256, 144, 32, 1),
        GgmlType::Q5K => (256, 176, 32, 2),
        GgmlType::Q6K => (256, 210, 16, 2),
        _ => return None,
    };
    Some(Form { elems, bytes, block, planes })
}

/// One GGUF block in plane form: `u[p][e]` for its elements `e`, `scale[p][s]` and `corr[s]`
/// for its sub-blocks `s` of `Form::block` elements.
struct BlockPlanes {
    u: [[u8; 256]; 2],
    scale: [[f32; 16]; 2],
    corr: [f32; 16],
}

/// 6-bit scale and min of sub-block `j` (0..8) of Q4_K/Q5_K (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    };
    (sc as f32, m as f32)
}

/// Fills `o` from one block `blk` of `ty` (layouts as in `gguf::dequant`).
fn block_planes(ty: GgmlType, blk: &[u8], o: &mut BlockPlanes) {
    // A 5-bit q = 16h + lo in sub-block s of scale `d`: lo → plane 0, h → plane 1 as 2h + 7
    // (scale 8d): together d·(q − 16).
    let split5 = |o: &mut BlockPlanes, e: usize, q: u8| {
        o.u[0][e] = q & 0x0f;
        o.u[1][e] = 2 * (q >> 4) + 7;
    };
    match ty {
        // {d, qs[16]}: x[j] = d·(lo(qs[j]) − 8), x[j+16] = d·(hi(qs[j]) − 8).
        // {d, m, qs[16]}: x = d·q + m = d·(q − 8) + (m + 8d).
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let d = f16_at(blk, 0);
            let qs = if ty == GgmlType::Q4_0 { &blk[2..18] } else { &blk[4..20] };
            for (j, &q) in qs.iter().enumerate() {
                o.u[0][j] = q & 0x0f;
                o.u[0][j + 16] = q >> 4;
            }
            o.scale[0][0] = d;
            o.corr[0] = if ty == GgmlType::Q4_1 { f16_at(blk, 2) + 8.0 * d } else { 0.0 };
        }
        // {d, qh u32, qs[16]}: x = d·(q − 16), bit j of qh the 5th bit of x[j] (j+16: x[j+16]).
        // {d, m, qh, qs}: x = d·q + m = d·(q − 16) + (m + 16d).
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let d = f16_at(blk, 0);
            let at = if ty == GgmlType::Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            let qs = &blk[at + 4..at + 20];
            for (j, &q) in qs.iter().enumerate() {
                split5(o, j, (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4));
                split5(o, j + 16, (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4));
            }
            o.scale[0][0] = d;
            o.scale[1][0] = 8.0 * d;
            o.corr[0] = if ty == GgmlType::Q5_1 { f16_at(blk, 2) + 16.0 * d } else { 0.0 };
        }
        // {d, qs: i8[32]}: x = d·q, q = 16·hi + lo, lo ∈ [0,15], hi ∈ [−8,7]:
        // x = 16d·((hi+8) − 8) + d·(lo − 8) + 8d.
        GgmlType::Q8_0 => {
            let d = f16_at(blk, 0);
            for j in 0..32 {
                let q = blk[2 + j] as i8;
                o.u[0][j] = ((q >> 4) + 8) as u8;
                o.u[1][j] = (q as u8) & 0x0f;
            }
            o.scale[0][0] = 16.0 * d;
            o.scale[1][0] = d;
            o.corr[0] = 8.0 * d;
        }
        // {d, dmin, scales[12], (qh[32],) qs[128]}: sub-block j (32 elements) is
        // d·sc_j·q − dmin·m_j; qs[32c + l] holds element 64c + l (low nibble) and 64c + 32 + l
        // (high); Q5_K's 5th bit of element 32j + l is bit j of qh[l].
        // Q4_K: (d·sc)·(q − 8) + (8·d·sc − dmin·m).  Q5_K: (d·sc)·(q − 16) + (16·d·sc − dmin·m).
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let scales = &blk[4..16];
            let five = ty == GgmlType::Q5K;
            let (qh, qs) = if five { (&blk[16..48], &blk[48..176]) } else { (&blk[0..0], &blk[16..144]) };
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let d1 = d * sc;
                for l in 0..32 {
                    let byte = qs[32 * (j / 2) + l];
                    let lo = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                    if five {
                        split5(o, 32 * j + l, lo | (((qh[l] >> j) & 1) << 4));
                    } else {
                        o.u[0][32 * j + l] = lo;
                    }
                }
                o.scale[0][j] = d1;
                o.scale[1][j] = 8.0 * d1;
                o.corr[j] = if five { 16.0 * d1 } else { 8.0 * d1 } - dmin * m;
            }
        }
        // {ql[128], qh[64], scales: i8[16], d}: element e = 128·half + 32·quarter + l has the
        // 6-bit q (4 bits of ql, 2 of qh) and value d·sc[e/16]·(q − 32). With D = d·sc and
        // q = 16h + lo: D·(lo − 8) + 8D·(2h + 5 − 8), exact with no constant.
        GgmlType::Q6K => {
            let d = f16_at(blk, 208);
            for e in 0..256 {
                let (half, quarter, l) = (e / 128, (e % 128) / 32, e % 32);
                let lo_byte = blk[64 * half + l + 32 * (quarter % 2)];
                let lo = if quarter < 2 { lo_byte & 0x0f } else { lo_byte >> 4 };
                let h = (blk[128 + 32 * half + l] >> (2 * quarter)) & 3;
                o.u[0][e] = lo;
                o.u[1][e] = 2 * h + 5;
            }
            for s in 0..16 {
                let big_d = d * (blk[192 + s] as i8) as f32;
                o.scale[0][s] = big_d;
                o.scale[1][s] = 8.0 * big_d;
                o.corr[s] = 0.0;
            }
        }
        _ => unreachable!("form() lists the types handled here"),
    }
}

/// Converts `n × k` elements of `ty` exactly; `None` if the type has no exact 4-bit-plane form
/// (or `k` is not a whole number of its blocks, or `bytes` is short).
pub fn decompose(ty: GgmlType, bytes: &[u8], n: usize, k: usize) -> Option<Decomposed> {
    let f = form(ty)?;
    if k % f.elems != 0 || bytes.len() < n * k / f.elems * f.bytes {
        return None;
    }
    let (gguf_blocks, subs) = (n * k / f.elems, f.elems / f.block);
    let n_sub = gguf_blocks * subs;
    let mut planes: Vec<Plane> = (0..f.planes).map(|_| Plane { packed: vec![0; n_sub * f.block / 2], scales: vec![0.0; n_sub] }).collect();
    let mut corr = vec![0f32; n_sub];
    let mut o = BlockPlanes { u: [[8; 256]; 2], scale: [[0.0; 16]; 2], corr: [0.0; 16] };
    for (b, blk) in bytes.chunks_exact(f.bytes).take(gguf_blocks).enumerate() {
        block_planes(ty, blk, &mut o);
        for (p, plane) in planes.iter_mut().enumerate() {
            let (e0, e1) = (b * f.elems / 2, (b + 1) * f.elems / 2);
            pack(&o.u[p][..f.elems], &mut plane.packed[e0..e1]);
            plane.scales[b * subs..(b + 1) * subs].copy_from_slice(&o.scale[p][..subs]);
        }
        corr[b * subs..(b + 1) * subs].copy_from_slice(&o.corr[..subs]);
    }
    let correction = corr.iter().any(|&c| c != 0.0).then_some(corr);
    Some(Decomposed { n, k, block: f.block, planes, correction })
}

/// Stacks weights with the same `k`, block and plane count along N (fused projections such as
/// Q|K|V); `None` when they differ.
pub fn concat_rows(parts: &[Decomposed]) -> Option<Decomposed> {
    let first = parts.first()?;
    if parts.iter().any(|p| p.k != first.k || p.block != first.block || p.planes.len() != first.planes.len()) {
        return None;
    }
    let mut out = Decomposed { n: 0, k: first.k, block: first.block, planes: first.planes.iter().map(|_| Plane { packed: vec![], scales: vec![] }).collect(), correction: None };
    let any_corr = parts.iter().any(|p| p.correction.is_some());
    let mut corr = Vec::new();
    for p in parts {
        out.n += p.n;
        for (o, pl) in out.planes.iter_mut().zip(&p.planes) {
            o.packed.extend_from_slice(&pl.packed);
            o.scales.extend_from_slice(&pl.scales);
        }
        match &p.correction {
            Some(c) => corr.extend_from_slice(c),
            None => corr.resize(corr.len() + p.n * p.k / p.block, 0.0),
        }
    }
    out.correction = any_corr.then_some(corr);
    Some(out)
}

impl Decomposed {
    /// Dequantized `(n, k)` row-major, for checks.
    pub fn dequantize(&self) -> Vec<f32> {
        let nb = self.k / self.block;
        let mut out = vec![0f32; self.n * self.k];
        for (i, x) in out.iter_mut().enumerate() {
            let (r, c) = (i / self.k, i % self.k);
            let blk = r * nb + c / self.block;
            let j = c % self.block;
            for p in &self.planes {
                let byte = p.packed[blk * self.block / 2 + j / 2];
                let u = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                *x += p.scales[blk] * (u as f32 - 8.0);
            }
            if let Some(c) = &self.correction {
                *x += c[blk];
            }
        }
        out
    }

    /// Bytes the graph holds for this weight.
    pub fn bytes(&self) -> usize {
        self.planes.iter().map(|p| p.packed.len() + 4 * p.scales.len()).sum::<usize>() + self.correction.as_ref().map_or(0, |c| 4 * c.len())
    }
}

/// A token embedding `(n, k)` as 8-bit blocks for `GatherBlockQuantized` (default zero point
/// 128): `(q + 128 as u8 (n, k), scales (n, k/block), block)`, exact for the types whose values
/// are `scale · (signed integer of ≤ 8 bits)`: Q8_0, Q4_0 (`q − 8`), Q5_0 (`q − 16`) with
/// block 32 and Q6_K (`sc·d · (q − 32)`) with block 16. `None` for other types (offsets such
/// as Q4_1's `m` have no integer zero point) or short `bytes`.
/// Bytes per 32 weights: 32 + 4 (block 32) or 32 + 8 (Q6_K).
pub fn gather_u8(ty: GgmlType, bytes: &[u8], n: usize, k: usize) -> Option<(Vec<u8>, Vec<f32>, usize)> {
    if !matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q6K) {
        return None;
    }
    let f = form(ty)?;
    if k % f.elems != 0 || bytes.len() < n * k / f.elems * f.bytes {
        return None;
    }
    let (gguf_blocks, subs) = (n * k / f.elems, f.elems / f.block);
    let mut q = vec![0u8; n * k];
    let mut s = vec![0f32; gguf_blocks * subs];
    let mut o = BlockPlanes { u: [[8; 256]; 2], scale: [[0.0; 16]; 2], corr: [0.0; 16] };
    for (b, blk) in bytes.chunks_exact(f.bytes).take(gguf_blocks).enumerate() {
        let q = &mut q[b * f.elems..(b + 1) * f.elems];
        if ty == GgmlType::Q8_0 {
            s[b] = f16_at(blk, 0);
            for (j, v) in q.iter_mut().enumerate() {
                *v = (blk[2 + j] as i8 as i16 + 128) as u8;
            }
            continue;
        }
        // Planes of the others: x = scale₀·(u₀ − 8) + scale₁·(u₁ − 8) with scale₁ = 8·scale₀
        // (one plane for Q4_0), no constant; so x = scale₀ · (u₀ − 8 + 8·(u₁ − 8)).
        block_planes(ty, blk, &mut o);
        for (e, v) in q.iter_mut().enumerate() {
            let hi = if f.planes == 2 { 8 * (o.u[1][e] as i16 - 8) } else { 0 };
            *v = (o.u[0][e] as i16 - 8 + hi + 128) as u8;
        }
        s[b * subs..(b + 1) * subs].copy_from_slice(&o.scale[0][..subs]);
    }
    Some((q, s, f.block))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequantize;

    /// Pseudo-random but valid blocks: arbitrary quant bytes and 6/8-bit scales, finite f16
    /// super-scales (one block in three with a zero or negative one).
    fn blocks(ty: GgmlType, n_blocks: usize, seed: u32) -> Vec<u8> {
        let size = ty.type_size().unwrap() as usize;
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 24) as u8
        };
        let mut out = Vec::new();
        for b in 0..n_blocks {
            let mut blk: Vec<u8> = (0..size).map(|_| next()).collect();
            let d = match b % 3 {
                1 if b == 1 => 0.0,
                1 => -0.004 * b as f32,
                _ => 0.01 + (b as f32) * 0.003,
            };
            let h = |v: f32| f16::from_f32(v).to_le_bytes();
            match ty {
                GgmlType::Q6K => blk[208..210].copy_from_slice(&h(d / 16.0)),
                GgmlType::Q4K | GgmlType::Q5K => {
                    blk[0..2].copy_from_slice(&h(d / 8.0));
                    blk[2..4].copy_from_slice(&h(0.002 * b as f32));
                }
                _ => blk[0..2].copy_from_slice(&h(d)),
            }
            if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                blk[2..4].copy_from_slice(&h(-0.07 * b as f32));
            }
            out.extend(blk);
        }
        out
    }

    const TYPES: [GgmlType; 8] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K];

    fn assert_close(ty: GgmlType, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{ty:?} element {i}: {a} vs {b}");
        }
    }

    #[test]
    fn planes_reproduce_ggml_dequantization() {
        for ty in TYPES {
            // 3 rows of 512: two K-quant super-blocks, sixteen 32-blocks per row.
            let (n, k) = (3, 512);
            let per = ty.block_size().unwrap() as usize;
            let bytes = blocks(ty, n * k / per, 11);
            let want = dequantize(ty, &bytes, n * k).unwrap();
            assert!(want.iter().any(|&v| v != 0.0) && want.iter().all(|v| v.is_finite()));
            let dec = decompose(ty, &bytes, n, k).unwrap();
            assert_eq!(dec.block, if ty == GgmlType::Q6K { 16 } else { 32 }, "{ty:?}");
            let planes = match ty {
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K => 1,
                _ => 2,
            };
            assert_eq!(dec.planes.len(), planes, "{ty:?}");
            // Q5_0 and Q6_K fold their offset into the second plane.
            let no_corr = matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q6K);
            assert_eq!(dec.correction.is_none(), no_corr, "{ty:?}");
            assert_close(ty, &dec.dequantize(), &want);
        }
    }

    #[test]
    fn plane_bytes_per_32_weights() {
        for (ty, want) in [(GgmlType::Q4_0, 20), (GgmlType::Q4_1, 24), (GgmlType::Q5_0, 40), (GgmlType::Q5_1, 44), (GgmlType::Q8_0, 44), (GgmlType::Q4K, 24), (GgmlType::Q5K, 44), (GgmlType::Q6K, 48)] {
            let per = ty.block_size().unwrap() as usize;
            let dec = decompose(ty, &blocks(ty, 256 / per, 5), 1, 256).unwrap();
            assert_eq!(dec.bytes() / 8, want, "{ty:?}");
        }
    }

    #[test]
    fn partial_or_unknown_blocks_are_refused() {
        // K-quants need whole 256-element rows; f16 has no plane form.
        assert!(decompose(GgmlType::Q4K, &blocks(GgmlType::Q4K, 1, 1), 2, 128).is_none());
        assert!(decompose(GgmlType::Q6K, &blocks(GgmlType::Q6K, 1, 1)[..209], 1, 256).is_none());
        assert!(decompose(GgmlType::F16, &[0; 64], 1, 32).is_none());
    }

    #[test]
    fn concatenation_keeps_rows() {
        let a = decompose(GgmlType::Q4_0, &blocks(GgmlType::Q4_0, 2, 1), 1, 64).unwrap();
        let b = decompose(GgmlType::Q4_1, &blocks(GgmlType::Q4_1, 4, 2), 2, 64).unwrap();
        let c = concat_rows(&[a.clone(), b.clone()]).unwrap();
        let mut want = a.dequantize();
        want.extend(b.dequantize());
        assert_eq!(c.dequantize(), want);
        assert!(concat_rows(&[a, decompose(GgmlType::Q8_0, &blocks(GgmlType::Q8_0, 2, 3), 1, 64).unwrap()]).is_none());
        // Q5_0 (no constant) and Q8_0 (constant): same planes and block, so they stack.
        let q5 = decompose(GgmlType::Q5_0, &blocks(GgmlType::Q5_0, 8, 4), 1, 256).unwrap();
        let q8 = decompose(GgmlType::Q8_0, &blocks(GgmlType::Q8_0, 16, 5), 2, 256).unwrap();
        let c = concat_rows(&[q5.clone(), q8.clone()]).unwrap();
        let mut want = q5.dequantize();
        want.extend(q8.dequantize());
        assert_eq!(c.dequantize(), want);
        // Block 16 never stacks with block 32.
        let q6 = decompose(GgmlType::Q6K, &blocks(GgmlType::Q6K, 1, 6), 1, 256).unwrap();
        assert!(concat_rows(&[q5, q6]).is_none());
    }

    #[test]
    fn eight_bit_gather_form_is_exact() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q6K] {
            let (n, k) = (2, 512);
            let per = ty.block_size().unwrap() as usize;
            let bytes = blocks(ty, n * k / per, 9);
            let (q, s, block) = gather_u8(ty, &bytes, n, k).unwrap();
            let got: Vec<f32> = q.iter().enumerate().map(|(i, &v)| s[i / block] * (v as f32 - 128.0)).collect();
            assert_close(ty, &got, &dequantize(ty, &bytes, n * k).unwrap());
        }
        assert!(gather_u8(GgmlType::Q4K, &blocks(GgmlType::Q4K, 1, 1), 1, 256).is_none());
    }
}
