//! Tiny synthetic qwen2 GGUFs written at test time (no download), shared by the test files that
//! `mod support;` this: a byte-level vocabulary with a few merges and ChatML controls, and
//! random valid blocks of every 4/5/6/8-bit type. Not every test file uses every item.
#![allow(dead_code)]
use fasa_engine::gguf::{GgmlType, GgufWriter, MetaValue};

// Widths are multiples of 256 so that every K-quant fits: width 256, 4 query heads over 2 KV
// heads of 64 dims (32 FCs), FFN 512, 2 layers.
pub const D: usize = 256;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HD: usize = 64;
pub const FFN: usize = 512;
pub const LAYERS: usize = 2;

/// GPT-2's byte → printable char table (the byte-level BPE alphabet).
pub fn byte_chars() -> Vec<char> {
    let mut bytes: Vec<u32> = (0x21..=0x7e).chain(0xa1..=0xac).chain(0xae..=0xff).collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut out = vec!['\0'; 256];
    for (b, c) in bytes.iter().zip(&chars) {
        out[*b as usize] = char::from_u32(*c).unwrap();
    }
    out
}

/// A tiny qwen2 vocabulary: the 256 byte tokens, merges up to "hello", and ChatML controls.
pub fn add_tokenizer(w: &mut GgufWriter) -> usize {
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    let merged = ["he", "ll", "hell", "hello"];
    tokens.extend(merged.iter().map(|s| s.to_string()));
    let mut types = vec![1i32; tokens.len()];
    for control in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(control.into());
        types.push(3);
    }
    let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    w.add_metadata("tokenizer.ggml.model", MetaValue::Str("gpt2".into()))
        .add_metadata("tokenizer.ggml.pre", MetaValue::Str("qwen2".into()))
        .add_metadata("tokenizer.ggml.eos_token_id", MetaValue::U32(id("<|im_end|>")))
        .add_metadata("tokenizer.ggml.bos_token_id", MetaValue::U32(id("<|endoftext|>")))
        .add_metadata("tokenizer.ggml.merges", MetaValue::Array(["h e", "l l", "he ll", "hell o"].iter().map(|m| MetaValue::Str(m.to_string())).collect()))
        .add_metadata("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()))
        .add_metadata("tokenizer.chat_template", MetaValue::Str(template.into()));
    let n = tokens.len();
    w.add_metadata("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::Str).collect()));
    n
}

/// Deterministic bytes.
pub struct Rng(pub u64);
impl Rng {
    pub fn byte(&mut self) -> u8 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 56) as u8
    }
    pub fn unit(&mut self) -> f32 {
        self.byte() as f32 / 255.0
    }
}

