//! Row selection for one decode step of one KV group (or one query head): each mode's stage 1.
//! Stage 2 (exact attention over the rows) is `fasa_kernels::cpu::attend_rows`.
use std::ops::Range;

use fasa_kernels::cpu::{choose_fcs, choose_fcs_var, fc_scores, fc_scores_q8, force_rows, q8_plane_bytes, quest_score, row_logits, softmax_in_place, tip_group_mass, tip_mass_merge, tip_mass_part, top_b, FcMoments, HeadView, MassPart, Q8View};

use super::config::{AttnConfig, Mode, QUEST_PAGE};
use super::profile::Profile;

/// Bytes per cached element on the CPU (f32).
pub const ELEM: u64 = 4;

pub struct GroupCtx<'a> {
    pub view: HeadView<'a>,
    /// Quest bounds, one slice per cache page: `(PAGE/16, 2, d)` mins then maxs, FC-pair order.
    pub bounds: &'a [&'a [f32]],
    /// K moments of each FC plane of the view over its `n` tokens (`SeqCache::moments`); empty
    /// when the mode does not choose FCs per step.
    pub moments: &'a [FcMoments],
    /// The int8 (or int4: `cache::tip_bits`) scoring planes (FASA-C), read by `fasa`'s TIP
    /// instead of the f32 planes.
    pub q8: Option<Q8View<'a>>,
    /// The model's softmax temperature `1/√d` (FASA-M's plane view has fewer dims than the head).
    pub scale: f32,
    pub layer: usize,
    pub kv_head: usize,
    /// Tokens visible (the whole cache at decode).
    pub n: usize,
    pub cfg: &'a AttnConfig,
    pub profile: &'a Profile,
    /// Stage 1 already computed (by parts on several threads: `mass_tip_fcs`), or None.
    pub pre: Option<&'a Stage1>,
}

/// `fasa`'s stage-1 scores of one KV group, computed ahead of `select` (`Stage1::merge`): the
/// FCs they used and the group's mass score `(n,)` (`tip_group_mass`), sinks and recent rows
/// forced in.
pub struct Stage1 {
    fcs: Vec<usize>,
    scores: Vec<f32>,
}

impl Stage1 {
    /// Joins the group's `mass_tip_part`s of consecutive ranges covering `0..c.n`.
    pub fn merge(c: &GroupCtx, fcs: Vec<usize>, parts: &[(&[f32], &[MassPart])]) -> Self {
        let mut scores = vec![0f32; c.n];
        tip_mass_merge(parts, c.scale, &mut scores);
        force_rows(&mut scores, c.cfg.sinks, c.cfg.recent);
        Self { fcs, scores }
    }
}

/// A deterministic permutation of `0..n` seeded by `seed` (xorshift Fisher–Yates).
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        p.swap(i, (s % (i as u64 + 1)) as usize);
    }
    p
}

/// `Σ_h softmax(logits_h)` of `(heads, m)` scaled logits: the attention mass each of the `m`
/// rows gets from the heads together.
fn summed_softmax(logits: &[f32], m: usize) -> Vec<f32> {
    let mut total = vec![0f32; m];
    let mut p = vec![0f32; m];
    for lh in logits.chunks_exact(m.max(1)) {
        p.copy_from_slice(lh);
        softmax_in_place(&mut p);
        total.iter_mut().zip(&p).for_each(|(t, v)| *t += v);
    }
    total
}

/// Exact per-head softmax over all `n` tokens, summed over heads: the attention mass each token
/// gets from the group (the oracle's score).
fn group_mass(view: &HeadView, qs: &[&[f32]], n: usize, scale: f32) -> Vec<f32> {
    let all: Vec<usize> = (0..view.n_fc).collect();
    let mut logits = vec![0f32; qs.len() * n];
    for (q, lh) in qs.iter().zip(logits.chunks_exact_mut(n.max(1))) {
        fc_scores(view, q, &all, n, lh, false);
        lh.iter_mut().for_each(|v| *v *= scale);
    }
    summed_softmax(&logits, n)
}

