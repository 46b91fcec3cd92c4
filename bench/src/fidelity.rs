//! Teacher-forced fidelity of each attention setting against dense attention on the same text.
//!
//! Per context L: the first L−T tokens are prefilled densely once into a base slot; each setting
//! copies that slot, then feeds the next T tokens one decode step at a time (the selector active)
//! and is compared, step by step, with the dense run over the same tokens: KL(dense‖sparse) of
//! the next-token distributions (natural log), top-1 agreement, perplexity of the true next
//! tokens, and the operator's counters (recall vs the oracle top-B, attention mass kept, K/V
//! bytes read relative to dense, per KV group).
use std::path::PathBuf;
use std::time::Instant;

use fasa_engine::attention::Profile;
use fasa_engine::calibrate::{self, CalibrateOptions};
use fasa_engine::{AttnConfig, EngineError, Mode, Model, Result};
use serde::{Deserialize, Serialize};

use crate::passkey::{self, PasskeyOptions, PasskeyRow};
use crate::{argmax, log_softmax, prefill};

/// One attention setting as named on the command line: `MODE[:knob=value,...]`, knobs `k`,
/// `pool`, `sinks`, `recent`, `rerank` (tokens, or `4x` = 4·B), `group` (1 = per KV group,
/// 0 = per query head), `dense` (dense layers). Unnamed knobs take the mode's recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setting {
    pub spec: String,
}

impl Setting {
    pub fn new(spec: &str) -> Self {
        Self { spec: spec.into() }
    }

    /// The settings at budget `b`. FCs per step default to the engine's default for `fasa` (12)
    /// and to 8 for the other FC modes (the paper's 8 of 32 on SmolLM2); callers cap the pool at
    /// the model's FC count (`AttnConfig::fit_pool`).
    pub fn config(&self, b: usize) -> std::result::Result<AttnConfig, String> {
        let (mode, knobs) = self.spec.split_once(':').unwrap_or((&self.spec, ""));
        let mode = Mode::parse(mode).ok_or_else(|| format!("unknown mode {mode:?} in {:?}", self.spec))?;
        let kv: Vec<(&str, &str)> = knobs.split(',').filter(|s| !s.is_empty()).map(|s| s.split_once('=').ok_or_else(|| format!("knob {s:?} is not name=value"))).collect::<std::result::Result<_, _>>()?;
        let num = |v: &str| v.parse::<usize>().map_err(|_| format!("knob value {v:?} is not a number"));
        let k_default = if mode == Mode::Fasa { AttnConfig::default().chunks } else { 8 };
        let k = kv.iter().find(|(n, _)| *n == "k").map(|(_, v)| num(v)).transpose()?.unwrap_or(k_default);
        let mut c = AttnConfig::baseline(mode, b, k);
        let pool_set = kv.iter().any(|(n, _)| *n == "pool");
        if !pool_set && mode == Mode::Fasa {
            c.pool = (AttnConfig::fasa(b, 8).pool * k).div_ceil(8).max(k);
        }
        for (n, v) in kv {
            match n {
                "k" => {}
                "pool" => c.pool = num(v)?,
                "sinks" => c.sinks = num(v)?,
                "recent" => c.recent = num(v)?,
                "rerank" => {
                    c.rerank = if let Some(m) = v.strip_suffix('x') { num(m)? * b } else { num(v)? };
                    c.rerank_grows = false;
                }
                "grow" => c.rerank_grows = num(v)? != 0,
                "group" => c.per_group = num(v)? != 0,
                "dense" => c.dense_layers = num(v)?,
                _ => return Err(format!("unknown knob {n:?} (k, pool, sinks, recent, rerank, grow, group, dense)")),
            }
        }
        if mode == Mode::Streaming {
            c.recent = b.saturating_sub(c.sinks);
        }
        Ok(c)
    }
}

#[derive(Debug, Clone)]
pub struct FidelityOptions {
    pub contexts: Vec<usize>,
    pub budgets: Vec<usize>,
    /// Settings compared with dense (dense itself is always run as the reference).
    pub settings: Vec<Setting>,
    /// Teacher-forced decode steps T per context.
    pub eval_tokens: usize,
    /// `(name, text)`; empty = `calibrate::default_eval_texts()`.
    pub texts: Vec<(String, String)>,
    /// Profile to load; when the file is missing, calibration runs and saves it there.
    pub profile: Option<PathBuf>,
    /// Calibration settings used when the profile must be made.
    pub calibration: CalibrateOptions,
    pub passkey: PasskeyOptions,
    /// Print progress to stderr.
    pub verbose: bool,
}

