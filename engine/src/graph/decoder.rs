//! Builds the decoder graph of a llama/qwen2 GGUF.
//!
//! Inputs: `input_ids` i64 `(S,)`, `position` i64 `(1,)`, `slot` i64 `(1,)`.
//! Output: `logits` f32 `(1, vocab)` of the last of the S tokens.
//! Per layer: RMSNorm → fused QKV `MatMulNBits` (+bias) → `FasaAttention` (RoPE on the model's
//! true pairs: adjacent for `llama`, half-split `(i, i + d/2)` for `qwen2`) → o-proj → residual
//! fused into the next `SkipSimplifiedLayerNormalization` → SwiGLU FFN (gate|up fused).
//! Weights stay in their GGUF bits where an exact 4-bit-plane form exists (`quant`: Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); projections whose parts differ in form run apart
//! and are concatenated; other types fall back to an f32 `MatMul`. The token embedding is an
//! exact 8-bit `GatherBlockQuantized` for Q8_0/Q4_0/Q5_0/Q6_K, else an f32 table.
use super::builder::{Attr, GraphBuilder};
use super::proto::dtype;

use super::corr_op::CORR_OP_NAME;
use super::quant::{concat_rows, decompose, gather_u8, Decomposed};
use crate::attention::{OP_DOMAIN, OP_NAME};
use crate::gguf::{GgmlType, GgufFile};
use crate::{EngineError, ModelConfig, Result, RopeLayout};

pub struct DecoderGraph {
    /// Serialized ONNX model.
    pub onnx: Vec<u8>,
    /// Bytes of weights held as initializers.
    pub weight_bytes: u64,
}

fn bad(f: &GgufFile, reason: String) -> EngineError {
    EngineError::BadModel { path: f.path.clone(), reason }
}

/// `(n = out, k = in)` of a 2-D weight and its raw bytes.
fn weight<'f>(f: &'f GgufFile, name: &str) -> Result<(usize, usize, GgmlType, &'f [u8])> {
    let t = f.tensor(name).ok_or_else(|| bad(f, format!("tensor {name} is missing")))?;
    if t.dims.len() != 2 {
        return Err(bad(f, format!("tensor {name} has dims {:?}, expected 2-D", t.dims)));
    }
    Ok((t.dims[1] as usize, t.dims[0] as usize, t.ggml_type, f.tensor_bytes(t)))
}

fn vector(f: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let v = f.dequantize(name).map_err(|e| bad(f, e.to_string()))?;
    if v.len() != len {
        return Err(bad(f, format!("tensor {name} has {} elements, expected {len}", v.len())));
    }
    Ok(v)
}

struct Ctx<'a> {
    g: GraphBuilder,
    f: &'a GgufFile,
    /// `MatMulNBits` accuracy level: 0 = f32 activations (exact), 4 = int8 activations.
    accuracy_level: i64,
    /// Performance experiments only (wrong results): leave out the Q4_1 correction term.
    skip_correction: bool,
    /// The correction term as standard nodes (Reshape, ReduceSum, MatMul, Add), not the CPU-only
    /// `BlockCorrection`: under ORT's CUDA provider, where the custom op would make ORT copy x
    /// and y to the host and back at every corrected matmul (GPU run 26: 8 + 3 copies a layer).
    correction_nodes: bool,
}

