//! Op 3, top-B selection over the TIP scores without a sort: the histogram of the scores' top 12
//! key bits gives the bin holding the B-th largest; `filter` keeps every score above that bin and
//! collects the bin's scores as candidates; `refine` radix-selects the missing ones among the
//! candidates by unique 64-bit keys (score, then lower index), so the kept set equals
//! `cpu::top_b` (ties → lower index). Sequences with `len ≤ B` keep every row.
use cudarc::driver::CudaSlice;

use super::{cfg, Dims, Gpu, GpuError};

/// `sel (batch·n_sel, budget)`: rows kept (unordered; the first `min(budget, len)` are valid).
/// `thr (batch·n_sel, THR_W)`: the threshold bin found by the TIP launch (`tip::launch` with `thr`)
/// on the same `dims.budget`; `None`: each block finds it from the histogram. `sel_cnt`, `cand_cnt`, `done` `(batch·n_sel,)` and `hist` must be zero on entry, and are zero
/// again on return: the last block of each selection completes it (as [`refine`]) and resets
/// them. `cand (batch·n_sel, l_max)` is scratch. `tok`: tokens per block, 8192 or 2048, or 0 to
/// choose (8192 unless that leaves fewer than two blocks per multiprocessor).
/// `ready (batch·n_sel,)`, zero on entry, with `thr` (FAC early, for [`super::fac::partials`]'s
/// `early`): each selection's last block sets it to 1 once the rows above the threshold bin are
/// written, lets the next launch start, and sets 2 once the selection is complete; the FAC
/// launch's combine clears it.
#[allow(clippy::too_many_arguments)]
pub fn filter(
    gpu: &Gpu,
    dims: &Dims,
    scores: &CudaSlice<f32>,
    hist: &mut CudaSlice<u32>,
    thr: Option<&CudaSlice<i32>>,
    lens: &CudaSlice<i32>,
    sel: &mut CudaSlice<u32>,
    sel_cnt: &mut CudaSlice<u32>,
    cand: &mut CudaSlice<u64>,
    cand_cnt: &mut CudaSlice<u32>,
    done: &mut CudaSlice<u32>,
    ready: Option<&mut CudaSlice<u32>>,
    tok: usize,
) -> Result<(), GpuError> {
    check(dims, sel, cand)?;
    let segs = (dims.batch * dims.n_sel) as usize;
    if done.len() < segs || ready.as_ref().is_some_and(|r| r.len() < segs) {
        return Err(GpuError::Shape("select::filter: done and ready need (batch·n_sel,)".into()));
    }
    if (ready.is_some() || dims.flags & super::EARLY_SELECT != 0) && thr.is_none_or(|t| t.len() < super::THR_W * segs) {
        return Err(GpuError::Shape("select::filter: ready and select early need thr (batch·n_sel, THR_W)".into()));
    }
    // Blocks of 8192 tokens (32 per thread, loads in flight together), or of 2048 where those
    // would leave fewer than two blocks per multiprocessor (batch 1).
    let big = match tok {
        0 => segs * (dims.l_max as usize).div_ceil(8192) >= 2 * gpu.sm_count,
        8192 => true,
        2048 => false,
        _ => return Err(GpuError::Shape(format!("select::filter: blocks of 8192 or 2048 tokens, not {tok}"))),
    };
    let tok = if big { 8192 } else { 2048 };
    let mut l = gpu.launcher(&gpu.f.select_filter[!big as usize]);
    let null = 0u64;
    l.arg(dims).arg(scores).arg(hist);
    match thr {
        Some(t) => l.arg(t),
        None => l.arg(&null),
    };
    l.arg(lens).arg(sel).arg(sel_cnt).arg(cand).arg(cand_cnt).arg(done);
    match ready {
        Some(r) => l.arg(r),
        None => l.arg(&null),
    };
    let grid = ((dims.l_max as usize).div_ceil(tok), dims.n_sel as usize, dims.batch as usize);
    // SAFETY: sizes checked; fewer than `budget` rows lie above the threshold bin, so sel writes
    // stay inside each selection's `budget` rows, and candidates inside its `l_max` slots.
    unsafe { l.launch(cfg(grid, 256)) }?;
    Ok(())
}

/// The completion step alone (already done by [`filter`]'s last blocks): completes `sel` and
/// zeroes `sel_cnt`, `cand_cnt` and, without `thr`, `hist` (with it, the filter's blocks did). With `rerank`, keeps the top `min(budget, m)` of `m`
/// candidate keys in `cand` instead.
#[allow(clippy::too_many_arguments)]
pub fn refine(
    gpu: &Gpu,
    dims: &Dims,
    hist: &mut CudaSlice<u32>,
    thr: Option<&CudaSlice<i32>>,
    lens: &CudaSlice<i32>,
    sel: &mut CudaSlice<u32>,
    sel_cnt: &mut CudaSlice<u32>,
    cand: &CudaSlice<u64>,
    cand_cnt: &mut CudaSlice<u32>,
    rerank: bool,
) -> Result<(), GpuError> {
    check(dims, sel, cand)?;
    let mode = rerank as i32;
    let mut l = gpu.launcher(&gpu.f.select_refine);
    let null = 0u64;
    l.arg(dims).arg(hist);
    match thr {
        Some(t) => l.arg(t),
        None => l.arg(&null),
    };
    l.arg(lens).arg(sel).arg(sel_cnt).arg(cand).arg(cand_cnt).arg(&mode);
    // SAFETY: sizes checked; one block per selection touches only that selection's rows.
    unsafe { l.launch(cfg((dims.n_sel as usize, dims.batch as usize, 1), 256)) }?;
    Ok(())
}

fn check(d: &Dims, sel: &CudaSlice<u32>, cand: &CudaSlice<u64>) -> Result<(), GpuError> {
    let segs = (d.batch * d.n_sel) as usize;
    if d.budget < 1 || sel.len() < segs * d.budget as usize || cand.len() < segs * d.l_max as usize {
        return Err(GpuError::Shape(format!("select: buffers too small for {d:?}")));
    }
    Ok(())
}
