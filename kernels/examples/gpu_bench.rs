//! Per-step decode attention time on the GPU: FASA-C (TIP + select + FAC) in the paper's mode and
//! the default mode (`fasa_default`: FC choice by K variance, group score by per-head mass, as the
//! CPU default; `fasa_default_old`: by query norm, scores summed), each of the paper's and the
//! default's also with TIP reading the int8 scoring planes (`*_int8`; the default's stored per FC,
//! as the engine stores them, `fasa_default_int8_grp` grouped) and int4 ones (`*_int4`),
//! and in-house dense, over the same cache; plus the device copy
//! bandwidth.
//! Each step runs over several layers' caches in turn (as many as make the bytes of dense and of
//! the paper's int4 row each ≥ 4× the L2), captured in one CUDA graph; times are per layer.
//! Prints CSV (and writes it to the path given as first argument).
//!
//! Run on the device: bench/gpu/run.sh. `--quick` times a few shapes only; `--targets` the four
//! shapes of issue 5's targets (Llama-3-8B, batch 1 and 16, 32k and 128k, B = 1024) with the
//! paper's rows and the engine's default int8 row: the decoder's threshold, every FAC kernel family
//! (at the decoder's split), the combine fused or apart for the decoder's FAC kernel, TIP blocks of
//! the automatic, 2 and 4 chunks.
//! `FASA_BENCH_SHAPES=16x32768,1x131072` keeps only those (batch × L) shapes and
//! `FASA_BENCH_MODES=dense_inhouse,fasa_paper_group_int8` only those rows (profiling).
//! `FASA_BENCH_BATCHES=1,4,16` sets the batch sizes (default 1 and 16).
//! `FASA_BENCH_FILTERTOK=8192` sets the select filter's scores per block (`FasaDecoder::filter_tok`).
//! `FASA_BENCH_PATHS=own` times a FASA row's own path only (the decoder's threshold, FAC kernel,
//! chunks and early flags), for same-call A/Bs of kernel builds in less device time.
//! `FASA_BENCH_FACROWS=0,128,256` also times FASA rows with FAC blocks of those rows (0 = the
//! decoder's split; variant suffix `r<rows>`). A FASA row's `before:` is the decoder's default
//! before GPU run 17 (`fac::split` at every batch); a dense row's, before run 16 (no PDL, the
//! 1-split combine).
//! Every row also times its fastest variant with programmatic dependent launch on and off
//! (`pdl:` / `nopdl:`, whatever the decoder's policy; the row's time is the policy's), in turn,
//! twice each, the faster of each pair (`FASA_GPU_PDL=0/1` forces it for all launches, so both
//! are the same there).

use std::io::Write;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use fasa_kernels::cpu::FcMoments;
use fasa_kernels::gpu::{decode::capture, fac, trace, tracing, DecodeConfig, Dtype, FacKernel, FasaDecoder, Gpu, GpuKvCache};

/// Bytes per token and group of 8 FCs that int8 TIP reads: 16 B of pairs plus 8 f32 scales per
/// 32 tokens (1 B per token).
const INT8_GROUP_BYTES: f64 = 17.0;
/// The same for int4 TIP: 8 B of pairs plus the same scales.
const INT4_GROUP_BYTES: f64 = 9.0;
/// Bytes per token and FC that int8 TIP reads from per-FC planes: its pair plus an f32 scale per
/// 32 tokens.
const INT8_FC_BYTES: f64 = 2.125;

struct Shape {
    model: &'static str,
    n_q: usize,
    n_kv: usize,
    d: usize,
    batch: usize,
    len: usize,
    budget: usize,
    k: usize,
}

