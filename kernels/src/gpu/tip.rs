//! Op 2, TIP: FC scores of every cached token from the chosen FCs only, sinks/recent forced to
//! +∞, and the per-selection histogram the select op starts from. The k FCs are chosen per step
//! inside the pool by Σ_h ‖q_{h,f}‖ (`cpu::choose_fcs`) or, given the cache's K moments, by the
//! logit variance they cause (`cpu::choose_fcs_var`); with `pool == k` that is the paper's fixed
//! set. A selection's q heads are combined by summing their scores ([`launch`]) or, in two
//! launches, by summing each head's softmax over the tokens ([`launch_heads`] then [`mass`]:
//! `cpu::tip_group_mass`). Both read the 16-bit K groups or, given the cache's int8 scoring planes
//! (`Q8Planes`), those for whole quantised blocks and K for the tokens after them
//! (`cpu::fc_scores_q8`); planes stored per FC are read by `tipfc_h*`, the chosen FCs' runs only.
use cudarc::driver::CudaSlice;

use super::launch::Launch;
use super::{cfg, mass_tpt, Dims, Dtype, Gpu, GpuError, Q8Planes, QB, TIP_TOK};

/// `scores (batch·n_sel, l_max)` f32 and `hist (batch·n_sel, NBIN)` (must be zero on entry; the
/// select op zeroes it again). `q (batch, n_q, d)` f32 FC-pair order; `pool (2, n_sel, P)`: the
/// pool's slots, then the FC ids in them; `lens (batch,)`. `mom`: the cache's K moments
/// (`GpuKvCache::mom`) to choose FCs by variance, else by norm. Uses
/// `dims.{hps, n_sel, pool, k, sinks, recent, budget}`. With
/// `thr = Some((done, thr))` the last block of each selection also finds the histogram's
/// threshold bin for `dims.budget` into `thr (batch·n_sel, THR_W)` = (bin, rows above it, …) when
/// `len > budget`; `done (batch·n_sel,)` is its block counter, zero on entry and on return.
/// Each block scores `nchunk` chunks of `TIP_TOK` tokens (see [`chunks`], [`chunks_wave`]). `q8`:
/// score whole quantised blocks from the int8 planes, with the pipelined kernel `pipe` (a
/// `gpu::TIP8_PIPES` code; 0: the unpipelined `tip8` of GPU run 14); int4 planes by the int4
/// kernel `pipe` names (a `gpu::TIP4_PIPES` code; any other but 0, `gpu::TIP4_PIPE`); per-FC
/// planes (`Q8Planes::by_fc`) by `tipfc_h1`, whatever `pipe`.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    gpu: &Gpu,
    dt: Dtype,
    dims: &Dims,
    k: &CudaSlice<u16>,
    q8: Option<&Q8Planes>,
    q: &CudaSlice<f32>,
    pool: &CudaSlice<i32>,
    mom: Option<&CudaSlice<f64>>,
    lens: &CudaSlice<i32>,
    scores: &mut CudaSlice<f32>,
    hist: &mut CudaSlice<u32>,
    thr: Option<(&mut CudaSlice<u32>, &mut CudaSlice<i32>)>,
    nchunk: usize,
    pipe: usize,
) -> Result<(), GpuError> {
    check(dims, q, pool, scores.len())?;
    check_mom(dims, mom)?;
    let segs = (dims.batch * dims.n_sel) as usize;
    if hist.len() < segs * super::NBIN || thr.as_ref().is_some_and(|(d, t)| d.len() < segs || t.len() < super::THR_W * segs) {
        return Err(GpuError::Shape("tip: done, thr or hist too small".into()));
    }
    check_q8(dims, q8)?;
    let null = 0u64;
    let pipelined = q8.is_some() && pipe != 0;
    let q4 = Q8Planes::int4(q8);
    if q4 && !pipelined {
        return Err(GpuError::Shape("tip: int4 scoring planes are read by the pipelined TIP only (FASA_GPU_TIP8=0 names the unpipelined one)".into()));
    }
    let by_fc = Q8Planes::per_fc(q8);
    let (f, smem) = match (pipelined, q4) {
        _ if by_fc => {
            let narrow = super::tipfc_narrow(nchunk.max(1));
            (gpu.f.tipfc(dt, 1, narrow), super::tipfc_smem(1, narrow))
        }
        (true, true) => {
            let (f, code) = gpu.f.tip4p(dt, pipe);
            (f, super::tip4p_smem(code))
        }
        (true, false) => (gpu.f.tip8p(dt, pipe).ok_or_else(|| GpuError::Shape(format!("tip: no int8 TIP kernel {pipe}")))?, super::tip8p_smem(pipe)),
        (false, _) => (gpu.f.tip(dt, q8.is_some()), 0),
    };
    // The planes' width travels in the flags (the region offsets, `kq_region` in fasa.cu).
    let d = Dims { flags: Q8Planes::flags(q8, dims.flags), ..*dims };
    let mut l = gpu.launcher(f);
    lead_args(&mut l, &d, k, q8, q, pool, mom, &null);
    l.arg(lens).arg(scores).arg(hist);
    match thr {
        Some((d, t)) => l.arg(d).arg(t),
        None => l.arg(&null).arg(&null),
    };
    let nchunk = nchunk.max(1);
    let nc = nchunk as i32;
    l.arg(&nc);
    if by_fc {
        l.arg(&null); // (tipfc's per-head partials: none for the summed score)
    }
    let grid = ((dims.l_max as usize).div_ceil(TIP_TOK * nchunk), dims.n_sel as usize, dims.batch as usize);
    let mut c = cfg(grid, 256);
    c.shared_mem_bytes = smem as u32; // (its limit raised to this when the module was loaded)
    // SAFETY: buffer sizes checked against dims; each block reads tokens < lens[b] ≤ l_max of its
    // (b, kv) region and writes scores/hist of its own selection only.
    unsafe { l.launch(c) }?;
    Ok(())
}

