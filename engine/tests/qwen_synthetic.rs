//! The qwen2 code paths on tiny synthetic GGUFs written here (no download): Q/K/V biases,
//! untied and tied LM heads, half-split RoPE in the operator, and every block type that has a
//! 4-bit-plane form (Q4_K, Q5_K, Q6_K with its 16-element blocks, Q5_0, Q5_1, Q8_0, Q4_0),
//! including a Q|K|V of mixed forms and 8-bit gathered embeddings. The ONNX Runtime graph
//! (`Model`) must give the logits of the plain f32 `ReferenceModel` within 1e-3 relative L2.
use fasa_engine::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};
use fasa_engine::reference::ReferenceModel;
use fasa_engine::{paths, AttnConfig, GenerateRequest, LoadOptions, Model, RopeLayout, Step};

// Widths are multiples of 256 so that every K-quant fits: width 256, 4 query heads over 2 KV
// heads of 64 dims (32 FCs), FFN 512, 2 layers.
const D: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = 64;
const FFN: usize = 512;
const LAYERS: usize = 2;

/// GPT-2's byte → printable char table (the byte-level BPE alphabet).
fn byte_chars() -> Vec<char> {
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
fn add_tokenizer(w: &mut GgufWriter) -> usize {
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
struct Rng(u64);
impl Rng {
    fn byte(&mut self) -> u8 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 56) as u8
    }
    fn unit(&mut self) -> f32 {
        self.byte() as f32 / 255.0
    }
}

fn h(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// Valid random blocks of `ty` for `n` elements whose values stay within about `±s`.
fn random_blocks(ty: GgmlType, n: usize, s: f32, rng: &mut Rng) -> Vec<u8> {
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
struct Types {
    embd: GgmlType,
    /// None: tied head.
    output: Option<GgmlType>,
    /// Per layer: q, k, v, o, gate, up, down.
    layers: [[GgmlType; 7]; LAYERS],
}

/// Writes the model and returns its path (inside `dir`).
fn write_model(dir: &std::path::Path, t: &Types) -> std::path::PathBuf {
    let mut w = GgufWriter::new();
    let key = |k: &str| format!("qwen2.{k}");
    w.add_metadata("general.architecture", MetaValue::Str("qwen2".into()))
        .add_metadata("general.name", MetaValue::Str("tiny qwen2".into()))
        .add_metadata(key("block_count"), MetaValue::U32(LAYERS as u32))
        .add_metadata(key("embedding_length"), MetaValue::U32(D as u32))
        .add_metadata(key("attention.head_count"), MetaValue::U32(HEADS as u32))
        .add_metadata(key("attention.head_count_kv"), MetaValue::U32(KV_HEADS as u32))
        .add_metadata(key("feed_forward_length"), MetaValue::U32(FFN as u32))
        .add_metadata(key("context_length"), MetaValue::U32(128))
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

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
    let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    num / den
}

fn load(path: &std::path::Path) -> Model {
    let ort = paths::default_ort_library();
    assert!(ort.is_file(), "ONNX Runtime library missing at {}: run scripts/setup", ort.display());
    let mut opts = LoadOptions::new(path, ort);
    (opts.max_sequences, opts.threads) = (1, 1);
    // ORT registers the operator's domain in a process-wide table: concurrent loads race
    // ("domain is already exist"), so the tests of this file load one at a time.
    static LOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = LOAD.lock().unwrap_or_else(|e| e.into_inner());
    Model::load(&opts).expect("load the synthetic model")
}

/// Graph vs reference: a prefill of `tokens`, then four decode steps on the reference's greedy
/// tokens, dense attention.
fn check(t: &Types) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), t);
    let mut model = load(&path);
    let c = model.info().config.clone();
    assert_eq!(c.rope_layout, RopeLayout::HalfSplit);
    assert!(c.qkv_bias);
    assert_eq!(c.tied_embeddings, t.output.is_none());
    let mut reference = ReferenceModel::load(&GgufFile::open(&path).unwrap()).unwrap();
    let vocab = c.vocab_size;
    let tokens = model.tokenizer().encode("hello world, 42 hello!", false).unwrap();
    assert!(tokens.contains(&model.tokenizer().id_of("hello").unwrap()), "{tokens:?}");
    let lease = model.pool().acquire().unwrap();
    model.configure_slot(lease.slot(), &AttnConfig::dense(), false);
    let got = model.forward(&tokens, 0, lease.slot()).unwrap();
    let all = reference.forward(&tokens, 0);
    let want = &all[(tokens.len() - 1) * vocab..];
    let e = rel_err(&got, want);
    assert!(e < 1e-3, "{}: prefill relative error {e}", describe(t));
    let mut next = fasa_engine::sampler::argmax(want);
    for step in 0..4 {
        let pos = tokens.len() + step;
        let got = model.forward(&[next], pos, lease.slot()).unwrap();
        let want = reference.forward(&[next], pos);
        let e = rel_err(&got, &want);
        assert!(e < 1e-3, "{}: decode step {step} relative error {e}", describe(t));
        next = fasa_engine::sampler::argmax(&want);
    }
    eprintln!("{}: graph weights {} bytes", describe(t), model.info().weight_bytes);
}

