//! Capture of one decode step's attention inputs, for checking kernels on real K/V offline
//! (`fasa-bench capture`, then the GPU tests). While a slot holds a `KvCapture`, every decode step
//! of a listed layer overwrites that layer's record with the cache as the step's attention reads
//! it (the new token included) and the step's rotated queries; other layers and prefill are left
//! alone. Everything is in the operator's FC-pair order: FC `f`'s rotated pair at `2f, 2f + 1`.
use super::cache::SeqCache;

/// One layer's record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerCapture {
    pub layer: usize,
    /// Tokens cached at the step.
    pub n: usize,
    /// `(n_heads, d)`: the step's rotated queries.
    pub q: Vec<f32>,
    /// Per KV head, `(n, d)`: rotated K rows.
    pub k: Vec<Vec<f32>>,
    /// Per KV head, `(n, d)`: V rows (model dim order).
    pub v: Vec<Vec<f32>>,
}

/// What a slot records: the layers asked for, and their records once a decode step ran them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvCapture {
    pub layers: Vec<usize>,
    pub records: Vec<LayerCapture>,
}

impl KvCapture {
    pub fn new(layers: Vec<usize>) -> Self {
        Self { layers, records: Vec::new() }
    }
}

/// Called by the operator after a single-token step of `layer` has written its K/V: `q_fc` is
/// that token's `(n_heads, d)` rotated queries, `n` the tokens now cached. No-op without a capture.
pub fn observe(cache: &mut SeqCache, layer: usize, n_kv_heads: usize, q_fc: &[f32], n: usize) {
    let Some(mut cap) = cache.state.capture.take() else { return };
    if cap.layers.contains(&layer) {
        let mut rec = LayerCapture { layer, n, q: q_fc.to_vec(), k: Vec::new(), v: Vec::new() };
        for kh in 0..n_kv_heads {
            let pages = cache.pages(layer, kh);
            let view = pages.view();
            rec.k.push((0..n).flat_map(|t| view.k_row(t).iter().copied()).collect());
            rec.v.push((0..n).flat_map(|t| view.v_row(t).iter().copied()).collect());
        }
        cap.records.retain(|r| r.layer != layer);
        cap.records.push(rec);
    }
    cache.state.capture = Some(cap);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::cache::{CachePool, CacheShape, PAGE};
    use crate::attention::{KvVariant, Profile};

    #[test]
    fn records_listed_layers_rows_across_pages_and_keeps_the_last_step() {
        let (hkv, d) = (2, 4);
        let cfg = crate::ModelConfig { architecture: "llama".into(), name: "t".into(), n_layers: 3, hidden: 12, n_heads: 3, n_kv_heads: hkv, head_dim: d, ffn_hidden: 8, vocab_size: 8, context_length: 1024, rope_theta: 1e4, rms_eps: 1e-5, rope_layout: crate::RopeLayout::Adjacent, tied_embeddings: true, qkv_bias: false };
        let pool = CachePool::new(CacheShape { n_layers: 3, n_kv_heads: hkv, head_dim: d }, 1, 1024, Profile::heuristic(&cfg, ""), KvVariant::FasaC);
        let lease = pool.acquire().unwrap();
        let mut c = pool.lock(lease.slot()).unwrap();
        // Token t of head h, element i: distinct values, K and V apart.
        let val = |layer: usize, h: usize, t: usize, i: usize| (layer * 1000 + h * 100 + t) as f32 + i as f32 / 10.0;
        let n = PAGE + 3;
        for layer in 0..3 {
            let delta = c.resize(layer, 0, n).unwrap();
            pool.account(delta);
            for h in 0..hkv {
                for t in 0..n {
                    let k: Vec<f32> = (0..d).map(|i| val(layer, h, t, i)).collect();
                    let v: Vec<f32> = k.iter().map(|x| -x).collect();
                    c.write(layer, h, t, &k, &v);
                }
            }
        }
        let q = vec![0.5f32; 3 * d];
        observe(&mut c, 1, hkv, &q, n);
        assert!(c.state.capture.is_none(), "no capture installed: nothing recorded, nothing installed");
        c.state.capture = Some(KvCapture::new(vec![1, 2]));
        for layer in 0..3 {
            observe(&mut c, layer, hkv, &q, n - 1);
        }
        let q2 = vec![2.0f32; 3 * d];
        observe(&mut c, 2, hkv, &q2, n);
        let cap = c.state.capture.take().unwrap();
        assert_eq!(cap.records.iter().map(|r| (r.layer, r.n)).collect::<Vec<_>>(), [(1, n - 1), (2, n)]);
        let r = &cap.records[1];
        assert_eq!(r.q, q2);
        for h in 0..hkv {
            let want: Vec<f32> = (0..n).flat_map(|t| (0..d).map(move |i| val(2, h, t, i))).collect();
            assert_eq!(r.k[h], want);
            assert_eq!(r.v[h], want.iter().map(|x| -x).collect::<Vec<_>>());
        }
    }
}
