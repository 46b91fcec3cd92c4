//! Op 2, TIP: FC scores of every cached token from the chosen FCs only (q heads of a selection
//! summed), sinks/recent forced to +∞, and the per-selection histogram the select op starts from.
//! The k FCs are chosen per step inside the pool by Σ_h ‖q_{h,f}‖ (`cpu::choose_fcs`); with
//! `pool == k` that is the paper's fixed set.
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{cfg, Dims, Dtype, Gpu, GpuError, TypedOp, TIP_TOK};

/// `scores (batch·n_sel, l_max)` f32 and `hist (batch·n_sel, NBIN)` (must be zero on entry; the
/// select op zeroes it again). `q (batch, n_q, d)` f32 FC-pair order; `pool (n_sel, P)` slots;
/// `lens (batch,)`. Uses `dims.{hps, n_sel, pool, k, sinks, recent, budget}`. With
/// `thr = Some((done, thr))` the last block of each selection also finds the histogram's
/// threshold bin for `dims.budget` into `thr (batch·n_sel, 2)` = (bin, rows above it) when
/// `len > budget`; `done (batch·n_sel,)` is its block counter, zero on entry and on return.
/// Each block scores `nchunk` chunks of `TIP_TOK` tokens (see [`chunks`]).
#[allow(clippy::too_many_arguments)]
pub fn launch(
    gpu: &Gpu,
    dt: Dtype,
    dims: &Dims,
    k: &CudaSlice<u16>,
    q: &CudaSlice<f32>,
    fc_of_slot: &CudaSlice<i32>,
    pool: &CudaSlice<i32>,
    lens: &CudaSlice<i32>,
    scores: &mut CudaSlice<f32>,
    hist: &mut CudaSlice<u32>,
    thr: Option<(&mut CudaSlice<u32>, &mut CudaSlice<i32>)>,
    nchunk: usize,
) -> Result<(), GpuError> {
    check(dims, q, pool, scores)?;
    let segs = (dims.batch * dims.n_sel) as usize;
    if hist.len() < segs * super::NBIN || thr.as_ref().is_some_and(|(d, t)| d.len() < segs || t.len() < 2 * segs) {
        return Err(GpuError::Shape("tip: done, thr or hist too small".into()));
    }
    let null = 0u64;
    let f = gpu.f.typed(dt, TypedOp::Tip);
    let mut l = gpu.stream.launch_builder(f);
    l.arg(dims).arg(k).arg(q).arg(fc_of_slot).arg(pool).arg(lens).arg(scores).arg(hist);
    match thr {
        Some((d, t)) => l.arg(d).arg(t),
        None => l.arg(&null).arg(&null),
    };
    let nchunk = nchunk.max(1);
    let nc = nchunk as i32;
    l.arg(&nc);
    let grid = ((dims.l_max as usize).div_ceil(TIP_TOK * nchunk), dims.n_sel as usize, dims.batch as usize);
    // SAFETY: buffer sizes checked against dims; each block reads tokens < lens[b] ≤ l_max of its
    // (b, kv) region and writes scores/hist of its own selection only.
    unsafe { l.launch(cfg(grid, 256)) }?;
    Ok(())
}

/// Chunks of `TIP_TOK` tokens per TIP block: enough blocks for about 8 per multiprocessor, each
/// as long as that allows (up to 8 chunks), so its fixed costs (FC choice, q, histogram flush)
/// are spread over more tokens.
pub fn chunks(l_max: usize, segs: usize, sm_count: usize) -> usize {
    (l_max.div_ceil(TIP_TOK) * segs / (8 * sm_count).max(1)).clamp(1, 8)
}

fn check(d: &Dims, q: &CudaSlice<f32>, pool: &CudaSlice<i32>, scores: &CudaSlice<f32>) -> Result<(), GpuError> {
    let ok = d.hps >= 1
        && d.hps as usize <= super::MAX_HPS
        && d.n_sel * d.hps == d.n_q
        && d.n_q % d.n_kv == 0
        && (d.n_q / d.n_kv) % d.hps == 0
        && d.pool >= 1
        && d.pool <= d.n_fc
        && d.k >= 1
        && q.len() >= (d.batch * d.n_q * d.d) as usize
        && pool.len() >= (d.n_sel * d.pool) as usize
        && scores.len() >= (d.batch * d.n_sel * d.l_max) as usize;
    if ok {
        Ok(())
    } else {
        Err(GpuError::Shape(format!("tip: inconsistent dims or buffers {d:?}")))
    }
}
