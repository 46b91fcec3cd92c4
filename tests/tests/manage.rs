//! Managing fasad through fasactl and busctl as separate processes: calibration (on first load
//! and on demand, profiles in the state folder), the memory plan under a simulated headroom
//! (`--headroom SIZE`) with typed errors for what does not fit, and models (list, pull of an
//! installed model, unload, load, `generate --model`).
use std::time::{Duration, Instant};

use fasa_tests::{describe, Fasad, TestBus};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn manager_property(bus: &TestBus, name: &str) -> String {
    let out = bus.busctl(&["get-property", "dev.fasa.Fasa1", "/dev/fasa/Fasa1", "dev.fasa.Fasa1.Manager", name]);
    assert!(out.status.success(), "{}", describe(&out));
    stdout(&out).trim().to_string()
}

#[test]
fn calibrates_on_first_load_and_keeps_the_profile() {
    let bus = TestBus::start();
    let profiles = bus.dir().join("state").join("profiles");
    // A small calibration, so the test stays short.
    let mut fasad = Fasad::start_as_configured(&bus, &["--max-sequences", "1", "--calibrate-max-tokens", "200"]);
    let t = Instant::now();
    loop {
        let state = manager_property(&bus, "ProfileState");
        if state == "s \"calibrated\"" {
            break;
        }
        assert!(state == "s \"calibrating\"", "{state}: {}", fasad.stderr());
        assert!(t.elapsed() < Duration::from_secs(90), "calibration on load did not end: {}", fasad.stderr());
        std::thread::sleep(Duration::from_millis(200));
    }
    let saved: Vec<_> = std::fs::read_dir(&profiles).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let sha = saved[0].file_stem().unwrap().to_string_lossy().into_owned();
    assert_eq!(sha, fasa_engine_sha());
    let profile: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&saved[0]).unwrap()).unwrap();
    assert_eq!(profile["model_sha256"], sha.as_str());
    assert_eq!(profile["uncalibrated"], false);

    // On demand, with a copy and a bad text.
    let copy = bus.dir().join("copy.json");
    let out = bus.fasactl(&["calibrate", "--max-tokens", "160", "--prefix", "96", "--output", copy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout(&out).trim().ends_with(&format!("{sha}.json")), "{}", describe(&out));
    assert!(stderr(&out).contains("calibration: finished"), "{}", describe(&out));
    assert!(copy.exists());
    let out = bus.fasactl(&["calibrate", "--text", "/nonexistent/prose.txt"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("InvalidArgument"), "{}", describe(&out));

    // Restarted, fasad finds the profile: no calibration this time.
    assert!(fasad.terminate(Duration::from_secs(10)).unwrap().success());
    let _fasad = Fasad::start_as_configured(&bus, &["--max-sequences", "1"]);
    assert_eq!(manager_property(&bus, "ProfileState"), "s \"calibrated\"");
}

/// The default model's sha256, as the engine pins it.
fn fasa_engine_sha() -> String {
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into()
}

#[test]
fn a_simulated_headroom_bounds_the_plan_and_requests_get_typed_errors() {
    let bus = TestBus::start();
    // 40 MiB of KV cache: the dense cache of SmolLM2 (72000 B per token, f32) holds ~580 tokens.
    let mut fasad = Fasad::start(&bus, &["--headroom", "40MiB", "--max-sequences", "4"]);
    assert_eq!(manager_property(&bus, "Variant"), "s \"dense\"");
    assert_eq!(manager_property(&bus, "MaxSessions"), "u 1");
    let context: u32 = manager_property(&bus, "MaxContext").trim_start_matches("u ").parse().unwrap();
    assert!((512..1024).contains(&context), "{context}");
    let out = bus.fasactl(&["plan", "--json", "--headroom", "40MiB", "--context", "8192"]);
    assert!(out.status.success(), "{}", describe(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["variant"], "dense", "{plan}");
    let out = bus.fasactl(&["plan", "--headroom", "1KiB"]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert!(stderr(&out).contains("DoesNotFit"), "{}", describe(&out));
    let out = bus.fasactl(&["plan", "--json", "--headroom", "1KiB"]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["error"], "does-not-fit");
    // A prompt beyond the planned context: a typed error, and fasad keeps serving.
    let long = "word ".repeat(context as usize + 50);
    let out = bus.fasactl(&["generate", "--raw", "--max-tokens", "4", &long]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("ContextTooLong"), "{}", describe(&out));
    let out = bus.fasactl(&["generate", "What is the capital of France?"]);
    assert!(out.status.success() && stdout(&out).contains("Paris"), "{}", describe(&out));
    assert!(fasad.alive());
    drop(fasad);

    // Nothing fits: fasad still starts, refuses every job with DoesNotFit, and survives.
    let mut fasad = Fasad::start(&bus, &["--headroom", "1KiB"]);
    assert_eq!(manager_property(&bus, "Variant"), "s \"none\"");
    for _ in 0..3 {
        let out = bus.fasactl(&["generate", "hi"]);
        assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
        assert!(stderr(&out).contains("DoesNotFit"), "{}", describe(&out));
    }
    assert!(fasad.alive(), "{}", fasad.stderr());
}

#[test]
fn a_slow_tier_lets_the_plan_choose_fasa_m_and_it_serves() {
    let bus = TestBus::start();
    // 64 MiB of KV memory cannot hold the whole 8192-token cache (72000 B per token, f32); with
    // a 2 GiB file-backed slow tier the planner keeps only the dominant K planes in memory.
    let mut fasad = Fasad::start(&bus, &["--headroom", "64MiB", "--slow-tier", "2GiB", "--max-sequences", "1"]);
    assert_eq!(manager_property(&bus, "Variant"), "s \"fasa-m\"");
    assert_eq!(manager_property(&bus, "MaxContext"), "u 8192");
    let out = bus.fasactl(&["generate", "What is the capital of France?"]);
    assert!(out.status.success() && stdout(&out).contains("Paris"), "{}", describe(&out));
    // A long prompt decodes sparsely from the two tiers.
    let long = format!("{} Now, what is the capital of France?", "The sky is blue. ".repeat(120));
    let out = bus.fasactl(&["generate", "--max-tokens", "16", &long]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(fasad.alive(), "{}", fasad.stderr());
    assert!(fasad.stderr().contains("variant=fasa-m"), "{}", fasad.stderr());
}

#[test]
fn models_are_listed_unloaded_and_loaded_by_name() {
    let bus = TestBus::start();
    let _fasad = Fasad::start(&bus, &["--max-sequences", "1"]);
    let out = bus.fasactl(&["models"]);
    assert!(out.status.success(), "{}", describe(&out));
    let line = stdout(&out).lines().find(|l| l.starts_with("smollm2-135m")).map(str::to_string).unwrap_or_default();
    assert!(line.contains("loaded") && line.contains("Apache-2.0"), "{}", describe(&out));
    assert!(stdout(&out).contains("qwen2.5-coder-0.5b"), "{}", describe(&out));
    // Pulling an installed model verifies it and downloads nothing.
    let out = bus.fasactl(&["models", "pull", "smollm2-135m"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout(&out).trim().ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"), "{}", describe(&out));
    let out = bus.fasactl(&["models", "pull", "no-such-model"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));

    let out = bus.fasactl(&["unload"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(manager_property(&bus, "Model"), "s \"\"");
    let out = bus.fasactl(&["generate", "hi"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("ModelNotLoaded"), "{}", describe(&out));
    // generate --model loads it first.
    let out = bus.fasactl(&["generate", "--model", "smollm2-135m", "What is the capital of France?"]);
    assert!(out.status.success() && stdout(&out).contains("Paris"), "{}", describe(&out));
    let out = bus.fasactl(&["load", "smollm2-135m"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = bus.fasactl(&["load", "no-such-model"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("InvalidArgument"), "{}", describe(&out));
}