impl FidelityOptions {
    /// The full run: 2k/4k/8k, B = 256 and 1024, every mode, T = 256, passkey at 1k–8k.
    pub fn full() -> Self {
        let modes = ["fasa", "fasa-paper", "oracle", "streaming", "quest", "random-fc"];
        Self {
            contexts: vec![2048, 4096, 8192],
            budgets: vec![256, 1024],
            settings: modes.iter().map(|m| Setting::new(m)).collect(),
            eval_tokens: 256,
            texts: vec![],
            profile: None,
            calibration: CalibrateOptions::default(),
            passkey: PasskeyOptions::default(),
            verbose: true,
        }
    }

    /// The CI-sized run: 1k context, T = 32, fasa/oracle/streaming at B = 256 and B = 1024 (≥ the
    /// context: must equal dense), passkey at 512 tokens with one key per depth, a small
    /// calibration when no profile is given.
    pub fn quick() -> Self {
        Self {
            contexts: vec![1024],
            budgets: vec![256, 1024],
            settings: ["fasa", "oracle", "streaming"].iter().map(|m| Setting::new(m)).collect(),
            eval_tokens: 32,
            texts: vec![],
            profile: None,
            calibration: CalibrateOptions { k_values: vec![32, 64, 128], prefix: 256, max_tokens: 512, stride: 8, ..Default::default() },
            passkey: PasskeyOptions { lengths: vec![512], keys_per_depth: 1, ..Default::default() },
            verbose: false,
        }
    }
}

/// One (context, budget, setting) measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub context: usize,
    pub budget: usize,
    pub spec: String,
    pub config: AttnConfig,
    pub steps: usize,
    /// Mean over steps of KL(dense‖this), nats.
    pub kl: f64,
    /// Largest single-step KL.
    pub kl_max: f64,
    /// Steps whose argmax equals dense's.
    pub top1: f64,
    /// exp(mean NLL of the true next tokens).
    pub ppl: f64,
    /// Mean over probes of |selected ∩ oracle top-B| / B (1 for dense).
    pub recall: f64,
    /// Mean softmax mass of the selected rows (1 for dense).
    pub mass: f64,
    /// K/V bytes read / dense's, per KV group, over all layers (dense layers included).
    pub bytes_fraction: f64,
    /// The same over the sparse layers only.
    pub bytes_fraction_sparse: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub model: String,
    pub model_sha256: String,
    pub profile_sources: Vec<String>,
    pub profile_queries: usize,
    pub eval_sources: Vec<String>,
    pub eval_tokens: usize,
    /// Activations of the weight matmuls in every run (dense included).
    #[serde(default)]
    pub activations: fasa_engine::Activations,
    pub rows: Vec<Row>,
    pub passkey: Vec<PasskeyRow>,
}

/// Loads the model with enough slots and context for `opts`.
pub fn load_model(max_context: usize, activations: fasa_engine::Activations) -> Result<Model> {
    let (m, o) = (fasa_engine::paths::default_model(), fasa_engine::paths::default_ort_library());
    let mut lo = fasa_engine::LoadOptions::new(m, o);
    lo.max_sequences = 3;
    lo.max_context = max_context;
    lo.activations = activations;
    Model::load(&lo)
}

/// Loads the profile at `path` if it fits the model, else calibrates (and saves it there).
pub fn ensure_profile(model: &mut Model, path: Option<&std::path::Path>, opts: &CalibrateOptions, verbose: bool) -> Result<Profile> {
    let info = model.info().clone();
    if let Some(p) = path.filter(|p| p.is_file()) {
        let prof = Profile::load(p)?;
        prof.check(&info.config, &info.sha256).map_err(|e| EngineError::InvalidRequest(format!("{}: {e} (delete it to recalibrate)", p.display())))?;
        model.pool().set_profile(prof.clone());
        return Ok(prof);
    }
    let t = Instant::now();
    let mut texts = calibrate::default_calibration_texts();
    if opts.max_tokens <= 512 {
        texts.truncate(1);
    }
    let mut last = -1.0;
    let prof = calibrate::calibrate(model, &texts, opts, &mut |f| {
        if verbose && f - last >= 0.1 {
            last = f;
            eprintln!("calibrating: {:.0}%", f * 100.0);
        }
    })?;
    if verbose {
        eprintln!("calibrated on {} queries per head in {:.1} s", prof.queries, t.elapsed().as_secs_f64());
    }
    if let Some(p) = path {
        prof.save(p)?;
    }
    model.pool().set_profile(prof.clone());
    Ok(prof)
}