/// The group's mass over the candidates `rows` only (per-head softmax over them, summed), with
/// the exact scaled logits `(heads, rows.len())` it computed from their K rows.
fn rows_mass(view: &HeadView, qs: &[&[f32]], rows: &[u32], scale: f32) -> (Vec<f32>, Vec<f32>) {
    let logits = row_logits(view, qs, rows, scale);
    (summed_softmax(&logits, rows.len()), logits)
}

/// Experiment switches that restore the previous `fasa` stage 1, for the harness's ablation
/// (bench/FIDELITY.md): `FASA_EXPERIMENT_GROUP_SCORE=sum` sums the heads' FC scores instead of
/// their softmax masses; `FASA_EXPERIMENT_FC_CHOICE=norm` picks FCs by `Σ‖q_f‖` instead of the
/// logit variance they cause.
pub(crate) fn experiment(var: &'static str, value: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == value)
}

/// The scoring planes TIP reads: `fasa` reads the int8 ones where the cache has them
/// (`FASA_EXPERIMENT_TIP=f32` restores the f32 planes, for the harness's comparison); the
/// paper's recipe reads them too under `FASA_EXPERIMENT_PAPER_PLANES=1`, else the f32 planes as
/// the baselines do.
fn tip_planes<'a>(c: &GroupCtx<'a>) -> Option<Q8View<'a>> {
    c.q8.filter(|_| q8_tip(c.cfg))
}

/// Whether `cfg`'s TIP reads the quantised scoring planes (CPU and GPU alike).
pub(crate) fn q8_tip(cfg: &AttnConfig) -> bool {
    let quantised = match cfg.mode {
        Mode::Fasa => true,
        Mode::FasaPaper => paper_planes(),
        _ => false,
    };
    quantised && !experiment("FASA_EXPERIMENT_TIP", "f32")
}

/// `FASA_EXPERIMENT_PAPER_PLANES=1`: `fasa-paper`'s TIP reads the quantised scoring planes, so the
/// paper's recipe can be measured with f32, int8 and int4 planes (bench/FIDELITY.md).
pub(crate) fn paper_planes() -> bool {
    experiment("FASA_EXPERIMENT_PAPER_PLANES", "1")
}

/// Stage-1 scores `(n,)` of the group's query heads from the FC planes `fcs`: each head's FC-score
/// softmax mass, summed (`fasa` over a group), or the plain sum of the heads' FC scores (the
/// paper's recipe and the baselines, one head or a group).
fn tip_scores(c: &GroupCtx, qs: &[&[f32]], fcs: &[usize]) -> Vec<f32> {
    let n = c.n;
    let mut s = vec![0f32; n];
    let q8 = tip_planes(c);
    if mass_scored(c, qs) {
        tip_group_mass(&c.view, q8.as_ref(), qs, fcs, n, c.scale, &mut s);
    } else {
        for (i, q) in qs.iter().enumerate() {
            match &q8 {
                Some(q8) => fc_scores_q8(&c.view, q8, q, fcs, n, &mut s, i > 0),
                None => fc_scores(&c.view, q, fcs, n, &mut s, i > 0),
            }
        }
    }
    s
}

/// Whether stage 1 scores the group by its heads' FC-score softmax masses (`fasa` over a group).
fn mass_scored(c: &GroupCtx, qs: &[&[f32]]) -> bool {
    c.cfg.mode == Mode::Fasa && qs.len() > 1 && !experiment("FASA_EXPERIMENT_GROUP_SCORE", "sum")
}