fn h(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// Valid random blocks of `ty` for `n` elements whose values stay within about `±s`.
pub fn random_blocks(ty: GgmlType, n: usize, s: f32, rng: &mut Rng) -> Vec<u8> {
    let (per, size) = (ty.block_size().unwrap() as usize, ty.type_size().unwrap() as usize);
    let mut out = Vec::with_capacity(n / per * size);
    for _ in 0..n / per {
        let mut b: Vec<u8> = (0..size).map(|_| rng.byte()).collect();
        let jitter = 0.5 + rng.unit();
        match ty {
            GgmlType::Q4_0 => b[0..2].copy_from_slice(&h(jitter * s / 8.0)),
            GgmlType::Q5_0 => b[0..2].copy_from_slice(&h(jitter * s / 16.0)),
            GgmlType::Q8_0 => b[0..2].copy_from_slice(&h(jitter * s / 128.0)),
            GgmlType::Q5_1 => {
                b[0..2].copy_from_slice(&h(jitter * s / 16.0));
                b[2..4].copy_from_slice(&h(-jitter * s));
            }
            // d·sc·q − dmin·m with 6-bit sc, m: centred about zero on average.
            GgmlType::Q4K | GgmlType::Q5K => {
                let levels = if ty == GgmlType::Q4K { 15.0 } else { 31.0 };
                b[0..2].copy_from_slice(&h(jitter * 2.0 * s / (63.0 * levels)));
                b[2..4].copy_from_slice(&h(jitter * s / 63.0));
            }
            GgmlType::Q6K => b[208..210].copy_from_slice(&h(jitter * s / (127.0 * 32.0))),
            _ => unreachable!("{ty:?}"),
        }
        out.extend(b);
    }
    out
}

/// Tensor types of one synthetic model.
pub struct Types {
    pub embd: GgmlType,
    /// None: tied head.
    pub output: Option<GgmlType>,
    /// Per layer: q, k, v, o, gate, up, down.
    pub layers: [[GgmlType; 7]; LAYERS],
}

/// Writes the model (trained context 128) and returns its path (inside `dir`).
pub fn write_model(dir: &std::path::Path, t: &Types) -> std::path::PathBuf {
    write_model_ctx(dir, t, 128)
}

/// As `write_model`, with a trained context of `context` tokens.
pub fn write_model_ctx(dir: &std::path::Path, t: &Types, context: u32) -> std::path::PathBuf {
    let mut w = GgufWriter::new();
    let key = |k: &str| format!("qwen2.{k}");
    w.add_metadata("general.architecture", MetaValue::Str("qwen2".into()))
        .add_metadata("general.name", MetaValue::Str("tiny qwen2".into()))
        .add_metadata(key("block_count"), MetaValue::U32(LAYERS as u32))
        .add_metadata(key("embedding_length"), MetaValue::U32(D as u32))
        .add_metadata(key("attention.head_count"), MetaValue::U32(HEADS as u32))
        .add_metadata(key("attention.head_count_kv"), MetaValue::U32(KV_HEADS as u32))
        .add_metadata(key("feed_forward_length"), MetaValue::U32(FFN as u32))
        .add_metadata(key("context_length"), MetaValue::U32(context))
        .add_metadata(key("rope.freq_base"), MetaValue::F32(10000.0))
        .add_metadata(key("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-6));
    let vocab = add_tokenizer(&mut w);
    let mut rng = Rng(7);
    let f32s = |w: &mut GgufWriter, name: String, n: usize, base: f32, s: f32, rng: &mut Rng| {
        let v: Vec<f32> = (0..n).map(|_| base + s * (2.0 * rng.unit() - 1.0)).collect();
        w.add_f32(name, &[n as u64], &v).unwrap();
    };
    let mat = |w: &mut GgufWriter, name: String, ty: GgmlType, rows: usize, cols: usize, s: f32, rng: &mut Rng| {
        let bytes = random_blocks(ty, rows * cols, s, rng);
        w.add_tensor(name, &[cols as u64, rows as u64], ty, bytes).unwrap();
    };
    let (q, kv) = (HEADS * HD, KV_HEADS * HD);
    mat(&mut w, "token_embd.weight".into(), t.embd, vocab, D, 1.0, &mut rng);
    if let Some(ty) = t.output {
        mat(&mut w, "output.weight".into(), ty, vocab, D, 0.3, &mut rng);
    }
    f32s(&mut w, "output_norm.weight".into(), D, 1.0, 0.3, &mut rng);
    for (l, ty) in t.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{l}.{s}");
        f32s(&mut w, n("attn_norm.weight"), D, 1.0, 0.3, &mut rng);
        mat(&mut w, n("attn_q.weight"), ty[0], q, D, 0.3, &mut rng);
        mat(&mut w, n("attn_k.weight"), ty[1], kv, D, 0.3, &mut rng);
        mat(&mut w, n("attn_v.weight"), ty[2], kv, D, 0.3, &mut rng);
        // Large Q/K biases, as Qwen2 has: a wrong bias or rotation shows in the logits.
        f32s(&mut w, n("attn_q.bias"), q, 0.0, 1.0, &mut rng);
        f32s(&mut w, n("attn_k.bias"), kv, 0.0, 1.0, &mut rng);
        f32s(&mut w, n("attn_v.bias"), kv, 0.0, 0.3, &mut rng);
        mat(&mut w, n("attn_output.weight"), ty[3], D, q, 0.2, &mut rng);
        f32s(&mut w, n("ffn_norm.weight"), D, 1.0, 0.3, &mut rng);
        mat(&mut w, n("ffn_gate.weight"), ty[4], FFN, D, 0.3, &mut rng);
        mat(&mut w, n("ffn_up.weight"), ty[5], FFN, D, 0.3, &mut rng);
        mat(&mut w, n("ffn_down.weight"), ty[6], D, FFN, 0.2, &mut rng);
    }
    let path = dir.join("tiny-qwen2.gguf");
    w.write(&path).unwrap();
    path
}

/// Relative L2 distance of logits `a` from `b`; infinite when `a` has a non-finite value (a GPU
/// output left poisoned).
pub fn logits_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
    let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    if a.iter().any(|x| !x.is_finite()) { f32::INFINITY } else { num / den }
}

/// (argmax, top-1 minus top-2).
pub fn top2(x: &[f32]) -> (u32, f32) {
    let (mut i1, mut v1, mut v2) = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in x.iter().enumerate() {
        if v > v1 {
            (v2, i1, v1) = (v1, i, v);
        } else if v > v2 {
            v2 = v;
        }
    }
    (i1 as u32, v1 - v2)
}

/// The synthetic model the GPU tests decode (`gpu_op`, `gpu_mem`, `cuda_ep`): a mix of the 4–8-bit
/// types over its layers, a trained context of 1024.
pub fn write_gpu_model(dir: &std::path::Path) -> std::path::PathBuf {
    use GgmlType::{Q4K, Q5K, Q5_0, Q6K, Q8_0};
    write_model_ctx(dir, &Types { embd: Q8_0, output: Some(Q6K), layers: [[Q5_0, Q5_0, Q8_0, Q4K, Q5K, Q5_0, Q6K]; LAYERS] }, 1024)
}

/// Load options of the GPU tests: f32 activations (they compare attention paths, and int8
/// activation rounding would turn their fp16-vs-f32 differences into steps of whole quantization
/// levels), a context of 512, `sequences` slots, on execution provider `ep`.
pub fn gpu_test_options(path: &std::path::Path, gpu: bool, ep: fasa_engine::ExecutionProvider, sequences: usize) -> fasa_engine::LoadOptions {
    let ort = fasa_engine::paths::default_ort_library();
    assert!(ort.is_file(), "ONNX Runtime library missing at {}: run scripts/setup or set FASA_ORT_LIB", ort.display());
    fasa_engine::LoadOptions { max_sequences: sequences, max_context: 512, gpu, activations: fasa_engine::Activations::F32, execution_provider: ep, ..fasa_engine::LoadOptions::new(path, ort) }
}

/// `n` deterministic token ids over the byte vocabulary; `salt` gives another sequence.
pub fn byte_prompt(n: usize, salt: u64) -> Vec<u32> {
    (0..n as u64).map(|i| ((i * 2654435761 + salt) >> 7) as u32 % 256).collect()
}
