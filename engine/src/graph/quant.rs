//! Exact conversion of GGUF block-quantized weights into ONNX Runtime `MatMulNBits` form, so
//! weights stay 4-bit in the graph and decode runs on ORT's prepacked fast path.
//!
//! ORT's CPU `MatMulNBits` is fast only for 4-bit weights with no or integer zero points (float
//! zero points and 8 bits fall back to dequantizing the whole matrix every run: ~100× slower at
//! M = 1, measured). So every GGUF block is written as a sum of symmetric 4-bit planes plus a
//! per-block constant:
//!   `W[n, k] = Σ_p scale_p[n, b] · (u_p[n, k] − 8) + corr[n, b]`,  `b = k / 32`, `u_p ∈ [0, 15]`
//! and the graph computes `A·Wᵀ = Σ_p MatMulNBits(A, plane_p) + BlockSum(A) · corrᵀ`, exact in
//! f32. A plane's bytes are `(n, k/32, 16)`, element `2i` in the low nibble of byte `i`.
use half::f16;

use crate::gguf::GgmlType;

pub const BLOCK: usize = 32;

/// One symmetric 4-bit plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Plane {
    /// `(n, k/32, 16)`.
    pub packed: Vec<u8>,
    /// `(n, k/32)`.
    pub scales: Vec<f32>,
}

/// A weight `(n = out, k = in)` as 4-bit planes plus a per-block constant.
#[derive(Debug, Clone, PartialEq)]
pub struct Decomposed {
    pub n: usize,
    pub k: usize,
    pub planes: Vec<Plane>,
    /// `(n, k/32)`, when some block has a non-zero constant.
    pub correction: Option<Vec<f32>>,
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Packs 32 values in `[0, 15]` as `(2i, 2i+1)` nibble pairs.
fn pack(u: &[u8; 32], out: &mut [u8]) {
    for i in 0..16 {
        out[i] = u[2 * i] | (u[2 * i + 1] << 4);
    }
}

/// Converts `n × k` elements of `ty` exactly; `None` if the type has no exact 4-bit-plane form.
pub fn decompose(ty: GgmlType, bytes: &[u8], n: usize, k: usize) -> Option<Decomposed> {
    if k % BLOCK != 0 {
        return None;
    }
    let blocks = n * k / BLOCK;
    let (bsize, n_planes) = match ty {
        GgmlType::Q4_0 => (18, 1),
        GgmlType::Q4_1 => (20, 1),
        GgmlType::Q8_0 => (34, 2),
        _ => return None,
    };
    if bytes.len() < blocks * bsize {
        return None;
    }
    let mut planes: Vec<Plane> = (0..n_planes).map(|_| Plane { packed: vec![0; blocks * 16], scales: vec![0.0; blocks] }).collect();
    let mut corr = vec![0f32; blocks];
    for b in 0..blocks {
        let blk = &bytes[b * bsize..(b + 1) * bsize];
        let d = f16_at(blk, 0);
        let dst = b * 16..(b + 1) * 16;
        match ty {
            // {d, qs[16]}: x[j] = d·(lo(qs[j]) − 8), x[j+16] = d·(hi(qs[j]) − 8).
            // {d, m, qs[16]}: x = d·q + m = d·(q − 8) + (m + 8d).
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let qs = if ty == GgmlType::Q4_0 { &blk[2..18] } else { &blk[4..20] };
                let u: [u8; 32] = std::array::from_fn(|j| if j < 16 { qs[j] & 0x0f } else { qs[j - 16] >> 4 });
                pack(&u, &mut planes[0].packed[dst]);
                planes[0].scales[b] = d;
                if ty == GgmlType::Q4_1 {
                    corr[b] = f16_at(blk, 2) + 8.0 * d;
                }
            }
            // {d, qs: i8[32]}: x = d·q, q = 16·hi + lo, lo ∈ [0,15], hi ∈ [−8,7]:
            // x = 16d·((hi+8) − 8) + d·(lo − 8) + 8d.
            GgmlType::Q8_0 => {
                let q: [i8; 32] = std::array::from_fn(|j| blk[2 + j] as i8);
                let hi: [u8; 32] = std::array::from_fn(|j| ((q[j] >> 4) + 8) as u8);
                let lo: [u8; 32] = std::array::from_fn(|j| (q[j] as u8) & 0x0f);
                pack(&hi, &mut planes[0].packed[dst.clone()]);
                pack(&lo, &mut planes[1].packed[dst]);
                planes[0].scales[b] = 16.0 * d;
                planes[1].scales[b] = d;
                corr[b] = 8.0 * d;
            }
            _ => unreachable!(),
        }
    }
    let correction = corr.iter().any(|&c| c != 0.0).then_some(corr);
    Some(Decomposed { n, k, planes, correction })
}

