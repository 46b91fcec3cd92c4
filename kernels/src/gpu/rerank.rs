//! Op 6 (default-mode extra), re-rank: the C candidates kept by FC score are scored exactly
//! (full dims, raw q·k per q head), and B of them are kept by the group's attention mass
//! Σ_h softmax_h(q·k/√d) over the candidates, forced rows kept (as the CPU operator's re-rank).
use cudarc::driver::CudaSlice;

use super::{cfg, Dims, Dtype, Gpu, GpuError, TypedOp, RR_ROWS};

/// `rr (batch·n_sel, hps, c)` raw scores of the candidates `selc (batch·n_sel, c)`.
#[allow(clippy::too_many_arguments)]
pub fn scores(
    gpu: &Gpu,
    dt: Dtype,
    dims: &Dims,
    k: &CudaSlice<u16>,
    q: &CudaSlice<f32>,
    fc_of_slot: &CudaSlice<i32>,
    lens: &CudaSlice<i32>,
    selc: &CudaSlice<u32>,
    c: usize,
    rr: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    let segs = (dims.batch * dims.n_sel) as usize;
    if selc.len() < segs * c || rr.len() < segs * dims.hps as usize * c {
        return Err(GpuError::Shape("rerank::scores: buffers too small".into()));
    }
    let ci = c as i32;
    let f = gpu.f.typed(dt, TypedOp::RerankScores);
    let mut l = gpu.launcher(f);
    l.arg(dims).arg(k).arg(q).arg(fc_of_slot).arg(lens).arg(selc).arg(&ci).arg(rr);
    // SAFETY: sizes checked; rows come from selc (tokens < len ≤ l_max).
    unsafe { l.launch(cfg((c.div_ceil(RR_ROWS), dims.n_sel as usize, dims.batch as usize), 128)) }?;
    Ok(())
}

/// Keeps B of the C candidates by group mass (every row a candidate where `len ≤ C`) into `sel
/// (batch·n_sel, B)`, `dims.budget = B`. `mass (batch·n_sel, c)` and `cand` are scratch;
/// `cand_cnt`, `sel_cnt` are zero on entry and on return.
#[allow(clippy::too_many_arguments)]
pub fn mass(
    gpu: &Gpu,
    dims: &Dims,
    lens: &CudaSlice<i32>,
    selc: &CudaSlice<u32>,
    c: usize,
    rr: &CudaSlice<f32>,
    scores: &CudaSlice<f32>,
    mass: &mut CudaSlice<f32>,
    cand: &mut CudaSlice<u64>,
    cand_cnt: &mut CudaSlice<u32>,
    sel: &mut CudaSlice<u32>,
    sel_cnt: &mut CudaSlice<u32>,
) -> Result<(), GpuError> {
    let segs = (dims.batch * dims.n_sel) as usize;
    if mass.len() < segs * c || cand.len() < segs * dims.l_max as usize || c > dims.l_max as usize || sel.len() < segs * dims.budget as usize {
        return Err(GpuError::Shape("rerank::mass: buffers too small".into()));
    }
    let ci = c as i32;
    let mut l = gpu.launcher(&gpu.f.rerank_mass);
    l.arg(dims).arg(lens).arg(selc).arg(&ci).arg(rr).arg(scores).arg(mass).arg(cand).arg(cand_cnt).arg(sel).arg(sel_cnt);
    // SAFETY: sizes checked; one block per selection, writing only its own rows.
    unsafe { l.launch(cfg((dims.n_sel as usize, dims.batch as usize, 1), 256)) }?;
    Ok(())
}
