//! The memory planner: from model shapes, the calibration profile, the requested context and
//! sessions and a headroom reading, picks the variant (dense, FASA-C, FASA-M), the resident FC
//! pool P, the FCs per step k, the token budget B, the context and the sessions that fit, with
//! the reason for each choice. Pure: no I/O here (readings come from `crate::headroom`).
//!
//! Decision order (docs/plan.md explains why):
//! 1. At the requested context × sessions, the most accurate layout that fits: the whole cache
//!    in fast memory (dense, or FASA-C when the objective is speed: same bytes), else FASA-M
//!    with the full pool, else FASA-M with pool FCs the profile shows to be nearly useless
//!    dropped (kept CA share ≥ `CA_CHEAP`).
//! 2. Else fewer sessions (costs throughput only: jobs queue): the layout of step 1 that keeps
//!    the most.
//! 3. Else FASA-M with a smaller pool down to `n_fc/8` and a smaller B (costs accuracy on every
//!    request, but every request of the requested length still runs).
//! 4. Else a shorter context (costs the requests that no longer fit): the longest any layout gives.
//! 5. Else `PlanError::DoesNotFit` with the smallest plan and what it needs.
pub mod accuracy;
pub mod bytes;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use accuracy::ca_share;
pub use bytes::{gpu_mirror_bytes_per_token, kv_bytes_per_token, per_session_bytes, plain_kv_bytes_per_token, row_cache_rows, session_bytes, tier_bytes_per_token, workspace_bytes, Layout, Shapes, TierBytes, Variant, DEFAULT_DENSE_LAYERS, ROW_CACHE_FACTOR};

use crate::attention::{AttnConfig, Profile, PAGE};
use crate::headroom::{format_size, Headroom, PressureLevel};

/// The shortest context a plan may offer; below it the planner refuses.
pub const MIN_CONTEXT: usize = 512;
/// The smallest token budget (the paper's LongBench setting).
pub const MIN_BUDGET: usize = 256;
/// The largest budget the planner picks (long reasoning in the paper used 1000–1500).
pub const MAX_BUDGET: usize = 2048;
/// Pool FCs may be dropped before anything else while the kept CA share stays at least this.
pub const CA_CHEAP: f64 = 0.95;

/// What to favour when the whole cache fits (the bytes are the same for dense and FASA-C).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Dense attention by default: the accuracy reference.
    #[default]
    Accuracy,
    /// FASA-C by default: reads about `d/2k` times fewer KV bytes per step at long context.
    Speed,
}

/// Everything the planner reads.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    pub shapes: Shapes,
    /// Resident bytes of the weights (`ModelInfo::weight_bytes`).
    pub weight_bytes: u64,
    /// Activation workspace (`bytes::workspace_bytes`).
    pub workspace_bytes: u64,
    /// KV cache element bytes: 4 for the f32 CPU cache, 2 for the fp16 GPU cache.
    pub element_bytes: usize,
    /// The GPU decode mirror comes out of the same memory as the cache (`Layout::gpu_mirror`):
    /// a GPU that shares the host's memory (`attention::gpu::mirror_in_host_memory`).
    pub gpu_mirror: bool,
    /// Calibration profile: CA per FC. `None` or uncalibrated: pool FCs are never dropped early.
    pub profile: Option<&'a Profile>,
    /// Tokens per sequence; 0 = the trained context.
    pub requested_context: usize,
    pub requested_sessions: usize,
    pub headroom: Headroom,
    /// Fast-tier bytes left for everything else (kernel, other processes, allocator slack).
    pub safety_margin: u64,
    /// True when the reading was taken before the model was loaded (weights and workspace come
    /// out of it); false when it is KV headroom only (`--headroom SIZE`, or a live daemon).
    pub model_in_headroom: bool,
    pub objective: Objective,
    /// Layers that attend densely under the sparse variants.
    pub dense_layers: usize,
}

