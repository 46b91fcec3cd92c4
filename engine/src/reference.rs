//! The plain-Rust f32 reference forward pass, llama2.c style: every weight dequantized to f32,
//! plain loops, its own KV cache. Slow and obviously correct: the graph and the FASA
//! operator are checked against it.
//!
//! Per layer: RMSNorm → Q/K/V projections (+ bias) → RoPE → causal GQA softmax attention →
//! output projection → residual → RMSNorm → SwiGLU FFN → residual. Then the final RMSNorm and
//! the LM head (`output.weight`, or the token embedding when tied).
use crate::config::{ModelConfig, RopeLayout};
use crate::gguf::{GgufError, GgufFile};

/// One decoder layer's weights. A matrix `(out, in)` is row-major: `y[o] = Σ_i W[o·in + i]·x[i]`
/// (a GGUF tensor with dims `[in, out]`).
struct LayerWeights {
    attn_norm: Vec<f32>,  // (hidden,)
    wq: Vec<f32>,         // (n_heads·head_dim, hidden)
    wk: Vec<f32>,         // (n_kv_heads·head_dim, hidden)
    wv: Vec<f32>,         // (n_kv_heads·head_dim, hidden)
    bq: Option<Vec<f32>>, // (n_heads·head_dim,)
    bk: Option<Vec<f32>>, // (n_kv_heads·head_dim,)
    bv: Option<Vec<f32>>, // (n_kv_heads·head_dim,)
    wo: Vec<f32>,         // (hidden, n_heads·head_dim)
    ffn_norm: Vec<f32>,   // (hidden,)
    w_gate: Vec<f32>,     // (ffn_hidden, hidden)
    w_up: Vec<f32>,       // (ffn_hidden, hidden)
    w_down: Vec<f32>,     // (hidden, ffn_hidden)
}

/// The whole model in f32 plus one sequence's KV cache.
pub struct ReferenceModel {
    config: ModelConfig,
    token_embd: Vec<f32>,      // (vocab, hidden)
    layers: Vec<LayerWeights>, // (n_layers,)
    output_norm: Vec<f32>,     // (hidden,)
    /// None when tied: the LM head is `token_embd`.
    output: Option<Vec<f32>>, // (vocab, hidden)
    key_cache: Vec<Vec<f32>>,  // (n_layers,) of (pos, n_kv_heads, head_dim), after RoPE
    value_cache: Vec<Vec<f32>>, // (n_layers,) of (pos, n_kv_heads, head_dim)
    /// Positions held in the caches.
    n_cached: usize,
}