/// Group-mass TIP, first half: `xh (batch·n_sel, hps, l_max)` scaled per-head FC scores
/// `scale·ŝ_h(t)` and `pml (batch·n_sel, ceil(l_max/(TIP_TOK·nchunk)), hps, 2)` each block's
/// per-head (max, Σexp) over its tokens. FC choice and other arguments as [`launch`]; `nchunk`
/// must be passed on to [`mass`]. `pipelined` (with `q8`): the kernel that copies its int8
/// pieces into shared memory ahead of the compute as the summed-score `tip8p` does (`tip8ph_h*`;
/// the same operations per token as `tip8_heads_*`); size `nchunk` with [`chunks_wave`].
/// Per-FC planes (`Q8Planes::by_fc`) are read by `tipm_h*` on tensor cores where `tensor_cores`
/// and it has a kernel for k ([`tipm_slots`](super::tipm_slots)), else by `tipfc_h*`,
/// whatever `pipelined`.
#[allow(clippy::too_many_arguments)]
pub fn launch_heads(
    gpu: &Gpu,
    dt: Dtype,
    dims: &Dims,
    k: &CudaSlice<u16>,
    q8: Option<&Q8Planes>,
    q: &CudaSlice<f32>,
    pool: &CudaSlice<i32>,
    mom: Option<&CudaSlice<f64>>,
    lens: &CudaSlice<i32>,
    xh: &mut CudaSlice<f32>,
    pml: &mut CudaSlice<f32>,
    nchunk: usize,
    pipelined: bool,
    tensor_cores: bool,
) -> Result<(), GpuError> {
    check(dims, q, pool, xh.len() / (dims.hps.max(1) as usize))?;
    check_mom(dims, mom)?;
    let nchunk = nchunk.max(1);
    let segs = (dims.batch * dims.n_sel) as usize;
    let nblk = (dims.l_max as usize).div_ceil(TIP_TOK * nchunk);
    let hps = dims.hps as usize;
    if xh.len() < segs * hps * dims.l_max as usize || pml.len() < segs * nblk * hps * 2 {
        return Err(GpuError::Shape("tip::launch_heads: xh or pml too small".into()));
    }
    check_q8(dims, q8)?;
    let q4 = Q8Planes::int4(q8);
    if q4 && !pipelined {
        return Err(GpuError::Shape("tip::launch_heads: int4 scoring planes are read by the pipelined kernel only (tip4ph_h*)".into()));
    }
    let null = 0u64;
    let nc = nchunk as i32;
    let by_fc = Q8Planes::per_fc(q8);
    let d = Dims { flags: Q8Planes::flags(q8, dims.flags), ..*dims };
    let tipm_k = if by_fc { super::tipm_slots(tensor_cores, dims.k as usize, dims.pool as usize) } else { None };
    if let Some(k_slots) = tipm_k {
        let mut l = gpu.launcher(gpu.f.tipm(dt, hps, k_slots));
        lead_args(&mut l, &d, k, q8, q, pool, mom, &null);
        l.arg(lens).arg(xh).arg(pml).arg(&nc);
        let mut c = cfg((nblk, dims.n_sel as usize, dims.batch as usize), 256);
        c.shared_mem_bytes = super::tipm_smem(k_slots) as u32;
        // SAFETY: sizes checked; each block reads tokens < lens[b] ≤ l_max of its (b, kv) region
        // (whole 64-token tiles of the planes below l_max) and writes its own selection's xh rows
        // and its own pml entry.
        unsafe { l.launch(c) }?;
        return Ok(());
    }
    let narrow = super::tipfc_narrow(nchunk);
    let pipelined = pipelined && q8.is_some();
    let f = if by_fc {
        gpu.f.tipfc(dt, hps.max(2), narrow)
    } else if q4 {
        gpu.f.tip4ph(dt, hps)
    } else {
        gpu.f.tip_heads(dt, hps, q8.is_some(), pipelined)
    };
    let mut l = gpu.launcher(f);
    lead_args(&mut l, &d, k, q8, q, pool, mom, &null);
    l.arg(lens).arg(xh);
    if by_fc {
        // (tipfc's summed-score outputs: none here)
        l.arg(&null).arg(&null).arg(&null).arg(&nc).arg(pml);
    } else {
        l.arg(pml).arg(&nc);
    }
    // SAFETY: sizes checked; each block reads tokens < lens[b] ≤ l_max of its (b, kv) region and writes its
    // own selection's xh rows and its own pml entry.
    let mut c = cfg((nblk, dims.n_sel as usize, dims.batch as usize), 256);
    c.shared_mem_bytes = match (pipelined, q4) {
        _ if by_fc => super::tipfc_smem(hps.max(2), narrow) as u32,
        (true, true) => super::tip4ph_smem(hps) as u32,
        (true, false) => super::tip8ph_smem(hps) as u32,
        (false, _) => 0,
    };
    unsafe { l.launch(c) }?;
    Ok(())
}

