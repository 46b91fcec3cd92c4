//! Planner tests on recorded headroom readings, with expected plans for SmolLM2-135M and
//! Llama-3-8B shapes.
use std::collections::BTreeMap;

use super::*;
use crate::attention::profile::{HeadProfile, LayerProfile, SCHEMA};
use crate::attention::CacheShape;
use crate::headroom::{parse_meminfo, parse_psi, Headroom, PressureLevel};
use crate::RopeLayout;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn smollm2() -> Shapes {
    Shapes { n_layers: 30, n_heads: 9, n_kv_heads: 3, head_dim: 64, hidden: 576, ffn_hidden: 1536, vocab: 49152, context_length: 8192 }
}

/// Llama-3-8B shapes with Llama-3.1's 128k trained context (same tensors otherwise).
fn llama3_8b() -> Shapes {
    Shapes { n_layers: 32, n_heads: 32, n_kv_heads: 8, head_dim: 128, hidden: 4096, ffn_hidden: 14336, vocab: 128256, context_length: 131072 }
}

const SMOL_WEIGHTS: u64 = 70_000_000;
const LLAMA_WEIGHTS: u64 = 4_500_000_000;

// Recorded readings (trimmed to the lines the parsers use).
/// A 512 MiB board (or a container with that much available).
const MEMINFO_TINY: &str = "MemTotal:        1015808 kB\nMemFree:          201344 kB\nMemAvailable:     524288 kB\nSwapTotal:             0 kB\nSwapFree:              0 kB\n";
/// Jetson Orin Nano 8 GB, JetPack 6, desktop running.
const MEMINFO_ORIN8: &str = "MemTotal:        7620352 kB\nMemFree:          512340 kB\nMemAvailable:    5123456 kB\nSwapTotal:       3810160 kB\nSwapFree:        3810160 kB\n";
/// Jetson AGX Orin 64 GB, headless.
const MEMINFO_ORIN64: &str = "MemTotal:       64335564 kB\nMemFree:        50123412 kB\nMemAvailable:   61234112 kB\nSwapTotal:      32167780 kB\nSwapFree:       32167780 kB\n";
/// The host of a 24 GB discrete GPU with 64 GB RAM.
const MEMINFO_HOST64: &str = "MemTotal:       65776904 kB\nMemFree:        40120344 kB\nMemAvailable:   60123456 kB\nSwapTotal:       2097148 kB\nSwapFree:        2097148 kB\n";
/// cuMemGetInfo on the 24 GB GPU with the display and another process using some.
const GPU24_FREE_TOTAL: (u64, u64) = (23_100_000_000, 25_757_220_864);
const PSI_IDLE: &str = "some avg10=0.00 avg60=0.00 avg300=0.00 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=45678\n";
const PSI_BUSY: &str = "some avg10=18.40 avg60=7.12 avg300=2.01 total=912345678\nfull avg10=3.10 avg60=1.02 avg300=0.22 total=81234567\n";

fn mem_available(text: &str) -> u64 {
    parse_meminfo(text).unwrap().available
}

/// File-backed slow-tier budget under the cache directory on the Jetsons.
const JETSON_SLOW: u64 = 16 * GIB;

fn input(shapes: Shapes, weights: u64, element_bytes: usize, headroom: Headroom, context: usize, sessions: usize) -> PlanInput<'static> {
    PlanInput {
        shapes,
        weight_bytes: weights,
        workspace_bytes: workspace_bytes(&shapes, crate::model::PREFILL_CHUNK, shapes.context_length),
        element_bytes,
        gpu_mirror: false,
        profile: None,
        requested_context: context,
        requested_sessions: sessions,
        headroom,
        safety_margin: 256 * MIB,
        model_in_headroom: true,
        objective: Objective::Accuracy,
        dense_layers: DEFAULT_DENSE_LAYERS,
    }
}

/// A calibrated-looking profile: every head's CA falls geometrically with rank (0.7 per FC),
/// as the low-frequency FCs dominate on the models measured.
fn geometric_profile(s: &Shapes) -> Profile {
    let n_fc = s.n_fc();
    let head = HeadProfile { ranked_fcs: (0..n_fc).rev().collect(), ca: (0..n_fc).map(|i| 0.6 * 0.7f32.powi(i as i32)).collect(), ca_by_k: BTreeMap::new() };
    Profile {
        schema: SCHEMA,
        model_sha256: String::new(),
        model_name: "test".into(),
        rope_layout: RopeLayout::Adjacent,
        head_dim: s.head_dim,
        k_values: vec![128],
        ca_k: 128,
        queries: 100,
        sources: vec![],
        layers: vec![LayerProfile { kv_heads: vec![head.clone(); s.n_kv_heads], q_heads: vec![head; s.n_heads] }; s.n_layers],
        uncalibrated: false,
        activations: None,
    }
}

