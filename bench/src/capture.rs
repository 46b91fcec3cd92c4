//! `fasa-bench capture`: K/V and queries of the real model at one decode step, for checking the
//! GPU kernels against their CPU twins on real data (kernels/tests/gpu.rs reads the file named by
//! `FASA_CAPTURED_KV`).
//!
//! The default model prefills `context − 1` tokens of real prose densely, then decodes token
//! `context` (dense) with a `KvCapture` on its slot. File format (little-endian):
//!
//! - line 1: a JSON header ending in `\n`: `format` = `"fasa-kv-capture"`, `version` = 1,
//!   `dtype` (`"f16"` or `"f32"`, the element type of every array), `model`, `model_sha256`,
//!   `text` (file and sha256 of the prose), `context` n (tokens cached at the step), `n_heads`,
//!   `n_kv_heads`, `head_dim` d, `profile` (its file and calibration sources), and `layers`: one
//!   object per captured layer `{layer, kv_ranked_fcs: [n_kv_heads lists], q_ranked_fcs:
//!   [n_heads lists]}` — the profile's FC rankings, best first;
//! - then, per entry of `layers` in order: q `(n_heads, d)`, then per KV head K `(n, d)` and V
//!   `(n, d)`.
//!
//! q and K are rotated (RoPE applied) and in the operator's FC-pair order (FC `f`'s pair at
//! `2f, 2f + 1`); V is in the model's dim order. At n = 4096, SmolLM2-135M, 4 layers, f16: 12 MiB.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use fasa_engine::attention::{KvCapture, LayerCapture, Profile};
use fasa_engine::{AttnConfig, Model};

use crate::prefill;

pub const FORMAT: &str = "fasa-kv-capture";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Elem {
    F16,
    F32,
}