impl ReferenceModel {
    /// Reads the config and dequantizes every weight to f32 (≈ 4 bytes per parameter).
    pub fn load(f: &GgufFile) -> Result<Self, GgufError> {
        let c = ModelConfig::from_gguf(f)?;
        let (d, q_dim, kv_dim) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let name = |w: &str| format!("blk.{l}.{w}");
            let bias = |w: &str, n: usize| -> Result<Option<Vec<f32>>, GgufError> {
                if c.qkv_bias {
                    weight(f, &name(w), &[n]).map(Some)
                } else {
                    Ok(None)
                }
            };
            layers.push(LayerWeights {
                attn_norm: weight(f, &name("attn_norm.weight"), &[d])?,
                wq: weight(f, &name("attn_q.weight"), &[d, q_dim])?,
                wk: weight(f, &name("attn_k.weight"), &[d, kv_dim])?,
                wv: weight(f, &name("attn_v.weight"), &[d, kv_dim])?,
                bq: bias("attn_q.bias", q_dim)?,
                bk: bias("attn_k.bias", kv_dim)?,
                bv: bias("attn_v.bias", kv_dim)?,
                wo: weight(f, &name("attn_output.weight"), &[q_dim, d])?,
                ffn_norm: weight(f, &name("ffn_norm.weight"), &[d])?,
                w_gate: weight(f, &name("ffn_gate.weight"), &[d, c.ffn_hidden])?,
                w_up: weight(f, &name("ffn_up.weight"), &[d, c.ffn_hidden])?,
                w_down: weight(f, &name("ffn_down.weight"), &[c.ffn_hidden, d])?,
            });
        }
        let token_embd = weight(f, "token_embd.weight", &[d, c.vocab_size])?;
        let output = match c.tied_embeddings {
            true => None,
            false => Some(weight(f, "output.weight", &[d, c.vocab_size])?),
        };
        let output_norm = weight(f, "output_norm.weight", &[d])?;
        Ok(ReferenceModel {
            key_cache: vec![Vec::new(); c.n_layers],
            value_cache: vec![Vec::new(); c.n_layers],
            n_cached: 0,
            config: c,
            token_embd,
            layers,
            output_norm,
            output,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Positions held in the KV cache.
    pub fn n_cached(&self) -> usize {
        self.n_cached
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.truncate(0);
    }

    fn truncate(&mut self, n_pos: usize) {
        let kv_dim = self.config.n_kv_heads * self.config.head_dim;
        for cache in self.key_cache.iter_mut().chain(self.value_cache.iter_mut()) {
            cache.truncate(n_pos * kv_dim);
        }
        self.n_cached = n_pos;
    }

    /// Runs `tokens` at positions `start_pos..start_pos + tokens.len()` and returns the logits
    /// of every position, `(tokens.len(), vocab)` flattened. Positions `0..start_pos` must
    /// be cached already; cached positions from `start_pos` on are dropped first (rewind).
    ///
    /// # Panics
    /// When `start_pos` is past the cached positions or a token is outside the vocabulary.
    pub fn forward(&mut self, tokens: &[u32], start_pos: usize) -> Vec<f32> {
        assert!(
            start_pos <= self.n_cached,
            "forward at position {start_pos}, but only {} positions are cached: feed the tokens before it first",
            self.n_cached
        );
        self.truncate(start_pos);
        let c = &self.config;
        let (seq, d, hd) = (tokens.len(), c.hidden, c.head_dim);
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);

        // Embedding lookup.
        let mut x = vec![0f32; seq * d]; // (seq, hidden)
        for (t, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            assert!(tok < c.vocab_size, "token id {tok} is outside the vocabulary of {} tokens", c.vocab_size);
            x[t * d..(t + 1) * d].copy_from_slice(&self.token_embd[tok * d..(tok + 1) * d]);
        }

        let mut xn = vec![0f32; seq * d]; // (seq, hidden)
        let mut q = vec![0f32; seq * q_dim]; // (seq, n_heads, head_dim)
        let mut k = vec![0f32; seq * kv_dim]; // (seq, n_kv_heads, head_dim)
        let mut v = vec![0f32; seq * kv_dim]; // (seq, n_kv_heads, head_dim)
        let mut att = vec![0f32; seq * q_dim]; // (seq, n_heads, head_dim)
        let mut proj = vec![0f32; seq * d]; // (seq, hidden)
        let mut gate = vec![0f32; seq * c.ffn_hidden]; // (seq, ffn_hidden)
        let mut up = vec![0f32; seq * c.ffn_hidden]; // (seq, ffn_hidden)

        for (l, w) in self.layers.iter().enumerate() {
            // Attention block.
            rmsnorm(&mut xn, &x, &w.attn_norm, c.rms_eps);
            matmul(&mut q, &xn, &w.wq, d);
            matmul(&mut k, &xn, &w.wk, d);
            matmul(&mut v, &xn, &w.wv, d);
            add_bias(&mut q, w.bq.as_deref());
            add_bias(&mut k, w.bk.as_deref());
            add_bias(&mut v, w.bv.as_deref());
            rope(&mut q, c.n_heads, hd, start_pos, c.rope_theta, c.rope_layout);
            rope(&mut k, c.n_kv_heads, hd, start_pos, c.rope_theta, c.rope_layout);
            self.key_cache[l].extend_from_slice(&k);
            self.value_cache[l].extend_from_slice(&v);
            attention(&mut att, &q, &self.key_cache[l], &self.value_cache[l], c, start_pos);
            matmul(&mut proj, &att, &w.wo, q_dim);
            add(&mut x, &proj);

            // SwiGLU feed-forward block.
            rmsnorm(&mut xn, &x, &w.ffn_norm, c.rms_eps);
            matmul(&mut gate, &xn, &w.w_gate, d);
            matmul(&mut up, &xn, &w.w_up, d);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = silu(*g) * u; // gate becomes the FFN activation, (seq, ffn_hidden)
            }
            matmul(&mut proj, &gate, &w.w_down, c.ffn_hidden);
            add(&mut x, &proj);
        }
        self.n_cached = start_pos + seq;

        rmsnorm(&mut xn, &x, &self.output_norm, c.rms_eps);
        let lm_head = self.output.as_ref().unwrap_or(&self.token_embd); // (vocab, hidden)
        let mut logits = vec![0f32; seq * c.vocab_size]; // (seq, vocab)
        matmul(&mut logits, &xn, lm_head, d);
        logits
    }
}

