//! The qwen2 code paths on tiny synthetic GGUFs written here (no download): Q/K/V biases,
//! untied and tied LM heads, half-split RoPE in the operator, and every block type that has a
//! 4-bit-plane form (Q4_K, Q5_K, Q6_K with its 16-element blocks, Q5_0, Q5_1, Q8_0, Q4_0),
//! including a Q|K|V of mixed forms and 8-bit gathered embeddings. The ONNX Runtime graph
//! (`Model`) must give the logits of the plain f32 `ReferenceModel` within 1e-3 relative L2.
mod support;

use fasa_engine::gguf::{GgmlType, GgufFile};
use fasa_engine::reference::ReferenceModel;
use fasa_engine::{paths, Activations, AttnConfig, GenerateRequest, LoadOptions, Model, RopeLayout, Step};
use support::{write_model, Types, LAYERS};

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
    // The exact weight conversion is what is checked: f32 activations.
    opts.activations = Activations::F32;
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