/// Resident bytes per tier and purpose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanBytes {
    pub weights: u64,
    pub workspace: u64,
    /// KV bytes in the fast tier at `max_context` × `max_sessions` (row caches included).
    pub kv_fast: u64,
    pub kv_slow: u64,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub variant: Variant,
    /// Resident FC pool P per KV head (FASA-M fast tier; the `fasa` mode picks k FCs in it).
    pub pool_fcs: usize,
    /// FCs scored per step, k.
    pub chunks: usize,
    /// Token budget B.
    pub budget: usize,
    pub dense_layers: usize,
    /// FASA-M row cache rows per sparse (layer, KV head, session); 0 otherwise.
    pub row_cache_rows: usize,
    pub max_context: usize,
    pub max_sessions: usize,
    pub element_bytes: usize,
    /// The whole-cache variants' GPU mirror is counted in the fast tier (`PlanInput::gpu_mirror`).
    #[serde(default)]
    pub gpu_mirror: bool,
    pub bytes: PlanBytes,
    /// KV headroom the plan was fitted into (after weights, workspace, margin and pressure).
    pub available: TierBytes,
    /// Resident KV bytes per cached token.
    pub per_token: TierBytes,
    /// Bytes each session holds whatever its length (FASA-M row cache).
    pub per_session: TierBytes,
    /// Share of the CA of all FCs kept by the pool and by the k FCs (calibrated profile only).
    pub ca_pool_share: Option<f64>,
    pub ca_chunks_share: Option<f64>,
    pub pressure: PressureLevel,
    /// One line per choice, in the order they were made.
    pub reasons: Vec<String>,
}

impl Plan {
    /// The attention settings requests get by default under this plan.
    pub fn attention(&self) -> AttnConfig {
        let mut a = AttnConfig::fasa(self.budget, self.chunks);
        a.pool = self.pool_fcs;
        a.dense_layers = self.dense_layers;
        match self.variant {
            Variant::Dense => a.mode = crate::Mode::Dense,
            // FASA-M holds no K rows outside the pool in memory: the exact re-rank would read
            // the slow tier for every candidate.
            Variant::FasaM => a.rerank = 0,
            Variant::FasaC => {}
        }
        a
    }

    fn layout(&self) -> Layout {
        Layout { variant: self.variant, pool: self.pool_fcs, budget: self.budget, dense_layers: self.dense_layers, element_bytes: self.element_bytes, gpu_mirror: self.gpu_mirror }
    }
}

/// The smallest plan tried, reported when nothing fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmallestPlan {
    pub variant: Variant,
    pub pool_fcs: usize,
    pub chunks: usize,
    pub budget: usize,
    pub context: usize,
    pub sessions: usize,
}

impl std::fmt::Display for SmallestPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} P={} k={} B={}, {} tokens × {} session", self.variant, self.pool_fcs, self.chunks, self.budget, self.context, self.sessions)
    }
}

fn tiers(t: &TierBytes) -> String {
    format!("{} fast + {} slow", format_size(t.fast), format_size(t.slow))
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum PlanError {
    #[error("invalid plan input: {0}")]
    Invalid(String),
    #[error("the model needs {} (weights {} + workspace {} + safety margin {}) but only {} of fast memory is free: free memory, raise the service's MemoryMax, or use a smaller model", format_size(.weights + .workspace + .margin), format_size(*.weights), format_size(*.workspace), format_size(*.margin), format_size(*.available))]
    ModelDoesNotFit { weights: u64, workspace: u64, margin: u64, available: u64 },
    #[error("even the smallest plan ({smallest}) needs {} of KV cache but only {} is free: free memory, add a slow tier, or lower the safety margin", tiers(.needed), tiers(.available))]
    DoesNotFit { needed: TierBytes, available: TierBytes, smallest: SmallestPlan },
}

/// One candidate setting of the knobs.
#[derive(Debug, Clone, Copy)]
struct Rung {
    variant: Variant,
    chunks: usize,
    pool: usize,
    budget: usize,
}

struct Fitter<'a> {
    shapes: &'a Shapes,
    dense_layers: usize,
    element_bytes: usize,
    gpu_mirror: bool,
    avail: TierBytes,
}