impl Ctx<'_> {
    /// The weights `names` (same input width K) as one stacked plane form, when each converts
    /// exactly and all share block and plane count; also K and each part's rows N_i.
    fn stacked(&self, names: &[String]) -> Result<(usize, Vec<usize>, Option<Decomposed>)> {
        let mut parts = Vec::new();
        let mut k_all = None;
        for n in names {
            let (rows, k, ty, bytes) = weight(self.f, n)?;
            if *k_all.get_or_insert(k) != k {
                return Err(bad(self.f, format!("{n}: input width {k} differs from its siblings")));
            }
            parts.push((rows, ty, bytes));
        }
        let k = k_all.unwrap_or(0);
        let dec: Option<Vec<Decomposed>> = parts.iter().map(|&(rows, ty, bytes)| decompose(ty, bytes, rows, k)).collect();
        Ok((k, parts.iter().map(|p| p.0).collect(), dec.as_deref().and_then(concat_rows)))
    }

    /// `out = input · [W_0; W_1; …]ᵀ` (weights stacked along N): one `MatMulNBits` group when
    /// every part converts exactly to planes of the same block and count; else each part on its
    /// own (planes, or an f32 `MatMul` for types with no plane form) joined by a `Concat`.
    fn linear(&mut self, names: &[String], input: &str, out: &str) -> Result<usize> {
        let (k, rows, stacked) = self.stacked(names)?;
        let n_total: usize = rows.iter().sum();
        if let Some(w) = stacked {
            self.matmul_planes(out, &w, input);
        } else if names.len() > 1 {
            // Mixed forms (e.g. a Q6_K V next to Q5_0 Q and K): (S, n_i) each, joined on N.
            let mut outs = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let o = format!("{out}.part{i}");
                self.linear(std::slice::from_ref(name), input, &o)?;
                outs.push(o);
            }
            let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
            self.g.node("Concat", "", out, &refs, &[out], vec![("axis", Attr::Int(-1))]);
        } else {
            // f32 fallback: W (N, K) → transposed (K, N) for MatMul(A, B).
            let w = self.f.dequantize(&names[0]).map_err(|e| bad(self.f, e.to_string()))?;
            let mut wt = vec![0f32; k * n_total];
            for r in 0..n_total {
                for c in 0..k {
                    wt[c * n_total + r] = w[r * k + c];
                }
            }
            let wn = self.g.init_f32(&format!("{out}.w"), &[k, n_total], &wt);
            self.g.node("MatMul", "", out, &[input, &wn], &[out], vec![]);
        }
        Ok(n_total)
    }

    /// `outs[i] = input · W_iᵀ` for weights of one input: a single stacked `MatMulNBits` group
    /// then a `Split` when they stack (fewer, wider kernels: FFN gate|up), else one `linear` each.
    fn linears(&mut self, names: &[String], input: &str, outs: &[String]) -> Result<()> {
        let (_, rows, stacked) = self.stacked(names)?;
        match stacked {
            Some(w) => {
                let joined = format!("{}.joined", outs[0]);
                self.matmul_planes(&joined, &w, input);
                let sizes: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
                let split = self.g.init_i64(&format!("{joined}.split"), &[sizes.len()], &sizes);
                let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
                self.g.node("Split", "", &format!("{joined}.split_node"), &[&joined, &split], &refs, vec![("axis", Attr::Int(-1))]);
            }
            None => {
                for (name, out) in names.iter().zip(outs) {
                    self.linear(std::slice::from_ref(name), input, out)?;
                }
            }
        }
        Ok(())
    }

    /// `out = Σ_p MatMulNBits(input, plane_p) + BlockSum(input) · corrᵀ` (see `quant`).
    fn matmul_planes(&mut self, out: &str, w: &Decomposed, input: &str) {
        let nb = w.k / w.block;
        let mut terms = Vec::new();
        for (p, plane) in w.planes.iter().enumerate() {
            let b = self.g.init_u8(&format!("{out}.p{p}.q"), &[w.n, nb, w.block / 2], plane.packed.clone());
            let s = self.g.init_f32(&format!("{out}.p{p}.scales"), &[w.n * nb], &plane.scales);
            let y = format!("{out}.p{p}");
            let attrs = vec![
                ("K", Attr::Int(w.k as i64)),
                ("N", Attr::Int(w.n as i64)),
                ("bits", Attr::Int(4)),
                ("block_size", Attr::Int(w.block as i64)),
                ("accuracy_level", Attr::Int(self.accuracy_level)),
            ];
            self.g.node("MatMulNBits", "com.microsoft", &y, &[input, &b, &s], &[&y], attrs);
            terms.push(y);
        }
        let corr = w.correction.as_ref().filter(|_| !self.skip_correction);
        // Sum the planes' terms: into `out` itself unless a correction follows.
        let mut acc = terms[0].clone();
        for (i, t) in terms.iter().enumerate().skip(1) {
            let name = if i + 1 == terms.len() && corr.is_none() { out.to_string() } else { format!("{out}.sum{i}") };
            self.g.node("Add", "", &name, &[&acc, t], &[&name], vec![]);
            acc = name;
        }
        if let Some(corr) = corr {
            // corrᵀ: (K/B, N), block-major, for `BlockCorrection`.
            let mut t = vec![0f32; nb * w.n];
            for r in 0..w.n {
                for b in 0..nb {
                    t[b * w.n + r] = corr[r * nb + b];
                }
            }
            let c = self.g.init_f32(&format!("{out}.corr"), &[nb, w.n], &t);
            if self.correction_nodes {
                // x (S, K) → (S, K/B, B) → block sums (S, K/B) → · corrᵀ (S, N) → + the planes' sum.
                let (xb, bs, cy) = (format!("{out}.xb"), format!("{out}.bsum"), format!("{out}.cy"));
                let shape = self.g.init_i64(&format!("{out}.bshape"), &[3], &[0, nb as i64, w.block as i64]);
                let axes = self.g.init_i64(&format!("{out}.baxis"), &[1], &[-1]);
                self.g.node("Reshape", "", &xb, &[input, &shape], &[&xb], vec![]);
                self.g.node("ReduceSum", "", &bs, &[&xb, &axes], &[&bs], vec![("keepdims", Attr::Int(0))]);
                self.g.node("MatMul", "", &cy, &[&bs, &c], &[&cy], vec![]);
                self.g.node("Add", "", out, &[&acc, &cy], &[out], vec![]);
            } else {
                self.g.node(CORR_OP_NAME, OP_DOMAIN, out, &[input, &acc, &c], &[out], vec![("block", Attr::Int(w.block as i64))]);
            }
        } else if acc != out {
            self.g.node("Identity", "", out, &[&acc], &[out], vec![]);
        }
    }
}

