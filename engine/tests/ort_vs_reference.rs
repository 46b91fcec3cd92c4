//! The ONNX Runtime graph (4/8-bit weights, f32 activations, FasaAttention in dense mode)
//! against the plain f32 reference forward pass, on the real default model: several prompts,
//! prefill and decode steps.
use fasa_engine::gguf::GgufFile;
use fasa_engine::reference::ReferenceModel;
use fasa_engine::{paths, Activations, LoadOptions, Model};

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
    let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    num / den
}

fn require_model() -> (std::path::PathBuf, std::path::PathBuf) {
    let (m, o) = (paths::default_model(), paths::default_ort_library());
    assert!(m.is_file(), "model missing at {}: run scripts/setup", m.display());
    assert!(o.is_file(), "ONNX Runtime library missing at {}: run scripts/setup", o.display());
    (m, o)
}

#[test]
fn logits_match_reference_on_prompts_and_decode_steps() {
    let (m, o) = require_model();
    // Exact f32 activations: the int8 default is measured against this in `activations.rs`.
    let mut model = Model::load(&LoadOptions { activations: Activations::F32, ..LoadOptions::new(&m, &o) }).expect("load");
    let mut reference = ReferenceModel::load(&GgufFile::open(&m).unwrap()).unwrap();
    let vocab = model.info().config.vocab_size;
    let prompts = ["The capital of France is", "fn main() { println!(\"hi\"); }\n// 12345", "Once upon a time, in a land far away, there lived"];
    for (i, p) in prompts.iter().enumerate() {
        let tokens = model.tokenizer().encode(p, false).unwrap();
        let lease = model.pool().acquire().unwrap();
        reference.reset();
        // Prefill: last position's logits.
        let got = model.forward(&tokens, 0, lease.slot()).unwrap();
        let all = reference.forward(&tokens, 0);
        let want = &all[(tokens.len() - 1) * vocab..];
        let e = rel_err(&got, want);
        assert!(e < 1e-3, "prompt {i}: prefill relative error {e}");
        // Three decode steps feeding the reference's greedy tokens.
        let mut pos = tokens.len();
        let mut next = fasa_engine::sampler::argmax(want);
        for step in 0..3 {
            let got = model.forward(&[next], pos, lease.slot()).unwrap();
            let want = reference.forward(&[next], pos);
            let e = rel_err(&got, &want);
            assert!(e < 1e-3, "prompt {i} step {step}: decode relative error {e}");
            next = fasa_engine::sampler::argmax(&want);
            pos += 1;
        }
    }
}