fn check_fits(p: &Plan) {
    assert!(p.bytes.kv_fast <= p.available.fast, "{p:#?}");
    assert!(p.bytes.kv_slow <= p.available.slow, "{p:#?}");
    assert!(p.max_context % PAGE == 0 || p.max_context == 8192 || p.max_context == 131072 || p.max_context == 32768);
    assert!(p.chunks <= p.pool_fcs && p.budget <= p.max_context);
}

#[test]
fn byte_accounting_mirrors_the_cpu_cache() {
    for s in [smollm2(), llama3_8b()] {
        let cs = CacheShape { n_layers: s.n_layers, n_kv_heads: s.n_kv_heads, head_dim: s.head_dim };
        assert_eq!(kv_bytes_per_token(Variant::Dense, &s, 0, 4).fast, cs.bytes_per_token() as u64);
        assert_eq!(kv_bytes_per_token(Variant::FasaC, &s, 0, 4), kv_bytes_per_token(Variant::Dense, &s, 0, 4));
    }
    let s = smollm2();
    // Whole cache: 30 layers × 3 heads × 3.125·64 elements.
    assert_eq!(kv_bytes_per_token(Variant::Dense, &s, 0, 2), TierBytes { fast: 42120, slow: 0 });
    // FASA-M P=16: layer 0 whole, 29 layers × 3 heads × 32 plane elements fast; rows of
    // (64 − 32 + 64) elements slow.
    assert_eq!(kv_bytes_per_token(Variant::FasaM, &s, 16, 2), TierBytes { fast: (200 + 29 * 32) * 3 * 2, slow: 29 * 3 * 96 * 2 });
    let l = llama3_8b();
    assert_eq!(plain_kv_bytes_per_token(&l, 2), 128 * 1024); // the well-known 128 KiB/token
    assert_eq!(kv_bytes_per_token(Variant::FasaM, &l, 32, 2), TierBytes { fast: (400 + 31 * 64) * 8 * 2, slow: 31 * 8 * 192 * 2 });
    // Pages are allocated whole; the row cache is per session.
    let lay = Layout { variant: Variant::FasaM, pool: 16, budget: 256, dense_layers: 1, element_bytes: 2, gpu_mirror: false };
    assert_eq!(per_session_bytes(&lay, &s, 8192).fast, (29 * 3 * 512 * 96 * 2) as u64);
    assert_eq!(per_session_bytes(&lay, &s, 128).fast, (29 * 3 * 128 * 96 * 2) as u64);
    assert_eq!(session_bytes(&lay, &s, 65), session_bytes(&lay, &s, 128));
    // Workspace: SmolLM2 ≈ 21 MB, Llama-3-8B ≈ 170 MB per 512-token prefill chunk.
    let w = workspace_bytes(&s, 512, 8192);
    assert!((20 * MIB..24 * MIB).contains(&w), "{w}");
    let w = workspace_bytes(&l, 512, 131072);
    assert!((160 * MIB..180 * MIB).contains(&w), "{w}");
}

#[test]
fn tiny_board_gives_smollm2_one_shorter_dense_session() {
    let h = Headroom { fast_bytes: mem_available(MEMINFO_TINY), slow_bytes: 0, pressure: PressureLevel::None };
    let p = plan(&input(smollm2(), SMOL_WEIGHTS, 4, h, 8192, 4)).unwrap();
    check_fits(&p);
    assert_eq!(p.variant, Variant::Dense);
    assert_eq!(p.max_sessions, 1);
    // 512 MiB − 70 MB − ~21 MiB − 256 MiB margin ≈ 168 MiB at 78120 B/token (f32 + int8 scoring planes).
    let expect = (p.available.fast / 78120) as usize / PAGE * PAGE;
    assert_eq!(p.max_context, expect);
    assert!((2048..3072).contains(&p.max_context), "{}", p.max_context);
    assert!(p.reasons.iter().any(|r| r.starts_with("context:")), "{:?}", p.reasons);
    // Llama-3-8B does not even load there.
    let e = plan(&input(llama3_8b(), LLAMA_WEIGHTS, 2, h, 8192, 1)).unwrap_err();
    assert!(matches!(e, PlanError::ModelDoesNotFit { .. }), "{e}");
    assert!(e.to_string().contains("smaller model"));
}

