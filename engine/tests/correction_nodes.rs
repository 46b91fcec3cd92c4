//! The 4-bit weights' correction term as standard ONNX nodes (the graph ORT's CUDA provider gets,
//! `build_decoder(.., cuda = true)`) against the CPU's `BlockCorrection` custom op, both run on
//! the CPU provider here (no GPU needed): a synthetic qwen2 whose every matmul carries a
//! correction, prefill and decode logits equal to f32 rounding.
//!
//! Its own test binary: the second model is built with `FASA_EXPERIMENT_CORRECTION=nodes`, a
//! process-wide switch read at load.
mod support;

use fasa_engine::gguf::GgmlType::{Q4K, Q5K, Q5_1, Q6K, Q8_0};
use fasa_engine::gguf::GgufFile;
use fasa_engine::{paths, Activations, AttnConfig, ExecutionProvider, LoadOptions, Model, ModelConfig};
use support::{logits_rel_err, write_model_ctx, Types, LAYERS};

fn load(path: &std::path::Path) -> Model {
    let opts = LoadOptions { max_sequences: 1, max_context: 256, gpu: false, activations: Activations::F32, execution_provider: ExecutionProvider::Cpu, ..LoadOptions::new(path, paths::default_ort_library()) };
    Model::load(&opts).expect("load the synthetic model")
}

/// Logits of a 48-token prefill, then of 6 decode steps fed fixed tokens.
fn run(m: &mut Model) -> Vec<Vec<f32>> {
    let lease = m.pool().acquire().unwrap();
    m.configure_slot(lease.slot(), &AttnConfig::dense(), false);
    let prompt: Vec<u32> = (0..48u32).map(|i| (i * 37 + 11) % 256).collect();
    let mut out = vec![m.forward(&prompt, 0, lease.slot()).unwrap()];
    for s in 0..6u32 {
        out.push(m.forward(&[(s * 53 + 7) % 256], prompt.len() + s as usize, lease.slot()).unwrap());
    }
    out
}

#[test]
fn correction_nodes_match_the_custom_op() {
    let dir = tempfile::tempdir().unwrap();
    let layer = [Q4K, Q5_1, Q8_0, Q4K, Q5K, Q5_1, Q4K];
    let path = write_model_ctx(dir.path(), &Types { embd: Q8_0, output: Some(Q6K), layers: [layer; LAYERS] }, 256);

    // The two graph forms: the CPU's has the custom op, the CUDA provider's none of it.
    let f = GgufFile::open(&path).unwrap();
    let c = ModelConfig::from_gguf(&f).unwrap();
    let has_op = |cuda| {
        let g = fasa_engine::graph::build_decoder(&f, &c, Activations::F32, cuda).unwrap();
        g.onnx.windows(fasa_engine::graph::CORR_OP_NAME.len()).any(|w| w == fasa_engine::graph::CORR_OP_NAME.as_bytes())
    };
    assert!(has_op(false), "the CPU graph should correct through BlockCorrection");
    assert!(!has_op(true), "the CUDA provider's graph should have no BlockCorrection node");

    let want = run(&mut load(&path));
    std::env::set_var("FASA_EXPERIMENT_CORRECTION", "nodes");
    let got = run(&mut load(&path));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let e = logits_rel_err(g, w);
        assert!(e <= 1e-5, "step {i} (0 = prefill): logits differ by {e:.2e}");
    }
}
