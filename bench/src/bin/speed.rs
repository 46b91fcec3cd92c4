//! Speed of the engine on this machine: prefill and decode tokens/s at given depths, per
//! attention mode, with the process's peak RSS. One JSON line per (depth, mode) on stdout.
//!
//! `speed --depth 0,2048,8000 --modes dense,fasa --prefill 512 --decode 128 [--threads N]
//! [--activations int8|f32] [--execution-provider auto|cpu|cuda]`
//! mirrors `llama-bench -p 512 -n 128 -d <depth>`: prefill 512 tokens on top of `depth` cached
//! tokens, and decode 128 tokens on top of `depth` cached tokens. `decode_tok_s` counts every
//! decode token; `first_decode_ms` is the first one's time and `steady_decode_tok_s` the rate of
//! the others (on the GPU path the first builds the step's decoder and, before GPU run 34, uploaded
//! the whole slot).
use std::time::Instant;

use fasa_engine::{paths, AttnConfig, AttnOverrides, LoadOptions, Mode, Model};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn list(name: &str, default: &str) -> Vec<String> {
    arg(name).unwrap_or_else(|| default.into()).split(',').map(str::to_string).collect()
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The depth's prefix is prefilled once and copied into each run's slot: a shortcut of this
/// benchmark, after which the copy's GPU mirror is empty, where a request's own prefill leaves it
/// in step. Feeding the prefix's last `w` tokens again (the same rows rewritten) brings it in step
/// untimed, so the timed prefill and first decode step pay what a request's do.
fn resync(model: &mut Model, toks: &[u32], upto: usize, slot: usize) -> anyhow::Result<()> {
    let w = upto.min(64);
    feed(model, &toks[upto - w..upto], upto - w, slot)
}

/// Prefills `n` tokens at `pos` in chunks of 512 (the engine's own chunking).
fn feed(model: &mut Model, toks: &[u32], pos: usize, slot: usize) -> anyhow::Result<()> {
    for (i, c) in toks.chunks(512).enumerate() {
        model.forward(c, pos + i * 512, slot)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let depths: Vec<usize> = list("--depth", "0,2048,8000").iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    let modes: Vec<Mode> = list("--modes", "dense,fasa").iter().map(|m| Mode::parse(m).ok_or_else(|| anyhow::anyhow!("unknown mode {m}"))).collect::<Result<_, _>>()?;
    let n_prefill: usize = arg("--prefill").map_or(Ok(512), |s| s.parse())?;
    let n_decode: usize = arg("--decode").map_or(Ok(128), |s| s.parse())?;
    let mut opts = LoadOptions::new(paths::default_model(), paths::default_ort_library());
    opts.threads = arg("--threads").map_or(Ok(0), |s| s.parse())?;
    opts.max_sequences = 2;
    opts.activations = arg("--activations").map_or(Ok(Default::default()), |s| s.parse()).map_err(anyhow::Error::msg)?;
    opts.execution_provider = arg("--execution-provider").map_or(Ok(Default::default()), |s| s.parse()).map_err(anyhow::Error::msg)?;
    let mut model = Model::load(&opts)?;
    let ctx = model.info().max_context;
    // Deterministic, varied text-like token ids (no special tokens).
    let toks: Vec<u32> = (0..ctx as u32).map(|i| 200 + (i * 7919) % 40000).collect();
    for &depth in &depths {
        if depth + n_decode > ctx {
            anyhow::bail!("depth {depth} + {n_decode} decode tokens exceed the context {ctx}");
        }
        // As llama-bench's `-p` at a depth, but inside the trained context.
        let prefill_depth = depth.min(ctx - n_prefill);
        // The shared prefix is prefilled once (dense, as in every mode) and copied per run.
        let base = model.pool().acquire().expect("a free slot");
        model.configure_slot(base.slot(), &AttnConfig::dense(), false);
        feed(&mut model, &toks[..prefill_depth], 0, base.slot())?;
        for &mode in &modes {
            let cfg = AttnOverrides { mode: Some(mode), ..Default::default() }.resolve(model.default_attention()).for_context(depth + n_decode);
            let work = model.pool().acquire().expect("a free slot");
            let slot = work.slot();
            model.pool().copy_slot(base.slot(), slot);
            model.configure_slot(slot, &cfg, false);
            resync(&mut model, &toks, prefill_depth, slot)?;
            let t = Instant::now();
            feed(&mut model, &toks[prefill_depth..prefill_depth + n_prefill], prefill_depth, slot)?;
            let prefill_s = t.elapsed().as_secs_f64();
            model.pool().copy_slot(base.slot(), slot);
            model.configure_slot(slot, &AttnConfig::dense(), false);
            feed(&mut model, &toks[prefill_depth..depth.max(1)], prefill_depth, slot)?;
            model.configure_slot(slot, &cfg, false);
            resync(&mut model, &toks, depth.max(1), slot)?;
            model.reset_stats(slot);
            // The first decode step apart: on the GPU path it builds the decoder (and until GPU
            // run 34 uploaded the whole slot, the mirror being behind after any prefill), so it
            // is the latency a request pays once.
            let t = Instant::now();
            let mut first_s = 0.0;
            for i in 0..n_decode {
                let p = depth.max(1) + i;
                model.forward(&toks[p..p + 1], p, slot)?;
                if i == 0 {
                    first_s = t.elapsed().as_secs_f64();
                }
            }
            let decode_s = t.elapsed().as_secs_f64();
            let steady = (n_decode > 1).then(|| (n_decode - 1) as f64 / (decode_s - first_s));
            let st = model.slot_stats(slot);
            println!(
                "{}",
                serde_json::json!({
                    "activations": opts.activations.as_str(), "execution_provider": model.info().execution_provider.as_str(), "gpu_layer_steps": st.gpu_layer_steps, "graph_steps": st.graph_steps, "depth": depth, "prefill_depth": prefill_depth, "mode": mode.as_str(), "budget": cfg.budget, "chunks": cfg.chunks,
                    "prefill_tokens": n_prefill, "prefill_tok_s": n_prefill as f64 / prefill_s,
                    "decode_tokens": n_decode, "decode_tok_s": n_decode as f64 / decode_s,
                    "first_decode_ms": first_s * 1e3, "steady_decode_tok_s": steady,
                    "kv_read_fraction": st.read_fraction(), "peak_rss_mib": peak_rss_kib() as f64 / 1024.0,
                })
            );
        }
    }
    Ok(())
}
