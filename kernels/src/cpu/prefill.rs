//! Causal attention for a chunk of new tokens (prefill) as blocked matrix products, so long
//! prompts cost GEMM time rather than one dot product per (query, key) pair.

use super::attention::{softmax_in_place, HeadView};

/// Causal attention of `s` new tokens of one KV group over the cache `view` (which already holds
/// them at positions `pos..pos+s`). `qs` is `(s, heads, d)` rotated queries in FC-pair order;
/// `out` is `(s, heads, d)`. Token `i` attends to positions `0..=pos+i`.
pub fn attend_causal_group(view: &HeadView, qs: &[f32], heads: usize, s: usize, pos: usize, scale: f32, out: &mut [f32]) {
    let d = view.head_dim();
    let m = s * heads;
    let n = pos + s;
    // scores (m, n): row (i, h) against every visible key.
    let mut sc = vec![0f32; m * n];
    for (p, kr) in view.kr_pages.iter().enumerate() {
        let t0 = p * view.page;
        if t0 >= n {
            break;
        }
        let cnt = (n - t0).min(view.page);
        // SAFETY: a is (m, d) row-major; b = this page's K rows read transposed, (d, cnt) with
        // row stride 1 and column stride d; c is the (m, cnt) block of `sc` at column t0.
        unsafe {
            matrixmultiply::sgemm(m, d, cnt, scale, qs.as_ptr(), d as isize, 1, kr.as_ptr(), 1, d as isize, 0.0, sc.as_mut_ptr().add(t0), n as isize, 1);
        }
    }
    for i in 0..s {
        for h in 0..heads {
            let row = &mut sc[(i * heads + h) * n..(i * heads + h + 1) * n];
            let visible = pos + i + 1;
            row[visible..].fill(f32::NEG_INFINITY);
            softmax_in_place(row);
        }
    }
    out[..m * d].fill(0.0);
    for (p, v) in view.v_pages.iter().enumerate() {
        let t0 = p * view.page;
        if t0 >= n {
            break;
        }
        let cnt = (n - t0).min(view.page);
        // SAFETY: a = (m, cnt) block of `sc` (row stride n); b = V page rows (cnt, d); c = out.
        unsafe {
            matrixmultiply::sgemm(m, cnt, d, 1.0, sc.as_ptr().add(t0), n as isize, 1, v.as_ptr(), d as isize, 1, 1.0, out.as_mut_ptr(), d as isize, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::attend_dense_group;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_per_token_dense_attention() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (d, page, heads, pos, s): (usize, usize, usize, usize, usize) = (8, 16, 3, 21, 30);
        let len = pos + s;
        let pages = len.div_ceil(page);
        let kr: Vec<Vec<f32>> = (0..pages).map(|_| (0..page * d).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
        let v: Vec<Vec<f32>> = (0..pages).map(|_| (0..page * d).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
        let kp: Vec<Vec<f32>> = vec![vec![0.0; d / 2 * page * 2]; pages]; // planes unused here
        let (k, krr, vv): (Vec<&[f32]>, Vec<&[f32]>, Vec<&[f32]>) =
            (kp.iter().map(|x| &x[..]).collect(), kr.iter().map(|x| &x[..]).collect(), v.iter().map(|x| &x[..]).collect());
        let view = HeadView { k_pages: &k, kr_pages: &krr, v_pages: &vv, page, n_fc: d / 2, len };
        let qs: Vec<f32> = (0..s * heads * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut out = vec![f32::NAN; s * heads * d];
        attend_causal_group(&view, &qs, heads, s, pos, 0.3, &mut out);
        for i in 0..s {
            let q: Vec<&[f32]> = (0..heads).map(|h| &qs[(i * heads + h) * d..(i * heads + h + 1) * d]).collect();
            let mut want = vec![0.0; heads * d];
            attend_dense_group(&view, &q, pos + i + 1, 0.3, &mut want);
            for (a, b) in out[i * heads * d..(i + 1) * heads * d].iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "token {i}: {a} vs {b}");
            }
        }
    }
}