impl Fitter<'_> {
    fn layout(&self, r: &Rung, context: usize) -> Layout {
        Layout { variant: r.variant, pool: r.pool, budget: r.budget.min(context), dense_layers: self.dense_layers, element_bytes: self.element_bytes, gpu_mirror: self.gpu_mirror }
    }
    fn need(&self, r: &Rung, context: usize, sessions: usize) -> TierBytes {
        session_bytes(&self.layout(r, context), self.shapes, context).times(sessions as u64)
    }
    fn fits(&self, r: &Rung, context: usize, sessions: usize) -> bool {
        self.need(r, context, sessions).fits(self.avail)
    }
    /// Most sessions (≤ `cap`) of `context` tokens that fit.
    fn max_sessions(&self, r: &Rung, context: usize, cap: usize) -> usize {
        let one = self.need(r, context, 1);
        let by = |need: u64, avail: u64| avail.checked_div(need).map_or(usize::MAX, |q| q.min(usize::MAX as u64) as usize);
        cap.min(by(one.fast, self.avail.fast)).min(by(one.slow, self.avail.slow))
    }
    /// Longest context (≤ `cap`, whole pages below it) for `sessions` sessions; 0 if none.
    fn max_context(&self, r: &Rung, sessions: usize, cap: usize) -> usize {
        if self.fits(r, cap, sessions) {
            return cap;
        }
        let (mut lo, mut hi) = (0usize, cap / PAGE); // lo fits (0 tokens may still not: checked below)
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.fits(r, mid * PAGE, sessions) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        if lo > 0 && self.fits(r, lo * PAGE, sessions) {
            lo * PAGE
        } else {
            0
        }
    }
}

/// Caps that keep a re-plan from growing (see `replan_on_pressure`).
#[derive(Debug, Clone, Copy)]
struct Cap {
    kv_fast: u64,
    slow: u64,
    context: usize,
    sessions: usize,
}

/// Plans for `input`; see the module comment for the order of choices.
pub fn plan(input: &PlanInput) -> Result<Plan, PlanError> {
    plan_capped(input, None)
}

/// Re-plans after a headroom change. Under pressure the new plan never exceeds `prev` in fast
/// KV bytes, slow headroom, context or sessions (it is meant for new jobs: running jobs keep
/// what they hold); without pressure it is a fresh plan and may grow again.
pub fn replan_on_pressure(prev: &Plan, input: &PlanInput) -> Result<Plan, PlanError> {
    if input.headroom.pressure == PressureLevel::None {
        return plan(input);
    }
    let cap = Cap { kv_fast: prev.bytes.kv_fast, slow: prev.available.slow, context: prev.max_context, sessions: prev.max_sessions };
    let mut p = plan_capped(input, Some(cap))?;
    p.reasons.insert(
        0,
        format!(
            "{} memory pressure: re-planned for new jobs within the previous plan ({} × {} tokens, {} fast KV); running jobs keep their memory",
            input.headroom.pressure.as_str(),
            prev.max_sessions,
            prev.max_context,
            format_size(prev.bytes.kv_fast)
        ),
    );
    Ok(p)
}

fn validate(input: &PlanInput) -> Result<(), PlanError> {
    let s = &input.shapes;
    let bad = |m: String| Err(PlanError::Invalid(m));
    if s.n_layers == 0 || s.n_heads == 0 || s.n_kv_heads == 0 || s.context_length == 0 {
        return bad("layers, heads, KV heads and the trained context must be at least 1".into());
    }
    if s.head_dim < 2 || s.head_dim % 8 != 0 {
        return bad(format!("head_dim {} must be a multiple of 8 (RoPE pairs, Quest bounds per page)", s.head_dim));
    }
    if s.n_heads % s.n_kv_heads != 0 {
        return bad(format!("{} query heads do not split into {} KV groups", s.n_heads, s.n_kv_heads));
    }
    if !matches!(input.element_bytes, 1 | 2 | 4) {
        return bad(format!("element_bytes {} (4 for the f32 CPU cache, 2 for fp16)", input.element_bytes));
    }
    if input.requested_sessions == 0 {
        return bad("sessions must be at least 1".into());
    }
    if input.dense_layers > s.n_layers {
        return bad(format!("dense_layers {} exceeds the {} layers", input.dense_layers, s.n_layers));
    }
    Ok(())
}

