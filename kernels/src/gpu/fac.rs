//! Ops 4 and 5, FAC and dense flash-decode: exact attention (full dims) of every q head of a
//! selection over its rows, the K/V rows read once for all those heads. Rows are split over
//! blocks (`rows_per_split` each, fused softmax per block) and `combine` merges the partials.
use cudarc::driver::CudaSlice;

use super::{cfg, Dims, Dtype, FacKernel, Gpu, GpuError, FAC_MAX_ROWS};

/// Rows per block and blocks per selection of FAC over `n_rows` selected rows and `n_seg`
/// selections (split-K): about 8 blocks per multiprocessor (3 are resident for a group of 4, so
/// several waves keep the tail short), 32..=FAC_MAX_ROWS rows each. The decoder's split below 64
/// selections per step; from there [`split_wave`] (for the kernel it runs: `FasaDecoder::fac_kernel`).
pub fn split(n_rows: usize, n_seg: usize, sm_count: usize) -> (usize, usize) {
    let want = (8 * sm_count).div_ceil(n_seg.max(1)).max(1);
    let rows = n_rows.div_ceil(want).next_multiple_of(32).clamp(32, FAC_MAX_ROWS);
    (rows, n_rows.div_ceil(rows).max(1))
}

/// Rows per block and blocks per selection as one wave of resident blocks (`per_sm` on each of
/// `sm_count` multiprocessors), 32..=FAC_MAX_ROWS rows each: every block's rows are one
/// selection's, so blocks take the same time and a second, partial wave is a tail. The decoder
/// takes it from 64 selections per step, for its FAC kernel's blocks per SM. GPU run 17 (Llama-3-8B
/// shapes, B = 1024, 4 lean blocks per SM): 16 selections' worth of 32k or 128k get 512 blocks of
/// 256 rows instead of [`split`]'s 1024 of 128 (1.94 waves); paper int8 step, same series: 16 ×
/// 32k 118.8 → 112.6 µs, 16 × 128k 275.9 → 270.2; blocks of 64, 192, 384, 512 rows were slower
/// (16 × 32k: 128.1, 124.4, 122.7, 133.3). At batch 1 both give 32-row blocks; below 64
/// selections (batch 4: 32) the split is unchanged and was not timed this way.
pub fn split_wave(n_rows: usize, n_seg: usize, sm_count: usize, per_sm: usize) -> (usize, usize) {
    let per_seg = (per_sm.max(1) * sm_count / n_seg.max(1)).max(1);
    let rows = n_rows.div_ceil(per_seg).next_multiple_of(32).clamp(32, FAC_MAX_ROWS);
    (rows, n_rows.div_ceil(rows).max(1))
}

/// The same for dense attention (rows `0..len`): about 16 blocks per multiprocessor, but no
/// shorter than the blocks of about 3 per multiprocessor, rounded up to a power of two, up to 2048
/// rows; at least 256 rows (so the partials stay under ~3 % of the K/V bytes); with few selections
/// (at most a 32nd of a wave of `per_sm` resident blocks on each multiprocessor: batch 1 of
/// Llama-3-8B shapes) one wave of longer blocks instead. GPU run 18 (dense, lean kernel, same
/// call): 1 × 32k 65.2 → 58.9 µs (512 rows instead of 256), 1 × 128k 214.8 → 199.6 (2048); at
/// 16 × 32k 256 to 4096 rows were within 1.5 %. GPU run 31 (tensor-core kernel, µs, same call):
/// Llama-3-8B 16 × 8k 512 rows (16 per SM) 163.4, 1024 148.9, 2048 141.5; SmolLM2 16 × 8k 256 (16
/// per SM) 44.9, 512 37.8, 1024 34.5, 2048 46.6, and 960 (9 splits: 432 blocks against 384) 42.9
/// in another call where 512 ran 37.3; 16 × 32k 2048 rows 527 µs against ~1984 (17 splits)
/// 531–538. At batch 1 the one-wave split stays the fastest (Llama 1 × 8k 256 rows 19.2 µs, 512
/// 23.0; SmolLM2 11.8, 14.6).
pub fn split_dense(n_rows: usize, n_seg: usize, sm_count: usize, per_sm: usize) -> (usize, usize) {
    let n_seg = n_seg.max(1);
    let wave = per_sm.max(1) * sm_count;
    let rows = if n_seg * 32 <= wave {
        n_rows.div_ceil((wave / n_seg).max(1))
    } else {
        let r16 = n_rows.div_ceil((16 * sm_count).div_ceil(n_seg));
        let r3 = n_rows.div_ceil((3 * sm_count).div_ceil(n_seg)).next_power_of_two().min(2048);
        r16.max(r3)
    };
    let rows = rows.next_multiple_of(64).max(256);
    (rows, n_rows.div_ceil(rows).max(1))
}