/// The FCs of the group-mass TIP that `select` would run over all `n` tokens for the group's
/// heads `heads` (one token set per group), or None where its stage 1 is anything else: then a
/// caller with threads may compute that TIP by parts (`mass_tip_part`, `tip_mass_merge`) and hand
/// it to `select` as `GroupCtx::pre`.
pub fn mass_tip_fcs(c: &GroupCtx, heads: &[usize], qs: &[&[f32]]) -> Option<Vec<usize>> {
    let (n, cfg) = (c.n, c.cfg);
    let exact_only = cfg.rerank > cfg.budget && cfg.rerank >= n;
    if !cfg.per_group || !mass_scored(c, qs) || n <= cfg.budget || exact_only {
        return None;
    }
    Some(fasa_fcs(c, heads, qs))
}

/// One part of the group-mass TIP over the tokens `range` (see `tip_mass_part`).
pub fn mass_tip_part(c: &GroupCtx, qs: &[&[f32]], fcs: &[usize], range: Range<usize>, e: &mut [f32]) -> Vec<MassPart> {
    tip_mass_part(&c.view, tip_planes(c).as_ref(), qs, fcs, range, c.scale, e)
}

/// The FCs `fasa` and `fasa-paper` score this step: the calibrated pool's first k (the paper,
/// P = k), else k chosen in the pool by the logit variance they cause (or by query norm).
fn fasa_fcs(c: &GroupCtx, heads: &[usize], qs: &[&[f32]]) -> Vec<usize> {
    let cfg = c.cfg;
    let ranked = ranked(c, heads);
    let pool = &ranked[..cfg.pool.min(ranked.len())];
    if cfg.pool <= cfg.chunks {
        pool[..cfg.chunks.min(pool.len())].to_vec()
    } else if c.moments.is_empty() || experiment("FASA_EXPERIMENT_FC_CHOICE", "norm") {
        choose_fcs(qs, pool, cfg.chunks)
    } else {
        choose_fcs_var(qs, pool, cfg.chunks, c.moments, c.n)
    }
}

/// Bytes TIP reads from `fcs` planes over the context: int8 (or int4) pairs and scales when it
/// read the scoring planes, f32 pairs otherwise.
pub fn plane_bytes(c: &GroupCtx, fcs: usize) -> u64 {
    tip_bytes(c.cfg, c.n, c.q8.map(|q| (q.blocks, q.bits)), fcs, ELEM)
}

/// Bytes TIP reads for `cfg` from `fcs` planes over `n` tokens of `elem`-byte elements, given
/// the whole blocks the cache holds quantised and their bits (`None`: no quantised planes): CPU
/// and GPU counters alike (`q8_plane_bytes`).
pub(crate) fn tip_bytes(cfg: &AttnConfig, n: usize, q8: Option<(usize, u32)>, fcs: usize, elem: u64) -> u64 {
    match q8.filter(|_| q8_tip(cfg)) {
        Some((blocks, bits)) => q8_plane_bytes(n, blocks, bits, fcs, elem as usize),
        None => (n * 2 * fcs) as u64 * elem,
    }
}

/// The query heads' FC pool for this selection: per query head when selecting for one head of a
/// per-head mode, else the KV group's ranking.
fn ranked<'p>(c: &GroupCtx<'p>, heads: &[usize]) -> &'p [usize] {
    let l = &c.profile.layers[c.layer];
    if !c.cfg.per_group && heads.len() == 1 {
        &l.q_heads[heads[0]].ranked_fcs
    } else {
        &l.kv_heads[c.kv_head].ranked_fcs
    }
}

/// What stage 1 chose: rows to attend (ascending), the FC planes it scored, other K/V bytes it
/// read (Quest bounds, re-rank K, the oracle's full K), and, after an exact re-rank, the kept
/// rows' scaled logits `(heads, rows.len())` so focused attention reads only their V.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    pub rows: Vec<u32>,
    pub fcs: Vec<usize>,
    pub extra_bytes: u64,
    pub logits: Vec<f32>,
}

/// Stage 1 for the query heads `heads` (global ids) with rotated queries `qs` (`(n_fc, 2)`).
pub fn select(c: &GroupCtx, heads: &[usize], qs: &[&[f32]]) -> Selection {
    let mut logits = Vec::new();
    let (rows, fcs, extra_bytes) = select_inner(c, heads, qs, &mut logits);
    Selection { rows, fcs, extra_bytes, logits }
}