impl Elem {
    fn name(self) -> &'static str {
        match self {
            Elem::F16 => "f16",
            Elem::F32 => "f32",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Tokens cached at the captured decode step.
    pub context: usize,
    pub layers: Vec<usize>,
    pub text: PathBuf,
    pub profile: PathBuf,
    pub dtype: Elem,
}

/// Runs the model and returns the records (in `opts.layers` order) and the header fields that
/// describe them.
pub fn capture(model: &mut Model, opts: &CaptureOptions) -> Result<(serde_json::Value, Vec<LayerCapture>)> {
    let info = model.info().clone();
    let c = &info.config;
    ensure!(opts.context >= 2, "context must be at least 2 tokens");
    if let Some(&l) = opts.layers.iter().find(|&&l| l >= c.n_layers) {
        bail!("layer {l} out of range: the model has {} layers", c.n_layers);
    }
    let prof = Profile::load(&opts.profile)?;
    prof.check(c, &info.sha256).map_err(|e| anyhow::anyhow!("{}: {e}", opts.profile.display()))?;
    let text = std::fs::read_to_string(&opts.text).with_context(|| format!("reading {}", opts.text.display()))?;
    let ids = model.tokenizer().encode(&text, false)?;
    ensure!(ids.len() >= opts.context, "{} has {} tokens, fewer than the context {}", opts.text.display(), ids.len(), opts.context);
    let lease = model.pool().acquire().context("no free cache slot")?;
    let slot = lease.slot();
    model.configure_slot(slot, &AttnConfig::dense(), false);
    let n = opts.context;
    prefill(model, &ids[..n - 1], 0, slot)?;
    model.pool().lock(slot).context("slot vanished")?.state.capture = Some(KvCapture::new(opts.layers.clone()));
    model.forward(&ids[n - 1..n], n - 1, slot)?;
    let cap = model.pool().lock(slot).and_then(|mut s| s.state.capture.take()).context("the capture vanished from its slot")?;
    let mut records = Vec::new();
    for &l in &opts.layers {
        let r = cap.records.iter().find(|r| r.layer == l).with_context(|| format!("layer {l} was not captured"))?;
        let d = c.head_dim;
        ensure!(r.n == n && r.q.len() == c.n_heads * d && r.k.len() == c.n_kv_heads, "layer {l}: capture of {} tokens, {} KV heads", r.n, r.k.len());
        ensure!(r.k.iter().chain(&r.v).all(|x| x.len() == n * d), "layer {l}: K/V rows missing");
        records.push(r.clone());
    }
    let layers: Vec<serde_json::Value> = opts
        .layers
        .iter()
        .map(|&l| {
            let p = &prof.layers[l];
            serde_json::json!({
                "layer": l,
                "kv_ranked_fcs": p.kv_heads.iter().map(|h| &h.ranked_fcs).collect::<Vec<_>>(),
                "q_ranked_fcs": p.q_heads.iter().map(|h| &h.ranked_fcs).collect::<Vec<_>>(),
            })
        })
        .collect();
    let header = serde_json::json!({
        "format": FORMAT,
        "version": 1,
        "dtype": opts.dtype.name(),
        "model": c.name,
        "model_sha256": info.sha256,
        "text": { "file": opts.text.file_name().map(|f| f.to_string_lossy().into_owned()), "sha256": fasa_engine::calibrate::sha256_hex(&text) },
        "context": n,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "profile": { "file": opts.profile.file_name().map(|f| f.to_string_lossy().into_owned()), "sources": prof.sources.iter().map(|s| &s.path).collect::<Vec<_>>(), "queries": prof.queries },
        "layers": layers,
    });
    Ok((header, records))
}

/// Writes the header line and the arrays (module docs); non-finite or f16-overflowing values are
/// refused rather than written as garbage.
pub fn write(out: &mut impl Write, header: &serde_json::Value, records: &[LayerCapture], dtype: Elem) -> Result<()> {
    let mut line = serde_json::to_vec(header)?;
    line.push(b'\n');
    out.write_all(&line)?;
    let mut buf = Vec::new();
    for r in records {
        for a in std::iter::once(&r.q).chain(r.k.iter().zip(&r.v).flat_map(|(k, v)| [k, v])) {
            buf.clear();
            for &x in a {
                ensure!(x.is_finite() && (dtype == Elem::F32 || x.abs() <= 65504.0), "layer {}: value {x} does not fit {}", r.layer, dtype.name());
                match dtype {
                    Elem::F16 => buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                    Elem::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                }
            }
            out.write_all(&buf)?;
        }
    }
    Ok(())
}

/// Captures and writes `path`; returns its size in bytes.
pub fn run(model: &mut Model, opts: &CaptureOptions, path: &Path) -> Result<u64> {
    let (header, records) = capture(model, opts)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    write(&mut f, &header, &records, opts.dtype)?;
    f.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_header_line_then_q_then_k_v_per_kv_head() {
        let (d, n) = (2, 3);
        let r = LayerCapture { layer: 5, n, q: vec![1.0, 2.0, 3.0, 4.0], k: vec![vec![0.5; n * d]], v: vec![vec![-2.0; n * d]] };
        let h = serde_json::json!({ "format": FORMAT, "dtype": "f16" });
        let mut out = Vec::new();
        write(&mut out, &h, std::slice::from_ref(&r), Elem::F16).unwrap();
        let nl = out.iter().position(|&b| b == b'\n').unwrap();
        let back: serde_json::Value = serde_json::from_slice(&out[..nl]).unwrap();
        assert_eq!(back, h);
        let vals: Vec<f32> = out[nl + 1..].chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        let want: Vec<f32> = r.q.iter().chain(&r.k[0]).chain(&r.v[0]).copied().collect();
        assert_eq!(vals, want);
        let mut out32 = Vec::new();
        write(&mut out32, &h, std::slice::from_ref(&r), Elem::F32).unwrap();
        assert_eq!(out32.len() - nl - 1, 4 * want.len());
        // f16 cannot hold it: refused, not clamped.
        let big = LayerCapture { q: vec![1e5; 4], ..r };
        assert!(write(&mut Vec::new(), &h, &[big], Elem::F16).is_err());
    }
}
