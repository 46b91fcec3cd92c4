//! Every GPU op against its CPU twin on fresh random inputs (the seed is printed) and on K/V
//! captured from the real model (`FASA_CAPTURED_KV`, written by `fasa-bench capture`), outputs
//! poisoned before each run. Needs an NVIDIA GPU: these tests are ignored unless the
//! `gpu-tests` feature is on (bench/gpu/run.sh runs them on the device).
#![cfg(feature = "gpu")]

use std::sync::Arc;

use fasa_kernels::cpu::{
    add_moments, attend_dense, attend_rows, choose_fcs, choose_fcs_var, fc_scores, fc_scores_q8, force_rows, quantize_page_block_bits, row_logits,
    softmax_in_place, tip_group_mass, top_b, FcMoments, HeadView, Q8View, QB,
};
use fasa_kernels::gpu::{append::append, decode::capture, DecodeConfig, Dtype, FacKernel, FasaDecoder, Gpu, GpuError, GpuKvCache};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const NEEDS_GPU: &str = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device";

fn gpu() -> Arc<Gpu> {
    Gpu::new(0).unwrap_or_else(|e| panic!("gpu-tests requested but no GPU path: {e}"))
}

fn rng() -> StdRng {
    let seed = std::env::var("FASA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("seed {seed} (FASA_TEST_SEED to repeat)");
    StdRng::seed_from_u64(seed)
}

/// ‖a − b‖ / ‖b‖.
fn nerr(a: &[f32], b: &[f32]) -> f64 {
    let (mut n, mut d) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        n += (*x as f64 - *y as f64).powi(2);
        d += (*y as f64).powi(2);
    }
    if a.iter().any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    (n / d.max(1e-30)).sqrt()
}

#[derive(Debug, Clone)]
struct Case {
    dt: Dtype,
    n_q: usize,
    n_kv: usize,
    d: usize,
    lens: Vec<usize>,
    l_max: usize,
    budget: usize,
    k: usize,
    pool: usize,
    sinks: usize,
    recent: usize,
    rerank: usize,
    per_group: bool,
    /// The default `fasa` stage 1: FCs chosen by K variance (`choose_fcs_var`), a group's heads
    /// combined by per-head mass (`tip_group_mass`); false: by query norm, scores summed.
    var_mass: bool,
    /// TIP from the int8 scoring planes (`cpu::fc_scores_q8` twin), else from the 16-bit K.
    q8: bool,
    /// With `q8`: the planes hold int4 values (`quantize_page_block_bits(.., 4)` twin).
    q4: bool,
    /// With `q8` (int8): the planes are stored per FC (`Q8Planes::by_fc`, the `tipfc_h*` TIP).
    by_fc: bool,
    /// With `by_fc` and `var_mass`: the group-mass stage 1 on CUDA cores (`tipfc_h*`) rather
    /// than on tensor cores (`tipm_h*`, `FasaDecoder::tipm`).
    cuda_cores: bool,
    /// q's values are uniform in ±2 times this (1: real models' range).
    q_scale: f32,
}

/// Host copy of one case's data, values already rounded to the storage type.
struct Data {
    /// `[b][kv]`: K `(len, d)` FC-pair order, V `(len, d)`.
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
    /// `(batch, n_q, d)`.
    q: Vec<f32>,
    /// `[b][kv]`: `(n_fc, len, 2)` planes for the CPU view.
    planes: Vec<Vec<Vec<f32>>>,
    /// Per KV head, the FC order in the GPU cache (pool first).
    order: Vec<Vec<usize>>,
    /// Per selection, FC ids best first.
    pools: Vec<Vec<usize>>,
}

/// K rows `(len, d)` in FC-pair order → the CPU view's `(n_fc, len, 2)` planes.
fn planes_of(k: &[f32], len: usize, d: usize) -> Vec<f32> {
    let n_fc = d / 2;
    let mut p = vec![0f32; n_fc * len * 2];
    for t in 0..len {
        for f in 0..n_fc {
            p[(f * len + t) * 2] = k[t * d + 2 * f];
            p[(f * len + t) * 2 + 1] = k[t * d + 2 * f + 1];
        }
    }
    p
}

fn make_data(c: &Case, r: &mut StdRng) -> Data {
    let (d, n_fc) = (c.d, c.d / 2);
    let round = |x: f32| c.dt.decode(c.dt.encode(x));
    let mut k = Vec::new();
    let mut v = Vec::new();
    let mut planes = Vec::new();
    for &len in &c.lens {
        let (mut kb, mut vb, mut pb) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..c.n_kv {
            // Some FCs carry more energy than others, like real keys.
            let amp: Vec<f32> = (0..n_fc).map(|_| r.random_range(0.2f32..2.0)).collect();
            let kk: Vec<f32> = (0..len * d).map(|i| round(amp[(i % d) / 2] * r.random_range(-1.0f32..1.0))).collect();
            let vv: Vec<f32> = (0..len * d).map(|_| round(r.random_range(-1.0f32..1.0))).collect();
            pb.push(planes_of(&kk, len, d));
            kb.push(kk);
            vb.push(vv);
        }
        k.push(kb);
        v.push(vb);
        planes.push(pb);
    }
    let q: Vec<f32> = (0..c.lens.len() * c.n_q * d).map(|_| c.q_scale * r.random_range(-2.0f32..2.0)).collect();
    let group = c.n_q / c.n_kv;
    let n_sel = if c.per_group { c.n_kv } else { c.n_q };
    let pools: Vec<Vec<usize>> = (0..n_sel)
        .map(|_| {
            let mut p: Vec<usize> = (0..n_fc).collect();
            p.shuffle(r);
            p
        })
        .collect();
    // The cache puts the pool of the KV head's first selection first (the engine's layout).
    let order: Vec<Vec<usize>> = (0..c.n_kv)
        .map(|kv| {
            let s = if c.per_group { kv } else { kv * group };
            pools[s].clone()
        })
        .collect();
    Data { k, v, q, planes, order, pools }
}