fn select_inner(c: &GroupCtx, heads: &[usize], qs: &[&[f32]], kept_logits: &mut Vec<f32>) -> (Vec<u32>, Vec<usize>, u64) {
    let (n, b, cfg) = (c.n, c.cfg.budget, c.cfg);
    let d = c.view.head_dim() as u64;
    let mut rows = Vec::with_capacity(b);
    if n <= b {
        rows.extend(0..n as u32);
        return (rows, vec![], 0);
    }
    let mut used_fcs = Vec::new();
    let mut fc_select = |fcs: &[usize], rows: &mut Vec<u32>| -> u64 {
        let rerank = cfg.rerank > b;
        if rerank && cfg.rerank >= n {
            // Every token is a candidate: exact scores choose, FC scores would add nothing.
            let all: Vec<u32> = (0..n as u32).collect();
            return rerank_into(c, qs, &all, rows, kept_logits);
        }
        used_fcs = fcs.to_vec();
        // Stage 1's scores with sinks and recent rows forced in (`Stage1` has them forced).
        let s: std::borrow::Cow<[f32]> = match c.pre {
            Some(pre) => pre.scores.as_slice().into(),
            None => {
                let mut s = tip_scores(c, qs, fcs);
                force_rows(&mut s, cfg.sinks, cfg.recent);
                s.into()
            }
        };
        if rerank {
            let mut cand = Vec::new();
            top_b(&s, cfg.rerank, &mut cand);
            rerank_into(c, qs, &cand, rows, kept_logits)
        } else {
            top_b(&s, b, rows);
            0
        }
    };
    let bytes = match cfg.mode {
        Mode::Dense => {
            rows.extend(0..n as u32);
            0
        }
        Mode::Oracle => {
            let mass = group_mass(&c.view, qs, n, c.scale);
            top_b(&mass, b, &mut rows);
            n as u64 * d * ELEM
        }
        Mode::Streaming => {
            let sinks = cfg.sinks.min(b);
            rows.extend(0..sinks as u32);
            rows.extend((n - (b - sinks)) as u32..n as u32);
            0
        }
        Mode::Quest => {
            let pages = n.div_ceil(QUEST_PAGE);
            let per_cache_page = c.view.page / QUEST_PAGE;
            let mut s = vec![0f32; pages];
            for (p, sp) in s.iter_mut().enumerate() {
                let cp = c.bounds[p / per_cache_page];
                let o = (p % per_cache_page) * 2 * d as usize;
                *sp = qs.iter().map(|q| quest_score(q, &cp[o..o + 2 * d as usize])).sum();
            }
            let mut top = Vec::new();
            top_b(&s, (b / QUEST_PAGE).max(1), &mut top);
            for p in top {
                let t0 = p as usize * QUEST_PAGE;
                rows.extend(t0 as u32..(t0 + QUEST_PAGE).min(n) as u32);
            }
            rows.truncate(b);
            pages as u64 * 2 * d * ELEM
        }
        Mode::RandomFc => {
            let seed = (c.layer as u64) << 32 | (heads[0] as u64) << 8 | c.kv_head as u64;
            let mut fcs: Vec<usize> = permutation(c.view.n_fc, seed + 1).into_iter().take(cfg.chunks).collect();
            fcs.sort_unstable();
            fc_select(&fcs, &mut rows)
        }
        Mode::FasaPaper | Mode::Fasa => {
            let fcs = match c.pre {
                Some(pre) => pre.fcs.clone(),
                None => fasa_fcs(c, heads, qs),
            };
            fc_select(&fcs, &mut rows)
        }
    };
    (rows, used_fcs, bytes)
}