/// One timed FASA-C row: name, pool P, sinks, recent, the default's stage 1 (variance + mass),
/// bits of the scoring planes TIP reads (8 or 4; 0: the 16-bit K), int8 planes laid out as the
/// engine lays them out (per FC where `DecodeConfig::planes_per_fc` says so; false: grouped).
type Mode = (&'static str, usize, usize, usize, bool, u32, bool);

/// The decoder settings of `mode` at shape `s` (dense rows: the paper's, only its dense kernels run).
fn config(s: &Shape, pools: &[Vec<usize>], (_, pool, sinks, recent, var_mass, bits, _): Mode) -> DecodeConfig {
    DecodeConfig {
        n_q: s.n_q,
        per_group: true,
        budget: s.budget,
        chunks: s.k,
        pools: pools.to_vec(),
        pool,
        sinks,
        recent,
        rerank: 0,
        fc_by_variance: false,
        group_mass: false,
        q8_tip: bits > 0,
    }
    .with_var_mass(var_mass)
}

/// FAC early, select early and FAC over candidates (at its cap, or off) as `vlabel`'s `early`.
fn set_early(d: &mut FasaDecoder, early: (bool, bool, bool)) {
    (d.early_fac, d.early_select) = (early.0, early.1);
    d.fac_cands = if early.2 { fasa_kernels::gpu::CAND_MAX } else { 0 };
}

/// A FASA row's variant: threshold (T/F), combine (f/c), TIP chunks, FAC kernel (n/l/m), then
/// `s<code>` of the int8 TIP kernel (`gpu::TIP8_PIPES`, 0: unpipelined).
/// `fr`: FAC rows per block (`FasaDecoder::set_fac_rows`; 0 = the decoder's, not shown); `hp`:
/// the pipelined group-mass int8 TIP (`FasaDecoder::tip8_heads_pipe`; off shown as `u`, for the
/// rows that run it); `early`: FAC early and select early (`FasaDecoder::early_fac`,
/// `early_select`; off shown as `w`, FAC waits for the whole filter, and `z`, the filter waits
/// for the whole TIP launch) and FAC over candidates (`fac_cands`; off shown as `y`, FAC waits
/// for the refine's rows; it runs with the `n` kernel only).
#[allow(clippy::too_many_arguments)]
fn vlabel(thr_in_tip: bool, fused: bool, ch: usize, fk: FacKernel, pipe: usize, fr: usize, hp: bool, early: (bool, bool, bool)) -> String {
    let mut l = format!("{}{}{}{}s{}", if thr_in_tip { "T" } else { "F" }, if fused { "f" } else { "c" }, ch, fk.letter(), pipe);
    if fr > 0 {
        l += &format!("r{fr}");
    }
    if !hp {
        l += "u";
    }
    if !early.0 {
        l += "w";
    }
    if !early.1 {
        l += "z";
    }
    if !early.2 {
        l += "y";
    }
    l
}

/// A FASA row's code path: threshold in TIP, fused combine, FAC kernel, (FAC early, select early,
/// FAC over candidates).
type Path = (bool, bool, FacKernel, (bool, bool, bool));

fn time_graph(gpu: &Gpu, g: &cudarc::driver::CudaGraph, reps: usize) -> f64 {
    let ev = |s: &Arc<cudarc::driver::CudaStream>| s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
    for _ in 0..3 {
        g.launch().unwrap();
    }
    gpu.stream.synchronize().unwrap();
    let mut t = Vec::new();
    for _ in 0..7 {
        let a = ev(&gpu.stream);
        for _ in 0..reps {
            g.launch().unwrap();
        }
        let b = ev(&gpu.stream);
        b.synchronize().unwrap();
        t.push(a.elapsed_ms(&b).unwrap() as f64 / reps as f64);
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

/// µs of `f` (a graph captured and timed) with the decoders' programmatic dependent launch on,
/// then off, in turn (on, off, on, off: a drift between calls hits both), the faster of each;
/// then the decoders' policy back.
fn pdl_both(decs: &mut [FasaDecoder], mut f: impl FnMut(&mut [FasaDecoder]) -> f64) -> (f64, f64) {
    let was = decs[0].pdl;
    let (mut on, mut off) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..2 {
        for pdl in [true, false] {
            decs.iter_mut().for_each(|d| d.pdl = pdl);
            let us = f(decs);
            let t = if pdl { &mut on } else { &mut off };
            *t = t.min(us);
        }
    }
    decs.iter_mut().for_each(|d| d.pdl = was);
    (on, off)
}

type Op<'a> = dyn FnMut(&mut FasaDecoder, &GpuKvCache) -> Result<(), fasa_kernels::gpu::GpuError> + 'a;

/// `op` on every (decoder, cache) pair, captured as one graph.
fn capture_all(gpu: &Gpu, decs: &mut [FasaDecoder], caches: &[GpuKvCache], op: &mut Op) -> cudarc::driver::CudaGraph {
    capture(gpu, || {
        for (d, c) in decs.iter_mut().zip(caches) {
            op(d, c)?;
        }
        Ok(())
    })
    .unwrap()
}

/// Milliseconds per layer of `op` on every (decoder, cache) pair, captured as one graph and
/// replayed.
fn graph_ms(
    gpu: &Gpu,
    decs: &mut [FasaDecoder],
    caches: &[GpuKvCache],
    layers: usize,
    mut op: impl FnMut(&mut FasaDecoder, &GpuKvCache) -> Result<(), fasa_kernels::gpu::GpuError>,
) -> f64 {
    let g = capture_all(gpu, decs, caches, &mut op);
    time_graph(gpu, &g, 20) / layers as f64
}

/// The stage timeline of `op` over every (decoder, cache) pair, as `graph_ms` captures it
/// (`FASA_GPU_TRACE=1` builds): three replays after three warm ones.
fn trace_graph(
    gpu: &Gpu,
    decs: &mut [FasaDecoder],
    caches: &[GpuKvCache],
    mut op: impl FnMut(&mut FasaDecoder, &GpuKvCache) -> Result<(), fasa_kernels::gpu::GpuError>,
) -> String {
    let g = capture_all(gpu, decs, caches, &mut op);
    for _ in 0..3 {
        g.launch().unwrap();
    }
    gpu.stream.synchronize().unwrap();
    gpu.trace_take().unwrap();
    for _ in 0..3 {
        g.launch().unwrap();
    }
    gpu.stream.synchronize().unwrap();
    trace::report(&gpu.trace_take().unwrap())
}

/// Device copy bandwidth (bytes read + written per second): through a copy kernel (the SM path
/// attention uses) and through a memcpy node (copy engines), both in graphs.
fn copy_bandwidth(gpu: &Gpu) -> (f64, f64) {
    let n = 1usize << 32; // 4 GiB each way
    let a = gpu.stream.alloc_zeros::<u8>(n).unwrap();
    let mut b = gpu.stream.alloc_zeros::<u8>(n).unwrap();
    let g = capture(gpu, || gpu.copy_kernel(&a, &mut b)).unwrap();
    let kernel = 2.0 * n as f64 / (time_graph(gpu, &g, 10) * 1e-3);
    let g = capture(gpu, || {
        gpu.stream.memcpy_dtod(&a, &mut b)?;
        Ok(())
    })
    .unwrap();
    let memcpy = 2.0 * n as f64 / (time_graph(gpu, &g, 10) * 1e-3);
    (kernel, memcpy)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let targets = args.iter().any(|a| a == "--targets");
    let list = |var: &str| -> Option<Vec<String>> { std::env::var(var).ok().map(|v| v.split(',').map(str::to_string).collect()) };
    let only = list("FASA_BENCH_SHAPES");
    let only_modes = list("FASA_BENCH_MODES");
    let own_path = std::env::var("FASA_BENCH_PATHS").is_ok_and(|v| v == "own");
    let wanted = |m: &str| only_modes.as_ref().is_none_or(|o| o.iter().any(|x| x == m));
    let out_path = args.iter().skip(1).find(|a| !a.starts_with("--")).cloned();
    let gpu = Gpu::new(0).expect("a CUDA GPU");
    let l2 = gpu.ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE).unwrap() as usize;
    let (bw, bw_memcpy) = copy_bandwidth(&gpu);
    let mut lines = vec![format!(
        "# device sm_{}{} {} SMs, L2 {} MiB; copy bandwidth (read+write): {:.3} TB/s by kernel, {:.3} TB/s by memcpy node",
        gpu.arch.0,
        gpu.arch.1,
        gpu.sm_count,
        l2 >> 20,
        bw / 1e12,
        bw_memcpy / 1e12
    )];
    lines.push(format!(
        "# resident blocks/SM (f16): {}",
        gpu.occupancy(Dtype::F16).unwrap().iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
    ));
    lines.push("model,batch,L,B,k,P,mode,layers,us_per_layer,kv_bytes,TBps,frac_copy,speedup_vs_dense,byte_limit,tip_us,select_us,variant,variants_us".into());
    println!("{}", lines.join("\n"));

    let mut shapes = Vec::new();
    let lens: &[usize] = if quick { &[32768] } else if targets { &[32768, 131072] } else { &[8192, 32768, 131072] };
    // (0: the decoder's choice)
    let filter_tok: usize = list("FASA_BENCH_FILTERTOK").and_then(|v| v.first().and_then(|x| x.parse().ok())).unwrap_or(0);
    let batches: Vec<usize> = list("FASA_BENCH_BATCHES").map(|v| v.iter().filter_map(|x| x.parse().ok()).collect()).unwrap_or(vec![1, 16]);
    let budgets: &[usize] = if quick || targets { &[1024] } else { &[1024, 256] };
    for &len in lens {
        for &batch in &batches {
            for &budget in budgets {
                shapes.push(Shape { model: "llama3-8b", n_q: 32, n_kv: 8, d: 128, batch, len, budget, k: 16 });
            }
        }
    }
    for &batch in &batches {
        for &budget in &[256usize, 1024] {
            if targets || (quick && budget != 256) {
                continue;
            }
            shapes.push(Shape { model: "smollm2-135m", n_q: 9, n_kv: 3, d: 64, batch, len: 8192, budget, k: 8 });
        }
    }

    if let Some(o) = &only {
        shapes.retain(|s| o.contains(&format!("{}x{}", s.batch, s.len)));
    }
    for s in &shapes {
        let layer_bytes = 2 * s.batch * s.n_kv * s.len * s.d * 2;
        // FASA rows read far fewer bytes per layer than dense (the paper's int4 row the fewest: its
        // planes and B rows), so the layers are as many as make those ≥ 4× the L2 too. (Until GPU
        // run 21 the count came from dense bytes alone: one layer at 1 × 128k and two at 1 × 32k,
        // whose 36 and 2 × 9 MB of int8 planes fit the 60 MiB L2, so stage 1 was timed partly from
        // it; until run 28, from the int8 row's bytes.)
        let fasa_bytes = s.batch * s.n_kv * (s.len * s.k.div_ceil(8) * INT4_GROUP_BYTES as usize + s.budget.min(s.len) * s.d * 4);
        let layers = (4 * l2).div_ceil(layer_bytes.min(fasa_bytes)).clamp(1, 32);
        let mut caches = Vec::new();
        for l in 0..layers {
            let mut c = GpuKvCache::new(&gpu, Dtype::F16, s.batch, s.n_kv, s.d, s.len, None).unwrap();
            gpu.fill_random(&mut c.k, Dtype::F16, 17 + l as u32, 1.0).unwrap();
            gpu.fill_random(&mut c.v, Dtype::F16, 1017 + l as u32, 1.0).unwrap();
            // K moments stand-in: zero-mean pairs of an arbitrary variance per FC (a hash of its
            // id), so the variance-based choice spreads over the pool as on real keys.
            for b in 0..s.batch {
                for kv in 0..s.n_kv {
                    let m: Vec<FcMoments> = (0..s.d / 2)
                        .map(|f| {
                            let h = ((f * 2654435761 + kv * 40503 + l * 977) % 1000) as f64 / 1000.0 + 0.05;
                            let n = s.len as f64;
                            [0.0, 0.0, n * h, 0.0, n * (1.05 - h)]
                        })
                        .collect();
                    c.write_moments(&gpu, b, kv, &m, s.len).unwrap();
                }
            }
            // Int8 planes of every whole block (the moments' length, s.len), for the *_int8 rows.
            c.enable_q8(&gpu).unwrap();
            caches.push(c);
        }
        let mut q = gpu.stream.alloc_zeros::<f32>(s.batch * s.n_q * s.d).unwrap();
        gpu.fill_random_f32(&mut q, 5, 2.0).unwrap();
        let lens = gpu.stream.clone_htod(&vec![s.len as i32; s.batch]).unwrap();
        let mut out = gpu.stream.alloc_zeros::<f32>(s.batch * s.n_q * s.d).unwrap();
        let n_fc = s.d / 2;
        // Calibrated pools stand-in: a fixed arbitrary ranking per KV head (natural slot order,
        // so the pool is the first groups, as the engine lays it out).
        let pools: Vec<Vec<usize>> = (0..s.n_kv).map(|_| (0..n_fc).collect()).collect();
        // The new default takes the engine's pool, 4k capped at d/2 (8 of 32 at SmolLM2 shapes, 16
        // of 64 at Llama's); the old-default row keeps its earlier 2k.
        // `fasa_default_p2k`: the new stage 1 at the old row's pool, to tell the cost of the
        // stage 1 from that of the larger pool (whose chosen FCs spread over more FC groups).
        // `*_int8`: the same as the row before with TIP reading the int8 planes (the default's
        // stored per FC, as the engine stores them; `fasa_default_int8_grp` grouped, as before
        // GPU run 30); the int4 rows last, as the caches' planes are requantised for them.
        let paper: Mode = ("fasa_paper_group", s.k, 0, 0, false, 0, false);
        let default: Mode = ("fasa_default", (4 * s.k).min(n_fc), 4, 32, true, 0, false);
        let all_modes: [Mode; 9] = [
            paper,
            ("fasa_paper_group_int8", s.k, 0, 0, false, 8, false),
            ("fasa_default_old", 2 * s.k, 4, 32, false, 0, false),
            ("fasa_default_p2k", 2 * s.k, 4, 32, true, 0, false),
            default,
            ("fasa_default_int8_grp", default.1, 4, 32, true, 8, false),
            ("fasa_default_int8", default.1, 4, 32, true, 8, true),
            ("fasa_paper_group_int4", s.k, 0, 0, false, 4, false),
            ("fasa_default_int4", default.1, 4, 32, true, 4, false),
        ];
        let target_modes =
            ["fasa_paper_group", "fasa_paper_group_int8", "fasa_default_int8_grp", "fasa_default_int8", "fasa_paper_group_int4", "fasa_default_int4"];
        let modes: Vec<Mode> = all_modes.into_iter().filter(|m| (!targets || target_modes.contains(&m.0)) && wanted(m.0)).collect();
        let dense_bytes = layer_bytes as f64;
        // Dense first.
        let dense_us = if !wanted("dense_inhouse") {
            f64::NAN
        } else {
            let cfg = config(s, &pools, paper);
            let mut decs: Vec<FasaDecoder> = caches.iter().map(|c| FasaDecoder::new(&gpu, c, cfg.clone()).unwrap()).collect();
            // Every FAC kernel family (n = registers-for-q, l = lean, m = tensor cores), the
            // fastest kept.
            let mut best = (f64::INFINITY, FacKernel::Reg);
            let mut all = Vec::new();
            for fk in FacKernel::for_dim(s.d) {
                for d in decs.iter_mut() {
                    d.dense_kernel = fk;
                }
                let ms = graph_ms(&gpu, &mut decs, &caches, layers, |d, c| d.dense(&gpu, c, &q, &lens, &mut out));
                all.push(format!("{}:{:.1}", fk.letter(), ms * 1e3));
                if ms < best.0 {
                    best = (ms, fk);
                }
            }
            for d in decs.iter_mut() {
                d.dense_kernel = best.1;
            }
            // FASA_BENCH_DENSEROWS: rows per dense block to time besides the decoder's split
            // (`r<rows>`); the fastest kept.
            let mut best_rows = 0;
            for rows in list("FASA_BENCH_DENSEROWS").unwrap_or_default().iter().filter_map(|x| x.parse::<usize>().ok()) {
                if decs.iter_mut().any(|d| d.set_dense_rows(rows).is_err()) {
                    continue;
                }
                let ms = graph_ms(&gpu, &mut decs, &caches, layers, |d, c| d.dense(&gpu, c, &q, &lens, &mut out));
                all.push(format!("r{rows}:{:.1}", ms * 1e3));
                if ms < best.0 {
                    best.0 = ms;
                    best_rows = rows;
                }
            }
            decs.iter_mut().for_each(|d| d.set_dense_rows(best_rows).unwrap());
            let pdl_policy = decs[0].pdl;
            let (on, off) = pdl_both(&mut decs, |decs| {
                graph_ms(&gpu, decs, &caches, layers, |d, c| d.dense(&gpu, c, &q, &lens, &mut out)) * 1e3
            });
            all.push(format!("pdl:{on:.1} nopdl:{off:.1}"));
            if tracing() {
                let t = trace_graph(&gpu, &mut decs, &caches, |d, c| d.dense(&gpu, c, &q, &lens, &mut out));
                println!("# {} {}x{} dense_inhouse: {t}", s.model, s.batch, s.len);
            }
            // Before GPU run 16: no PDL, the 1-split combine.
            decs.iter_mut().for_each(|d| {
                d.pdl = false;
                d.combine8 = Some(false);
            });
            all.push(format!("before:{:.1}", graph_ms(&gpu, &mut decs, &caches, layers, |d, c| d.dense(&gpu, c, &q, &lens, &mut out)) * 1e3));
            decs.iter_mut().for_each(|d| {
                d.pdl = pdl_policy;
                d.combine8 = None;
            });
            let ms = best.0.min((if decs[0].pdl { on } else { off }) * 1e-3);
            let dense_us = ms * 1e3;
            let dense_label = match best_rows {
                0 => best.1.letter().to_string(),
                r => format!("{}r{r}", best.1.letter()),
            };
            let tbps = dense_bytes / (ms * 1e-3) / 1e12;
            let l = format!(
                "{},{},{},{},{},{},dense_inhouse,{},{:.2},{},{:.3},{:.2},1.00,1.00,,,{},{}",
                s.model, s.batch, s.len, s.budget, s.k, n_fc, layers, dense_us, dense_bytes, tbps, tbps * 1e12 / bw,
                dense_label, all.join(" ")
            );
            println!("{l}");
            lines.push(l);
            dense_us
        };
        for mode in modes {
            let (name, p, bits) = (mode.0, mode.1, mode.5);
            let cfg = config(s, &pools, mode);
            let by_fc = mode.6 && cfg.planes_per_fc(bits);
            let q8 = bits > 0;
            if q8 {
                for c in caches.iter_mut() {
                    c.enable_scoring_planes_as(&gpu, bits, by_fc).unwrap();
                }
            }
            let mut decs: Vec<FasaDecoder> = caches.iter().map(|c| FasaDecoder::new(&gpu, c, cfg.clone()).unwrap()).collect();
            decs.iter_mut().for_each(|d| d.filter_tok = filter_tok);
            // Every code-path variant (threshold found by TIP's last block or by each filter
            // block; combine fused into FAC's last block or launched apart), the fastest kept.
            // TIP blocks of one chunk or of the automatic number (`tip::chunks`) are timed too.
            // (The fused combine lost at every shape in run 5: dropped; the lean FAC kernels added.)
            // Also the int8 TIP kernels listed in FASA_BENCH_TIP8 (0 = unpipelined, or
            // gpu::TIP8_PIPES codes; default: the decoder's).
            let mut best = (f64::INFINITY, true, false, 1, FacKernel::Reg, 0usize, 0usize, true, (true, true, true));
            let mut all = Vec::new();
            let nums = |var: &str| -> Option<Vec<usize>> { list(var).map(|v| v.iter().filter_map(|x| x.parse().ok()).collect()) };
            // (int4 rows take the int4 codes of the list, gpu::TIP4_PIPES; int8 rows the others)
            let mut pipe_opts = if q8 { nums("FASA_BENCH_TIP8").unwrap_or_default() } else { vec![] };
            pipe_opts.retain(|&p| (p >= 1000) == (bits == 4));
            if pipe_opts.is_empty() {
                pipe_opts.push(if bits == 4 { fasa_kernels::gpu::TIP4_PIPE } else { decs[0].tip8_pipe });
            }
            // FASA_BENCH_FACROWS: FAC rows per block to time (0 = the decoder's, the default).
            let fr_opts = nums("FASA_BENCH_FACROWS").unwrap_or_else(|| vec![0]);
            // The default's int8 rows: the group-mass TIP pipelined and not (`u`; int4: pipelined
            // only).
            // (per-FC planes: tipfc_h* either way)
            let hp_opts: &[bool] = if bits == 8 && mode.4 && !by_fc { &[true, false] } else { &[true] };
            let opts = fr_opts.iter().flat_map(|&fr| pipe_opts.iter().map(move |&p| (fr, p)));
            for (fr, pipe, hp) in opts.flat_map(|(fr, p)| hp_opts.iter().map(move |&hp| (fr, p, hp))) {
                if decs.iter_mut().any(|d| d.set_fac_rows(fr).is_err()) {
                    continue;
                }
                for (d, c) in decs.iter_mut().zip(&caches) {
                    d.tip8_heads_pipe = hp;
                    d.set_tip8_pipe(&gpu, c, pipe).unwrap();
                }
                let auto = decs[0].tip_chunks;
                // --targets: the decoder's threshold and FAC kernel, the combine fused or apart, and
                // TIP blocks of the automatic, 2 and 4 chunks.
                let chunk_opts: Vec<usize> = match (targets, auto > 1) {
                    (true, true) => [auto, 2, 4].into_iter().fold(Vec::new(), |mut v, c| {
                        if !v.contains(&c) {
                            v.push(c);
                        }
                        v
                    }),
                    (false, true) => vec![auto, 1],
                    _ => vec![auto],
                };
                // Every FAC kernel family with the decoder's threshold, FAC and select early
                // (--targets: with both combines for the decoder's FAC kernel, and it without FAC
                // early, without select early, without both).
                let (t, fk0) = (decs[0].thr_in_tip, decs[0].fac_kernel);
                const E: (bool, bool, bool) = (true, true, true);
                let mut paths: Vec<Path> = FacKernel::for_dim(s.d).map(|fk| (t, false, fk, E)).collect();
                if targets {
                    paths.extend([
                        (t, true, fk0, E),
                        (t, false, fk0, (false, true, true)),
                        (t, false, fk0, (true, false, true)),
                        (t, false, fk0, (false, false, true)),
                    ]);
                    if fk0 == FacKernel::Reg {
                        paths.push((t, false, fk0, (true, true, false)));
                    }
                } else {
                    paths.extend([(!t, false, FacKernel::Reg, E), (!t, false, FacKernel::Lean, E)]);
                }
                // FASA_BENCH_PATHS=own: the decoder's own path only (a same-call A/B of kernel
                // builds, FASA_GPU_DEFINES, or of TIP kernels, FASA_BENCH_TIP8, in less time).
                let (chunk_opts, paths) = if own_path { (vec![auto], vec![(t, false, fk0, E)]) } else { (chunk_opts, paths) };
                for &ch in &chunk_opts {
                    for &(thr_in_tip, fused, fk, early) in &paths {
                        for d in decs.iter_mut() {
                            d.thr_in_tip = thr_in_tip;
                            d.fused_combine = fused;
                            d.tip_chunks = ch;
                            d.fac_kernel = fk;
                            set_early(d, early);
                        }
                        let ms = graph_ms(&gpu, &mut decs, &caches, layers, |d, c| d.step(&gpu, c, &q, &lens, &mut out));
                        // (both need the threshold from TIP: without it the label says wz)
                        let early = (early.0 && thr_in_tip, early.1 && thr_in_tip, early.2);
                        let label = vlabel(thr_in_tip, fused, ch, fk, pipe, fr, hp, early);
                        all.push(format!("{label}:{:.1}", ms * 1e3));
                        if ms < best.0 {
                            best = (ms, thr_in_tip, fused, ch, fk, pipe, fr, hp, early);
                        }
                    }
                }
            }
            let (ms, thr_in_tip, fused, ch, fk, pipe, fr, hp, early) = best;
            for (d, c) in decs.iter_mut().zip(&caches) {
                d.tip8_heads_pipe = hp;
                d.set_tip8_pipe(&gpu, c, pipe).unwrap();
                d.thr_in_tip = thr_in_tip;
                d.fused_combine = fused;
                d.tip_chunks = ch;
                d.fac_kernel = fk;
                set_early(d, early);
                d.set_fac_rows(fr).unwrap();
            }
            let variant = vlabel(thr_in_tip, fused, ch, fk, pipe, fr, hp, early);
            let (on, off) = pdl_both(&mut decs, |decs| {
                graph_ms(&gpu, decs, &caches, layers, |d, c| d.step(&gpu, c, &q, &lens, &mut out)) * 1e3
            });
            all.push(format!("pdl:{on:.1} nopdl:{off:.1}"));
            if tracing() {
                let t = trace_graph(&gpu, &mut decs, &caches, |d, c| d.step(&gpu, c, &q, &lens, &mut out));
                println!("# {} {}x{} {name} {variant}: {t}", s.model, s.batch, s.len);
            }
            // The decoder's default before GPU run 17 (FAC split by fac::split everywhere), same
            // variant otherwise.
            // (Not where that split has more partials than the decoder's buffers hold: dense rows at
            // batch 16 of 8k since f10c474's longer dense blocks.)
            let old_rows = fac::split(s.budget.min(s.len), s.batch * decs[0].dims().n_sel as usize, gpu.sm_count).0;
            if decs.iter_mut().all(|d| d.set_fac_rows(old_rows).is_ok()) {
                all.push(format!("before:{:.1}", graph_ms(&gpu, &mut decs, &caches, layers, |d, c| d.step(&gpu, c, &q, &lens, &mut out)) * 1e3));
            }
            decs.iter_mut().for_each(|d| d.set_fac_rows(fr).unwrap());
            // The row: the decoder's default (fastest variant, PDL by its policy), the fastest of
            // its three timings (the first of a series ran up to 8 % slow in GPU run 16).
            let ms = ms.min((if decs[0].pdl { on } else { off }) * 1e-3);
            // Stages: TIP alone, TIP + select; FAC is the rest.
            let tip_us = graph_ms(&gpu, &mut decs, &caches, layers, |d, c| d.tip_only(&gpu, c, &q, &lens)) * 1e3;
            let select_us = graph_ms(&gpu, &mut decs, &caches, layers, |d, c| d.select(&gpu, c, &q, &lens)) * 1e3;
            // Bytes the method must read: the FC groups holding the pool's chosen FCs of every
            // token (16-bit: 32 B per token and group; int8: 16 B and one f32 scale per FC and
            // block of 32 tokens, 17 B; int4: 8 B and the scales, 9 B; the partial last block's
            // 16-bit groups not counted; int8 per FC: the k chosen FCs' pairs and scales, 2.125 B
            // each), plus full K and V of B rows (scores, per-head scores and histograms not
            // counted).
            let groups_read = (p.div_ceil(8)).min(n_fc / 8) as f64;
            let tip = (s.batch * s.n_kv * s.len) as f64 * match bits {
                8 if by_fc => s.k.min(p) as f64 * INT8_FC_BYTES,
                8 => groups_read * INT8_GROUP_BYTES,
                4 => groups_read * INT4_GROUP_BYTES,
                _ => groups_read * 32.0,
            };
            let fac = (s.batch * s.n_kv * s.budget.min(s.len) * s.d * 2 * 2) as f64;
            let bytes = tip + fac;
            let tbps = bytes / (ms * 1e-3) / 1e12;
            let l = format!(
                "{},{},{},{},{},{},{},{},{:.2},{},{:.3},{:.2},{:.2},{:.2},{:.2},{:.2},{},{}",
                s.model,
                s.batch,
                s.len,
                s.budget,
                s.k,
                p,
                name,
                layers,
                ms * 1e3,
                bytes,
                tbps,
                tbps * 1e12 / bw,
                dense_us / (ms * 1e3),
                dense_bytes / bytes,
                tip_us,
                select_us,
                variant,
                all.join(" ")
            );
            println!("{l}");
            lines.push(l);
        }
        std::io::stdout().flush().unwrap();
    }
    if let Some(p) = out_path {
        std::fs::write(p, lines.join("\n") + "\n").unwrap();
    }
}
