//! The real Qwen2.5-Coder-0.5B-Instruct (qwen2: half-split RoPE, Q/K/V biases, untied head,
//! Q5_0/Q8_0/Q4_K/Q6_K weights, 7 query heads per KV head, 152k vocabulary) through the ONNX
//! Runtime graph against the f32 reference forward pass, and a greedy chat answer.
//!
//! CI-optional: the model is 491 MB, so these tests are `#[ignore]`d (reported as ignored, never
//! passed); run them with `cargo test -p fasa-engine --release --test qwen_real -- --ignored`
//! after `fasactl models pull qwen2.5-coder-0.5b`. With `--ignored` and no model they fail,
//! saying so.
use std::time::Instant;

use fasa_engine::catalog::QWEN25_CODER_05B;
use fasa_engine::gguf::GgufFile;
use fasa_engine::reference::ReferenceModel;
use fasa_engine::{paths, Activations, AttnConfig, GenerateRequest, LoadOptions, Model, RopeLayout, Step};

fn qwen_path() -> std::path::PathBuf {
    let p = paths::models_dir().join(QWEN25_CODER_05B.file);
    assert!(p.is_file(), "{} is missing: run `fasactl models pull {}` first", p.display(), QWEN25_CODER_05B.name);
    p
}

fn load() -> Model {
    let ort = paths::default_ort_library();
    assert!(ort.is_file(), "ONNX Runtime library missing at {}: run scripts/setup", ort.display());
    let t = Instant::now();
    let mut opts = LoadOptions::new(qwen_path(), ort);
    (opts.max_sequences, opts.max_context) = (1, 4096);
    // Against the f32 reference: exact f32 activations.
    opts.activations = Activations::F32;
    // ORT registers the operator's domain in a process-wide table: concurrent loads race.
    static LOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let model = {
        let _one = LOAD.lock().unwrap_or_else(|e| e.into_inner());
        Model::load(&opts).expect("load Qwen2.5-Coder-0.5B")
    };
    let gguf = QWEN25_CODER_05B.size;
    let w = model.info().weight_bytes;
    eprintln!("loaded in {:.1}s: graph weights {:.1} MiB vs GGUF {:.1} MiB ({:.2}×)", t.elapsed().as_secs_f32(), w as f64 / 1048576.0, gguf as f64 / 1048576.0, w as f64 / gguf as f64);
    model
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
    let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    num / den
}

#[test]
#[ignore = "needs the 491 MB Qwen2.5-Coder-0.5B: fasactl models pull qwen2.5-coder-0.5b"]
fn qwen_logits_match_reference() {
    let mut model = load();
    let c = model.info().config.clone();
    assert_eq!((c.architecture.as_str(), c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim), ("qwen2", 24, 14, 2, 64));
    assert_eq!((c.rope_layout, c.qkv_bias, c.tied_embeddings, c.vocab_size, c.context_length), (RopeLayout::HalfSplit, true, false, 151936, 32768));
    let mut reference = ReferenceModel::load(&GgufFile::open(&qwen_path()).unwrap()).unwrap();
    let vocab = c.vocab_size;
    let chat = "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n<|im_start|>assistant\n";
    for (i, (text, special)) in [("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", false), (chat, true)].into_iter().enumerate() {
        let tokens = model.tokenizer().encode(text, special).unwrap();
        let lease = model.pool().acquire().unwrap();
        model.configure_slot(lease.slot(), &AttnConfig::dense(), false);
        reference.reset();
        let t = Instant::now();
        let got = model.forward(&tokens, 0, lease.slot()).unwrap();
        let graph_s = t.elapsed().as_secs_f32();
        let all = reference.forward(&tokens, 0);
        let want = &all[(tokens.len() - 1) * vocab..];
        let e = rel_err(&got, want);
        eprintln!("prompt {i}: {} tokens, prefill {graph_s:.2}s, relative error {e:.2e}", tokens.len());
        assert!(e < 1e-3, "prompt {i}: prefill relative error {e}");
        let mut next = fasa_engine::sampler::argmax(want);
        for step in 0..3 {
            let pos = tokens.len() + step;
            let got = model.forward(&[next], pos, lease.slot()).unwrap();
            let want = reference.forward(&[next], pos);
            let e = rel_err(&got, &want);
            eprintln!("prompt {i} step {step}: token {:?}, relative error {e:.2e}", model.tokenizer().decode(&[next]).unwrap());
            assert!(e < 1e-3, "prompt {i} step {step}: decode relative error {e}");
            next = fasa_engine::sampler::argmax(&want);
        }
    }
}

#[test]
#[ignore = "needs the 491 MB Qwen2.5-Coder-0.5B: fasactl models pull qwen2.5-coder-0.5b"]
fn qwen_greedy_chat_writes_a_python_function() {
    let mut model = load();
    let mut req = GenerateRequest::chat("Write a Python function `square(x)` that returns x squared. Reply with only the code.");
    req.max_tokens = 80;
    let mut seq = model.start(req).unwrap();
    let (mut text, t, mut first) = (String::new(), Instant::now(), None);
    let reason = loop {
        match model.step(&mut seq).unwrap() {
            Step::Text(s) => text.push_str(&s),
            Step::Finished { text: s, reason } => {
                text.push_str(&s);
                break reason;
            }
        }
        first.get_or_insert(t.elapsed());
    };
    let n = seq.generated_tokens();
    let first = first.unwrap_or_default();
    let decode_s = (t.elapsed() - first).as_secs_f32();
    eprintln!("answer ({reason:?}, {n} tokens; prefill {} tokens + first token {:.2}s, then {:.1} tokens/s):\n{text}", seq.prompt_tokens(), first.as_secs_f32(), (n.saturating_sub(1)) as f32 / decode_s);
    assert!(text.contains("def square(x"), "{text}");
    assert!(text.contains("return") && (text.contains("x * x") || text.contains("x ** 2") || text.contains("x**2") || text.contains("x*x")), "{text}");
}