/// Partials `po (batch·n_sel, n_split, hps, d)`, `pml (batch·n_sel, n_split, hps, 2)`. With
/// `sel`, the rows are its first `min(budget, len)` entries; without, rows `0..len` (dense).
/// With `fused = Some((done, out))` the last block of each selection also merges its partials
/// into `out (batch, n_q, d)` (`done (batch·n_sel,)` zero on entry and on return), so no
/// [`combine`] launch is needed (measured slower at every bench shape: its merge is a serial tail
/// of dependent loads; bench/RESULTS.md, GPU run 5).
/// `early = Some((thr, ready, cand))` (FAC early; with `sel`, right after [`super::select::filter`]
/// given the same `thr`, `ready`, `cand` and flags): the launch starts while the filter's last
/// blocks refine, scores the rows above the threshold bin, then the refine's once `ready` says
/// so; the fused combine or [`combine`] with `ready` clears it. With FAC over candidates in
/// `dims.flags` ([`super::cands_flag`]; `FacKernel::Reg` only) the launch starts with the
/// filter and scores the threshold bin's candidates (`cand`) before the refine's cut is known.
#[allow(clippy::too_many_arguments)]
pub fn partials(
    gpu: &Gpu,
    dt: Dtype,
    dims: &Dims,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
    q: &CudaSlice<f32>,
    fc_of_slot: &CudaSlice<i32>,
    lens: &CudaSlice<i32>,
    sel: Option<&CudaSlice<u32>>,
    rows_per_split: usize,
    n_split: usize,
    po: &mut CudaSlice<f32>,
    pml: &mut CudaSlice<f32>,
    fused: Option<(&mut CudaSlice<u32>, &mut CudaSlice<f32>)>,
    early: Option<(&CudaSlice<i32>, &mut CudaSlice<u32>, &CudaSlice<u64>)>,
    kind: FacKernel,
) -> Result<(), GpuError> {
    let segs = (dims.batch * dims.n_sel) as usize;
    if let Some((thr, ready, cand)) = &early {
        if sel.is_none() || thr.len() < super::THR_W * segs || ready.len() < segs || cand.len() < segs * dims.l_max as usize {
            return Err(GpuError::Shape("fac: early needs sel, thr (batch·n_sel, THR_W), ready (batch·n_sel,), cand (batch·n_sel, l_max)".into()));
        }
    }
    let cap = super::cands_cap(dims.flags);
    if cap > 0 && (early.is_none() || kind != FacKernel::Reg || cap > super::CAND_MAX || rows_per_split + cap > FAC_MAX_ROWS + 1) {
        return Err(GpuError::Shape("fac: candidates need FAC early, the fac_h* kernel, ≤ CAND_MAX of them and room beside the split's rows".into()));
    }
    if let Some((done, out)) = &fused {
        if done.len() < segs || out.len() < (dims.batch * dims.n_q * dims.d) as usize {
            return Err(GpuError::Shape("fac: done needs (batch·n_sel,), out (batch, n_q, d)".into()));
        }
    }
    let hps = dims.hps as usize;
    if rows_per_split == 0 || (sel.is_some() && rows_per_split > FAC_MAX_ROWS) || hps > super::MAX_HPS
        || po.len() < segs * n_split * hps * dims.d as usize
        || pml.len() < segs * n_split * hps * 2
        || sel.is_some_and(|s| s.len() < segs * dims.budget as usize)
    {
        return Err(GpuError::Shape(format!("fac: buffers or split do not fit {dims:?}")));
    }
    let (rps, ns) = (rows_per_split as i32, n_split as i32);
    let null = 0u64;
    let f = gpu.f.fac(dt, hps, kind, dims.d as usize, cap > 0)?;
    let mut l = gpu.launcher(f);
    l.arg(dims).arg(k).arg(v).arg(q).arg(fc_of_slot).arg(lens);
    match sel {
        Some(s) => l.arg(s),
        None => l.arg(&null),
    };
    l.arg(&rps).arg(&ns).arg(po).arg(pml);
    match fused {
        Some((done, out)) => l.arg(done).arg(out),
        None => l.arg(&null).arg(&null),
    };
    match early {
        Some((thr, ready, cand)) => l.arg(thr).arg(ready).arg(cand),
        None => l.arg(&null).arg(&null).arg(&null),
    };
    // SAFETY: sizes checked; rows are < len ≤ l_max (sel holds rows written by select), each block
    // writes its own partial slot; a null `sel` is the kernel's dense mode. Early: each block reads
    // at most ceil(A/S) + ceil((n − A)/S) ≤ FAC_MAX_ROWS + 1 rows (the shared array's size), or
    // with candidates ceil(B/S) + cap ≤ rows_per_split + cap (checked; the kernel checks it too).
    unsafe { l.launch(cfg((n_split, dims.n_sel as usize, dims.batch as usize), 128)) }?;
    Ok(())
}

