//! The decoder graph under ONNX Runtime's CUDA execution provider (`ExecutionProvider::Cuda`)
//! against the CPU path, on the tiny synthetic qwen2 of `gpu_op.rs` (no download).
//!
//! Its own test binary: a process loads one ONNX Runtime library, and the CUDA provider needs
//! the onnxruntime-gpu build's (`FASA_ORT_LIB`); scripts/setup fetches the CPU build, whose lack
//! of the provider the first test checks. The second needs an NVIDIA GPU and that build: ignored
//! in CI; on the device run with `--include-ignored` (bench/gpu/run.sh does, when it was given
//! the library).
//!
//! Tolerance: under the CUDA provider the weight matmuls run in cuBLAS/CUDA kernels (TF32 where
//! ORT enables it) instead of the CPU's f32 MLAS, and attention reads the fp16 GPU mirror, so
//! logits differ from the CPU path's by a few 1e-3 (relative L2); the sparse modes can also swap
//! a near-tied row. Bounds as `gpu_op.rs`: dense ≤ 1e-2 at every step, sparse ≤ 1e-2 at 90% of
//! the steps and ≤ 0.1 at all, greedy tokens equal wherever the CPU's top-2 margin exceeds 0.05.
mod support;

use fasa_engine::{paths, runtime, AttnConfig, ExecutionProvider, LoadOptions, Model};
use support::{byte_prompt, gpu_test_options, logits_rel_err as rel_err, top2, write_gpu_model as synthetic, LAYERS};

const PROMPT: usize = 320;
const STEPS: usize = 40;
const BUDGET: usize = 64;

fn options(path: &std::path::Path, gpu: bool, ep: ExecutionProvider) -> LoadOptions {
    gpu_test_options(path, gpu, ep, 1)
}

/// Without the provider in the library, `cuda` is refused with the reason and `auto` falls back
/// to the CPU; with it (the device), `cpu` still gets the CPU.
#[test]
fn the_provider_is_chosen_or_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path());
    let cpu = Model::load(&options(&path, false, ExecutionProvider::Cpu)).expect("load on the CPU provider");
    assert_eq!(cpu.info().execution_provider, ExecutionProvider::Cpu);
    if runtime::has_cuda_provider() {
        eprintln!("this ONNX Runtime library has the CUDA provider: the refusal without it is not checked here");
        let e = Model::load(&options(&path, false, ExecutionProvider::Cuda)).err().expect("cuda without the GPU path must be refused").to_string();
        assert!(e.contains("needs the GPU path"), "{e}");
        return;
    }
    let e = Model::load(&options(&path, true, ExecutionProvider::Cuda)).err().expect("cuda without the provider must be refused").to_string();
    assert!(e.contains("no CUDA execution provider") && e.contains("FASA_ORT_LIB"), "{e}");
    let auto = Model::load(&options(&path, true, ExecutionProvider::Auto)).expect("auto loads on the CPU provider");
    assert_eq!(auto.info().execution_provider, ExecutionProvider::Cpu);
}

#[test]
#[ignore = "needs an NVIDIA GPU and onnxruntime-gpu's library: run on the device with --include-ignored (FASA_ORT_LIB, its CUDA libraries on LD_LIBRARY_PATH)"]
fn cuda_provider_matches_the_cpu_path() {
    // Outputs poisoned (NaN) before every GPU step: an unwritten row fails the step.
    std::env::set_var("FASA_GPU_POISON", "1");
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path());
    let mut cpu = Model::load(&options(&path, false, ExecutionProvider::Cpu)).expect("load on the CPU");
    assert!(runtime::has_cuda_provider(), "this ONNX Runtime library ({}) has no CUDA execution provider", paths::default_ort_library().display());
    let mut gpu = Model::load(&options(&path, true, ExecutionProvider::Auto)).expect("load on the CUDA provider");
    assert_eq!(gpu.info().execution_provider, ExecutionProvider::Cuda, "auto with the provider and a GPU takes CUDA");
    let prompt = byte_prompt(PROMPT, 12345);
    let decode_steps = (STEPS * LAYERS) as u64;
    let mut failures = vec![];
    for cfg in [AttnConfig::dense(), AttnConfig::fasa(BUDGET, 4), AttnConfig::paper(BUDGET, 4)] {
        let mode = cfg.mode.as_str();
        let (lc, lg) = (cpu.pool().acquire().unwrap(), gpu.pool().acquire().unwrap());
        cpu.configure_slot(lc.slot(), &cfg, false);
        gpu.configure_slot(lg.slot(), &cfg, false);
        // Prefill: the operator's CPU path, its output uploaded to ORT's device buffer.
        let mut lo_c = cpu.forward(&prompt, 0, lc.slot()).unwrap();
        let lo_g = gpu.forward(&prompt, 0, lg.slot()).unwrap();
        let pre = rel_err(&lo_g, &lo_c);
        let (mut errs, mut clear, mut disagree) = (vec![], 0, 0);
        for s in 0..STEPS {
            let (next, _) = top2(&lo_c);
            let pos = prompt.len() + s;
            lo_c = cpu.forward(&[next], pos, lc.slot()).unwrap();
            let lo_g = gpu.forward(&[next], pos, lg.slot()).unwrap();
            errs.push(rel_err(&lo_g, &lo_c));
            let ((tc, margin), (tg, _)) = (top2(&lo_c), top2(&lo_g));
            if margin > 0.05 {
                clear += 1;
                disagree += usize::from(tc != tg);
            }
        }
        let st = gpu.slot_stats(lg.slot());
        let mut sorted = errs.clone();
        sorted.sort_by(f32::total_cmp);
        let (median, p90, worst) = (sorted[STEPS / 2], sorted[STEPS * 9 / 10 - 1], sorted[STEPS - 1]);
        eprintln!("{mode:>10}: prefill logits rel-L2 {pre:.2e}; decode median {median:.2e}, p90 {p90:.2e}, max {worst:.2e}; greedy tokens differ at {disagree}/{clear} clear-margin steps; layer-steps on ORT's stream {}/{decode_steps}", st.ort_stream_steps);
        if pre > 1e-2 {
            failures.push(format!("{mode}: prefill logits differ by {pre:.2e}"));
        }
        if st.ort_stream_steps != decode_steps || st.gpu_layer_steps != decode_steps {
            failures.push(format!("{mode}: {} layer-steps on ORT's stream, {} on the GPU (want {decode_steps} each)", st.ort_stream_steps, st.gpu_layer_steps));
        }
        let sparse = cfg.mode != fasa_engine::Mode::Dense;
        if (!sparse && worst > 1e-2) || (sparse && (p90 > 1e-2 || worst > 0.1)) {
            failures.push(format!("{mode}: logits differ beyond the tolerance (p90 {p90:.2e}, max {worst:.2e})"));
        }
        if disagree > 0 {
            failures.push(format!("{mode}: greedy tokens differ at {disagree} clear-margin steps"));
        }
    }
    if let Some(e) = gpu.pool().gpu().and_then(|m| m.last_error()) {
        failures.push(format!("a GPU step failed and ran on the CPU: {e}"));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
