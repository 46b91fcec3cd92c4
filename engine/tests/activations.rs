//! int8 activations (the default, as llama.cpp multiplies its quantized weights) against exact
//! f32 activations on the real default model, teacher-forced over prose: what the faster
//! matmuls cost in next-token distribution. Dense attention in both, so only the matmuls differ.
use fasa_engine::calibrate::default_calibration_texts;
use fasa_engine::{paths, Activations, AttnConfig, LoadOptions, Model, Prompt};

fn load(activations: Activations) -> Model {
    let (m, o) = (paths::default_model(), paths::default_ort_library());
    assert!(m.is_file(), "model missing at {}: run scripts/setup", m.display());
    let opts = LoadOptions { max_sequences: 1, max_context: 2048, activations, ..LoadOptions::new(&m, &o) };
    Model::load(&opts).expect("load")
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| v as f64 - z).collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

#[test]
fn int8_activations_keep_the_next_token_distribution() {
    let (mut exact, mut fast) = (load(Activations::F32), load(Activations::Int8));
    assert_eq!(fast.info().activations, Activations::Int8);
    let text: String = default_calibration_texts().into_iter().map(|(_, t)| t).collect::<Vec<_>>().join("\n");
    let mut tokens = exact.encode_prompt(&Prompt::Raw(text)).unwrap();
    // 512 tokens of context, then 256 positions scored one decode step at a time.
    let (ctx, steps) = (512, 256);
    assert!(tokens.len() > ctx + steps, "text too short: {} tokens", tokens.len());
    tokens.truncate(ctx + steps + 1);
    let (a, b) = (exact.pool().acquire().unwrap(), fast.pool().acquire().unwrap());
    let (mut lo_e, mut lo_f) = (vec![], vec![]);
    for (m, slot, lo) in [(&mut exact, a.slot(), &mut lo_e), (&mut fast, b.slot(), &mut lo_f)] {
        m.configure_slot(slot, &AttnConfig::dense(), false);
        *lo = m.forward(&tokens[..ctx], 0, slot).unwrap();
    }
    let (mut kl, mut agree, mut worst) = (0f64, 0usize, 0f64);
    for s in 0..steps {
        let (p, q) = (log_softmax(&lo_e), log_softmax(&lo_f));
        let k: f64 = p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum();
        kl += k;
        worst = worst.max(k);
        agree += (argmax(&lo_e) == argmax(&lo_f)) as usize;
        let (pos, next) = (ctx + s, tokens[ctx + s]);
        lo_e = exact.forward(&[next], pos, a.slot()).unwrap();
        lo_f = fast.forward(&[next], pos, b.slot()).unwrap();
    }
    let (kl, top1) = (kl / steps as f64, agree as f64 / steps as f64);
    eprintln!("int8 vs f32 activations over {steps} positions: mean KL {kl:.5}, worst {worst:.4}, top-1 agreement {top1:.3}");
    // Bounds well under what sparse attention itself costs (`fasa` at B = 256: KL ~0.02,
    // top-1 ~0.92 against dense) and far above what a broken quantization gives.
    assert!(kl <= 0.01, "mean KL {kl}");
    assert!(top1 >= 0.93, "top-1 agreement {top1}");
}