#[test]
fn jetson_orin_8gb() {
    let h = Headroom { fast_bytes: mem_available(MEMINFO_ORIN8), slow_bytes: JETSON_SLOW, pressure: parse_psi(PSI_IDLE).unwrap().level() };
    // SmolLM2 fp16, full context × 4: 4 × 8192 × 42120 B = 1.3 GiB: dense fits.
    let p = plan(&input(smollm2(), SMOL_WEIGHTS, 2, h, 0, 4)).unwrap();
    check_fits(&p);
    assert_eq!((p.variant, p.max_context, p.max_sessions), (Variant::Dense, 8192, 4));
    assert_eq!(p.bytes.kv_fast, 4 * 8192 * 42120);
    assert_eq!(p.attention().mode, crate::Mode::Dense);
    // Speed objective: same bytes, FASA-C.
    let mut i = input(smollm2(), SMOL_WEIGHTS, 2, h, 0, 4);
    i.objective = Objective::Speed;
    let q = plan(&i).unwrap();
    assert_eq!((q.variant, q.bytes.kv_fast), (Variant::FasaC, p.bytes.kv_fast));
    assert_eq!(q.attention().mode, crate::Mode::Fasa);
    assert_eq!((q.chunks, q.pool_fcs, q.budget), (12, 24, 512));

    // Llama-3-8B fp16 at 8k: ~290 MiB of KV headroom after 4.5 GB of weights. The whole cache
    // (1.6 GB) does not fit, nor FASA-M with the full pool (~400 MB with its row cache), and no
    // profile says which FCs are free: the pool shrinks (step 3) and the context stays.
    let p = plan(&input(llama3_8b(), LLAMA_WEIGHTS, 2, h, 8192, 2)).unwrap();
    check_fits(&p);
    assert_eq!((p.variant, p.max_context), (Variant::FasaM, 8192));
    assert!(p.pool_fcs < 32 && p.pool_fcs >= 8, "{p:#?}");
    assert!(p.reasons.iter().any(|r| r.starts_with("accuracy:")), "{:?}", p.reasons);
    // With a calibrated profile the cheap FCs go first and both sessions may run with a larger
    // pool than the step-3 cut would have left.
    let prof = geometric_profile(&llama3_8b());
    let mut i = input(llama3_8b(), LLAMA_WEIGHTS, 2, h, 8192, 2);
    i.profile = Some(&prof);
    let c = plan(&i).unwrap();
    check_fits(&c);
    assert_eq!(c.variant, Variant::FasaM);
    assert!(c.ca_pool_share.unwrap() > 0.99, "{c:#?}");
    assert!(c.reasons.iter().any(|r| r.contains("keeps")), "{:?}", c.reasons);
}

#[test]
fn jetson_orin_64gb() {
    let h = Headroom { fast_bytes: mem_available(MEMINFO_ORIN64), slow_bytes: 64 * GIB, pressure: PressureLevel::None };
    // One 128k Llama session: 128k × 200 KiB = 25 GiB whole cache fits in ~52 GiB: dense.
    let p = plan(&input(llama3_8b(), LLAMA_WEIGHTS, 2, h, 0, 1)).unwrap();
    check_fits(&p);
    assert_eq!((p.variant, p.max_context, p.max_sessions), (Variant::Dense, 131072, 1));
    // Four of them do not (100 GiB); FASA-M with the full pool does: ~5 GiB fast and ~11.6
    // GiB slow each.
    let p = plan(&input(llama3_8b(), LLAMA_WEIGHTS, 2, h, 0, 4)).unwrap();
    check_fits(&p);
    assert_eq!((p.variant, p.pool_fcs, p.chunks, p.budget, p.max_context, p.max_sessions), (Variant::FasaM, 48, 24, 2048, 131072, 4));
    assert_eq!(p.row_cache_rows, 4096);
    // Eight need 93 GiB of slow tier: the planner cuts sessions before accuracy, keeping the
    // layout that keeps the most (FASA-M: 6, where the whole cache would keep 2).
    let p = plan(&input(llama3_8b(), LLAMA_WEIGHTS, 2, h, 0, 8)).unwrap();
    check_fits(&p);
    assert_eq!((p.variant, p.pool_fcs, p.max_context, p.max_sessions), (Variant::FasaM, 48, 131072, 6));
    // SmolLM2: everything fits densely.
    let p = plan(&input(smollm2(), SMOL_WEIGHTS, 2, h, 0, 64)).unwrap();
    assert_eq!((p.variant, p.max_sessions), (Variant::Dense, 64));
}

