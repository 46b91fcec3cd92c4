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
/// them. `cand (batch·n_sel, l_max)` is scratch. `tok`: tokens per block, 8192, 2048 or 1024, or 0
/// to choose ([`filter_tok`]).
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
    // would leave fewer than two blocks per multiprocessor (batch 1), or of 1024 where even
    // those would leave multiprocessors without one ([`filter_tok`]).
    let tok = if tok == 0 { filter_tok(segs, dims.l_max as usize, gpu.sm_count) } else { tok };
    let Some(kernel) = FILTER_TOKS.iter().position(|&t| t == tok) else {
        return Err(GpuError::Shape(format!("select::filter: blocks of {FILTER_TOKS:?} tokens, not {tok}")));
    };
    let mut l = gpu.launcher(&gpu.f.select_filter[kernel]);
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

/// Tokens per select-filter block, in the order of `Funcs::select_filter` (`select_filter_v8`,
/// `_v2`, `_v1`: 4·V scores a thread).
const FILTER_TOKS: [usize; 3] = [8192, 2048, 1024];

/// The select filter's tokens per block for `segs` selections of `l_max` tokens on `sm_count`
/// multiprocessors: 8192 while that gives two blocks per multiprocessor, else 2048, else 1024
/// where blocks of 2048 would not give each multiprocessor one. A filter block is a chain of
/// dependent steps (its loads, one block scan, the atomics, the writes), so on a small grid more,
/// shorter blocks finish sooner. GPU run 37 (Llama-3-8B shapes, same call, three rounds, 2048 →
/// 1024 tokens): paper int8 1 × 8k 25.95 → 25.34 µs and 1 × 32k 27.1 → 26.8 (32 and 128 blocks
/// of 2048); default int8 1 × 8k 35.8 → 35.3, 1 × 32k 39.5 → 39.3; SmolLM2 1 × 8k (12 blocks)
/// paper 20.6 → 20.4, default 30.3 → 30.0 at B 256. At 1 × 128k (512 blocks) 1024 cost 2.8 µs.
pub fn filter_tok(segs: usize, l_max: usize, sm_count: usize) -> usize {
    if segs * l_max.div_ceil(8192) >= 2 * sm_count {
        8192
    } else if segs * l_max.div_ceil(2048) >= sm_count {
        2048
    } else {
        1024
    }
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

#[cfg(test)]
mod tests {
    use super::filter_tok;

    #[test]
    fn the_filter_shortens_its_blocks_only_on_small_grids() {
        // H200, 132 SMs. Llama-3-8B (8 KV groups): batch 1 at 8k and 32k (32 and 128 blocks of
        // 2048) take 1024; 1 × 128k (512) keeps 2048 (1024 cost 2.8 µs, GPU run 37); 16 × 32k
        // (64 of 8192 a selection row: 1024 blocks) takes 8192.
        assert_eq!(filter_tok(8, 8192, 132), 1024);
        assert_eq!(filter_tok(8, 32768, 132), 1024);
        assert_eq!(filter_tok(8, 131072, 132), 2048);
        assert_eq!(filter_tok(128, 32768, 132), 8192);
        // SmolLM2 (3 KV groups) at 8k: batch 1 (12 blocks) takes 1024, on a 16-SM Jetson Orin
        // too; batch 16 (192 blocks of 2048) keeps 2048.
        assert_eq!(filter_tok(3, 8192, 132), 1024);
        assert_eq!(filter_tok(3, 8192, 16), 1024);
        assert_eq!(filter_tok(48, 8192, 132), 2048);
    }
}