fn plan_capped(input: &PlanInput, cap: Option<Cap>) -> Result<Plan, PlanError> {
    validate(input)?;
    let s = &input.shapes;
    let mut reasons = Vec::new();

    // --- What is asked for.
    let mut context = match input.requested_context {
        0 => s.context_length,
        n => n.min(s.context_length),
    };
    if input.requested_context > s.context_length {
        reasons.push(format!("context: {} requested, the model was trained for {}: capped", input.requested_context, s.context_length));
    }
    let mut sessions = input.requested_sessions;
    if let Some(c) = cap {
        context = context.min(c.context.max(1));
        sessions = sessions.min(c.sessions.max(1));
    }

    // --- What is free for the KV cache.
    let h = &input.headroom;
    let fast = match h.pressure {
        PressureLevel::None => h.fast_bytes,
        PressureLevel::Moderate => h.fast_bytes / 4 * 3,
        PressureLevel::Critical => h.fast_bytes / 2,
    };
    if h.pressure != PressureLevel::None {
        reasons.push(format!("{} memory pressure: planning with {} of the {} fast headroom", h.pressure.as_str(), format_size(fast), format_size(h.fast_bytes)));
    }
    let model = if input.model_in_headroom { input.weight_bytes.saturating_add(input.workspace_bytes) } else { 0 };
    let reserved = model.saturating_add(input.safety_margin);
    if input.model_in_headroom && fast < reserved {
        return Err(PlanError::ModelDoesNotFit { weights: input.weight_bytes, workspace: input.workspace_bytes, margin: input.safety_margin, available: fast });
    }
    let mut avail = TierBytes { fast: fast.saturating_sub(reserved), slow: h.slow_bytes };
    if let Some(c) = cap {
        avail.fast = avail.fast.min(c.kv_fast);
        avail.slow = avail.slow.min(c.slow);
    }
    reasons.push(format!(
        "headroom: {} fast{} − {} safety margin = {} for the KV cache; {} slow tier",
        format_size(fast),
        if input.model_in_headroom { format!(" − {} weights − {} workspace", format_size(input.weight_bytes), format_size(input.workspace_bytes)) } else { String::new() },
        format_size(input.safety_margin),
        format_size(avail.fast),
        if avail.slow == 0 { "no".to_string() } else { format_size(avail.slow) }
    ));

    // --- The knobs, most accurate first.
    let n_fc = s.n_fc();
    // 3/8 of the FCs per step: the fewest with which `fasa` kept every passkey and its KL within
    // 2× the oracle's at 2k–8k on SmolLM2 (bench/FIDELITY.md); 1/4 lost 2 of 6 passkeys at 4k.
    let k_full = (3 * n_fc / 8).max(1);
    let p_full = (2 * k_full).min(n_fc);
    let k_min = (n_fc / 8).max(1);
    let b_full = (context / 16 / PAGE * PAGE).clamp(MIN_BUDGET, MAX_BUDGET).min(context);
    let b_min = MIN_BUDGET.min(context);
    let dl = input.dense_layers;
    let profile = input.profile.filter(|p| !p.uncalibrated && p.layers.len() == s.n_layers);
    let share = |n: usize, of: usize| profile.and_then(|p| ca_share(p, n, of, dl));
    let whole = match input.objective {
        Objective::Accuracy => Variant::Dense,
        Objective::Speed => Variant::FasaC,
    };
    let has_slow = avail.slow > 0;
    let mut cheap = vec![Rung { variant: whole, chunks: k_full, pool: p_full, budget: b_full }];
    let mut expensive = Vec::new();
    if has_slow {
        cheap.push(Rung { variant: Variant::FasaM, chunks: k_full, pool: p_full, budget: b_full });
        let mut p = p_full;
        // Pool FCs whose CA the profile shows to be small go first (nearly free); without a
        // calibrated profile nothing is known to be free.
        while p > 1 && share(p - 1, p_full).is_some_and(|sh| sh >= CA_CHEAP) {
            p -= 1;
            cheap.push(Rung { variant: Variant::FasaM, chunks: k_full.min(p), pool: p, budget: b_full });
        }
        while p > k_min {
            p -= 1;
            expensive.push(Rung { variant: Variant::FasaM, chunks: k_full.min(p), pool: p, budget: b_full });
        }
        let mut b = b_full;
        while b > b_min {
            b = (b / 2).max(b_min);
            expensive.push(Rung { variant: Variant::FasaM, chunks: k_full.min(p), pool: p, budget: b });
        }
    }
    let fit = Fitter { shapes: s, dense_layers: dl, element_bytes: input.element_bytes, gpu_mirror: input.gpu_mirror, avail };
    if input.gpu_mirror {
        reasons.push(format!("GPU mirror: the GPU shares this memory, so its fp16 copy of a whole cache (planes and workspaces included) counts too, {} per token", format_size(gpu_mirror_bytes_per_token(s))));
    }

    // --- 1. The requested context × sessions.
    let mut chosen: Option<(Rung, usize, usize)> = cheap.iter().find(|r| fit.fits(r, context, sessions)).map(|r| (*r, context, sessions));
    // --- 2. Fewer sessions.
    if chosen.is_none() {
        // The layout that keeps the most sessions; the most accurate on ties.
        for r in &cheap {
            let n = fit.max_sessions(r, context, sessions);
            if n >= 1 && chosen.is_none_or(|(_, _, best)| n > best) {
                chosen = Some((*r, context, n));
            }
        }
        if let Some((_, _, n)) = chosen {
            reasons.push(format!("sessions: {sessions} requested, {n} fit at {context} tokens (sessions go before accuracy: extra jobs queue)"));
        }
    }
    // --- 3. Less accuracy (smaller pool, then smaller B), full context.
    if chosen.is_none() {
        chosen = expensive.iter().find_map(|r| {
            let n = fit.max_sessions(r, context, sessions);
            (n >= 1).then_some((*r, context, n))
        });
        if let Some((r, _, n)) = chosen {
            let b = if r.budget < b_full { format!(" and B from {b_full} to {}", r.budget) } else { String::new() };
            reasons.push(format!("accuracy: pool cut from P={p_full} to P={}{b} to keep the {context}-token context ({n} of {sessions} sessions)", r.pool));
        }
    }
    // --- 4. Shorter context: the longest any layout gives for one session, most accurate on ties.
    let min_context = MIN_CONTEXT.min(context);
    if chosen.is_none() {
        let mut best: Option<(Rung, usize)> = None;
        for r in cheap.iter().chain(&expensive) {
            let c = fit.max_context(r, 1, context);
            if c >= min_context && best.is_none_or(|(_, bc)| c > bc) {
                best = Some((*r, c));
            }
        }
        if let Some((r, c)) = best {
            let n = fit.max_sessions(&r, c, sessions).max(1);
            reasons.push(format!("context: {context} tokens do not fit even at the smallest pool and budget; {c} is the longest that does ({n} session)"));
            chosen = Some((r, c, n));
        }
    }
    let Some((r, context, sessions)) = chosen else {
        let smallest = *expensive.last().or(cheap.last()).expect("at least the whole-cache rung");
        return Err(PlanError::DoesNotFit {
            needed: fit.need(&smallest, min_context, 1),
            available: avail,
            smallest: SmallestPlan { variant: smallest.variant, pool_fcs: smallest.pool, chunks: smallest.chunks, budget: smallest.budget.min(min_context), context: min_context, sessions: 1 },
        });
    };

    // --- Explain the layout and knobs.
    let budget = r.budget.min(context);
    match r.variant {
        Variant::Dense => reasons.push(format!("variant dense: the whole cache ({context} tokens × {sessions}) fits in fast memory; requests may still ask for fasa (k={}, P={}, B={budget}) at no extra memory", r.chunks, r.pool)),
        Variant::FasaC => reasons.push(format!("variant fasa-c: the whole cache fits in fast memory; fasa reads k={} of {n_fc} FCs per token plus B={budget} full rows per step", r.chunks)),
        Variant::FasaM => reasons.push(format!(
            "variant fasa-m: the whole cache ({} per token) does not fit in fast memory; only the P={} pool planes stay there, V and the other K pairs go to the slow tier",
            format_size(tier_bytes_per_token(&Layout { variant: whole, pool: r.pool, budget, dense_layers: dl, element_bytes: input.element_bytes, gpu_mirror: input.gpu_mirror }, s).fast),
            r.pool
        )),
    }
    let ca_pool_share = share(r.pool, n_fc);
    let ca_chunks_share = share(r.chunks, n_fc);
    match (ca_pool_share, ca_chunks_share) {
        (Some(p), Some(k)) => reasons.push(format!("FCs: pool P={} keeps {:.1}% of the CA of all {n_fc} FCs, k={} keeps {:.1}% (calibrated profile)", r.pool, 100.0 * p, r.chunks, 100.0 * k)),
        _ => reasons.push(format!(
            "FCs: k={} (default n_fc/4 = {k_full}, the paper's 16 of 64), pool P={} (default 2k = {p_full}); no calibrated profile, so no pool FC is known to be free to drop",
            r.chunks, r.pool
        )),
    }
    reasons.push(format!("budget: B={budget} tokens (context/16 clamped to {MIN_BUDGET}..{MAX_BUDGET})"));

    let layout = fit.layout(&r, context);
    let kv = session_bytes(&layout, s, context).times(sessions as u64);
    Ok(Plan {
        variant: r.variant,
        pool_fcs: r.pool,
        chunks: r.chunks,
        budget,
        dense_layers: dl,
        row_cache_rows: if r.variant == Variant::FasaM { row_cache_rows(budget, context) } else { 0 },
        max_context: context,
        max_sessions: sessions,
        element_bytes: input.element_bytes,
        gpu_mirror: input.gpu_mirror,
        bytes: PlanBytes { weights: input.weight_bytes, workspace: input.workspace_bytes, kv_fast: kv.fast, kv_slow: kv.slow },
        available: avail,
        per_token: tier_bytes_per_token(&layout, s),
        per_session: per_session_bytes(&layout, s, context),
        ca_pool_share,
        ca_chunks_share,
        pressure: h.pressure,
        reasons,
    })
}

/// The longest context (whole pages, ≤ `cap`) that `sessions` sessions of `layout` can hold in
/// `avail`; 0 if not even one page fits. The tables of docs/plan.md come from this.
pub fn longest_context(layout: &Layout, shapes: &Shapes, avail: TierBytes, sessions: usize, cap: usize) -> usize {
    let fit = Fitter { shapes, dense_layers: layout.dense_layers, element_bytes: layout.element_bytes, gpu_mirror: layout.gpu_mirror, avail };
    fit.max_context(&Rung { variant: layout.variant, chunks: layout.pool, pool: layout.pool, budget: layout.budget }, sessions, cap)
}

impl Plan {
    /// Resident KV bytes of one session of `tokens` tokens under this plan (for admitting a job).
    pub fn session_bytes(&self, shapes: &Shapes, tokens: usize) -> TierBytes {
        session_bytes(&self.layout(), shapes, tokens)
    }
}