/// The re-rank stage: exact per-head softmax over the candidates `cand` (ascending), summed over
/// the group's heads, keeps the best B (forced rows stay in) into `rows`, and their logits
/// `(heads, B)` into `kept`. Returns the K bytes it read.
fn rerank_into(c: &GroupCtx, qs: &[&[f32]], cand: &[u32], rows: &mut Vec<u32>, kept: &mut Vec<f32>) -> u64 {
    let (n, cfg) = (c.n, c.cfg);
    let (mut mass, logits) = rows_mass(&c.view, qs, cand, c.scale);
    for (m, &t) in mass.iter_mut().zip(cand) {
        if (t as usize) < cfg.sinks || (t as usize) >= n - cfg.recent.min(n) {
            *m = f32::INFINITY;
        }
    }
    let mut pick = Vec::new();
    top_b(&mass, cfg.budget, &mut pick);
    rows.extend(pick.iter().map(|&i| cand[i as usize]));
    // `pick` is ascending, as `rows`: the kept logits line up with the rows.
    for h in 0..qs.len() {
        kept.extend(pick.iter().map(|&i| logits[h * cand.len() + i as usize]));
    }
    (cand.len() * c.view.head_dim()) as u64 * ELEM
}

/// Distinct elements over several sets, each without repeats (selections and FC sets are):
/// what the heads of one group read together.
pub fn union_len<T: Ord + Copy>(sets: &[&[T]]) -> usize {
    if let [one] = sets {
        // Selections hold distinct elements: one set is its own union (no sort per step).
        return one.len();
    }
    let mut all: Vec<T> = sets.iter().flat_map(|s| s.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    all.len()
}

/// Exact attention mass `(n,)` of one query head over all tokens (for measurement).
pub fn head_mass(view: &HeadView, q: &[f32], n: usize, scale: f32) -> Vec<f32> {
    let all: Vec<usize> = (0..view.n_fc).collect();
    let mut s = vec![0f32; n];
    fc_scores(view, q, &all, n, &mut s, false);
    s.iter_mut().for_each(|v| *v *= scale);
    softmax_in_place(&mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::profile::{HeadProfile, LayerProfile};
    use crate::RopeLayout;

    struct Fixture {
        k: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
        bounds: Vec<Vec<f32>>,
        n: usize,
        d: usize,
    }

    /// One cache page of `n` tokens, d = 4 (2 FCs): token t's K is zero except FC 1 = (t, 0).
    fn fixture(n: usize, page: usize) -> Fixture {
        let d = 4;
        let mut k = vec![0f32; d / 2 * page * 2];
        for t in 0..n {
            k[(page + t) * 2] = t as f32; // FC 1, first element
        }
        let mut bounds = vec![0f32; page / QUEST_PAGE * 2 * d];
        for p in 0..page / QUEST_PAGE {
            let (lo, hi) = (p * QUEST_PAGE, (p * QUEST_PAGE + QUEST_PAGE - 1).min(n.saturating_sub(1)));
            let o = p * 2 * d;
            bounds[o + 2] = lo as f32; // min of FC 1 first element
            bounds[o + d + 2] = hi as f32; // max
        }
        Fixture { k: vec![k], v: vec![vec![0.0; page * d]], bounds: vec![bounds], n, d }
    }

    fn profile(ranked: Vec<usize>) -> Profile {
        let h = HeadProfile { ranked_fcs: ranked, ca: vec![], ca_by_k: Default::default() };
        Profile {
            schema: 1,
            model_sha256: String::new(),
            model_name: String::new(),
            rope_layout: RopeLayout::Adjacent,
            head_dim: 4,
            k_values: vec![],
            ca_k: 0,
            queries: 0,
            sources: vec![],
            layers: vec![LayerProfile { kv_heads: vec![h.clone()], q_heads: vec![h] }],
            uncalibrated: false,
            activations: None,
        }
    }

    fn run(f: &Fixture, cfg: &AttnConfig, prof: &Profile, q: &[f32]) -> Vec<u32> {
        let k: Vec<&[f32]> = f.k.iter().map(|p| p.as_slice()).collect();
        let v: Vec<&[f32]> = f.v.iter().map(|p| p.as_slice()).collect();
        let b: Vec<&[f32]> = f.bounds.iter().map(|p| p.as_slice()).collect();
        // K rows in FC-pair order: FC 1's first element is t.
        let mut kr = vec![vec![0f32; 64 * f.d]];
        for t in 0..f.n {
            kr[0][t * f.d + 2] = t as f32;
        }
        let krr: Vec<&[f32]> = kr.iter().map(|p| p.as_slice()).collect();
        let view = HeadView { k_pages: &k, kr_pages: &krr, v_pages: &v, page: 64, n_fc: f.d / 2, len: f.n };
        let c = GroupCtx { view, q8: None, bounds: &b, layer: 0, kv_head: 0, n: f.n, cfg, profile: prof, moments: &[], scale: 1.0 / (f.d as f32).sqrt(), pre: None };
        select(&c, &[0], &[q]).rows
    }

    #[test]
    fn each_mode_selects_what_its_definition_says() {
        let f = fixture(64, 64);
        let q = [0.0, 0.0, 1.0, 0.0]; // scores t on FC 1: later tokens score higher
        let prof = profile(vec![1, 0]);
        let top8: Vec<u32> = (56..64).collect();
        assert_eq!(run(&f, &AttnConfig::baseline(Mode::Oracle, 8, 1), &prof, &q), top8);
        assert_eq!(run(&f, &AttnConfig::paper(8, 1), &prof, &q), top8);
        // The paper's FC set is the calibrated one: FC 0 carries no signal → ties → lowest ids.
        assert_eq!(run(&f, &AttnConfig::paper(8, 1), &profile(vec![0, 1]), &q), (0..8).collect::<Vec<u32>>());
        // Per-step choice by ‖q_f‖ finds FC 1 even when calibration ranked FC 0 first.
        let mut dynamic = AttnConfig::fasa(8, 1);
        (dynamic.pool, dynamic.sinks, dynamic.recent) = (2, 0, 0);
        assert_eq!(run(&f, &dynamic, &profile(vec![0, 1]), &q), top8);
        // Streaming: 4 sinks + 4 recent.
        assert_eq!(run(&f, &AttnConfig::baseline(Mode::Streaming, 8, 1), &prof, &q), vec![0, 1, 2, 3, 60, 61, 62, 63]);
        // Sinks and recent kept inside B; the rest by score (q favours early tokens here).
        let mut forced = AttnConfig::fasa(8, 1);
        (forced.pool, forced.sinks, forced.recent) = (1, 2, 2);
        let qneg = [0.0, 0.0, -1.0, 0.0];
        assert_eq!(run(&f, &forced, &prof, &qneg), vec![0, 1, 2, 3, 4, 5, 62, 63]);
        // Quest: the best 16-token page by its bound.
        assert_eq!(run(&f, &AttnConfig::baseline(Mode::Quest, 16, 1), &prof, &q), (48..64).collect::<Vec<u32>>());
        // Budget ≥ context: everything.
        assert_eq!(run(&f, &AttnConfig::paper(64, 1), &prof, &q), (0..64).collect::<Vec<u32>>());
    }

    #[test]
    fn rerank_uses_exact_scores_among_candidates() {
        let f = fixture(64, 64);
        let q = [0.0, 0.0, 1.0, 0.0];
        // Calibration ranks the useless FC 0 first: its scores tie, so the 32 candidates are the
        // lowest ids; exact scores then pick the best 8 of those.
        let mut cfg = AttnConfig::paper(8, 1);
        cfg.rerank = 32;
        assert_eq!(run(&f, &cfg, &profile(vec![0, 1]), &q), (24..32).collect::<Vec<u32>>());
    }

    #[test]
    fn random_fc_is_deterministic() {
        assert_eq!(permutation(32, 5), permutation(32, 5));
        assert_ne!(permutation(32, 5), permutation(32, 6));
        let mut p = permutation(32, 9);
        p.sort_unstable();
        assert_eq!(p, (0..32).collect::<Vec<_>>());
    }
}