/// How the weight matmuls take their activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// Exact f32 products with the GGUF weights (the reference's logits to 1e-3).
    F32,
    /// Activations quantized to int8 per 32-element block inside `MatMulNBits`, as llama.cpp
    /// does for its quantized weights (Q8_1 activations): the 4-bit products run on integer
    /// SIMD. Logits differ from f32 by a few percent (relative L2); what that costs in
    /// distribution, KL and top-1 agreement, is measured in `engine/tests/activations.rs`.
    #[default]
    Int8,
}

impl Activations {
    pub const ALL: [Activations; 2] = [Activations::F32, Activations::Int8];

    fn accuracy_level(self) -> i64 {
        match self {
            Activations::F32 => 0,
            Activations::Int8 => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Activations::F32 => "f32",
            Activations::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for Activations {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| format!("activations must be f32 or int8, not {s:?}"))
    }
}

/// `cuda`: the graph is for ORT's CUDA provider (see `Ctx::correction_nodes`;
/// `FASA_EXPERIMENT_CORRECTION=nodes` / `op` forces either form: tests check the nodes on the
/// CPU, benchmarks time the custom op under CUDA).
pub fn build_decoder(f: &GgufFile, c: &ModelConfig, activations: Activations, cuda: bool) -> Result<DecoderGraph> {
    let (d_model, d) = (c.hidden, c.head_dim);
    let env_flag = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<i64>().ok());
    let mut x = Ctx {
        g: GraphBuilder::new("fasa-decoder"),
        f,
        accuracy_level: activations.accuracy_level(),
        skip_correction: env_flag("FASA_EXPERIMENT_NO_CORRECTION") == Some(1),
        correction_nodes: match std::env::var("FASA_EXPERIMENT_CORRECTION").as_deref() {
            Ok("nodes") => true,
            Ok("op") => false,
            _ => cuda,
        },
    };
    x.g.input("input_ids", dtype::INT64, &[None]);
    x.g.input("position", dtype::INT64, &[Some(1)]);
    x.g.input("slot", dtype::INT64, &[Some(1)]);
    x.g.output("logits", dtype::FLOAT, &[Some(1), Some(c.vocab_size as i64)]);
    let eps = Attr::Float(c.rms_eps);

    // Token embedding (V, D): an exact 8-bit gather where the type allows (Q8_0, Q4_0, Q5_0,
    // Q6_K), else an f32 table.
    let (vocab, emb_k, emb_ty, emb_bytes) = weight(f, "token_embd.weight")?;
    if emb_k != d_model || vocab != c.vocab_size {
        return Err(bad(f, format!("token_embd.weight is ({vocab}, {emb_k}), expected ({}, {d_model})", c.vocab_size)));
    }
    match gather_u8(emb_ty, emb_bytes, vocab, d_model) {
        Some((q, s, block)) => {
            let q = x.g.init_u8("embed.q", &[vocab, d_model], q);
            let s = x.g.init_f32("embed.scales", &[vocab, d_model / block], &s);
            let attrs = vec![("gather_axis", Attr::Int(0)), ("quantize_axis", Attr::Int(1)), ("block_size", Attr::Int(block as i64)), ("bits", Attr::Int(8))];
            x.g.node("GatherBlockQuantized", "com.microsoft", "embed", &[&q, "input_ids", &s], &["x0"], attrs);
        }
        None => {
            let table = f.dequantize("token_embd.weight").map_err(|e| bad(f, e.to_string()))?;
            let t = x.g.init_f32("embed.table", &[vocab, d_model], &table);
            x.g.node("Gather", "", "embed", &[&t, "input_ids"], &["x0"], vec![("axis", Attr::Int(0))]);
        }
    }