fn describe(t: &Types) -> String {
    format!("embd {:?}, head {:?}, layers {:?}", t.embd, t.output, t.layers)
}

use GgmlType::{Q4K, Q4_0, Q5K, Q5_0, Q5_1, Q6K, Q8_0};

#[test]
fn k_quants_with_untied_head_and_biases_match_the_reference() {
    check(&Types {
        // 8-bit gather with 16-element blocks; a Q4_K head.
        embd: Q6K,
        output: Some(Q4K),
        layers: [
            // Q|K|V of three forms (1 plane, 2 planes, block 16): joined by Concat.
            [Q4K, Q5K, Q6K, Q5_0, Q4K, Q5_1, Q6K],
            // The Qwen2.5-Coder mix: Q5_0 Q|K, Q8_0 V stack into one MatMulNBits group.
            [Q5_0, Q5_0, Q8_0, Q6K, Q5K, Q8_0, Q4K],
        ],
    });
}

#[test]
fn tied_head_and_legacy_quants_match_the_reference() {
    check(&Types {
        // Q5_0 embedding: 8-bit gather; tied, so also the 2-plane LM head.
        embd: Q5_0,
        output: None,
        layers: [[Q4_0, Q4_0, Q4_0, Q8_0, Q5_1, Q4_0, Q5_0], [Q6K, Q6K, Q6K, Q4K, Q6K, Q6K, Q5K]],
    });
}

#[test]
fn synthetic_qwen2_chats_through_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), &Types { embd: Q8_0, output: Some(Q6K), layers: [[Q5_0, Q5_0, Q8_0, Q5_0, Q5_0, Q5_0, Q6K]; LAYERS] });
    let mut model = load(&path);
    let mut req = GenerateRequest::chat("hello");
    req.max_tokens = 6;
    let prompt = model.encode_prompt(&req.prompt).unwrap();
    let t = model.tokenizer();
    let (start, end) = (t.id_of("<|im_start|>").unwrap(), t.id_of("<|im_end|>").unwrap());
    assert_eq!(prompt.iter().filter(|&&x| x == start).count(), 2, "ChatML from the GGUF template: {prompt:?}");
    assert!(prompt.contains(&end) && t.is_end_of_generation(end));
    let mut seq = model.start(req).unwrap();
    let mut steps = 0;
    while !matches!(model.step(&mut seq).unwrap(), Step::Finished { .. }) {
        steps += 1;
        assert!(steps <= 6);
    }
    assert!(seq.generated_tokens() >= 1 && seq.generated_tokens() <= 6);
}

#[test]
fn every_attention_mode_runs_on_half_split_qwen2() {
    // Sparse modes select FCs as the true rotation pairs (i, i + d/2) of the qwen2 layout; with
    // a budget covering the whole context each must give the dense logits, with a small one
    // finite logits.
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), &Types { embd: Q8_0, output: Some(Q6K), layers: [[Q5_0, Q5_0, Q8_0, Q4K, Q5K, Q5_0, Q6K]; LAYERS] });
    let mut model = load(&path);
    let prompt = model.tokenizer().encode(&"hello world, 1 2 3. ".repeat(5), false).unwrap();
    assert!(prompt.len() > 60, "{}", prompt.len());
    let mut run = |c: &AttnConfig| -> Vec<Vec<f32>> {
        let lease = model.pool().acquire().unwrap();
        model.configure_slot(lease.slot(), c, false);
        let mut out = vec![model.forward(&prompt, 0, lease.slot()).unwrap()];
        for (i, tok) in [5u32, 77, 200].into_iter().enumerate() {
            out.push(model.forward(&[tok], prompt.len() + i, lease.slot()).unwrap());
        }
        out
    };
    let dense = run(&AttnConfig::dense());
    for mode in fasa_engine::Mode::ALL.into_iter().filter(|&m| m != fasa_engine::Mode::Dense) {
        let all = run(&AttnConfig::baseline(mode, 256, 8));
        for (step, (a, b)) in all.iter().zip(&dense).enumerate() {
            let e = rel_err(a, b);
            assert!(e < 1e-5, "{mode} with the whole context in budget, step {step}: relative error {e}");
        }
        let small = run(&AttnConfig::baseline(mode, 40, 4));
        assert!(small.iter().flatten().all(|v| v.is_finite()), "{mode} at B = 40");
    }
}