/// The evaluation token ids: the texts joined by blank lines, repeated until `n` tokens.
pub fn eval_ids(model: &Model, texts: &[(String, String)], n: usize) -> Result<Vec<u32>> {
    let joined = texts.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join("\n\n");
    let one = model.tokenizer().encode(&joined, false)?;
    if one.is_empty() {
        return Err(EngineError::InvalidRequest("the evaluation text is empty".into()));
    }
    Ok(one.iter().copied().cycle().take(n).collect())
}

/// Dense reference of one context: log-probabilities per step (T × vocab).
struct Reference {
    logp: Vec<Vec<f64>>,
    row: Row,
}

/// Feeds `ids` one decode step each at positions `pos..` of `work` (a copy of `base`) under `cfg`;
/// calls `each(step, logits)`.
fn teacher_force(model: &mut Model, base: usize, work: usize, cfg: &AttnConfig, measure: bool, ids: &[u32], pos: usize, each: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
    if !model.pool().copy_slot(base, work) {
        return Err(EngineError::InvalidRequest("cannot copy the base slot".into()));
    }
    // C sized for the context as the engine sizes it for a request (`AttnConfig::for_context`).
    model.configure_slot(work, &cfg.clone().for_context(pos + ids.len()), measure);
    model.reset_stats(work);
    for (i, &t) in ids.iter().enumerate() {
        let logits = model.forward(&[t], pos + i, work)?;
        each(i, &logits);
    }
    Ok(())
}

/// Runs one context: the dense reference and every (budget, setting).
fn run_context(model: &mut Model, ids: &[u32], ctx: usize, opts: &FidelityOptions, base: usize, work: usize, rows: &mut Vec<Row>) -> Result<()> {
    let t_steps = opts.eval_tokens.min(ctx - 1);
    let start = ctx - t_steps;
    let t0 = Instant::now();
    model.configure_slot(base, &AttnConfig::dense(), false);
    prefill(model, &ids[..start], 0, base)?;
    if opts.verbose {
        eprintln!("context {ctx}: prefilled {start} tokens in {:.1} s", t0.elapsed().as_secs_f64());
    }
    let feed = &ids[start..ctx];
    let truth = &ids[start + 1..=ctx];
    let dense_cfg = AttnConfig::dense();
    let t0 = Instant::now();
    let mut logp = Vec::with_capacity(t_steps);
    let mut nll = 0.0;
    teacher_force(model, base, work, &dense_cfg, false, feed, start, &mut |i, l| {
        let lp = log_softmax(l);
        nll -= lp[truth[i] as usize];
        logp.push(lp);
    })?;
    let st = model.slot_stats(work);
    let reference = Reference {
        logp,
        row: Row {
            context: ctx,
            budget: ctx,
            spec: "dense".into(),
            config: dense_cfg,
            steps: t_steps,
            kl: 0.0,
            kl_max: 0.0,
            top1: 1.0,
            ppl: (nll / t_steps as f64).exp(),
            recall: 1.0,
            mass: 1.0,
            bytes_fraction: st.read_fraction(),
            bytes_fraction_sparse: 1.0,
            seconds: t0.elapsed().as_secs_f64(),
        },
    };
    if opts.verbose {
        eprintln!("  dense: ppl {:.3} ({:.1} s)", reference.row.ppl, reference.row.seconds);
    }
    rows.push(reference.row.clone());
    for &b in &opts.budgets {
        for s in &opts.settings {
            let c = model.info().config.clone();
            let cfg = s.config(b).map_err(EngineError::InvalidRequest)?.fit_pool(c.n_fcs());
            cfg.validate(c.n_fcs(), c.n_layers).map_err(|e| EngineError::InvalidRequest(format!("{}: {e}", s.spec)))?;
            let t0 = Instant::now();
            let (mut kl, mut kl_max, mut agree, mut nll) = (0.0, 0.0f64, 0usize, 0.0);
            let dense_top: Vec<u32> = reference.logp.iter().map(|lp| argmax_f64(lp)).collect();
            teacher_force(model, base, work, &cfg, true, feed, start, &mut |i, l| {
                let lp = log_softmax(l);
                let pd = &reference.logp[i];
                let step_kl: f64 = pd.iter().zip(&lp).map(|(&a, &b)| if a > -80.0 { a.exp() * (a - b) } else { 0.0 }).sum::<f64>().max(0.0);
                kl += step_kl;
                kl_max = kl_max.max(step_kl);
                agree += (argmax(l) == dense_top[i]) as usize;
                nll -= lp[truth[i] as usize];
            })?;
            let st = model.slot_stats(work);
            // Bytes over the sparse layers alone: dense layers read exactly their dense bytes.
            let sparse_frac = {
                let dl = cfg.dense_layers.min(c.n_layers) as f64;
                let per_layer = st.bytes_dense as f64 / c.n_layers as f64;
                let (dense_part, rest) = (per_layer * dl, st.bytes_dense as f64 - per_layer * dl);
                if rest > 0.0 { (st.bytes_read as f64 - dense_part) / rest } else { 1.0 }
            };
            let row = Row {
                context: ctx,
                budget: b,
                spec: s.spec.clone(),
                config: cfg,
                steps: t_steps,
                kl: kl / t_steps as f64,
                kl_max,
                top1: agree as f64 / t_steps as f64,
                ppl: (nll / t_steps as f64).exp(),
                recall: if st.probes == 0 { 1.0 } else { st.recall() },
                mass: if st.probes == 0 { 1.0 } else { st.mass() },
                bytes_fraction: st.read_fraction(),
                bytes_fraction_sparse: sparse_frac,
                seconds: t0.elapsed().as_secs_f64(),
            };
            if opts.verbose {
                eprintln!(
                    "  B={b} {}: KL {:.4} top1 {:.3} ppl {:.3} recall {:.3} mass {:.3} bytes {:.3} ({:.1} s)",
                    s.spec, row.kl, row.top1, row.ppl, row.recall, row.mass, row.bytes_fraction, row.seconds
                );
            }
            rows.push(row);
        }
    }
    Ok(())
}