fn view<'a>(planes: &'a [&'a [f32]], krows: &'a [&'a [f32]], vpages: &'a [&'a [f32]], len: usize, d: usize) -> HeadView<'a> {
    HeadView { k_pages: planes, kr_pages: krows, v_pages: vpages, page: len.max(1), n_fc: d / 2, len }
}

fn qh(data: &Data, c: &Case, b: usize, h: usize) -> Vec<f32> {
    data.q[(b * c.n_q + h) * c.d..(b * c.n_q + h + 1) * c.d].to_vec()
}

/// K moments `(n_fc,)` of tokens `0..len` of `k` `(≥ len, d)`, summed in token order as the CPU
/// cache sums them.
fn moments_of(k: &[f32], len: usize, d: usize) -> Vec<FcMoments> {
    let mut m = vec![[0f64; 5]; d / 2];
    for row in k[..len * d].chunks_exact(d) {
        for (f, mf) in m.iter_mut().enumerate() {
            add_moments(mf, row[2 * f], row[2 * f + 1]);
        }
    }
    m
}

/// Selections whose FCs chosen by variance differ from those by query norm (so the test tells
/// the two choices apart), and selections where the choice was made.
static VAR_DIFFERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static VAR_CHOICES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// CPU pipeline of one selection (as the engine's `select`): FC scores (forced), and the rows.
fn cpu_select(c: &Case, data: &Data, b: usize, s: usize) -> (Vec<f32>, Vec<u32>) {
    let len = c.lens[b];
    let group = c.n_q / c.n_kv;
    let hps = if c.per_group { group } else { 1 };
    let kv = s * hps / group;
    let pl = [data.planes[b][kv].as_slice()];
    let kr = [data.k[b][kv].as_slice()];
    let vp = [data.v[b][kv].as_slice()];
    let vw = view(&pl, &kr, &vp, len, c.d);
    let qs: Vec<Vec<f32>> = (0..hps).map(|i| qh(data, c, b, s * hps + i)).collect();
    let qr: Vec<&[f32]> = qs.iter().map(|x| x.as_slice()).collect();
    let p = c.pool.max(c.k).min(c.d / 2);
    let pool = &data.pools[s][..p];
    let fcs = if p <= c.k {
        pool.to_vec()
    } else if c.var_mass {
        let fcs = choose_fcs_var(&qr, pool, c.k, &moments_of(&data.k[b][kv], len, c.d), len);
        let (mut a, mut n) = (fcs.clone(), choose_fcs(&qr, pool, c.k));
        a.sort_unstable();
        n.sort_unstable();
        VAR_CHOICES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        VAR_DIFFERS.fetch_add((a != n) as usize, std::sync::atomic::Ordering::Relaxed);
        fcs
    } else {
        choose_fcs(&qr, pool, c.k)
    };
    let mut sc = vec![0f32; len];
    // The int8 twin: every whole block of the (fp16/bf16-rounded) K quantised by the CPU.
    let (q8p, q8s) = if c.q8 { quantize_all(&data.planes[b][kv], len, c.d / 2, c.bits()) } else { (vec![], vec![]) };
    let (qp, sp) = ([q8p.as_slice()], [q8s.as_slice()]);
    let q8v = Q8View { pages: &qp, scales: &sp, blocks: len / QB, bits: c.bits() };
    let q8 = c.q8.then_some(&q8v);
    if c.var_mass && hps > 1 {
        tip_group_mass(&vw, q8, &qr, &fcs, len, 1.0 / (c.d as f32).sqrt(), &mut sc);
    } else {
        for (i, q) in qr.iter().enumerate() {
            match q8 {
                Some(q8) => fc_scores_q8(&vw, q8, q, &fcs, len, &mut sc, i > 0),
                None => fc_scores(&vw, q, &fcs, len, &mut sc, i > 0),
            }
        }
    }
    force_rows(&mut sc, c.sinks, c.recent);
    let mut rows = Vec::new();
    if len <= c.budget {
        rows.extend(0..len as u32);
    } else if c.rerank > c.budget {
        let mut cand = Vec::new();
        top_b(&sc, c.rerank, &mut cand);
        let mass = group_mass(&vw, &qr, &cand, c, len);
        let mut pick = Vec::new();
        top_b(&mass, c.budget, &mut pick);
        rows.extend(pick.iter().map(|&i| cand[i as usize]));
    } else {
        top_b(&sc, c.budget, &mut rows);
    }
    (sc, rows)
}

/// `cpu::quantize_page_block_bits` over every whole block of one page of `len` tokens (`planes`
/// `(n_fc, len, 2)`): the int8 (or int4) page `(n_fc, 2, len)` and its scales `(n_fc, len / QB)`.
fn quantize_all(planes: &[f32], len: usize, n_fc: usize, bits: u32) -> (Vec<i8>, Vec<f32>) {
    let page = len.max(1);
    let (mut q, mut s) = (vec![0i8; n_fc * 2 * page], vec![0f32; n_fc * (page / QB)]);
    for blk in 0..len / QB {
        quantize_page_block_bits(planes, page, n_fc, blk, &mut q, &mut s, bits);
    }
    (q, s)
}

/// The engine's re-rank key (`rows_mass` in engine/src/attention/sparse.rs): Σ_h
/// softmax_h(q·k/√d) over the candidates, forced rows +∞.
fn group_mass(vw: &HeadView, qs: &[&[f32]], cand: &[u32], c: &Case, len: usize) -> Vec<f32> {
    let m = cand.len();
    let mut total = vec![0f32; m];
    let logits = row_logits(vw, qs, cand, 1.0 / (c.d as f32).sqrt());
    for s in logits.chunks_exact(m.max(1)) {
        let mut s = s.to_vec();
        softmax_in_place(&mut s);
        total.iter_mut().zip(&s).for_each(|(t, v)| *t += v);
    }
    for (m, &t) in total.iter_mut().zip(cand) {
        if (t as usize) < c.sinks || (t as usize) >= len - c.recent.min(len) {
            *m = f32::INFINITY;
        }
    }
    total
}

struct Outcome {
    score_err: f64,
    /// The cache's K moments (host upload + append) equal the CPU's sums bit for bit.
    moments_same: bool,
    /// The int8 planes (host upload's and append's quantiser) equal `cpu::quantize_page_block`'s.
    q8_same: bool,
    /// The cache's K (host upload + append) holds every token's rounded K where
    /// `GpuKvCache::k_index` says, and zeros elsewhere.
    k_same: bool,
    exact_select: bool,
    near_tie_diffs: usize,
    fac_err: f64,
    dense_err: f64,
    graph_same: bool,
    variants_same: bool,
    /// After a step broken off midway, the next step (on other q) equals a fresh decoder's.
    after_error_same: bool,
}

/// The decoder settings of case `c` (its FC pools from `data`).
fn decode_config(c: &Case, data: &Data) -> DecodeConfig {
    DecodeConfig {
        n_q: c.n_q,
        per_group: c.per_group,
        budget: c.budget,
        chunks: c.k,
        pools: data.pools.clone(),
        pool: c.pool,
        sinks: c.sinks,
        recent: c.recent,
        rerank: c.rerank,
        fc_by_variance: false,
        group_mass: false,
        q8_tip: c.q8,
    }
    .with_var_mass(c.var_mass)
}

fn run_case(g: &Gpu, c: &Case, data: &Data) -> Result<Outcome, GpuError> {
    let batch = c.lens.len();
    let st = &g.stream;
    let mut cache = GpuKvCache::new(g, c.dt, batch, c.n_kv, c.d, c.l_max, Some(data.order.clone()))?;
    if c.q8 {
        cache.enable_scoring_planes_as(g, c.bits(), c.by_fc)?;
    }
    // The first tokens from the host, the last APPENDED (or all) one at a time through the append
    // op, so both the host path's and the append's quantiser (a block completed every 32) run.
    const APPENDED: usize = 40;
    for b in 0..batch {
        let n = (c.lens[b] - c.lens[b].min(APPENDED)) * c.d;
        for kv in 0..c.n_kv {
            cache.write_host(g, b, kv, &data.k[b][kv][..n], &data.v[b][kv][..n])?;
        }
    }
    for i in 0..APPENDED {
        let mut k_new = vec![0f32; batch * c.n_kv * c.d];
        let mut v_new = vec![0f32; batch * c.n_kv * c.d];
        let mut pos = vec![-1i32; batch];
        for b in 0..batch {
            let len = c.lens[b];
            let t = len - len.min(APPENDED) + i;
            if t >= len {
                continue;
            }
            pos[b] = t as i32;
            for kv in 0..c.n_kv {
                let o = (b * c.n_kv + kv) * c.d;
                k_new[o..o + c.d].copy_from_slice(&data.k[b][kv][t * c.d..(t + 1) * c.d]);
                v_new[o..o + c.d].copy_from_slice(&data.v[b][kv][t * c.d..(t + 1) * c.d]);
            }
        }
        let (kd, vd, pd) = (st.clone_htod(&k_new)?, st.clone_htod(&v_new)?, st.clone_htod(&pos)?);
        append(g, &mut cache, &kd, &vd, &pd)?;
    }
    let q = st.clone_htod(&data.q)?;
    let lens_d = st.clone_htod(&c.lens.iter().map(|&l| l as i32).collect::<Vec<_>>())?;
    let mut dec = FasaDecoder::new(g, &cache, decode_config(c, data))?;
    dec.set_tipm(g, &cache, !c.cuda_cores)?;
    let n_out = batch * c.n_q * c.d;
    let nan_out = vec![f32::NAN; n_out];
    // Poison.
    st.memcpy_htod(&vec![f32::NAN; dec.scores.len()], &mut dec.scores)?;
    st.memcpy_htod(&vec![u32::MAX; dec.sel.len()], &mut dec.sel)?;
    let mut out = st.clone_htod(&nan_out)?;
    dec.step(g, &cache, &q, &lens_d, &mut out)?;
    let out_h = st.clone_dtoh(&out)?;
    let scores_h = st.clone_dtoh(&dec.scores)?;
    let sel_h = st.clone_dtoh(&dec.sel)?;
    // The same step captured in a graph and replayed gives the same output.
    let mut out2 = st.clone_htod(&nan_out)?;
    let graph = capture(g, || dec.step(g, &cache, &q, &lens_d, &mut out2))?;
    graph.launch()?;
    let out2_h = st.clone_dtoh(&out2)?;
    // (row order inside `sel` varies with atomics, so sums may differ in the last bits)
    let graph_same = nerr(&out2_h, &out_h) <= 1e-5;
    // The other code paths (threshold found by every filter block, separate combine launch,
    // several token chunks per TIP block), alone and together, give the same output; then back
    // to the defaults.
    let mut variants_same = true;
    let chunks0 = dec.tip_chunks;
    let fac0 = dec.fac_kernel;
    // The two other FAC kernel families, each forced for three variants.
    let others: Vec<FacKernel> = FacKernel::for_dim(c.d).filter(|&k| k != fac0).collect();
    let others = [others[0], *others.last().unwrap_or(&others[0])];
    let st0 = dec.tip8_pipe;
    // Programmatic dependent launch switched for three (the decoder's policy, twice, then forced
    // for every launch as FASA_GPU_PDL does), filter blocks of each size forced for three; the int8
    // TIP unpipelined (0) and the other pipelined kernels for others; each combine kernel forced
    // for the last two.
    let pdl0 = dec.pdl;
    let forced0 = g.pdl_forced();
    for (thr_in_tip, fused, chunks, fk, pdl, ftok, pipe, force, c8) in [
        (false, true, 1, fac0, pdl0, 0, st0, None, None),
        (true, true, 2, fac0, pdl0, 0, st0, None, None),
        (false, false, 3, fac0, pdl0, 0, st0, None, None),
        (true, false, 3, fac0, pdl0, 0, st0, None, None),
        (true, false, chunks0, others[0], pdl0, 0, st0, None, None),
        (false, true, 2, others[1], pdl0, 0, st0, None, None),
        (true, false, chunks0, fac0, !pdl0, 0, st0, None, None),
        (true, false, chunks0, fac0, pdl0, 8192, st0, None, None),
        (false, false, chunks0, fac0, pdl0, 2048, st0, None, None),
        (true, false, chunks0, fac0, pdl0, 1024, st0, None, None),
        (true, false, 2, fac0, pdl0, 0, 0, None, None),
        (true, false, 3, others[0], pdl0, 0, 24, None, None),
        (true, true, chunks0, fac0, pdl0, 0, 24, None, None),
        (false, false, 1, fac0, pdl0, 0, 124, None, None),
        (true, false, 3, fac0, pdl0, 0, 124, None, None),
        (false, true, 2, others[1], pdl0, 0, 224, None, None),
        (true, false, 3, fac0, pdl0, 0, 224, None, None),
        (true, false, chunks0, fac0, pdl0, 0, st0, Some(!pdl0), None),
        (true, true, chunks0, others[1], !pdl0, 0, st0, None, None),
        (true, false, chunks0, fac0, pdl0, 0, st0, None, Some(true)),
        (true, false, 2, others[0], pdl0, 0, st0, None, Some(false)),
    ] {
        // (int4 planes: the pipelined TIP only; 24 stands for the other int4 kernel, 4224, and
        // every other code for the default, gpu::TIP4_PIPE)
        let pipe = match (c.q4, pipe) {
            (true, 0) => st0,
            (true, 24) => 4224,
            (_, p) => p,
        };
        // (the group-mass int8 TIP unpipelined where the summed one is: tip8_heads_h*)
        dec.tip8_heads_pipe = pipe != 0;
        dec.thr_in_tip = thr_in_tip;
        dec.fused_combine = fused;
        dec.tip_chunks = chunks;
        dec.fac_kernel = fk;
        dec.filter_tok = ftok;
        dec.tip8_pipe = pipe;
        dec.pdl = pdl;
        dec.combine8 = c8;
        match force.or(forced0) {
            Some(on) => g.set_pdl(on),
            None => g.set_pdl_auto(),
        }
        st.memcpy_htod(&vec![u32::MAX; dec.sel.len()], &mut dec.sel)?;
        let mut o3 = st.clone_htod(&nan_out)?;
        dec.step(g, &cache, &q, &lens_d, &mut o3)?;
        let o3_h = st.clone_dtoh(&o3)?;
        // Another chunk count merges the group-mass partials in another order: rows tied to the
        // last bits may swap (then the output moves by that row's share, not by 1e-5).
        let sel3 = st.clone_dtoh(&dec.sel)?;
        let swaps = near_tie_swaps(&sel_h, &sel3, &scores_h, cache.l_max, &c.lens, c.budget);
        // After a re-rank, stage-1 scores do not tell a near-tie: only the same sets pass.
        let swaps = if c.rerank > c.budget { swaps.filter(|&n| n == 0) } else { swaps };
        variants_same &= match swaps {
            Some(0) => nerr(&o3_h, &out_h) <= 1e-5,
            Some(_) => nerr(&o3_h, &out_h) <= 1e-2,
            None => false,
        };
    }
    match forced0 {
        Some(on) => g.set_pdl(on),
        None => g.set_pdl_auto(),
    }
    dec.pdl = pdl0;
    dec.combine8 = None;
    dec.filter_tok = 0;
    dec.tip8_heads_pipe = true;
    dec.thr_in_tip = true;
    dec.fused_combine = false;
    dec.tip_chunks = chunks0;
    dec.fac_kernel = fac0;
    dec.tip8_pipe = st0;
    // A step that must keep the default's selection (near ties aside: none) and so its output
    // within 1e-5 (rows summed in another order).
    let same_rows = |dec: &mut FasaDecoder| -> Result<bool, GpuError> {
        let mut o = st.clone_htod(&nan_out)?;
        dec.step(g, &cache, &q, &lens_d, &mut o)?;
        let sel = st.clone_dtoh(&dec.sel)?;
        Ok(match near_tie_swaps(&sel_h, &sel, &scores_h, cache.l_max, &c.lens, c.budget) {
            Some(0) => nerr(&st.clone_dtoh(&o)?, &out_h) <= 1e-5,
            _ => false,
        })
    };
    // FAC in blocks of 32, 96 and 256 rows (one or several iterations per warp, 2 to 8
    // splits), the combine fused once.
    for (rows, fused) in [(32, false), (96, true), (256, false)] {
        dec.fused_combine = fused;
        if dec.set_fac_rows(rows).is_err() {
            continue; // more splits than the partials hold at this shape
        }
        variants_same &= same_rows(&mut dec)?;
    }
    dec.fused_combine = false;
    dec.set_fac_rows(0)?;
    // The other bins of the group-mass scores (mass bins off where the decoder has them on):
    // the same rows.
    let mb0 = dec.mass_bins;
    dec.mass_bins = !mb0;
    variants_same &= same_rows(&mut dec)?;
    dec.mass_bins = mb0;
    // FAC after the whole select filter (no FAC early), the filter after the whole TIP launch (no
    // select early), neither; combine apart and fused. FAC over candidates (where the decoder's
    // FAC kernel runs it) off, and at one candidate per FAC block, so selections with more
    // candidates than FAC blocks take the refine's rows.
    let cands0 = dec.fac_cands;
    for (early_fac, early_select, fused, cands) in [
        (false, true, false, cands0),
        (false, true, true, cands0),
        (true, false, false, cands0),
        (false, false, true, cands0),
        (true, true, false, 0),
        (true, true, true, 1),
        (true, false, false, 1),
    ] {
        dec.early_fac = early_fac;
        dec.early_select = early_select;
        dec.fused_combine = fused;
        dec.fac_cands = cands;
        variants_same &= same_rows(&mut dec)?;
    }
    dec.early_fac = true;
    dec.early_select = true;
    dec.fused_combine = false;
    dec.fac_cands = cands0;
    // A step broken off midway: a one-float output, which the combine refuses after stage 1 and
    // FAC have run (setting the FAC early flags that the combine clears). The next step, on q
    // negated (other rows), must equal a fresh decoder's, not take the broken step's rows.
    let mut tiny = st.alloc_zeros::<f32>(1)?;
    let broke = dec.step(g, &cache, &q, &lens_d, &mut tiny).is_err();
    let q_neg = st.clone_htod(&data.q.iter().map(|x| -x).collect::<Vec<_>>())?;
    let mut o_next = st.clone_htod(&nan_out)?;
    dec.step(g, &cache, &q_neg, &lens_d, &mut o_next)?;
    let mut fresh = FasaDecoder::new(g, &cache, dec.cfg.clone())?;
    fresh.set_tipm(g, &cache, dec.tipm)?;
    let mut o_fresh = st.clone_htod(&nan_out)?;
    fresh.step(g, &cache, &q_neg, &lens_d, &mut o_fresh)?;
    let after_error_same = broke && nerr(&st.clone_dtoh(&o_next)?, &st.clone_dtoh(&o_fresh)?) <= 1e-5;
    // Dense (the other FAC kernel families must give the same output).
    let mut outd = st.clone_htod(&nan_out)?;
    dec.dense(g, &cache, &q, &lens_d, &mut outd)?;
    let outd_h = st.clone_dtoh(&outd)?;
    let dense0 = dec.dense_kernel;
    for kind in FacKernel::for_dim(c.d).filter(|&k| k != dense0) {
        dec.dense_kernel = kind;
        let mut outd2 = st.clone_htod(&nan_out)?;
        dec.dense(g, &cache, &q, &lens_d, &mut outd2)?;
        let e = nerr(&st.clone_dtoh(&outd2)?, &outd_h);
        println!("  dense {kind:?} vs {dense0:?}: {e:.2e}");
        variants_same &= e <= 1e-5;
    }
    dec.dense_kernel = dense0;
    // Both combine kernels over the dense partials (many splits).
    for c8 in [false, true] {
        dec.combine8 = Some(c8);
        let mut outd3 = st.clone_htod(&nan_out)?;
        dec.dense(g, &cache, &q, &lens_d, &mut outd3)?;
        variants_same &= nerr(&st.clone_dtoh(&outd3)?, &outd_h) <= 1e-5;
    }
    dec.combine8 = None;
    st.synchronize()?;

    let group = c.n_q / c.n_kv;
    let hps = if c.per_group { group } else { 1 };
    let n_sel = c.n_q / hps;
    let scale = 1.0 / (c.d as f32).sqrt();
    // Moments cover exactly tokens 0..len of each (sequence, KV head), the last one appended.
    let mom_h = st.clone_dtoh(&cache.mom)?;
    let mom_len_h = st.clone_dtoh(&cache.mom_len)?;
    let mut moments_same = true;
    for b in 0..batch {
        for kv in 0..c.n_kv {
            let want = moments_of(&data.k[b][kv], c.lens[b], c.d);
            let o = (b * c.n_kv + kv) * (c.d / 2) * 5;
            let got = &mom_h[o..o + (c.d / 2) * 5];
            moments_same &= mom_len_h[b * c.n_kv + kv] == c.lens[b] as i32 && want.iter().flatten().zip(got).all(|(a, b)| a.to_bits() == b.to_bits());
        }
    }
    // K layout: every stored element where k_index puts it (the kernels' k_off), the rest zero.
    let k_h = st.clone_dtoh(&cache.k)?;
    let mut k_want = vec![0u16; k_h.len()];
    for b in 0..batch {
        for kv in 0..c.n_kv {
            let base = (b * c.n_kv + kv) * cache.l_max * c.d;
            for t in 0..c.lens[b] {
                for (slot, &f) in data.order[kv].iter().enumerate() {
                    let o = base + cache.k_index(t, slot);
                    k_want[o] = c.dt.encode(data.k[b][kv][t * c.d + 2 * f]);
                    k_want[o + 1] = c.dt.encode(data.k[b][kv][t * c.d + 2 * f + 1]);
                }
            }
        }
    }
    let k_same = k_h == k_want;
    // Int8 planes: every whole block quantised, values and scales equal to the CPU's bit for bit.
    let mut q8_same = true;
    if let Some(p) = &cache.q8 {
        let (qh, sh, nb) = (st.clone_dtoh(&p.q)?, st.clone_dtoh(&p.scales)?, st.clone_dtoh(&p.blocks)?);
        let (n_fc, n_grp, l) = (c.d / 2, c.d / 16, cache.l_max);
        for b in 0..batch {
            for kv in 0..c.n_kv {
                let (len, bk) = (c.lens[b], b * c.n_kv + kv);
                q8_same &= nb[bk] == (len / QB) as i32;
                let (wq, ws) = quantize_all(&data.planes[b][kv], len, n_fc, c.bits());
                for (slot, &f) in data.order[kv].iter().enumerate() {
                    for blk in 0..len / QB {
                        q8_same &= sh[(bk * (l / QB) + blk) * n_fc + slot].to_bits() == ws[f * (len.max(1) / QB) + blk].to_bits();
                        for t in blk * QB..(blk + 1) * QB {
                            let piece = (t / 64 * n_grp + slot / 8) * 64 + t % 64;
                            let (x, y) = if c.by_fc {
                                // Slot `slot`'s run of 64 pairs in the token's tile.
                                let o = bk * l * c.d + ((t / 64 * n_fc + slot) * 64 + t % 64) * 2;
                                (qh[o], qh[o + 1])
                            } else if c.q4 {
                                // Two's complement nibbles: x low, y high, one byte per slot.
                                let byte = qh[bk * l * c.d / 2 + piece * 8 + slot % 8];
                                ((byte << 4) >> 4, byte >> 4)
                            } else {
                                let o = bk * l * c.d + piece * 16 + (slot % 8) * 2;
                                (qh[o], qh[o + 1])
                            };
                            q8_same &= x == wq[f * 2 * len + t] && y == wq[(f * 2 + 1) * len + t];
                        }
                    }
                }
            }
        }
    }
    // The group-mass scores are probabilities: near-ties are relative to the threshold.
    let mass = c.var_mass && hps > 1;
    let (mut sg, mut sc_all) = (Vec::new(), Vec::new());
    let (mut exact, mut near) = (true, 0usize);
    let (mut fo, mut fr, mut dn, mut dr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for b in 0..batch {
        let len = c.lens[b];
        for s in 0..n_sel {
            let seg = b * n_sel + s;
            let kv = s * hps / group;
            let (cpu_sc, cpu_rows) = cpu_select(c, data, b, s);
            let gpu_sc = &scores_h[seg * cache.l_max..seg * cache.l_max + len];
            if len > c.budget {
                for (a, e) in gpu_sc.iter().zip(&cpu_sc) {
                    assert_eq!(a.is_infinite(), e.is_infinite(), "forced rows differ (b {b}, sel {s})");
                    if e.is_finite() {
                        sg.push(*a);
                        sc_all.push(*e);
                    }
                }
            }
            let n_rows = len.min(c.budget);
            let mut rows: Vec<u32> = sel_h[seg * c.budget..seg * c.budget + n_rows].to_vec();
            rows.sort_unstable();
            let mut dedup = rows.clone();
            dedup.dedup();
            assert_eq!(dedup.len(), n_rows, "duplicate or missing rows (b {b}, sel {s}): {:?}", &rows[..rows.len().min(16)]);
            assert!(rows.iter().all(|&t| (t as usize) < len), "row out of range");
            // Exactness: the same scores through the CPU's top_b give the same set.
            if len > c.budget && c.rerank <= c.budget {
                let mut want = Vec::new();
                top_b(gpu_sc, c.budget, &mut want);
                if want != rows {
                    exact = false;
                    eprintln!("select differs from cpu::top_b on the GPU's own scores (b {b}, sel {s})");
                }
            }
            // Re-rank on the GPU's own stage-1 scores: the same rows up to near-ties of the mass.
            if c.rerank > c.budget {
                let group = c.n_q / c.n_kv;
                let kv = s * hps / group;
                let pl = [data.planes[b][kv].as_slice()];
                let kr = [data.k[b][kv].as_slice()];
                let vp = [data.v[b][kv].as_slice()];
                let vw = view(&pl, &kr, &vp, len, c.d);
                let qs: Vec<Vec<f32>> = (0..hps).map(|i| qh(data, c, b, s * hps + i)).collect();
                let qr: Vec<&[f32]> = qs.iter().map(|x| x.as_slice()).collect();
                let mut cand = Vec::new();
                top_b(gpu_sc, c.rerank, &mut cand);
                let mass = group_mass(&vw, &qr, &cand, c, len);
                let mut pick = Vec::new();
                top_b(&mass, c.budget, &mut pick);
                let mut want: Vec<u32> = pick.iter().map(|&i| cand[i as usize]).collect();
                want.sort_unstable();
                if want != rows {
                    let mut kept: Vec<f32> = pick.iter().map(|&i| mass[i as usize]).collect();
                    kept.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    let thr = kept[0];
                    let pos: std::collections::HashMap<u32, f32> = cand.iter().zip(&mass).map(|(&t, &m)| (t, m)).collect();
                    let gs: std::collections::HashSet<u32> = rows.iter().copied().collect();
                    let ws: std::collections::HashSet<u32> = want.iter().copied().collect();
                    for t in gs.symmetric_difference(&ws) {
                        let m = pos.get(t).copied().unwrap_or(f32::NAN);
                        assert!((m - thr).abs() <= 1e-5 * thr.abs().max(1e-6), "re-rank differs beyond a near-tie: token {t} mass {m} thr {thr}");
                        near += 1;
                    }
                }
            }
            // Against the full CPU pipeline: only near-ties may differ.
            if rows != cpu_rows {
                let mut ref_scores: Vec<f32> = cpu_rows.iter().map(|&t| cpu_sc[t as usize]).collect();
                ref_scores.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let thr = ref_scores.first().copied().unwrap_or(0.0);
                let gs: std::collections::HashSet<u32> = rows.iter().copied().collect();
                let cs: std::collections::HashSet<u32> = cpu_rows.iter().copied().collect();
                for &t in gs.symmetric_difference(&cs) {
                    let is_rr = c.rerank > c.budget;
                    let close = (cpu_sc[t as usize] - thr).abs() <= 1e-4 * if mass { thr.abs() } else { thr.abs().max(1.0) };
                    if !close && !is_rr {
                        panic!("selection differs beyond a near-tie: token {t} score {} thr {thr} (b {b}, sel {s}, {c:?})", cpu_sc[t as usize]);
                    }
                    near += 1;
                }
            }
            // FAC over the GPU's rows, dense over all, per q head.
            let pl = [data.planes[b][kv].as_slice()];
            let kr = [data.k[b][kv].as_slice()];
            let vp = [data.v[b][kv].as_slice()];
            let vw = view(&pl, &kr, &vp, len, c.d);
            for i in 0..hps {
                let h = s * hps + i;
                let qv = qh(data, c, b, h);
                let mut o = vec![0f32; c.d];
                attend_rows(&vw, &qv, &rows, scale, &mut o);
                fr.extend_from_slice(&o);
                fo.extend_from_slice(&out_h[(b * c.n_q + h) * c.d..(b * c.n_q + h + 1) * c.d]);
                attend_dense(&vw, &qv, len, scale, &mut o);
                dr.extend_from_slice(&o);
                dn.extend_from_slice(&outd_h[(b * c.n_q + h) * c.d..(b * c.n_q + h + 1) * c.d]);
            }
        }
    }
    Ok(Outcome {
        score_err: if sc_all.is_empty() { 0.0 } else { nerr(&sg, &sc_all) },
        moments_same,
        q8_same,
        k_same,
        exact_select: exact,
        near_tie_diffs: near,
        fac_err: nerr(&fo, &fr),
        dense_err: nerr(&dn, &dr),
        graph_same,
        variants_same,
        after_error_same,
    })
}

/// Rows in which two steps' selections `(segments, B)` differ, when every one of them is within a
/// near-tie (1e-4 relative) of the reference step's threshold by its own stage-1 `scores`
/// `(segments, l_max)`; None when a row differs beyond that.
fn near_tie_swaps(reference: &[u32], other: &[u32], scores: &[f32], l_max: usize, lens: &[usize], budget: usize) -> Option<usize> {
    let segs = reference.len() / budget;
    let per_seq = segs / lens.len();
    let mut swaps = 0;
    for seg in 0..segs {
        let n = lens[seg / per_seq].min(budget);
        let (mut a, mut b) = (reference[seg * budget..seg * budget + n].to_vec(), other[seg * budget..seg * budget + n].to_vec());
        a.sort_unstable();
        b.sort_unstable();
        if a == b {
            continue;
        }
        let sc = &scores[seg * l_max..(seg + 1) * l_max];
        let thr = a.iter().map(|&t| sc[t as usize]).fold(f32::INFINITY, f32::min);
        let (sa, sb): (std::collections::HashSet<u32>, std::collections::HashSet<u32>) = (a.into_iter().collect(), b.into_iter().collect());
        for &t in sa.symmetric_difference(&sb) {
            if (sc[t as usize] - thr).abs() > 1e-4 * thr.abs().max(1e-6) {
                return None;
            }
            swaps += 1;
        }
    }
    Some(swaps)
}

fn check(c: Case, r: &mut StdRng) {
    let data = make_data(&c, r);
    check_data(&c, &data, "random");
}

/// Runs one case on `data` and asserts every comparison; `what` names the data in the log line.
fn check_data(c: &Case, data: &Data, what: &str) -> Outcome {
    let g = gpu();
    let o = run_case(&g, c, data).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    let tol = match c.dt {
        Dtype::F16 => 1e-3,
        Dtype::Bf16 => 1e-3,
    };
    eprintln!(
        "{what} {:?} d{} q{}/kv{} lens {:?} B{} k{}/P{} S{} R{} C{} per_group {} var_mass {} TIP planes {}: scores {:.2e}, moments {}, int8 planes {}, K layout {}, select exact {}, near-tie diffs {}, fac {:.2e}, dense {:.2e}, graph {}, variants {}, after an error {}",
        c.dt, c.d, c.n_q, c.n_kv, c.lens, c.budget, c.k, c.pool, c.sinks, c.recent, c.rerank, c.per_group, c.var_mass, if c.q8 { format!("{}{}", c.bits(), if c.by_fc { " per FC" } else { "" }) } else { "16".into() },
        o.score_err, o.moments_same, o.q8_same, o.k_same, o.exact_select, o.near_tie_diffs, o.fac_err, o.dense_err, o.graph_same, o.variants_same, o.after_error_same
    );
    if c.var_mass {
        use std::sync::atomic::Ordering::Relaxed;
        eprintln!("  FCs by variance ≠ by norm in {} of {} selections so far", VAR_DIFFERS.load(Relaxed), VAR_CHOICES.load(Relaxed));
    }
    // Summed FC scores: only the sum order differs; group mass (exp of scaled scores, then
    // normalized): within 1e-3 (the brief's bound; seen far below).
    let score_tol = if c.var_mass { 1e-3 } else { 1e-4 };
    assert!(o.score_err <= score_tol, "TIP scores vs cpu::fc_scores / tip_group_mass: {:.3e}", o.score_err);
    assert!(o.moments_same, "K moments vs cpu::add_moments over tokens 0..len");
    assert!(o.q8_same, "int8 planes vs cpu::quantize_page_block over the whole blocks of 0..len");
    assert!(o.k_same, "K (host writes + appends) vs GpuKvCache::k_index");
    assert!(o.exact_select, "select vs cpu::top_b");
    assert!(o.fac_err <= tol, "FAC vs cpu::attend_rows: {:.3e}", o.fac_err);
    assert!(o.dense_err <= tol, "dense vs cpu::attend_dense: {:.3e}", o.dense_err);
    assert!(o.graph_same, "graph replay differs from direct launches");
    assert!(o.variants_same, "thr_in_tip / fused_combine / early_fac / early_select variants differ from the default step");
    assert!(o.after_error_same, "the step after one broken off midway differs from a fresh decoder's");
    o
}

fn base(dt: Dtype, d: usize, n_q: usize, n_kv: usize) -> Case {
    Case {
        dt,
        n_q,
        n_kv,
        d,
        lens: vec![3000, 1500, 200, 1],
        l_max: 3072,
        budget: 256,
        k: d / 8,
        pool: d / 8,
        sinks: 0,
        recent: 0,
        rerank: 0,
        per_group: true,
        var_mass: false,
        q8: false,
        q4: false,
        by_fc: false,
        cuda_cores: false,
        q_scale: 1.0,
    }
}

impl Case {
    /// Bits per value of the scoring planes (with `q8`).
    fn bits(&self) -> u32 {
        if self.q4 { 4 } else { 8 }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn paper_mode_matches_cpu_f16() {
    let mut r = rng();
    for (d, n_q, n_kv) in [(128, 32, 8), (64, 9, 3), (128, 8, 8), (64, 16, 2)] {
        check(base(Dtype::F16, d, n_q, n_kv), &mut r);
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn default_mode_matches_cpu() {
    let mut r = rng();
    for (dt, d, n_q, n_kv) in [(Dtype::F16, 128, 32, 8), (Dtype::F16, 64, 9, 3), (Dtype::Bf16, 128, 28, 4), (Dtype::F16, 64, 14, 2)] {
        let c = Case { pool: d / 4, sinks: 4, recent: 32, var_mass: true, ..base(dt, d, n_q, n_kv) };
        check(c, &mut r);
    }
    // More forced rows than B: the threshold in the top bin, which mass bins clamp (+∞ with the
    // largest masses), so the refine sorts whole keys.
    let c = Case { budget: 32, pool: 16, sinks: 4, recent: 64, var_mass: true, ..base(Dtype::F16, 64, 9, 3) };
    check(c, &mut r);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn old_default_mode_matches_cpu() {
    // The earlier default stage 1 (FCs by query norm, group scores summed) stays available.
    let mut r = rng();
    for (dt, d, n_q, n_kv) in [(Dtype::F16, 128, 32, 8), (Dtype::Bf16, 64, 14, 2)] {
        let c = Case { pool: d / 4, sinks: 4, recent: 32, ..base(dt, d, n_q, n_kv) };
        check(c, &mut r);
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn extreme_queries_match_cpu() {
    // q · d^-1/2 far past fp16's largest value and far below its subnormals: the tensor-core FAC
    // and dense kernels take q as fp16 pairs (GPU run 37: × 10^12 made the dense output ∞), and
    // the scores leave the histogram bins' windows at both ends.
    let mut r = rng();
    for q_scale in [1e12f32, 1e-14] {
        // The paper's mode from 16-bit K and from int8 planes, the default's (group mass).
        for (dt, d, n_q, n_kv, var_mass, q8) in [
            (Dtype::F16, 128, 32, 8, false, false),
            (Dtype::F16, 128, 32, 8, false, true),
            (Dtype::F16, 64, 9, 3, true, false),
            (Dtype::Bf16, 128, 28, 4, true, true),
        ] {
            eprintln!("q × {q_scale:e}:");
            let c = Case { q_scale, var_mass, q8, pool: if var_mass { d / 4 } else { d / 8 }, ..base(dt, d, n_q, n_kv) };
            check(c, &mut r);
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn per_head_selection_matches_cpu() {
    let mut r = rng();
    for (d, n_q, n_kv) in [(128, 32, 8), (64, 9, 3)] {
        let c = Case { per_group: false, pool: d / 4, sinks: 4, recent: 16, var_mass: true, ..base(Dtype::F16, d, n_q, n_kv) };
        check(c, &mut r);
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn rerank_matches_cpu() {
    let mut r = rng();
    for (d, n_q, n_kv) in [(128, 32, 8), (64, 9, 3)] {
        // lens straddle C: 3000 > C (re-rank), 1500 in (B, C] (plain top-B), 200 ≤ B (all rows).
        let c = Case { pool: d / 4, sinks: 4, recent: 32, rerank: 1024, lens: vec![3000, 1000, 200, 1], var_mass: true, ..base(Dtype::F16, d, n_q, n_kv) };
        check(c, &mut r);
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn int8_tip_matches_cpu() {
    // Int8 scoring planes (cpu::fc_scores_q8 twin) in the paper's summed TIP and the default's
    // group-mass TIP (H = 2, 4, 8 kernels), per head, with a re-rank, and long enough for several
    // TIP chunks; lens 1 and 200 leave a tail only or a few blocks.
    let mut r = rng();
    for (dt, d, n_q, n_kv) in [(Dtype::F16, 128, 32, 8), (Dtype::Bf16, 64, 9, 3), (Dtype::F16, 64, 16, 2)] {
        check(Case { q8: true, ..base(dt, d, n_q, n_kv) }, &mut r);
        check(Case { q8: true, pool: d / 4, sinks: 4, recent: 32, var_mass: true, ..base(dt, d, n_q, n_kv) }, &mut r);
    }
    check(Case { q8: true, per_group: false, pool: 32, sinks: 4, recent: 16, var_mass: true, ..base(Dtype::F16, 128, 32, 8) }, &mut r);
    // Groups of 2 (the 2-head group-mass kernels), and the paper's fixed FC set (P = k) under the
    // group mass: the pipelined per-head TIP's copies then go out before its FC choice.
    check(Case { q8: true, pool: 32, sinks: 4, recent: 32, var_mass: true, ..base(Dtype::Bf16, 128, 16, 8) }, &mut r);
    check(Case { q8: true, var_mass: true, ..base(Dtype::F16, 64, 16, 4) }, &mut r);
    check(Case { q8: true, pool: 16, sinks: 4, recent: 32, rerank: 1024, lens: vec![3000, 1000, 200, 1], var_mass: true, ..base(Dtype::F16, 64, 14, 2) }, &mut r);
    check(Case { q8: true, lens: vec![40000, 33000], l_max: 40960, budget: 1024, k: 16, pool: 32, sinks: 4, recent: 32, var_mass: true, ..base(Dtype::F16, 128, 32, 8) }, &mut r);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn int4_tip_matches_cpu() {
    // Int4 scoring planes (quantize_page_block_bits(.., 4) twin) in the summed-score TIP (the
    // paper's fixed FC set, whose copies go out before the FC choice, and a pool chosen from by
    // norm with forced rows) and the default's group-mass TIP (H = 2, 4, 8 kernels, with a
    // re-rank), per group and per head, both dtypes, d 64 and 128, and long enough for several
    // TIP chunks; lens 1 and 200 leave a tail only or a few blocks.
    let mut r = rng();
    for (dt, d, n_q, n_kv) in [(Dtype::F16, 128, 32, 8), (Dtype::Bf16, 64, 9, 3), (Dtype::F16, 64, 16, 2)] {
        check(Case { q8: true, q4: true, ..base(dt, d, n_q, n_kv) }, &mut r);
        check(Case { q8: true, q4: true, pool: d / 4, sinks: 4, recent: 32, ..base(dt, d, n_q, n_kv) }, &mut r);
        check(Case { q8: true, q4: true, pool: d / 4, sinks: 4, recent: 32, var_mass: true, ..base(dt, d, n_q, n_kv) }, &mut r);
    }
    check(Case { q8: true, q4: true, pool: 32, sinks: 4, recent: 32, var_mass: true, ..base(Dtype::Bf16, 128, 16, 8) }, &mut r);
    check(Case { q8: true, q4: true, pool: 16, sinks: 4, recent: 32, rerank: 1024, lens: vec![3000, 1000, 200, 1], var_mass: true, ..base(Dtype::F16, 64, 14, 2) }, &mut r);
    check(Case { q8: true, q4: true, per_group: false, pool: 32, sinks: 4, recent: 16, ..base(Dtype::F16, 128, 32, 8) }, &mut r);
    check(Case { q8: true, q4: true, lens: vec![40000, 33000], l_max: 40960, budget: 1024, k: 16, ..base(Dtype::F16, 128, 32, 8) }, &mut r);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn fc_planes_tip_matches_cpu() {
    // Int8 planes stored per FC (`tipm_h*` on tensor cores, `tipfc_h*`): the default's group-mass
    // TIP (H = 2, 4, 8 kernels, FCs chosen from a pool larger than k, with a re-rank; both kernels),
    // the summed score (the paper's fixed set, a pool chosen from by norm), per head, both dtypes,
    // d 64 and 128, 1 and 2 tensor-core k-steps of 16 FCs (more: tipfc), and long enough for several TIP steps;
    // lens 1 and 200 leave a tail only or a few blocks, 3000 half a 64-token tile.
    let mut r = rng();
    for (dt, d, n_q, n_kv) in [(Dtype::F16, 128, 32, 8), (Dtype::Bf16, 64, 9, 3), (Dtype::F16, 64, 16, 2)] {
        check(Case { q8: true, by_fc: true, pool: d / 4, sinks: 4, recent: 32, var_mass: true, ..base(dt, d, n_q, n_kv) }, &mut r);
        check(Case { q8: true, by_fc: true, pool: d / 4, sinks: 4, recent: 32, var_mass: true, cuda_cores: true, ..base(dt, d, n_q, n_kv) }, &mut r);
        check(Case { q8: true, by_fc: true, pool: d / 4, sinks: 4, recent: 32, ..base(dt, d, n_q, n_kv) }, &mut r);
        check(Case { q8: true, by_fc: true, ..base(dt, d, n_q, n_kv) }, &mut r);
    }
    check(Case { q8: true, by_fc: true, pool: 32, sinks: 4, recent: 32, var_mass: true, ..base(Dtype::Bf16, 128, 16, 8) }, &mut r);
    check(Case { q8: true, by_fc: true, pool: 32, sinks: 4, recent: 32, var_mass: true, ..base(Dtype::F16, 128, 56, 7) }, &mut r);
    check(Case { q8: true, by_fc: true, per_group: false, pool: 32, sinks: 4, recent: 16, var_mass: true, ..base(Dtype::F16, 128, 32, 8) }, &mut r);
    check(Case { q8: true, by_fc: true, pool: 16, sinks: 4, recent: 32, rerank: 1024, lens: vec![3000, 1000, 200, 1], var_mass: true, ..base(Dtype::F16, 64, 14, 2) }, &mut r);
    check(Case { q8: true, by_fc: true, lens: vec![40000, 33000], l_max: 40960, budget: 1024, k: 16, pool: 64, sinks: 4, recent: 32, var_mass: true, ..base(Dtype::F16, 128, 32, 8) }, &mut r);
    for (k, pool) in [(24, 32), (40, 64), (64, 64)] {
        check(Case { q8: true, by_fc: true, k, pool, sinks: 4, recent: 32, var_mass: true, ..base(Dtype::Bf16, 128, 32, 8) }, &mut r);
    }
    check(Case { q8: true, by_fc: true, k: 40, pool: 64, sinks: 4, recent: 32, var_mass: true, cuda_cores: true, ..base(Dtype::F16, 128, 56, 7) }, &mut r);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn fc_planes_score_as_grouped_planes() {
    // The same int8 values read per FC (`tipfc_h*`, scales folded into q; the group mass also on
    // tensor cores, `tipm_h*`) and per group: summed scores equal the pipelined `tip8p 124`'s
    // (MODE 1, the same operations per token) bit for bit; group-mass scores within 1e-5 of the
    // pipelined `tip8ph_h*`'s (MODE 0: each value times its scale, and each block's per-head
    // (max, Σexp) merges its tokens in another order; `tipm_h*` sums exact products of q rounded
    // to 22 bits of each block's largest, rounded once).
    let g = gpu();
    let mut r = rng();
    let st = &g.stream;
    for (d, n_q, n_kv, var_mass) in [(128, 32, 8, false), (64, 9, 3, false), (128, 32, 8, true), (64, 9, 3, true), (128, 56, 7, true)] {
        let c = Case { q8: true, lens: vec![5000, 1111, 37], l_max: 5120, pool: d / 2, sinks: 4, recent: 32, var_mass, ..base(Dtype::F16, d, n_q, n_kv) };
        let data = make_data(&c, &mut r);
        let mut cache = GpuKvCache::new(&g, c.dt, c.lens.len(), c.n_kv, c.d, c.l_max, Some(data.order.clone())).unwrap();
        for (b, &len) in c.lens.iter().enumerate() {
            for kv in 0..c.n_kv {
                cache.write_host(&g, b, kv, &data.k[b][kv][..len * d], &data.v[b][kv][..len * d]).unwrap();
            }
        }
        let q = st.clone_htod(&data.q).unwrap();
        let lens = st.clone_htod(&c.lens.iter().map(|&l| l as i32).collect::<Vec<_>>()).unwrap();
        let cfg = decode_config(&c, &data);
        let mut scores = Vec::new();
        for (by_fc, tc) in [(false, false), (true, false), (true, true)] {
            cache.enable_scoring_planes_as(&g, 8, by_fc).unwrap();
            let mut dec = FasaDecoder::new(&g, &cache, cfg.clone()).unwrap();
            dec.set_tip8_pipe(&g, &cache, 124).unwrap(); // (summed: tip8p, MODE 1)
            dec.set_tipm(&g, &cache, tc).unwrap();
            st.memcpy_htod(&vec![f32::NAN; dec.scores.len()], &mut dec.scores).unwrap();
            dec.tip_only(&g, &cache, &q, &lens).unwrap();
            let sc = st.clone_dtoh(&dec.scores).unwrap();
            let l = cache.l_max;
            let segs = sc.len() / l;
            scores.push((0..segs).flat_map(|seg| sc[seg * l..seg * l + c.lens[seg / (segs / c.lens.len())]].to_vec()).collect::<Vec<f32>>());
        }
        for (i, what) in [(1, "CUDA cores"), (2, "tensor cores")] {
            assert!(scores[i].iter().all(|x| !x.is_nan()), "every token scored ({what})");
            if var_mass {
                let fin = |v: &[f32]| v.iter().map(|&x| if x.is_finite() { x } else { 0.0 }).collect::<Vec<f32>>();
                let e = nerr(&fin(&scores[i]), &fin(&scores[0]));
                eprintln!("group mass d{d} q{n_q}/kv{n_kv}: per FC ({what}) vs grouped {e:.2e}");
                assert!(e <= 1e-5, "group-mass scores per FC ({what}) vs grouped: {e:.3e}");
            } else {
                let same = scores[0].iter().zip(&scores[i]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "summed scores per FC ({what}) differ from grouped planes' (d{d} q{n_q}/kv{n_kv})");
            }
        }
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn int8_blocks_follow_rewrites() {
    // A rewrite at p drops p's block and every later one; appending up to the block's last token
    // quantises it again; a block after a gap is not quantised (the count is a prefix).
    let g = gpu();
    let (d, len) = (64, 200);
    let mut cache = GpuKvCache::new(&g, Dtype::F16, 1, 1, d, 256, None).unwrap();
    let mut r = rng();
    let k: Vec<f32> = (0..len * d).map(|_| r.random_range(-1.0f32..1.0)).collect();
    cache.write_host(&g, 0, 0, &k, &k).unwrap();
    cache.enable_q8(&g).unwrap();
    let blocks = |c: &GpuKvCache| g.stream.clone_dtoh(&c.q8.as_ref().unwrap().blocks).unwrap()[0];
    assert_eq!(blocks(&cache), (len / QB) as i32, "enable_q8 quantises the stored tokens");
    let st = &g.stream;
    let put = |c: &mut GpuKvCache, t: usize| {
        let (kd, pd) = (st.clone_htod(&k[t * d..(t + 1) * d]).unwrap(), st.clone_htod(&[t as i32]).unwrap());
        append(&g, c, &kd, &kd, &pd).unwrap();
    };
    put(&mut cache, 70); // inside block 2 of 6
    assert_eq!(blocks(&cache), 2);
    for t in 71..96 {
        put(&mut cache, t);
    }
    assert_eq!(blocks(&cache), 3, "block 2 quantised again by its last token");
    put(&mut cache, 159); // completes block 4, but block 3 is not quantised
    assert_eq!(blocks(&cache), 3);
    // A rewrite with other values lands where k_index says (the old values gone), and nothing
    // else changes.
    let k2: Vec<f32> = k[10 * d..11 * d].iter().map(|x| -0.5 * x).collect();
    let (kd, pd) = (st.clone_htod(&k2).unwrap(), st.clone_htod(&[10i32]).unwrap());
    append(&g, &mut cache, &kd, &kd, &pd).unwrap();
    let got = st.clone_dtoh(&cache.k).unwrap();
    let mut want = vec![0u16; got.len()];
    for t in (0..len).chain([159]) {
        for s in 0..d / 2 {
            let row = if t == 10 { &k2[..] } else { &k[t * d..(t + 1) * d] };
            want[cache.k_index(t, s)] = Dtype::F16.encode(row[2 * s]);
            want[cache.k_index(t, s) + 1] = Dtype::F16.encode(row[2 * s + 1]);
        }
    }
    assert!(got == want, "K after host writes, appends and a rewrite vs GpuKvCache::k_index");
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn appended_rows_equal_host_writes() {
    // append_rows (the engine's prefill mirror: chunks of rows, a rollback, a catch-up) against
    // write_host of the final rows: K tiles, V, moments and mom_len bit for bit, and the int8
    // planes (grouped and per FC) the same; a rewrite quantises only the blocks it touched.
    let g = gpu();
    let st = &g.stream;
    let mut r = rng();
    for (dt, d, n_kv, by_fc) in [(Dtype::F16, 64, 3, false), (Dtype::Bf16, 128, 2, true), (Dtype::F16, 128, 1, false)] {
        let (l_max, len) = (1024, 777);
        let n_fc = d / 2;
        let order: Vec<Vec<usize>> = (0..n_kv).map(|kv| (0..n_fc).map(|s| (s * 5 + kv) % n_fc).collect()).collect();
        let rows = |r: &mut StdRng| -> Vec<Vec<f32>> { (0..n_kv).map(|_| (0..len * d).map(|_| r.random_range(-3.0f32..3.0)).collect()).collect() };
        let (k, v, k_old) = (rows(&mut r), rows(&mut r), rows(&mut r));
        // What `got` holds at the end (below): k_old's rows below the rollback, k's after.
        let fin: Vec<Vec<f32>> = (0..n_kv).map(|kv| k_old[kv][..100 * d].iter().chain(&k[kv][100 * d..]).copied().collect()).collect();
        let mut want = GpuKvCache::new(&g, dt, 1, n_kv, d, l_max, Some(order.clone())).unwrap();
        for kv in 0..n_kv {
            want.write_host(&g, 0, kv, &fin[kv], &v[kv]).unwrap();
        }
        want.enable_scoring_planes_as(&g, 8, by_fc).unwrap();
        let mut got = GpuKvCache::new(&g, dt, 1, n_kv, d, l_max, Some(order)).unwrap();
        got.enable_scoring_planes_as(&g, 8, by_fc).unwrap();
        // (n_kv, t1 - t0, d) rows of `src` uploaded and appended.
        let put = |c: &mut GpuKvCache, src: &[Vec<f32>], t0: usize, t1: usize| {
            let flat: Vec<f32> = src.iter().flat_map(|h| h[t0 * d..t1 * d].iter().copied()).collect();
            let dev = st.clone_htod(&flat).unwrap();
            let vf: Vec<f32> = v.iter().flat_map(|h| h[t0 * d..t1 * d].iter().copied()).collect();
            let vd = st.clone_htod(&vf).unwrap();
            fasa_kernels::gpu::append::append_rows(&g, c, 0, t0, t1 - t0, &dev.as_view(), &vd.as_view()).unwrap();
        };
        // Other rows first up to 600, then rolled back to 100 and written in chunks of 300
        // (moments counted again below 100), the last chunk not a whole block.
        put(&mut got, &k_old, 0, 600);
        for (t0, t1) in [(100, 400), (400, 700), (700, len)] {
            put(&mut got, &k, t0, t1);
        }
        let what = format!("{dt:?} d {d} n_kv {n_kv} per FC {by_fc}");
        assert!(st.clone_dtoh(&got.v).unwrap() == st.clone_dtoh(&want.v).unwrap(), "{what}: V");
        let (gk, wk) = (st.clone_dtoh(&got.k).unwrap(), st.clone_dtoh(&want.k).unwrap());
        // (rows past len: the stale rows the rollback left on the one side, zeros on the other)
        for kv in 0..n_kv {
            for t in 0..len {
                for s in 0..n_fc {
                    let o = kv * l_max * d + got.k_index(t, s);
                    assert!(gk[o] == wk[o] && gk[o + 1] == wk[o + 1], "{what}: K of token {t}, slot {s}, KV head {kv}");
                }
            }
        }
        let bits = |m: Vec<f64>| m.into_iter().map(f64::to_bits).collect::<Vec<_>>();
        assert!(bits(st.clone_dtoh(&got.mom).unwrap()) == bits(st.clone_dtoh(&want.mom).unwrap()), "{what}: moments");
        assert_eq!(st.clone_dtoh(&got.mom_len).unwrap(), vec![len as i32; n_kv], "{what}: mom_len");
        let (gq, wq) = (got.q8.as_ref().unwrap(), want.q8.as_ref().unwrap());
        assert_eq!(st.clone_dtoh(&gq.blocks).unwrap(), vec![(len / QB) as i32; n_kv], "{what}: quantised blocks");
        let whole = |p: &fasa_kernels::gpu::Q8Planes| -> (Vec<i8>, Vec<f32>) {
            let (q, sc) = (st.clone_dtoh(&p.q).unwrap(), st.clone_dtoh(&p.scales).unwrap());
            // (the blocks below len/QB of every KV head: regions of l_max·d bytes and (l_max/QB)·n_fc scales)
            let qb = (len / QB) * QB;
            let q = (0..n_kv).flat_map(|kv| q[kv * l_max * d..kv * l_max * d + qb * d].to_vec()).collect();
            let sc = (0..n_kv).flat_map(|kv| sc[kv * (l_max / QB) * n_fc..kv * (l_max / QB) * n_fc + (len / QB) * n_fc].to_vec()).collect::<Vec<f32>>();
            (q, sc)
        };
        let ((q1, s1), (q2, s2)) = (whole(gq), whole(wq));
        assert!(q1 == q2, "{what}: int8 planes");
        assert!(s1.iter().map(|x| x.to_bits()).eq(s2.iter().map(|x| x.to_bits())), "{what}: int8 scales");
        // Rows written again from t0 = len − 10: only the blocks from t0's on are quantised again
        // (a prompt written in chunks quantises each block once), so a mark left in the scales of
        // block 0 stays, and the rewritten blocks equal write_host's.
        let (per_kv, t0) = ((l_max / QB) * n_fc, len - 10);
        let mark = 0x7fc0_dead_u32;
        let mut sc = st.clone_dtoh(&got.q8.as_ref().unwrap().scales).unwrap();
        (0..n_kv).for_each(|kv| sc[kv * per_kv] = f32::from_bits(mark));
        st.memcpy_htod(&sc, &mut got.q8.as_mut().unwrap().scales).unwrap();
        put(&mut got, &k, t0, len);
        let (sc, sw) = (st.clone_dtoh(&got.q8.as_ref().unwrap().scales).unwrap(), st.clone_dtoh(&want.q8.as_ref().unwrap().scales).unwrap());
        for kv in 0..n_kv {
            assert_eq!(sc[kv * per_kv].to_bits(), mark, "{what}: block 0 quantised again by a write from row {t0}");
            let r = kv * per_kv + (t0 / QB) * n_fc..kv * per_kv + (len / QB) * n_fc;
            assert!(sc[r.clone()].iter().map(|x| x.to_bits()).eq(sw[r].iter().map(|x| x.to_bits())), "{what}: scales of the blocks from row {t0}");
        }
        assert_eq!(st.clone_dtoh(&got.q8.as_ref().unwrap().blocks).unwrap(), vec![(len / QB) as i32; n_kv], "{what}: quantised blocks after the rewrite");
    }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn long_and_large_budget_matches_cpu() {
    let mut r = rng();
    let c = Case { lens: vec![40000, 33000], l_max: 40960, budget: 1024, k: 16, pool: 32, sinks: 4, recent: 32, var_mass: true, ..base(Dtype::F16, 128, 32, 8) };
    check(c, &mut r);
    let c = Case { lens: vec![20000], l_max: 20000, budget: 1024, k: 16, pool: 16, ..base(Dtype::Bf16, 128, 32, 8) };
    check(c, &mut r);
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn ties_pick_lower_rows() {
    // Every K equal: all scores tie, top-B must be rows 0..B (cpu::top_b's rule). 6000 ties also
    // overflow the shared-memory candidate buffer (4096) and take the global-memory path.
    // The group-mass scores tie too (every head's softmax uniform), in one of mass bins' bins.
    for len in [2000, 6000] {
        ties_case(len, false);
        ties_case(len, true);
    }
}

fn ties_case(len: usize, group_mass: bool) {
    let g = gpu();
    let (d, n_kv, n_q, b) = (64, 1, 2, 100);
    let mut cache = GpuKvCache::new(&g, Dtype::F16, 1, n_kv, d, len, None).unwrap();
    let k = vec![0.5f32; len * d];
    cache.write_host(&g, 0, 0, &k, &k).unwrap();
    let q = g.stream.clone_htod(&vec![1.0f32; n_q * d]).unwrap();
    let lens = g.stream.clone_htod(&[len as i32]).unwrap();
    let cfg = DecodeConfig {
        n_q,
        per_group: true,
        budget: b,
        chunks: 4,
        pools: vec![(0..32).collect()],
        pool: 4,
        sinks: 0,
        recent: 0,
        rerank: 0,
        fc_by_variance: false,
        group_mass,
        q8_tip: false,
    };
    let mut dec = FasaDecoder::new(&g, &cache, cfg).unwrap();
    dec.select(&g, &cache, &q, &lens).unwrap();
    let mut rows = g.stream.clone_dtoh(&dec.sel).unwrap();
    rows.sort_unstable();
    assert_eq!(rows, (0..b as u32).collect::<Vec<_>>());
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs libnvrtc, no GPU: scripts/test runs it again with the NVRTC of scripts/setup --nvrtc")]
fn nvrtc_compiles_for_orin_and_hopper() {
    // Needs only libnvrtc (no GPU): both targets compile.
    fasa_kernels::gpu::libraries_present().ok();
    for arch in [(8, 7), (9, 0)] {
        let ptx = fasa_kernels::gpu::compile_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
        // The per-FC TIP kernels' names carry the tokens per thread their shared memory is sized
        // for: the loader's names must be the compiled ones.
        for dt in [Dtype::F16, Dtype::Bf16] {
            for (h, narrow) in [1, 2, 4, 8].into_iter().flat_map(|h| [(h, false), (h, true)]) {
                let name = fasa_kernels::gpu::tipfc_name(h, narrow, dt);
                assert!(ptx.contains(&format!(".entry {name}(")), "{name} not in the module");
            }
            for (h, ks) in [2, 4, 8].into_iter().flat_map(|h| [(h, 1), (h, 2)]) {
                let name = fasa_kernels::gpu::tipm_name(h, ks, dt);
                assert!(ptx.contains(&format!(".entry {name}(")), "{name} not in the module");
            }
        }
        for tpt in [2, 4, 8] {
            assert!(ptx.contains(&format!(".entry tip_mass_t{tpt}(")), "tip_mass_t{tpt} not in the module");
        }
        for v in [8, 2, 1] {
            assert!(ptx.contains(&format!(".entry select_filter_v{v}(")), "select_filter_v{v} not in the module");
        }
    }
}

/// One layer of a `fasa-bench capture` file (format in bench/src/capture.rs), values as stored.
struct CapturedLayer {
    layer: usize,
    /// `(n_q, d)` rotated queries, FC-pair order.
    q: Vec<f32>,
    /// Per KV head `(n, d)`: rotated K (FC-pair order), V.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// The profile's FC rankings, best first: per KV head, per query head.
    kv_ranked: Vec<Vec<usize>>,
    q_ranked: Vec<Vec<usize>>,
}

struct Captured {
    model: String,
    n: usize,
    n_q: usize,
    n_kv: usize,
    d: usize,
    layers: Vec<CapturedLayer>,
}

fn read_captured(path: &std::path::Path) -> Result<Captured, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let nl = bytes.iter().position(|&b| b == b'\n').ok_or("no header line")?;
    let h: serde_json::Value = serde_json::from_slice(&bytes[..nl]).map_err(|e| format!("header: {e}"))?;
    if h["format"] != "fasa-kv-capture" || h["version"] != 1 {
        return Err(format!("not a version-1 fasa-kv-capture file: {}", h["format"]));
    }
    let num = |k: &str| h[k].as_u64().map(|x| x as usize).ok_or(format!("header field {k} missing"));
    let (n, n_q, n_kv, d) = (num("context")?, num("n_heads")?, num("n_kv_heads")?, num("head_dim")?);
    let elem = match h["dtype"].as_str() {
        Some("f16") => 2,
        Some("f32") => 4,
        x => return Err(format!("dtype {x:?}")),
    };
    let ranked = |v: &serde_json::Value, count: usize| -> Result<Vec<Vec<usize>>, String> {
        let lists: Vec<Vec<usize>> = serde_json::from_value(v.clone()).map_err(|e| format!("FC rankings: {e}"))?;
        let ok = lists.len() == count && lists.iter().all(|l| l.len() == d / 2 && l.iter().all(|&f| f < d / 2));
        if ok { Ok(lists) } else { Err("FC rankings do not rank every FC of every head".into()) }
    };
    let metas = h["layers"].as_array().ok_or("header field layers missing")?;
    let per_layer = (n_q * d + n_kv * 2 * n * d) * elem;
    if bytes.len() - nl - 1 != metas.len() * per_layer {
        return Err(format!("{} bytes of arrays, the header describes {}", bytes.len() - nl - 1, metas.len() * per_layer));
    }
    let mut at = nl + 1;
    let mut take = |count: usize| -> Vec<f32> {
        let raw = &bytes[at..at + count * elem];
        at += count * elem;
        if elem == 2 {
            raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        } else {
            raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
    };
    let mut layers = Vec::new();
    for m in metas {
        let q = take(n_q * d);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for _ in 0..n_kv {
            k.push(take(n * d));
            v.push(take(n * d));
        }
        let layer = m["layer"].as_u64().ok_or("layer id missing")? as usize;
        layers.push(CapturedLayer { layer, q, k, v, kv_ranked: ranked(&m["kv_ranked_fcs"], n_kv)?, q_ranked: ranked(&m["q_ranked_fcs"], n_q)? });
    }
    Ok(Captured { model: h["model"].as_str().unwrap_or("?").into(), n, n_q, n_kv, d, layers })
}

/// One captured layer as a case's data: batch entry `b` holds the first `c.lens[b]` tokens (a
/// prefix is what the cache held earlier in the prompt) with the step's queries; K and V rounded
/// to the storage type; pools from the profile (per KV head, or per query head when selecting
/// per head), the cache's FC order that of each KV head's first selection.
fn captured_data(c: &Case, cap: &Captured, l: &CapturedLayer) -> Data {
    let d = cap.d;
    let round = |x: &f32| c.dt.decode(c.dt.encode(*x));
    let (mut k, mut v, mut planes) = (Vec::new(), Vec::new(), Vec::new());
    for &len in &c.lens {
        assert!(len <= cap.n, "case length {len} beyond the capture's {}", cap.n);
        let kb: Vec<Vec<f32>> = l.k.iter().map(|x| x[..len * d].iter().map(round).collect()).collect();
        planes.push(kb.iter().map(|x| planes_of(x, len, d)).collect());
        k.push(kb);
        v.push(l.v.iter().map(|x| x[..len * d].iter().map(round).collect()).collect());
    }
    let q = c.lens.iter().flat_map(|_| l.q.iter().copied()).collect();
    let pools = if c.per_group { l.kv_ranked.clone() } else { l.q_ranked.clone() };
    let group = c.n_q / c.n_kv;
    let order = (0..c.n_kv).map(|kv| pools[if c.per_group { kv } else { kv * group }].clone()).collect();
    Data { k, v, q, planes, order, pools }
}

#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs an NVIDIA GPU: run bench/gpu/run.sh on the device")]
fn captured_kv_matches_cpu() {
    let Some(path) = std::env::var_os("FASA_CAPTURED_KV").map(std::path::PathBuf::from).filter(|p| p.is_file()) else {
        eprintln!(
            "SKIPPED captured_kv_matches_cpu: FASA_CAPTURED_KV is unset or names no file ({:?}); write one with `fasa-bench capture` (bench/gpu/build.sh does)",
            std::env::var_os("FASA_CAPTURED_KV")
        );
        return;
    };
    let cap = read_captured(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    eprintln!("captured K/V: {} ({}), {} tokens, q{}/kv{} d{}, layers {:?}", path.display(), cap.model, cap.n, cap.n_q, cap.n_kv, cap.d, cap.layers.iter().map(|l| l.layer).collect::<Vec<_>>());
    // The whole context and a prefix of 3/8 of it: at B = 1024 (C = 2048) the prefix is in
    // (B, C], the plain top-B path; every other (length, budget) re-ranks.
    let lens = vec![cap.n, cap.n * 3 / 8];
    let (mut worst, mut near, mut cases) = ([0f64; 3], 0usize, 0usize);
    for l in &cap.layers {
        for dt in [Dtype::F16, Dtype::Bf16] {
            for budget in [256, 1024] {
                let base = Case { lens: lens.clone(), l_max: cap.n, budget, k: 8, ..base(dt, cap.d, cap.n_q, cap.n_kv) };
                // Default recipe (engine AttnConfig::fasa: pool 4k capped at d/2, 4 sinks, 32
                // recent, C = 2B, per KV group, FCs by variance, group mass), the earlier
                // default's stage 1 (FCs by query norm, scores summed), then the paper's (k fixed
                // FCs per query head).
                let fasa = Case { pool: (4 * 8).min(cap.d / 2), sinks: 4, recent: 32, rerank: 2 * budget, per_group: true, var_mass: true, ..base.clone() };
                let old = Case { var_mass: false, ..fasa.clone() };
                let paper = Case { pool: 8, sinks: 0, recent: 0, rerank: 0, per_group: false, ..base };
                let (fasa_q8, paper_q8) = (Case { q8: true, ..fasa.clone() }, Case { q8: true, ..paper.clone() });
                let (fasa_q4, paper_q4) = (Case { q4: true, ..fasa_q8.clone() }, Case { q4: true, ..paper_q8.clone() });
                let fasa_fc = Case { by_fc: true, ..fasa_q8.clone() };
                let fasa_fc_cc = Case { cuda_cores: true, ..fasa_fc.clone() };
                let cases_here = [
                    ("fasa", fasa),
                    ("fasa-old", old),
                    ("fasa-paper", paper),
                    ("fasa-int8-per-fc", fasa_fc),
                    ("fasa-int8-per-fc-cuda-cores", fasa_fc_cc),
                    ("fasa-int8", fasa_q8),
                    ("fasa-paper-int8", paper_q8),
                    ("fasa-int4", fasa_q4),
                    ("fasa-paper-int4", paper_q4),
                ];
                for (name, c) in cases_here {
                    let data = captured_data(&c, &cap, l);
                    let o = check_data(&c, &data, &format!("captured layer {} {name}", l.layer));
                    worst = [worst[0].max(o.score_err), worst[1].max(o.fac_err), worst[2].max(o.dense_err)];
                    near += o.near_tie_diffs;
                    cases += 1;
                }
            }
        }
    }
    eprintln!(
        "captured K/V: {cases} cases passed; worst normalized error: TIP scores {:.2e}, FAC {:.2e}, dense {:.2e}; selected sets equal to the CPU's but for {near} near-tie rows",
        worst[0], worst[1], worst[2]
    );
}

/// Runs everywhere: without a driver/NVRTC/GPU the GPU path is a typed error, never a panic.
#[test]
fn missing_gpu_is_an_error_not_a_panic() {
    if let Err(e) = Gpu::new(0) {
        assert!(matches!(e, GpuError::NoDriver | GpuError::NoNvrtc | GpuError::NoDevice), "{e}");
    }
    let _ = NEEDS_GPU;
}
