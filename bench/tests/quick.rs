//! The quick fidelity harness, in process on the real default model: sanity of the metrics.
//! Dense against itself is exact; the oracle is no worse than StreamingLLM; every mode whose
//! budget covers the context equals dense; `fasa` reads fewer K/V bytes than dense.
use fasa_bench::fidelity::{self, FidelityOptions};

#[test]
fn quick_harness_is_sane() {
    let mut opts = FidelityOptions::quick();
    // The committed profile when it fits this model, else a small calibration (not saved).
    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fidelity/profile.json");
    let mut model = fidelity::load_model(1024 + 64, Default::default()).expect("load the model (run scripts/setup)");
    let fits = fasa_engine::attention::Profile::load(&committed).is_ok_and(|p| p.check(&model.info().config, &model.info().sha256).is_ok());
    if fits {
        opts.profile = Some(committed);
    }
    let res = fidelity::run(&mut model, &opts).unwrap();
    let row = |spec: &str, b: usize| res.rows.iter().find(|r| r.spec == spec && r.budget == b).unwrap_or_else(|| panic!("no row {spec} B={b}"));
    let dense = res.rows.iter().find(|r| r.spec == "dense").unwrap();
    for r in &res.rows {
        eprintln!("B={} {}: KL {:.5} top1 {:.3} ppl {:.3} recall {:.3} mass {:.3} bytes {:.3}", r.budget, r.spec, r.kl, r.top1, r.ppl, r.recall, r.mass, r.bytes_fraction);
    }
    assert_eq!((dense.kl, dense.top1, dense.bytes_fraction), (0.0, 1.0, 1.0));
    assert!(dense.ppl.is_finite() && dense.ppl > 1.0);
    assert!(row("oracle", 256).kl <= row("streaming", 256).kl, "oracle is the ceiling of top-B");
    for spec in ["fasa", "oracle", "streaming"] {
        let r = row(spec, 1024);
        assert!(r.kl < 1e-6 && r.top1 == 1.0, "{spec} with B ≥ context must equal dense: KL {}", r.kl);
        assert!((r.ppl - dense.ppl).abs() < 1e-4 * dense.ppl);
    }
    let f = row("fasa", 256);
    assert!(f.bytes_fraction < 1.0 && f.recall > 0.0 && f.mass > 0.0 && f.mass <= 1.0 + 1e-6);
    // Passkey rows: dense and each setting, same prompts.
    assert!(res.passkey.iter().any(|p| p.spec == "dense" && p.total == 3));
}