#[test]
fn discrete_gpu_24gb_with_64gb_host() {
    let gpu = crate::headroom::GpuMemInfo { mem_get_info: || Some(GPU24_FREE_TOTAL) };
    let fast = crate::headroom::HeadroomSource::available(&gpu).unwrap().unwrap();
    let h = Headroom { fast_bytes: fast, slow_bytes: mem_available(MEMINFO_HOST64) - 4 * GIB, pressure: PressureLevel::None };
    // 2 × 32k whole: 12.5 GiB of ~17.8: dense on the GPU.
    let p = plan(&input(llama3_8b(), LLAMA_WEIGHTS, 2, h, 32768, 2)).unwrap();
    check_fits(&p);
    assert_eq!((p.variant, p.max_sessions), (Variant::Dense, 2));
    // 8 × 32k: FASA-M, planes on the GPU, rows in host RAM.
    let p = plan(&input(llama3_8b(), LLAMA_WEIGHTS, 2, h, 32768, 8)).unwrap();
    check_fits(&p);
    assert_eq!((p.variant, p.pool_fcs, p.max_sessions, p.max_context), (Variant::FasaM, 48, 8, 32768));
    assert!(p.bytes.kv_slow > p.bytes.kv_fast);
    // JSON: `variant` is kebab-case and the plan round-trips.
    let j = serde_json::to_value(&p).unwrap();
    assert_eq!(j["variant"], "fasa-m");
    assert_eq!(serde_json::from_value::<Plan>(j).unwrap(), p);
}

#[test]
fn pressure_shrinks_the_plan_for_new_jobs_and_never_grows_it() {
    let calm = Headroom { fast_bytes: mem_available(MEMINFO_ORIN8), slow_bytes: JETSON_SLOW, pressure: PressureLevel::None };
    let prev = plan(&input(smollm2(), SMOL_WEIGHTS, 2, calm, 8192, 8)).unwrap();
    assert_eq!((prev.variant, prev.max_sessions), (Variant::Dense, 8));
    // Another process took memory: 1.5 GiB left and PSI says moderate.
    let busy = Headroom { fast_bytes: 3 * GIB / 2, slow_bytes: JETSON_SLOW, pressure: parse_psi(PSI_BUSY).unwrap().level() };
    assert_eq!(busy.pressure, PressureLevel::Moderate);
    let p = replan_on_pressure(&prev, &input(smollm2(), SMOL_WEIGHTS, 2, busy, 8192, 8)).unwrap();
    check_fits(&p);
    assert!(p.bytes.kv_fast < prev.bytes.kv_fast, "{p:#?}");
    assert!(p.max_sessions <= prev.max_sessions && p.max_context <= prev.max_context);
    assert!(p.reasons[0].contains("moderate memory pressure"), "{:?}", p.reasons);
    // Still under pressure but the reading went up (page cache dropped): no growth.
    let more = Headroom { fast_bytes: 6 * GIB, slow_bytes: JETSON_SLOW, pressure: PressureLevel::Moderate };
    let q = replan_on_pressure(&p, &input(smollm2(), SMOL_WEIGHTS, 2, more, 8192, 8)).unwrap();
    assert!(q.bytes.kv_fast <= p.bytes.kv_fast && q.max_sessions <= p.max_sessions && q.max_context <= p.max_context, "{q:#?}");
    // Critical pressure halves the headroom used.
    let crit = Headroom { pressure: PressureLevel::Critical, ..busy };
    let r = replan_on_pressure(&p, &input(smollm2(), SMOL_WEIGHTS, 2, crit, 8192, 8)).unwrap();
    assert!(r.bytes.kv_fast < p.bytes.kv_fast, "{r:#?}");
    // Pressure over: a fresh plan, which may grow back.
    let s = replan_on_pressure(&r, &input(smollm2(), SMOL_WEIGHTS, 2, calm, 8192, 8)).unwrap();
    assert_eq!(s, prev);
}

