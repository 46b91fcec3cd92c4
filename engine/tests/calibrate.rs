//! Calibration on the real default model: the dominant FCs found on one text are largely the
//! ones found on a disjoint text (the paper's "task-agnostic" claim, checked on ours), the
//! profile fits the model, and it survives a JSON round trip.
use fasa_engine::attention::Profile;
use fasa_engine::calibrate::{calibrate, default_calibration_texts, default_eval_texts, generated_text, top_overlap, CalibrateOptions};
use fasa_engine::{paths, LoadOptions, Model};

fn load() -> Model {
    let (m, o) = (paths::default_model(), paths::default_ort_library());
    assert!(m.is_file(), "model missing at {}: run scripts/setup", m.display());
    Model::load(&LoadOptions::new(&m, &o)).expect("load")
}

#[test]
fn top_fcs_are_stable_across_disjoint_texts() {
    let mut model = load();
    // Two disjoint texts: a calibration licence and an evaluation licence, else model-written.
    let mut texts: Vec<(String, String)> = default_calibration_texts().into_iter().take(1).chain(default_eval_texts().into_iter().take(1)).collect();
    while texts.len() < 2 {
        let seed = texts.len() as u64 + 10;
        texts.push((format!("generated {seed}"), generated_text(&mut model, 400, seed).unwrap()));
    }
    // ~300 tokens each: 128 prefilled, every 4th of the next 192 recorded (48 queries per head).
    let opts = CalibrateOptions { k_values: vec![32, 64], ca_k: 64, prefix: 128, max_tokens: 320, stride: 4, ..Default::default() };
    let mut calls = 0;
    let a = calibrate(&mut model, &texts[..1], &opts, &mut |_| calls += 1).unwrap();
    let b = calibrate(&mut model, &texts[1..], &opts, &mut |_| {}).unwrap();
    assert!(calls > 2, "progress is reported");
    assert_eq!(model.free_slots(), model.info().max_sequences, "calibration returned its slot");

    let info = model.info();
    for p in [&a, &b] {
        p.check(&info.config, &info.sha256).unwrap();
        assert!(!p.uncalibrated);
        assert_eq!(p.activations, Some(info.activations), "the profile records the activations it was made under");
        assert_eq!((p.ca_k, p.k_values.clone(), p.queries), (64, vec![32, 64], 48));
        assert_eq!(p.sources.len(), 1);
        let h = &p.layers[3].kv_heads[0];
        assert!(h.ca.windows(2).all(|w| w[0] >= w[1]), "ca is in ranked order");
        assert_eq!(h.ca_by_k[&64], h.ca);
    }
    let (kv, q, chance) = top_overlap(&a, &b, 8);
    eprintln!("top-8 overlap between {} and {}: KV groups {kv:.2}/8, query heads {q:.2}/8, chance {chance:.2}", texts[0].0, texts[1].0);
    assert!(kv >= 2.0 * chance && q >= 2.0 * chance, "overlap kv {kv:.2} q {q:.2} vs chance {chance:.2}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.json");
    a.save(&path).unwrap();
    assert_eq!(Profile::load(&path).unwrap(), a);
    // A profile saved before the field existed reads as "not recorded".
    let mut old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(old.as_object_mut().unwrap().remove("activations").is_some());
    std::fs::write(&path, old.to_string()).unwrap();
    let p = Profile::load(&path).unwrap();
    assert_eq!(p.activations, None);
    assert_eq!(Profile { activations: a.activations, ..p }, a);
}