/// Stacks weights with the same `k` and plane count along N (fused projections such as Q|K|V).
pub fn concat_rows(parts: &[Decomposed]) -> Option<Decomposed> {
    let first = parts.first()?;
    if parts.iter().any(|p| p.k != first.k || p.planes.len() != first.planes.len()) {
        return None;
    }
    let mut out = Decomposed { n: 0, k: first.k, planes: first.planes.iter().map(|_| Plane { packed: vec![], scales: vec![] }).collect(), correction: None };
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
            None => corr.resize(corr.len() + p.n * p.k / BLOCK, 0.0),
        }
    }
    out.correction = any_corr.then_some(corr);
    Some(out)
}

impl Decomposed {
    /// Dequantized `(n, k)` row-major, for checks.
    pub fn dequantize(&self) -> Vec<f32> {
        let nb = self.k / BLOCK;
        let mut out = vec![0f32; self.n * self.k];
        for (i, x) in out.iter_mut().enumerate() {
            let (r, c) = (i / self.k, i % self.k);
            let blk = r * nb + c / BLOCK;
            let j = c % BLOCK;
            for p in &self.planes {
                let byte = p.packed[blk * 16 + j / 2];
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequantize;

    fn blocks(ty: GgmlType, n_blocks: usize, seed: u32) -> Vec<u8> {
        // Pseudo-random but valid blocks: finite f16 scales, arbitrary quant bytes.
        let size = match ty {
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            _ => 34,
        };
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 24) as u8
        };
        let mut out = Vec::new();
        for b in 0..n_blocks {
            let mut blk: Vec<u8> = (0..size).map(|_| next()).collect();
            let d = if b == 1 { 0.0 } else { 0.01 + (b as f32) * 0.003 };
            blk[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            if ty == GgmlType::Q4_1 {
                blk[2..4].copy_from_slice(&f16::from_f32(-0.07 * b as f32).to_le_bytes());
            }
            out.extend(blk);
        }
        out
    }

    #[test]
    fn planes_reproduce_ggml_dequantization() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let (n, k) = (3, 64);
            let bytes = blocks(ty, n * k / 32, 11);
            let want = dequantize(ty, &bytes, n * k).unwrap();
            let got = decompose(ty, &bytes, n, k).unwrap().dequantize();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{ty:?} element {i}: {a} vs {b}");
            }
        }
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
    }
}

/// Q8_0 as `(q + 128 as u8 (n, k), scales (n, k/32))`: `GatherBlockQuantized`'s 8-bit form
/// (default zero point 128), exact. `None` if `bytes` is short.
pub fn q8_0_unsigned(bytes: &[u8], n: usize, k: usize) -> Option<(Vec<u8>, Vec<f32>)> {
    let blocks = n * k / BLOCK;
    if k % BLOCK != 0 || bytes.len() < blocks * 34 {
        return None;
    }
    let mut q = vec![0u8; n * k];
    let mut s = vec![0f32; blocks];
    for b in 0..blocks {
        let blk = &bytes[b * 34..(b + 1) * 34];
        s[b] = f16_at(blk, 0);
        for j in 0..32 {
            q[b * 32 + j] = (blk[2 + j] as i8 as i16 + 128) as u8;
        }
    }
    Some((q, s))
}
