//! The per-block constant of 4-bit weights (`MatMulNBits` planes plus a constant per block: see
//! the engine's `graph::quant`): `y[n] += Σ_b corr[b, n] · Σ_{j ∈ block b} x[j]` for one row of
//! activations. One pass instead of the four graph nodes (reshape, block sums, matrix product,
//! add) whose per-node cost, at one token, was as large as the arithmetic.

avx2_dispatch! {
    /// `out (n,) += Σ_b blocksum_b(x) · corr_t[b·n..(b+1)·n]`, `x` `(nb·block,)`, `corr_t`
    /// `(nb, n)` (block-major, so each block adds one contiguous row).
    pub fn add_block_correction / block_correction_avx2 => block_correction(x: &[f32], block: usize, corr_t: &[f32], out: &mut [f32])
}

#[inline(always)]
fn block_correction(x: &[f32], block: usize, corr_t: &[f32], out: &mut [f32]) {
    let n = out.len();
    for (xb, c) in x.chunks_exact(block).zip(corr_t.chunks_exact(n)) {
        let s: f32 = xb.iter().sum();
        for (o, &v) in out.iter_mut().zip(c) {
            *o = s.mul_add(v, *o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_block_sums_times_the_constants() {
        let (block, nb, n) = (4, 3, 5);
        let x: Vec<f32> = (0..block * nb).map(|i| i as f32 * 0.5 - 2.0).collect();
        let c: Vec<f32> = (0..nb * n).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut out: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let want: Vec<f32> = (0..n).map(|j| j as f32 + (0..nb).map(|b| x[b * block..(b + 1) * block].iter().sum::<f32>() * c[b * n + j]).sum::<f32>()).collect();
        add_block_correction(&x, block, &c, &mut out);
        assert_eq!(out, want);
    }
}
