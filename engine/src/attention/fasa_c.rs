//! One sparse decode step over a FASA-C cache on the CPU, as ordered work items over the
//! session's threads: stage 1 in parts of the context (`mass_tip_part`), then per KV group the
//! selection (merge, top-C, exact re-rank, top-B), then focused attention per query head.
//!
//! Why items and not one task per group: SmolLM2 has 3 KV groups and the machines it targets 2
//! threads, so a task per group leaves one thread idle a third of the step. Items are claimed in
//! list order by whichever thread is free (`run_in_order`); an item waits only for earlier items.
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use fasa_kernels::cpu::{attend_rows_group, attend_scored_rows_group, MassPart, QB};
use ort::operator::ComputeContext;

use super::cache::{Pages, SeqCache};
use super::config::{AttnConfig, Mode};
use super::profile::Profile;
use super::sparse::{head_mass, mass_tip_fcs, mass_tip_part, plane_bytes, select, union_len, GroupCtx, Selection, Stage1, ELEM};
use super::stats::AttnStats;

/// Shortest context whose stage-1 TIP is split into parts (below it the parts' bookkeeping costs
/// more than the imbalance it removes).
const SPLIT_MIN: usize = 2048;

/// A raw output pointer shared by workers that write disjoint rows.
pub(super) struct SharedOut(pub *mut f32);
// SAFETY: workers write disjoint `(token, head)` ranges of one buffer that outlives the step.
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

impl SharedOut {
    /// A method (not a field access) so closures capture the whole `Sync` wrapper.
    pub(super) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// What one layer's sparse step reads.
pub(super) struct Step<'a> {
    pub cache: &'a SeqCache,
    pub pages: &'a [Pages<'a>],
    pub bounds: &'a [Vec<&'a [f32]>],
    pub cfg: &'a AttnConfig,
    pub profile: &'a Profile,
    pub layer: usize,
    /// Tokens cached, the new one included.
    pub n: usize,
    /// Query heads per KV group, head dim.
    pub group: usize,
    pub d: usize,
    pub scale: f32,
    /// Rotated queries `(H, n_fc, 2)`.
    pub q_fc: &'a [f32],
    /// Recall and mass against the exact top-B, per head (the harness's measurement).
    pub measure: bool,
    pub threads: usize,
}