/// The tensor `name` as f32, after checking its GGUF dims (`[in, out]` for a matrix).
fn weight(f: &GgufFile, name: &str, dims: &[usize]) -> Result<Vec<f32>, GgufError> {
    let t = f.tensor(name).ok_or_else(|| GgufError::MissingTensor { path: f.path.clone(), name: name.to_string() })?;
    if t.dims.iter().map(|&x| x as usize).ne(dims.iter().copied()) {
        return Err(GgufError::Malformed {
            path: f.path.clone(),
            reason: format!("tensor '{name}' has dims {:?}, the config implies {dims:?}", t.dims),
        });
    }
    f.dequantize(name)
}

/// `out[t] = x[t] / sqrt(mean(x[t]²) + eps) ⊙ weight` for every row `t`; x, out: (seq, dim).
fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for (o, xr) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        let mean_sq = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for i in 0..dim {
            o[i] = xr[i] * scale * weight[i];
        }
    }
}

/// `out[t][o] = Σ_i w[o][i]·x[t][i]`; x: (seq, n_in), w: (n_out, n_in), out: (seq, n_out).
/// Rows of `w` outermost, so each weight row is read once for all tokens.
fn matmul(out: &mut [f32], x: &[f32], w: &[f32], n_in: usize) {
    let n_out = w.len() / n_in;
    let seq = x.len() / n_in;
    debug_assert_eq!(out.len(), seq * n_out);
    for (o, row) in w.chunks_exact(n_in).enumerate() {
        for t in 0..seq {
            out[t * n_out + o] = dot(row, &x[t * n_in..(t + 1) * n_in]);
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Adds `bias` (n,) to every row of x (seq, n).
fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            add(row, b);
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Rotates every head of x (seq, heads, head_dim) in place; row `t` is at position
/// `start_pos + t`. FC `i` (the pair `layout.pair(i, head_dim)`) turns by the angle
/// `pos · theta^(-2i/head_dim)`.
fn rope(x: &mut [f32], n_heads: usize, head_dim: usize, start_pos: usize, theta: f32, layout: RopeLayout) {
    let row = n_heads * head_dim;
    for (t, xt) in x.chunks_exact_mut(row).enumerate() {
        let pos = (start_pos + t) as f64;
        for head in xt.chunks_exact_mut(head_dim) {
            for i in 0..head_dim / 2 {
                let freq = (theta as f64).powf(-2.0 * i as f64 / head_dim as f64);
                let (sin, cos) = (pos * freq).sin_cos();
                let (sin, cos) = (sin as f32, cos as f32);
                let (a, b) = layout.pair(i, head_dim);
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// Causal attention of the new rows of `q` over every cached position up to their own.
/// q, out: (seq, n_heads, head_dim); keys, values: (start_pos + seq, n_kv_heads, head_dim).
/// Query head `h` reads KV head `h / group_size`.
fn attention(out: &mut [f32], q: &[f32], keys: &[f32], values: &[f32], c: &ModelConfig, start_pos: usize) {
    let hd = c.head_dim;
    let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
    let seq = q.len() / q_dim;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0f32; start_pos + seq]; // (positions,)
    for t in 0..seq {
        let pos = start_pos + t;
        for h in 0..c.n_heads {
            let kvh = h / c.group_size();
            let qh = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd]; // (head_dim,)
            let scores = &mut scores[..=pos]; // (pos + 1,): causal, keys 0..=pos
            for (s, score) in scores.iter_mut().enumerate() {
                let ks = &keys[s * kv_dim + kvh * hd..s * kv_dim + (kvh + 1) * hd];
                *score = dot(qh, ks) * scale;
            }
            softmax(scores);
            let o = &mut out[t * q_dim + h * hd..t * q_dim + (h + 1) * hd]; // (head_dim,)
            o.fill(0.0);
            for (s, &p) in scores.iter().enumerate() {
                let vs = &values[s * kv_dim + kvh * hd..s * kv_dim + (kvh + 1) * hd];
                for i in 0..hd {
                    o[i] += p * vs[i];
                }
            }
        }
    }
}

fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::test_support::open_default_model;
    use crate::gguf::{GgufWriter, MetaValue};

    fn argmax(x: &[f32]) -> usize {
        let mut best = 0;
        for (i, &v) in x.iter().enumerate() {
            if v > x[best] {
                best = i;
            }
        }
        best
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Ids of vocabulary entries by their exact strings (byte-level BPE: 'Ġ' is a leading space).
    fn token_ids(f: &GgufFile, pieces: &[&str]) -> Vec<u32> {
        let vocab = f.get_str_array("tokenizer.ggml.tokens").unwrap();
        pieces
            .iter()
            .map(|p| {
                vocab.iter().position(|t| t == p).unwrap_or_else(|| panic!("token {p:?} is not in the vocabulary"))
                    as u32
            })
            .collect()
    }

    #[test]
    fn greedy_capital_of_france_is_paris() {
        let f = open_default_model();
        let mut m = ReferenceModel::load(&f).unwrap();
        let prompt = token_ids(&f, &["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]);
        let paris = token_ids(&f, &["ĠParis"])[0];
        let vocab = m.config().vocab_size;
        let logits = m.forward(&prompt, 0); // (5, vocab)
        assert_eq!(logits.len(), prompt.len() * vocab);
        assert!(logits.iter().all(|v| v.is_finite()));
        let next = argmax(&logits[(prompt.len() - 1) * vocab..]);
        let names = f.get_str_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(next as u32, paris, "first generated token is {:?}, expected \"ĠParis\"", names[next]);
        assert_eq!(m.n_cached(), prompt.len());
    }

    #[test]
    fn kv_cache_matches_a_single_pass() {
        let f = open_default_model();
        let mut m = ReferenceModel::load(&f).unwrap();
        check_kv_cache_consistency(&mut m, &token_ids(&f, &["The", "Ġcapital", "Ġof"]));
    }

    /// forward([a, b, c]) == forward([a, b]) then forward([c], 2), and rewinding to 2 and
    /// running [c] again gives the same logits.
    fn check_kv_cache_consistency(m: &mut ReferenceModel, abc: &[u32]) {
        let vocab = m.config().vocab_size;
        let all = m.forward(abc, 0); // (3, vocab)
        m.reset();
        let ab = m.forward(&abc[..2], 0); // (2, vocab)
        let c = m.forward(&abc[2..], 2); // (1, vocab)
        assert!(max_abs_diff(&all[..2 * vocab], &ab) < 1e-4);
        let diff = max_abs_diff(&all[2 * vocab..], &c);
        assert!(diff < 1e-4, "logits of c differ by {diff}");
        let again = m.forward(&abc[2..], 2);
        assert_eq!(again, c);
        assert_eq!(m.n_cached(), 3);
    }

    /// Deterministic values in [-scale, scale).
    fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    // A tiny model: 2 layers, width 32, 4 query heads over 2 KV heads of 8 dims, FFN 48, 40 tokens.
    const D: usize = 32;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const HD: usize = 8;
    const FFN: usize = 48;
    const VOCAB: usize = 40;
    const LAYERS: usize = 2;

    /// Adjacent → half-split order of the rows of a Q or K projection (heads of `HD` rows):
    /// row 2i of a head moves to i, row 2i+1 to i + HD/2.
    fn to_half_split(w: &[f32], row_len: usize) -> Vec<f32> {
        let mut out = vec![0f32; w.len()];
        for (r, row) in w.chunks_exact(row_len).enumerate() {
            let (head, j) = (r / HD, r % HD);
            let new = head * HD + if j % 2 == 0 { j / 2 } else { j / 2 + HD / 2 };
            out[new * row_len..(new + 1) * row_len].copy_from_slice(row);
        }
        out
    }

    /// Writes a tiny model of `arch` with random weights (Q/K/V biases included, the LM head
    /// untied) and loads it. For `qwen2` the Q/K rows are permuted to the half-split layout,
    /// so both architectures compute the same function.
    fn tiny_model(arch: &str) -> ReferenceModel {
        let half_split = arch == "qwen2";
        let qk = |w: Vec<f32>, row_len: usize| if half_split { to_half_split(&w, row_len) } else { w };
        let mut w = GgufWriter::new();
        let key = |k: &str| format!("{arch}.{k}");
        w.add_metadata("general.architecture", MetaValue::Str(arch.into()))
            .add_metadata(key("block_count"), MetaValue::U32(LAYERS as u32))
            .add_metadata(key("embedding_length"), MetaValue::U32(D as u32))
            .add_metadata(key("attention.head_count"), MetaValue::U32(HEADS as u32))
            .add_metadata(key("attention.head_count_kv"), MetaValue::U32(KV_HEADS as u32))
            .add_metadata(key("feed_forward_length"), MetaValue::U32(FFN as u32))
            .add_metadata(key("context_length"), MetaValue::U32(64))
            .add_metadata(key("rope.freq_base"), MetaValue::F32(100.0))
            .add_metadata(key("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5))
            .add_metadata(
                "tokenizer.ggml.tokens",
                MetaValue::Array((0..VOCAB).map(|i| MetaValue::Str(format!("t{i}"))).collect()),
            );
        let (q_dim, kv_dim) = (HEADS * HD, KV_HEADS * HD);
        let mut seed = 0;
        let mut rnd = |n: usize, scale: f32| {
            seed += 1;
            noise(n, seed, scale)
        };
        let mut add = |name: String, dims: &[u64], values: Vec<f32>| {
            w.add_f32(name, dims, &values).unwrap();
        };
        let (d, q, kv, ffn, vocab) = (D as u64, q_dim as u64, kv_dim as u64, FFN as u64, VOCAB as u64);
        add("token_embd.weight".into(), &[d, vocab], rnd(D * VOCAB, 1.0));
        add("output.weight".into(), &[d, vocab], rnd(D * VOCAB, 0.3));
        add("output_norm.weight".into(), &[d], rnd(D, 1.0).iter().map(|v| 1.0 + 0.5 * v).collect());
        for l in 0..LAYERS {
            let n = |s: &str| format!("blk.{l}.{s}");
            add(n("attn_norm.weight"), &[d], rnd(D, 1.0).iter().map(|v| 1.0 + 0.5 * v).collect());
            add(n("attn_q.weight"), &[d, q], qk(rnd(q_dim * D, 0.5), D));
            add(n("attn_k.weight"), &[d, kv], qk(rnd(kv_dim * D, 0.5), D));
            add(n("attn_v.weight"), &[d, kv], rnd(kv_dim * D, 0.3));
            add(n("attn_q.bias"), &[q], qk(rnd(q_dim, 0.5), 1));
            add(n("attn_k.bias"), &[kv], qk(rnd(kv_dim, 0.5), 1));
            add(n("attn_v.bias"), &[kv], rnd(kv_dim, 0.3));
            add(n("attn_output.weight"), &[q, d], rnd(D * q_dim, 0.3));
            add(n("ffn_norm.weight"), &[d], rnd(D, 1.0).iter().map(|v| 1.0 + 0.5 * v).collect());
            add(n("ffn_gate.weight"), &[d, ffn], rnd(FFN * D, 0.3));
            add(n("ffn_up.weight"), &[d, ffn], rnd(FFN * D, 0.3));
            add(n("ffn_down.weight"), &[ffn, d], rnd(D * FFN, 0.3));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("tiny-{arch}.gguf"));
        w.write(&path).unwrap();
        ReferenceModel::load(&GgufFile::open(&path).unwrap()).unwrap()
    }

    #[test]
    fn tiny_models_keep_the_kv_cache_consistent() {
        for arch in ["llama", "qwen2"] {
            let mut m = tiny_model(arch);
            assert!(m.config().qkv_bias && !m.config().tied_embeddings);
            check_kv_cache_consistency(&mut m, &[3, 17, 39]);
        }
    }

    #[test]
    fn half_split_model_equals_its_adjacent_twin() {
        let (mut llama, mut qwen) = (tiny_model("llama"), tiny_model("qwen2"));
        assert_eq!(qwen.config().rope_layout, RopeLayout::HalfSplit);
        let tokens: Vec<u32> = (0..12).map(|i| (i * 7 % VOCAB) as u32).collect();
        let a = llama.forward(&tokens, 0);
        let b = qwen.forward(&tokens, 0);
        let diff = max_abs_diff(&a, &b);
        assert!(diff < 1e-4, "logits differ by {diff}");
    }

    #[test]
    fn rope_rotates_each_pair_by_its_angle() {
        // One head of 4 dims at position 3, theta 100: FC 0 turns by 3 rad, FC 1 by 0.3 rad.
        let x = [1.0f32, 0.0, 0.0, 2.0];
        let mut adj = x;
        rope(&mut adj, 1, 4, 3, 100.0, RopeLayout::Adjacent);
        // Adjacent pairs (0,1), (2,3).
        let want = [3f32.cos(), 3f32.sin(), -2.0 * 0.3f32.sin(), 2.0 * 0.3f32.cos()];
        assert!(max_abs_diff(&adj, &want) < 1e-6, "{adj:?}");
        let mut hs = x;
        rope(&mut hs, 1, 4, 3, 100.0, RopeLayout::HalfSplit);
        // Half-split pairs (0,2), (1,3).
        let want = [3f32.cos(), -2.0 * 0.3f32.sin(), 3f32.sin(), 2.0 * 0.3f32.cos()];
        assert!(max_abs_diff(&hs, &want) < 1e-6, "{hs:?}");
    }
}