/// Group-mass TIP, second half: `scores` = Σ_h softmax_t(xh_h)(t), forced rows +∞, `hist` and
/// (with `thr`) the threshold, as [`launch`]'s. `nchunk` as given to [`launch_heads`].
#[allow(clippy::too_many_arguments)]
pub fn mass(
    gpu: &Gpu,
    dims: &Dims,
    xh: &CudaSlice<f32>,
    pml: &CudaSlice<f32>,
    lens: &CudaSlice<i32>,
    nchunk: usize,
    scores: &mut CudaSlice<f32>,
    hist: &mut CudaSlice<u32>,
    thr: Option<(&mut CudaSlice<u32>, &mut CudaSlice<i32>)>,
) -> Result<(), GpuError> {
    let segs = (dims.batch * dims.n_sel) as usize;
    let nchunk = nchunk.max(1);
    let nblk = (dims.l_max as usize).div_ceil(TIP_TOK * nchunk);
    let hps = dims.hps as usize;
    let ok = xh.len() >= segs * hps * dims.l_max as usize
        && pml.len() >= segs * nblk * hps * 2
        && scores.len() >= segs * dims.l_max as usize
        && hist.len() >= segs * super::NBIN
        && thr.as_ref().is_none_or(|(d, t)| d.len() >= segs && t.len() >= super::THR_W * segs);
    if !ok {
        return Err(GpuError::Shape("tip::mass: buffers too small".into()));
    }
    let null = 0u64;
    let nc = nchunk as i32;
    let tpt = mass_tpt((dims.l_max as usize).div_ceil(256 * 8) * segs, gpu.sm_count);
    let mut l = gpu.launcher(&gpu.f.tip_mass[tpt.trailing_zeros() as usize - 1]);
    l.arg(dims).arg(xh).arg(pml).arg(lens).arg(&nc).arg(scores).arg(hist);
    match thr {
        Some((d, t)) => l.arg(d).arg(t),
        None => l.arg(&null).arg(&null),
    };
    let grid = ((dims.l_max as usize).div_ceil(256 * tpt), dims.n_sel as usize, dims.batch as usize);
    // SAFETY: sizes checked; each block reads its selection's xh and pml entries of blocks that
    // held tokens (< lens[b]) and writes its own tokens' scores and its selection's histogram.
    unsafe { l.launch(cfg(grid, 256)) }?;
    Ok(())
}

/// Every TIP kernel's leading arguments: dims `d` (with the planes' flags), K and the planes
/// ([`arg_k`]), q, the pool, the K moments or null.
#[allow(clippy::too_many_arguments)]
fn lead_args<'a>(
    l: &mut Launch<'a>,
    d: &'a Dims,
    k: &'a CudaSlice<u16>,
    q8: Option<&'a Q8Planes>,
    q: &'a CudaSlice<f32>,
    pool: &'a CudaSlice<i32>,
    mom: Option<&'a CudaSlice<f64>>,
    null: &'a u64,
) {
    l.arg(d);
    arg_k(l, k, q8);
    l.arg(q).arg(pool);
    match mom {
        Some(m) => l.arg(m),
        None => l.arg(null),
    };
}

/// K, then with int8 planes their values, scales and block counts (the `tip8*` kernels' order).
fn arg_k<'a>(l: &mut Launch<'a>, k: &'a CudaSlice<u16>, q8: Option<&'a Q8Planes>) {
    l.arg(k);
    if let Some(p) = q8 {
        l.arg(&p.q).arg(&p.scales).arg(&p.blocks);
    }
}