    let w = x.g.init_f32("l0.attn_norm", &[d_model], &vector(f, "blk.0.attn_norm.weight", d_model)?);
    x.g.node("SimplifiedLayerNormalization", "", "l0.norm1", &["x0", &w], &["l0.h"], vec![("axis", Attr::Int(-1)), ("epsilon", eps)]);
    let qkv_width = (c.n_heads + 2 * c.n_kv_heads) * d;
    let mut resid = "x0".to_string();
    for l in 0..c.n_layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        let h = format!("l{l}.h");
        let names = [p("attn_q.weight"), p("attn_k.weight"), p("attn_v.weight")];
        let mut qkv = format!("l{l}.qkv");
        let width = x.linear(&names, &h, &qkv)?;
        if width != qkv_width {
            return Err(bad(f, format!("layer {l}: Q|K|V width {width}, expected {qkv_width}")));
        }
        if c.qkv_bias {
            let mut bias = vector(f, &p("attn_q.bias"), c.n_heads * d)?;
            bias.extend(vector(f, &p("attn_k.bias"), c.n_kv_heads * d)?);
            bias.extend(vector(f, &p("attn_v.bias"), c.n_kv_heads * d)?);
            let b = x.g.init_f32(&format!("l{l}.qkv_bias"), &[qkv_width], &bias);
            let biased = format!("l{l}.qkv_b");
            x.g.node("Add", "", &biased, &[&qkv, &b], &[&biased], vec![]);
            qkv = biased;
        }
        let attn = format!("l{l}.attn");
        let attrs = vec![
            ("layer", Attr::Int(l as i64)),
            ("n_heads", Attr::Int(c.n_heads as i64)),
            ("n_kv_heads", Attr::Int(c.n_kv_heads as i64)),
            ("head_dim", Attr::Int(d as i64)),
            ("rope_theta", Attr::Float(c.rope_theta)),
            ("rope_layout", Attr::Int(match c.rope_layout { RopeLayout::Adjacent => 0, RopeLayout::HalfSplit => 1 })),
        ];
        x.g.node(OP_NAME, OP_DOMAIN, &attn, &[&qkv, "position", "slot"], &[&attn], attrs);
        let o = format!("l{l}.o");
        x.linear(&[p("attn_output.weight")], &attn, &o)?;
        // h2 = norm(resid + o), resid' = resid + o.
        let (h2, mid) = (format!("l{l}.h2"), format!("l{l}.mid"));
        let w = x.g.init_f32(&format!("l{l}.ffn_norm"), &[d_model], &vector(f, &p("ffn_norm.weight"), d_model)?);
        x.g.node("SkipSimplifiedLayerNormalization", "com.microsoft", &format!("l{l}.norm2"), &[&resid, &o, &w], &[&h2, "", "", &mid], vec![("epsilon", Attr::Float(c.rms_eps))]);
        let (gate, up, sg, act, prod, down) = (format!("l{l}.gate"), format!("l{l}.up"), format!("l{l}.sg"), format!("l{l}.act"), format!("l{l}.prod"), format!("l{l}.down"));
        x.linears(&[p("ffn_gate.weight"), p("ffn_up.weight")], &h2, &[gate.clone(), up.clone()])?;
        x.g.node("Sigmoid", "", &sg, &[&gate], &[&sg], vec![]);
        x.g.node("Mul", "", &act, &[&gate, &sg], &[&act], vec![]);
        x.g.node("Mul", "", &prod, &[&act, &up], &[&prod], vec![]);
        x.linear(&[p("ffn_down.weight")], &prod, &down)?;
        // Next layer's input norm (or the final norm) fused with this residual add.
        let (next_h, next_resid, wname, wlabel) = if l + 1 < c.n_layers {
            (format!("l{}.h", l + 1), format!("l{}.x", l + 1), format!("blk.{}.attn_norm.weight", l + 1), format!("l{}.attn_norm", l + 1))
        } else {
            ("final.h".to_string(), "final.x".to_string(), "output_norm.weight".to_string(), "output_norm".to_string())
        };
        let w = x.g.init_f32(&wlabel, &[d_model], &vector(f, &wname, d_model)?);
        x.g.node("SkipSimplifiedLayerNormalization", "com.microsoft", &format!("l{l}.norm3"), &[&mid, &down, &w], &[&next_h, "", "", &next_resid], vec![("epsilon", Attr::Float(c.rms_eps))]);
        resid = next_resid;
    }

    // Logits of the last token only: (1, D) → (1, V).
    let starts = x.g.init_i64("last.starts", &[1], &[-1]);
    let ends = x.g.init_i64("last.ends", &[1], &[i64::MAX]);
    let axes = x.g.init_i64("last.axes", &[1], &[0]);
    x.g.node("Slice", "", "last", &["final.h", &starts, &ends, &axes], &["final.last"], vec![]);
    let head = if c.tied_embeddings { "token_embd.weight" } else { "output.weight" };
    x.linear(&[head.to_string()], "final.last", "logits")?;

    let weight_bytes = x.g.initializer_bytes;
    let onnx = x.g.finish(&[("", 17), ("com.microsoft", 1), (OP_DOMAIN, 1)]);
    Ok(DecoderGraph { onnx, weight_bytes })
}