/// `out (batch, n_q, d)` f32, V's dim order. `c8`: the kernel whose walkers load 8 splits at once
/// (`fac_combine8`), or `None` to choose by the splits per walker. `ready`: FAC early's flags,
/// cleared for the next step.
#[allow(clippy::too_many_arguments)]
pub fn combine(
    gpu: &Gpu,
    dims: &Dims,
    n_split: usize,
    po: &CudaSlice<f32>,
    pml: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    c8: Option<bool>,
    ready: Option<&mut CudaSlice<u32>>,
) -> Result<(), GpuError> {
    if out.len() < (dims.batch * dims.n_q * dims.d) as usize || ready.as_ref().is_some_and(|r| r.len() < (dims.batch * dims.n_sel) as usize) {
        return Err(GpuError::Shape("fac::combine: out needs (batch, n_q, d), ready (batch·n_sel,)".into()));
    }
    let ns = n_split as i32;
    // Walkers (groups of d threads of the 512) with more than 4 splits each load 8 at once
    // (fac_combine8; fasa.cu says where each wins).
    let c8 = c8.unwrap_or(n_split.div_ceil(512 / (dims.d.max(1) as usize)) > 4);
    let mut l = gpu.launcher(&gpu.f.fac_combine[c8 as usize]);
    let null = 0u64;
    l.arg(dims).arg(&ns).arg(po).arg(pml).arg(out);
    match ready {
        Some(r) => l.arg(r),
        None => l.arg(&null),
    };
    if dims.d > 128 {
        return Err(GpuError::Shape("fac::combine: d ≤ 128".into()));
    }
    // SAFETY: one block per (head, selection, sequence) of 512 threads (≥ 4 groups of d ≤ 128);
    // each block writes the d outputs of its head.
    unsafe { l.launch(cfg((dims.hps as usize, dims.n_sel as usize, dims.batch as usize), 512)) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_dense;

    #[test]
    fn dense_split_keeps_blocks_long_at_batch_16_and_one_wave_at_batch_1() {
        // (H200: 132 SMs, 2 tensor-core dense blocks per SM.) Llama-3-8B, 8 KV heads: batch 16 at
        // 8k runs 2048-row blocks (GPU run 31: 141.5 µs against 163.4 at the 16-per-SM 512), at
        // 32k as before (~2k) and at 128k the 16-per-SM rows (7744).
        assert_eq!(split_dense(8192, 128, 132, 2), (2048, 4));
        assert_eq!(split_dense(32768, 128, 132, 2), (2048, 16));
        assert_eq!(split_dense(131072, 128, 132, 2), (7744, 17));
        // SmolLM2, 3 KV heads: batch 16 at 8k in blocks of 1024 rows (34.5 µs against 44.9 at 256
        // and 42.9 at 960: 9 splits left a second wave).
        assert_eq!(split_dense(8192, 48, 132, 2), (1024, 8));
        // Batch 1: one wave of 256-row blocks at 8k, longer ones at 32k and 128k.
        assert_eq!(split_dense(8192, 8, 132, 2), (256, 32));
        assert_eq!(split_dense(32768, 8, 132, 2), (1024, 32));
        assert_eq!(split_dense(131072, 8, 132, 2), (4032, 33));
        assert_eq!(split_dense(8192, 3, 132, 2), (256, 32));
    }
}