fn argmax_f64(x: &[f64]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs the whole harness on `model` (which must have ≥ 2 free slots and fit the contexts).
pub fn run(model: &mut Model, opts: &FidelityOptions) -> Result<Results> {
    let prof = ensure_profile(model, opts.profile.as_deref(), &opts.calibration, opts.verbose)?;
    let texts = if opts.texts.is_empty() { calibrate::default_eval_texts() } else { opts.texts.clone() };
    if texts.is_empty() {
        return Err(EngineError::InvalidRequest(format!("no evaluation text: none of {:?} exist in {}; pass --text FILE", calibrate::EVAL_FILES, calibrate::LICENSE_DIR)));
    }
    let max_ctx = opts.contexts.iter().copied().max().unwrap_or(0);
    if max_ctx > model.info().max_context {
        return Err(EngineError::ContextTooLong { prompt: max_ctx, limit: model.info().max_context });
    }
    let ids = eval_ids(model, &texts, max_ctx + 1)?;
    let base = model.pool().acquire().ok_or(EngineError::NoFreeSlot(model.pool().n_slots()))?;
    let work = model.pool().acquire().ok_or(EngineError::NoFreeSlot(model.pool().n_slots()))?;
    let mut rows = Vec::new();
    for &ctx in &opts.contexts {
        run_context(model, &ids, ctx, opts, base.slot(), work.slot(), &mut rows)?;
    }
    let pk = passkey::run(model, &opts.passkey, &opts.budgets, &opts.settings, base.slot(), work.slot(), opts.verbose)?;
    let info = model.info();
    Ok(Results {
        model: info.config.name.clone(),
        model_sha256: info.sha256.clone(),
        profile_sources: prof.sources.iter().map(|s| format!("{} ({} tokens, sha256 {})", s.path, s.tokens, &s.sha256[..12.min(s.sha256.len())])).collect(),
        profile_queries: prof.queries,
        eval_sources: texts.iter().map(|(n, t)| format!("{n} (sha256 {})", &calibrate::sha256_hex(t)[..12])).collect(),
        eval_tokens: opts.eval_tokens,
        activations: info.activations,
        rows,
        passkey: pk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_knobs() {
        let c = Setting::new("fasa:k=4,pool=32,sinks=0,recent=16,rerank=4x,group=0,dense=2").config(256).unwrap();
        assert_eq!((c.mode, c.chunks, c.pool, c.sinks, c.recent, c.rerank, c.per_group, c.dense_layers), (Mode::Fasa, 4, 32, 0, 16, 1024, false, 2));
        let s = Setting::new("streaming").config(512).unwrap();
        assert_eq!((s.sinks, s.recent), (4, 508));
        assert!(Setting::new("nope").config(1).is_err());
        assert!(Setting::new("fasa:x=1").config(1).is_err());
    }
}