/// Runs items `0..n` on `threads` pool threads: each free thread claims the next item in list
/// order and first waits until the items `deps(i)` (all before `i`) are done. A waited-for item
/// was claimed earlier by a thread that is running it, and that thread waits only on still
/// earlier items, so the step cannot deadlock, also when the pool runs the tasks one after the
/// other on one thread.
fn run_in_order(ctx: &ComputeContext, threads: usize, n: usize, deps: impl Fn(usize) -> Range<usize> + Sync, run: impl Fn(usize) + Sync) -> ort::Result<()> {
    let next = AtomicUsize::new(0);
    let done: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
    ctx.par_for(threads.clamp(1, n.max(1)), 0, |_| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        for d in deps(i) {
            let mut spins = 0u32;
            while !done[d].load(Ordering::Acquire) {
                spins += 1;
                if spins < 1 << 12 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        run(i);
        done[i].store(true, Ordering::Release);
    })
}

/// A group's selections and counters, set once by its selection item and then read, without a
/// lock or a copy, by its heads' items.
struct Chosen {
    sels: Vec<Selection>,
    stats: AttnStats,
}

/// Decodes one token for every KV group into `out` (`(H, d)`) and returns the counters.
pub(super) fn sparse_step(ctx: &ComputeContext, s: &Step, out: &SharedOut) -> ort::Result<AttnStats> {
    let (hkv, group, d) = (s.pages.len(), s.group, s.d);
    let moments: Vec<_> = (0..hkv).map(|g| if wants_moments(s.cfg) { s.cache.moments(s.layer, g) } else { vec![] }).collect();
    let gctx = |g: usize| GroupCtx { view: s.pages[g].view(), q8: s.pages[g].q8_view(), bounds: &s.bounds[g], layer: s.layer, kv_head: g, n: s.n, cfg: s.cfg, profile: s.profile, moments: &moments[g], scale: s.scale, pre: None };
    let heads = |g: usize| g * group..(g + 1) * group;
    let group_qs = |g: usize| -> Vec<&[f32]> { heads(g).map(|qh| &s.q_fc[qh * d..(qh + 1) * d]).collect() };
    // Stage 1 in `parts` parts per group where it is the group-mass TIP over a long context.
    let tip_fcs: Vec<Option<Vec<usize>>> = if s.threads > 1 && s.n >= SPLIT_MIN { (0..hkv).map(|g| mass_tip_fcs(&gctx(g), &heads(g).collect::<Vec<_>>(), &group_qs(g))).collect() } else { vec![] };
    let parts = if !tip_fcs.is_empty() && tip_fcs.iter().all(Option::is_some) { s.threads } else { 0 };
    let bound = |i: usize| if i == parts { s.n } else { s.n * i / parts / QB * QB };
    let tip_parts: Vec<Mutex<(Vec<f32>, Vec<MassPart>)>> = (0..hkv * parts).map(|_| Default::default()).collect();
    let chosen: Vec<OnceLock<Chosen>> = (0..hkv).map(|_| OnceLock::new()).collect();
    // Items: [TIP parts: hkv × parts] [selection: hkv] [focused attention: hkv × group].
    let (sel0, att0) = (hkv * parts, hkv * parts + hkv);
    let deps = |i: usize| match i {
        i if i < sel0 => 0..0,
        i if i < att0 => (i - sel0) * parts..(i - sel0 + 1) * parts,
        i => {
            let g = (i - att0) / group;
            sel0 + g..sel0 + g + 1
        }
    };
    run_in_order(ctx, s.threads, att0 + hkv * group, deps, |i| {
        if i < sel0 {
            let (g, p) = (i / parts, i % parts);
            let (qs, range) = (group_qs(g), bound(p)..bound(p + 1));
            let mut e = vec![0f32; qs.len() * range.len()];
            let part = mass_tip_part(&gctx(g), &qs, tip_fcs[g].as_deref().unwrap_or_default(), range, &mut e);
            *tip_parts[i].lock().unwrap_or_else(|e| e.into_inner()) = (e, part);
        } else if i < att0 {
            let g = i - sel0;
            let pre = (parts > 0).then(|| {
                let got: Vec<_> = tip_parts[g * parts..(g + 1) * parts].iter().map(|p| std::mem::take(&mut *p.lock().unwrap_or_else(|e| e.into_inner()))).collect();
                let views: Vec<(&[f32], &[MassPart])> = got.iter().map(|(e, m)| (&e[..], &m[..])).collect();
                Stage1::merge(&gctx(g), tip_fcs[g].clone().unwrap_or_default(), &views)
            });
            let gc = GroupCtx { pre: pre.as_ref(), ..gctx(g) };
            let qs = group_qs(g);
            let (sels, mut st) = select_group(&gc, group, d, &qs);
            if s.measure {
                measure(&gc, &qs, &sels, &mut st);
            }
            // Set once: item `i` runs once, and its heads' items start after it is done.
            let _ = chosen[g].set(Chosen { sels, stats: st });
        } else {
            let (g, h) = ((i - att0) / group, (i - att0) % group);
            let qh = g * group + h;
            let q = &s.q_fc[qh * d..(qh + 1) * d];
            let Some(c) = chosen[g].get() else { unreachable!("a head's item runs after its group's selection") };
            let sel = &c.sels[if s.cfg.per_group { 0 } else { h }];
            // SAFETY: each item writes only its own query head's row `(d,)` of `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(qh * d), d) };
            let view = s.pages[g].view();
            if sel.logits.is_empty() {
                attend_rows_group(&view, &[q], &sel.rows, s.scale, o);
            } else {
                // The kept logits `(B,)` of this head after the re-rank, copied: the softmax runs
                // in place and the group's other heads read the same selection.
                let b = sel.rows.len();
                let mut logits = sel.logits[(if s.cfg.per_group { h } else { 0 }) * b..][..b].to_vec();
                attend_scored_rows_group(&view, &mut logits, &sel.rows, o);
            }
        }
    })?;
    let mut stats = AttnStats::default();
    for c in chosen.into_iter().filter_map(OnceLock::into_inner) {
        stats.merge(&c.stats);
    }
    Ok(stats)
}

/// Adds each head's recall of the exact top-B and the attention mass its selection covers.
fn measure(gc: &GroupCtx, qs: &[&[f32]], sels: &[Selection], st: &mut AttnStats) {
    for (i, q) in qs.iter().enumerate() {
        let sel = &sels[if gc.cfg.per_group { 0 } else { i }];
        let mass = head_mass(&gc.view, q, gc.n, gc.scale);
        st.mass_sum += sel.rows.iter().map(|&t| mass[t as usize] as f64).sum::<f64>();
        let mut oracle = Vec::new();
        fasa_kernels::cpu::top_b(&mass, sel.rows.len(), &mut oracle);
        let hit = sel.rows.iter().filter(|t| oracle.binary_search(t).is_ok()).count();
        st.recall_sum += hit as f64 / sel.rows.len().max(1) as f64;
        st.probes += 1;
    }
}

/// Whether stage 1 chooses its FCs per step (by the K moments of the planes).
pub(super) fn wants_moments(cfg: &AttnConfig) -> bool {
    cfg.mode == Mode::Fasa && cfg.pool > cfg.chunks
}

/// Stage 1 for KV group `gctx.kv_head` (query heads `qs`, head dim `d`, one token set per group or per head),
/// with the group's counters: rows attended and K/V bytes read (the FC planes and rows the heads
/// use together, plus each selection's extra reads), against dense's.
pub(super) fn select_group(gctx: &GroupCtx, group: usize, d: usize, qs: &[&[f32]]) -> (Vec<Selection>, AttnStats) {
    // `d` is the full head dim: FASA-M's plane view holds only the resident FCs.
    let (cfg, n) = (gctx.cfg, gctx.n);
    let heads: Vec<usize> = (gctx.kv_head * group..(gctx.kv_head + 1) * group).collect();
    let sels: Vec<Selection> = if cfg.per_group {
        vec![select(gctx, &heads, qs)]
    } else {
        heads.iter().zip(qs).map(|(&qh, q)| select(gctx, &[qh], &[q])).collect()
    };
    let fcs: Vec<&[usize]> = sels.iter().map(|x| x.fcs.as_slice()).collect();
    let rows: Vec<&[u32]> = sels.iter().map(|x| x.rows.as_slice()).collect();
    let union_rows = union_len(&rows);
    // After an exact re-rank the kept rows' K was read among the candidates (counted in
    // `extra_bytes`) and its logits are reused: focused attention reads only their V.
    let row_elems = if sels.iter().all(|x| !x.logits.is_empty()) { d } else { 2 * d };
    let st = AttnStats {
        sparse_layer_steps: 1,
        bytes_dense: (n * 2 * d) as u64 * ELEM,
        rows: union_rows as u64,
        bytes_read: plane_bytes(gctx, union_len(&fcs)) + (union_rows * row_elems) as u64 * ELEM + sels.iter().map(|x| x.extra_bytes).sum::<u64>(),
        ..Default::default()
    };
    (sels, st)
}
