//! The default `fasa` decode on the real model at a 2.3k-token context gives the same logits on
//! one thread as on two, where two threads split stage 1 into parts of the context (3 KV groups
//! do not share out over 2 threads) and run selections and per-head attention as ordered work
//! items (`attention::fasa_c`). Only the rounding of the parts' softmax merge differs.
use fasa_engine::calibrate::default_calibration_texts;
use fasa_engine::{paths, AttnConfig, LoadOptions, Model, Prompt};

fn load(threads: usize) -> Model {
    let (m, o) = (paths::default_model(), paths::default_ort_library());
    assert!(m.is_file(), "model missing at {}: run scripts/setup", m.display());
    let opts = LoadOptions { max_sequences: 1, max_context: 4096, threads, ..LoadOptions::new(&m, &o) };
    Model::load(&opts).expect("load")
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

#[test]
fn two_threads_decode_as_one() {
    let (mut one, mut two) = (load(1), load(2));
    let text: String = default_calibration_texts().into_iter().map(|(_, t)| t).collect::<Vec<_>>().join("\n");
    let mut tokens = one.encode_prompt(&Prompt::Raw(text.repeat(4))).unwrap();
    assert!(tokens.len() >= 2300, "prompt text too short: {} tokens", tokens.len());
    tokens.truncate(2300);
    let cfg = one.default_attention().clone().for_context(2400);
    let (a, b) = (one.pool().acquire().unwrap(), two.pool().acquire().unwrap());
    let (mut lo_1, mut lo_2) = (vec![], vec![]);
    for (m, slot, lo) in [(&mut one, a.slot(), &mut lo_1), (&mut two, b.slot(), &mut lo_2)] {
        m.configure_slot(slot, &AttnConfig::dense(), false);
        for i in (0..tokens.len()).step_by(512) {
            *lo = m.forward(&tokens[i..(i + 512).min(tokens.len())], i, slot).unwrap();
        }
        m.configure_slot(slot, &cfg, false);
    }
    let mut worst = 0f32;
    for s in 0..12 {
        let next = argmax(&lo_1) as u32;
        lo_1 = one.forward(&[next], tokens.len() + s, a.slot()).unwrap();
        lo_2 = two.forward(&[next], tokens.len() + s, b.slot()).unwrap();
        let d = lo_1.iter().zip(&lo_2).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        worst = worst.max(d);
    }
    let (s1, s2) = (one.slot_stats(a.slot()), two.slot_stats(b.slot()));
    eprintln!("largest logit difference over 12 steps: {worst:.2e}; rows {} / {}", s1.rows, s2.rows);
    assert!(s1.sparse_layer_steps > 0 && s1.sparse_layer_steps == s2.sparse_layer_steps);
    assert!(worst <= 1e-2, "one vs two threads: logits differ by {worst}");
}