fn check_q8(d: &Dims, q8: Option<&Q8Planes>) -> Result<(), GpuError> {
    let (bk, l) = ((d.batch * d.n_kv) as usize, d.l_max as usize);
    if q8.is_some_and(|p| p.blocks.len() < bk || p.q.len() < bk * l * d.d as usize * p.bits as usize / 8 || p.scales.len() < bk * (l / QB) * d.n_fc as usize) {
        return Err(GpuError::Shape("tip: int8 planes need (batch, n_kv) blocks of the cache's shape".into()));
    }
    Ok(())
}

fn check_mom(d: &Dims, mom: Option<&CudaSlice<f64>>) -> Result<(), GpuError> {
    if mom.is_some_and(|m| m.len() < (d.batch * d.n_kv * d.n_fc * 5) as usize) {
        return Err(GpuError::Shape("tip: moments need (batch, n_kv, n_fc, 5)".into()));
    }
    Ok(())
}

/// Chunks of `TIP_TOK` tokens per TIP block: at most about 8 blocks per multiprocessor, each as
/// long as that allows (up to 8 chunks), so its fixed costs (FC choice, q, histogram flush) are
/// spread over more tokens. (Rounded up since GPU run 12: 4 chunks instead of 3 at 32k, batch 16,
/// Llama shapes, 138.6 → 132.5 µs for the paper's int8 step.)
pub fn chunks(l_max: usize, segs: usize, sm_count: usize) -> usize {
    (l_max.div_ceil(TIP_TOK) * segs).div_ceil((8 * sm_count).max(1)).clamp(1, 8)
}

/// Chunks of `TIP_TOK` tokens per block of the pipelined int8 TIP: as few blocks as fill the
/// resident slots (`per_sm` blocks on each of `sm_count` multiprocessors) once, each a long
/// contiguous run of tokens, so no tail wave is left and the prologue and histogram flush are
/// paid once per block (16 × 128k, Llama shapes: 2 blocks per selection of 64 chunks each; at
/// batch 1: 32 blocks of 1 to 4 chunks).
pub fn chunks_wave(l_max: usize, segs: usize, sm_count: usize, per_sm: usize) -> usize {
    let per_seg = (per_sm.max(1) * sm_count / segs.max(1)).max(1);
    l_max.div_ceil(TIP_TOK).div_ceil(per_seg).max(1)
}

/// `scores`: elements of the per-token output per head (`(batch·n_sel, l_max)` at least).
fn check(d: &Dims, q: &CudaSlice<f32>, pool: &CudaSlice<i32>, scores: usize) -> Result<(), GpuError> {
    let ok = d.hps >= 1
        && d.hps as usize <= super::MAX_HPS
        && d.n_sel * d.hps == d.n_q
        && d.n_q % d.n_kv == 0
        && (d.n_q / d.n_kv) % d.hps == 0
        && d.pool >= 1
        && d.pool <= d.n_fc
        && d.k >= 1
        && q.len() >= (d.batch * d.n_q * d.d) as usize
        && pool.len() >= (2 * d.n_sel * d.pool) as usize
        && scores >= (d.batch * d.n_sel * d.l_max) as usize;
    if ok {
        Ok(())
    } else {
        Err(GpuError::Shape(format!("tip: inconsistent dims or buffers {d:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::super::mass_tpt;

    #[test]
    fn the_mass_stage_halves_its_blocks_only_while_they_fit_one_wave() {
        // (FASA_GPU_MASS_TPT, a benchmark switch, is not set in the tests.) H200, 132 SMs, blocks
        // at 8 tokens a thread = ceil(l_max / 2048) · batch · selections. Llama-3-8B (8 KV
        // groups): batch 1 at 8k (32) and 32k (128) take 4 tokens a thread (GPU run 36: 37.6 →
        // 36.8 and 42.2 → 41.1 µs), 1 × 128k (512) and 16 × 32k (2048) keep 8 (4 cost 1.8 and
        // 5.3 µs there).
        assert_eq!(mass_tpt(32, 132), 4);
        assert_eq!(mass_tpt(128, 132), 4);
        assert_eq!(mass_tpt(512, 132), 8);
        assert_eq!(mass_tpt(2048, 132), 8);
        // SmolLM2 (3 KV groups) at 8k: batch 1 (12) on an H200 or a 16-SM Jetson Orin takes 4;
        // batch 16 (192) keeps 8.
        assert_eq!(mass_tpt(12, 132), 4);
        assert_eq!(mass_tpt(12, 16), 4);
        assert_eq!(mass_tpt(192, 132), 8);
    }
}