#[test]
fn refuses_when_even_the_smallest_plan_does_not_fit() {
    // 16 MiB of KV headroom (given as --headroom), no slow tier: one 512-token SmolLM2 session
    // needs 512 × 78120 B = 38 MiB.
    let h = Headroom { fast_bytes: 16 * MIB, slow_bytes: 0, pressure: PressureLevel::None };
    let mut i = input(smollm2(), SMOL_WEIGHTS, 4, h, 8192, 1);
    i.model_in_headroom = false;
    i.safety_margin = 0;
    let e = plan(&i).unwrap_err();
    let PlanError::DoesNotFit { needed, available, smallest } = &e else { panic!("{e}") };
    assert_eq!(needed.fast, 512 * 78120);
    assert_eq!(available.fast, 16 * MIB);
    assert_eq!((smallest.variant, smallest.context, smallest.sessions), (Variant::Dense, 512, 1));
    assert!(e.to_string().contains("even the smallest plan (dense"), "{e}");
    let j = serde_json::to_value(&e).unwrap();
    assert_eq!(j["error"], "does-not-fit");
    // With a slow tier the smallest plan is FASA-M at P = k = n_fc/8 and B = 256; 1 MiB is
    // still too little for its fast tier.
    i.headroom = Headroom { fast_bytes: MIB, slow_bytes: GIB, pressure: PressureLevel::None };
    let PlanError::DoesNotFit { smallest, .. } = plan(&i).unwrap_err() else { panic!() };
    assert_eq!((smallest.variant, smallest.pool_fcs, smallest.chunks, smallest.budget), (Variant::FasaM, 4, 4, 256));
    // 32 MiB holds no dense 512-token session (35 MiB) but FASA-M's: ~23 MiB at 512 tokens,
    // most of it the row cache (which at this length holds every row).
    i.headroom.fast_bytes = 32 * MIB;
    let p = plan(&i).unwrap();
    check_fits(&p);
    assert_eq!(p.variant, Variant::FasaM);
    assert!(p.max_context >= MIN_CONTEXT);
}

#[test]
fn bad_input_is_a_typed_error() {
    let h = Headroom { fast_bytes: GIB, slow_bytes: 0, pressure: PressureLevel::None };
    let mut i = input(smollm2(), SMOL_WEIGHTS, 3, h, 0, 1);
    assert!(matches!(plan(&i), Err(PlanError::Invalid(_))));
    i.element_bytes = 2;
    i.requested_sessions = 0;
    assert!(matches!(plan(&i), Err(PlanError::Invalid(_))));
    i.requested_sessions = 1;
    i.requested_context = 1 << 20;
    let p = plan(&i).unwrap();
    assert!(p.max_context <= 8192 && p.reasons[0].contains("trained for 8192"));
}

/// The table of docs/plan.md: `cargo test --release -p fasa-engine --lib plan::tests::kv_table -- --nocapture`.
#[test]
fn kv_table() {
    let avail = TierBytes { fast: GIB, slow: u64::MAX };
    println!("| shapes | elem | layout | fast B/token | slow B/token | fast vs dense | longest context in 1 GiB |");
    println!("|---|---|---|---:|---:|---:|---:|");
    for (name, s) in [("SmolLM2-135M", smollm2()), ("Llama-3-8B", llama3_8b())] {
        let n_fc = s.n_fc();
        let k = n_fc / 4;
        for e in [2usize, 4] {
            let dense = kv_bytes_per_token(Variant::Dense, &s, 0, e).fast;
            let plain = plain_kv_bytes_per_token(&s, e);
            let elem = if e == 2 { "fp16" } else { "f32" };
            let longest = |l: &Layout| longest_context(l, &s, avail, 1, 1 << 26);
            let row = |label: String, t: TierBytes, ctx: usize| println!("| {name} | {elem} | {label} | {} | {} | {:.3} | {ctx} |", t.fast, t.slow, t.fast as f64 / dense as f64);
            let whole = Layout { variant: Variant::Dense, pool: 0, budget: 0, dense_layers: 1, element_bytes: e, gpu_mirror: false };
            row("plain K+V (reference, not ours)".into(), TierBytes { fast: plain, slow: 0 }, (GIB / plain) as usize);
            row("dense (whole cache)".into(), kv_bytes_per_token(Variant::Dense, &s, 0, e), longest(&whole));
            row("FASA-C (whole cache)".into(), kv_bytes_per_token(Variant::FasaC, &s, 0, e), longest(&Layout { variant: Variant::FasaC, ..whole }));
            for p in [2 * k, k, n_fc / 8] {
                let l = Layout { variant: Variant::FasaM, pool: p, budget: 1024, dense_layers: 1, element_bytes: e, gpu_mirror: false };
                row(format!("FASA-M P={p} (B=1024)"), kv_bytes_per_token(Variant::FasaM, &s, p, e), longest(&l));
            }
        }
    }
    // The target: FASA-M's fast tier at most 1/6 of dense, at P = k.
    for s in [smollm2(), llama3_8b()] {
        let d = kv_bytes_per_token(Variant::Dense, &s, 0, 2).fast;
        let m = kv_bytes_per_token(Variant::FasaM, &s, s.n_fc() / 4, 2).fast;
        assert!(m * 6 <= d, "{m} vs {d}");
    }
}

