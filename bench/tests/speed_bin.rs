//! The `speed` binary on the real default model, a few tokens: one JSON line per (depth, mode),
//! the first decode token timed apart, and the rates consistent with each other.

#[test]
fn speed_reports_the_first_decode_token_apart() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_speed"))
        .args(["--depth", "64", "--modes", "dense,fasa", "--prefill", "16", "--decode", "3", "--threads", "2"])
        .output()
        .expect("run speed");
    assert!(out.status.success(), "speed failed (run scripts/setup): {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["dense", "fasa"]);
    for r in &rows {
        let (all, first_ms, steady) = (r["decode_tok_s"].as_f64().unwrap(), r["first_decode_ms"].as_f64().unwrap(), r["steady_decode_tok_s"].as_f64().unwrap());
        assert_eq!(r["decode_tokens"], 3);
        assert!(all > 0.0 && first_ms > 0.0 && steady > 0.0, "{r}");
        // 3 tokens take the first one's time and 2 at the steady rate.
        let total_s = first_ms / 1e3 + 2.0 / steady;
        assert!((3.0 / total_s - all).abs() <= 1e-6 * all, "rates disagree: {r}");
    }
}