/// Prints the plans of the recorded readings (docs/plan.md): `… --lib plan::tests::print_plans -- --nocapture`.
#[test]
fn print_plans() {
    let orin8 = Headroom { fast_bytes: mem_available(MEMINFO_ORIN8), slow_bytes: JETSON_SLOW, pressure: PressureLevel::None };
    let p = plan(&input(llama3_8b(), LLAMA_WEIGHTS, 2, orin8, 8192, 2)).unwrap();
    println!("{}", serde_json::to_string_pretty(&p).unwrap());
    let e = plan(&PlanInput { model_in_headroom: false, safety_margin: 0, ..input(smollm2(), SMOL_WEIGHTS, 4, Headroom { fast_bytes: 16 * MIB, slow_bytes: 0, pressure: PressureLevel::None }, 8192, 1) }).unwrap_err();
    println!("{e}\n{}", serde_json::to_string(&e).unwrap());
}

#[test]
fn a_gpu_sharing_the_host_memory_counts_its_mirror() {
    // SmolLM2 with the daemon's f32 cache: on a GPU that shares the host's memory (Jetson) the
    // whole-cache variants' GPU mirror costs its bytes per layer and token on top (FASA-M keeps
    // no mirror), so a headroom that holds 4 full sessions without it holds fewer with it.
    let s = smollm2();
    let m = fasa_kernels::gpu::append::mirror_bytes_per_token(3, 9, 64);
    // fp16 K and V (3 heads × 2 × 64 × 2 B), int8 planes and scales (3 × (64 + 32·4/32)), and
    // 32 B a query head of decoder workspaces.
    assert_eq!(m, 768 + 204 + 288);
    let per = |v: Variant, on: bool| tier_bytes_per_token(&Layout { variant: v, pool: 16, budget: 256, dense_layers: 1, element_bytes: 4, gpu_mirror: on }, &s);
    for v in [Variant::Dense, Variant::FasaC] {
        assert_eq!(per(v, true).fast - per(v, false).fast, 30 * m, "{v}");
    }
    assert_eq!(per(Variant::FasaM, true), per(Variant::FasaM, false));
    let base = input(s, SMOL_WEIGHTS, 4, Headroom { fast_bytes: 0, slow_bytes: 0, pressure: PressureLevel::None }, 0, 4);
    let kv = 4 * 8192 * per(Variant::Dense, false).fast;
    let fast = SMOL_WEIGHTS + base.workspace_bytes + base.safety_margin + kv + MIB;
    let h = Headroom { fast_bytes: fast, slow_bytes: 0, pressure: PressureLevel::None };
    let without = plan(&input(s, SMOL_WEIGHTS, 4, h, 0, 4)).unwrap();
    assert_eq!((without.variant, without.max_context, without.max_sessions, without.gpu_mirror), (Variant::Dense, 8192, 4, false));
    let with = plan(&PlanInput { gpu_mirror: true, ..input(s, SMOL_WEIGHTS, 4, h, 0, 4) }).unwrap();
    check_fits(&with);
    assert!(with.gpu_mirror && with.max_context == 8192 && with.max_sessions < 4, "{with:#?}");
    assert_eq!(with.per_token.fast, per(Variant::Dense, true).fast);
    assert!(with.reasons.iter().any(|r| r.starts_with("GPU mirror:")), "{:?}", with.reasons);
    // The plan's own byte count for admitting a job includes the mirror too.
    assert_eq!(with.session_bytes(&s, 8192).fast, 8192 * per(Variant::Dense, true).fast);
}
