//! Offline calibration of the dominant frequency chunks (FCs): dense decoding over prose while a
//! `CaRecorder` measures each FC's contextual agreement (CA) with the exact top-K, then the FCs
//! ranked per layer, per query head and per KV group into a `Profile` (docs/profile.md).
//!
//! Per text: the first `prefix` tokens are prefilled densely, then the following tokens are
//! teacher-forced; every `stride`-th of them is fed alone as a decode step (S = 1, the only runs
//! the operator records), the ones between go in as one prefill chunk, which is cheaper and
//! leaves the cache identical.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::attention::profile::{HeadProfile, LayerProfile, Source, SCHEMA};
use crate::attention::{AttnConfig, CaRecorder, Profile};
use crate::model::PREFILL_CHUNK;
use crate::{AttnOverrides, EngineError, GenerateRequest, Mode, Model, Prompt, Result, SamplingParams, Step};

/// Folder of licence texts that Debian and Ubuntu install on every system.
pub const LICENSE_DIR: &str = "/usr/share/common-licenses";
/// Licence files calibration reads by default (those present are used).
pub const CALIBRATION_FILES: &[&str] = &["Apache-2.0", "MPL-2.0"];
/// Licence files the fidelity harness evaluates on by default: disjoint from the calibration
/// files (the GPL family shares no text with Apache or MPL 2.0).
pub const EVAL_FILES: &[&str] = &["GPL-2", "GFDL-1.3", "Artistic", "LGPL-2.1", "GPL-3"];

#[derive(Debug, Clone, PartialEq)]
pub struct CalibrateOptions {
    /// K values CA is measured at; a K counts only once the cache holds at least 2K tokens.
    pub k_values: Vec<usize>,
    /// The K whose mean CA ranks the FCs (the largest measured K below it when it never counted).
    pub ca_k: usize,
    /// Tokens prefilled densely before the first recorded step.
    pub prefix: usize,
    /// Tokens of each text used in all (prefix included).
    pub max_tokens: usize,
    /// Record every `stride`-th teacher-forced token (1 = every one).
    pub stride: usize,
    /// Tokens the model writes itself when no text is given.
    pub generated_tokens: usize,
}

impl Default for CalibrateOptions {
    /// About 60 s on 2 busy cores for the default model: 2 texts × 896 tokens, 512 prefilled,
    /// every 8th of the next 384 recorded (96 decode queries per head). A recorded step costs
    /// ~0.5 s of one core at 512–900 cached tokens (every FC ranked per head); the rest is cheap.
    fn default() -> Self {
        Self { k_values: vec![32, 64, 128, 256, 512], ca_k: 128, prefix: 512, max_tokens: 896, stride: 8, generated_tokens: 896 }
    }
}

/// Reads `names` from `dir`, skipping missing files and files that are links to one already read
/// (`GPL` → `GPL-3`). Returns `(source name, text)`.
fn read_texts(dir: &Path, names: &[&str]) -> Vec<(String, String)> {
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    for name in names {
        let path = dir.join(name);
        let Ok(real) = std::fs::canonicalize(&path) else { continue };
        if seen.contains(&real) {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(&real) {
            seen.push(real);
            out.push((path.display().to_string(), text));
        }
    }
    out
}

/// The default calibration prose: Apache-2.0 and MPL-2.0 from `/usr/share/common-licenses`.
/// Empty when none exist; `calibrate` then has the model write its own text.
pub fn default_calibration_texts() -> Vec<(String, String)> {
    read_texts(Path::new(LICENSE_DIR), CALIBRATION_FILES)
}

/// The default evaluation prose, disjoint from the calibration files: GPL-2, GFDL-1.3, Artistic,
/// LGPL-2.1, GPL-3 (those present), about 20k tokens together.
pub fn default_eval_texts() -> Vec<(String, String)> {
    read_texts(Path::new(LICENSE_DIR), EVAL_FILES)
}

/// Hex sha256 of a text's UTF-8 bytes.
pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Text the model writes itself (sampled at temperature 0.8, seeded): the calibration fallback
/// on systems without licence texts.
pub fn generated_text(model: &mut Model, tokens: usize, seed: u64) -> Result<String> {
    let req = GenerateRequest {
        prompt: Prompt::Raw("Chapter 1\n\nThe old lighthouse keeper had kept a journal for forty years.".into()),
        sampling: SamplingParams { temperature: 0.8, top_k: 50, top_p: 0.95, seed },
        max_tokens: tokens,
        stop: vec![],
        attention: AttnOverrides { mode: Some(Mode::Dense), ..Default::default() },
    };
    let mut seq = model.start(req)?;
    let mut text = String::new();
    loop {
        match model.step(&mut seq)? {
            Step::Text(t) => text.push_str(&t),
            Step::Finished { text: t, .. } => {
                text.push_str(&t);
                return Ok(text);
            }
        }
    }
}

/// Calibrates the loaded model on `texts` (`(source name, text)`; empty: two texts the model
/// writes itself). `progress` gets the fraction done, 0..=1. The profile is returned, not
/// installed: `model.pool().set_profile(p)` does that.
pub fn calibrate(model: &mut Model, texts: &[(String, String)], opts: &CalibrateOptions, progress: &mut dyn FnMut(f32)) -> Result<Profile> {
    if opts.k_values.is_empty() || opts.k_values.contains(&0) || opts.stride == 0 {
        return Err(EngineError::InvalidRequest("calibration needs K values ≥ 1 and a stride ≥ 1".into()));
    }
    let generated;
    let texts = if texts.is_empty() {
        generated = (0..2u64)
            .map(|seed| Ok((format!("generated by the model (seed {seed}, {} tokens)", opts.generated_tokens), generated_text(model, opts.generated_tokens, seed)?)))
            .collect::<Result<Vec<_>>>()?;
        &generated[..]
    } else {
        texts
    };
    let c = model.info().config.clone();
    let limit = model.info().max_context.saturating_sub(1);
    let n_fc = c.n_fcs();
    // Token ids of every text, cut to what is used.
    let mut docs = Vec::new();
    for (name, text) in texts {
        let mut ids = model.tokenizer().encode(text, false)?;
        ids.truncate(opts.max_tokens.min(limit));
        if ids.len() < opts.prefix.max(2) + 1 {
            return Err(EngineError::InvalidRequest(format!("calibration text {name} has {} tokens; it needs more than the prefix of {}", ids.len(), opts.prefix)));
        }
        docs.push((name, sha256_hex(text), ids));
    }
    let lease = model.pool().acquire().ok_or(EngineError::NoFreeSlot(model.pool().n_slots()))?;
    let slot = lease.slot();
    model.configure_slot(slot, &AttnConfig::dense(), false);
    model.set_recorder(slot, Some(CaRecorder::new(opts.k_values.clone(), c.n_layers, c.n_heads, c.n_kv_heads, n_fc)));
    let total: usize = docs.iter().map(|(_, _, ids)| ids.len()).sum();
    let mut done = 0usize;
    let mut sources = Vec::new();
    for (name, sha, ids) in &docs {
        // Position 0 rewinds the slot: each text starts from an empty cache.
        let prefix = opts.prefix.max(1);
        let mut pos = 0;
        while pos < prefix {
            let end = (pos + PREFILL_CHUNK).min(prefix);
            model.forward(&ids[pos..end], pos, slot)?;
            pos = end;
        }
        done += prefix;
        progress(done as f32 / total as f32);
        while pos < ids.len() {
            // stride−1 unrecorded tokens in one chunk, then one recorded decode step.
            let between = (opts.stride - 1).min(ids.len() - pos - 1);
            if between > 0 {
                model.forward(&ids[pos..pos + between], pos, slot)?;
                pos += between;
            }
            model.forward(&ids[pos..pos + 1], pos, slot)?;
            pos += 1;
            done += between + 1;
            progress(done as f32 / total as f32);
        }
        sources.push(Source { path: name.to_string(), sha256: sha.clone(), tokens: ids.len() });
    }
    let rec = model.set_recorder(slot, None).ok_or_else(|| EngineError::Runtime("the CA recorder vanished from its slot".into()))?;
    drop(lease);
    progress(1.0);
    let mut p = profile_from(&rec, &c, &model.info().sha256, opts.ca_k, sources);
    p.activations = Some(model.info().activations);
    Ok(p)
}

/// Ranks the FCs of every (layer, head) by mean CA at `ca_k` (or the largest measured K below
/// it, else the smallest measured); ties keep the lower FC first.
pub fn profile_from(rec: &CaRecorder, c: &crate::ModelConfig, model_sha256: &str, ca_k: usize, sources: Vec<Source>) -> Profile {
    let nk = rec.k_values.len();
    // A K counts once every layer saw at least a quarter of the queries the best-counted K saw
    // (a K near half the context is reached only by the last few steps: too few to rank by).
    let most = rec.count.iter().copied().max().unwrap_or(0);
    let counted = |ki: usize| (0..rec.n_layers).all(|l| rec.count[l * nk + ki] > 0 && rec.count[l * nk + ki] * 4 >= most);
    let measured: Vec<usize> = (0..nk).filter(|&ki| counted(ki)).collect();
    let rank_ki = measured
        .iter()
        .copied()
        .filter(|&ki| rec.k_values[ki] <= ca_k)
        .max_by_key(|&ki| rec.k_values[ki])
        .or_else(|| measured.iter().copied().min_by_key(|&ki| rec.k_values[ki]));
    let head = |kv: bool, l: usize, h: usize| -> HeadProfile {
        let Some(rk) = rank_ki else {
            return HeadProfile { ranked_fcs: (0..rec.n_fc).rev().collect(), ca: vec![], ca_by_k: BTreeMap::new() };
        };
        let ca: Vec<f32> = (0..rec.n_fc).map(|f| rec.mean(kv, l, h, f, rk)).collect();
        let mut ranked: Vec<usize> = (0..rec.n_fc).collect();
        ranked.sort_by(|&a, &b| ca[b].partial_cmp(&ca[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
        let ca_by_k = measured.iter().map(|&ki| (rec.k_values[ki], ranked.iter().map(|&f| rec.mean(kv, l, h, f, ki)).collect())).collect();
        HeadProfile { ca: ranked.iter().map(|&f| ca[f]).collect(), ranked_fcs: ranked, ca_by_k }
    };
    let layers = (0..rec.n_layers)
        .map(|l| LayerProfile { kv_heads: (0..rec.n_kv_heads).map(|h| head(true, l, h)).collect(), q_heads: (0..rec.n_heads).map(|h| head(false, l, h)).collect() })
        .collect();
    Profile {
        schema: SCHEMA,
        model_sha256: model_sha256.into(),
        model_name: c.name.clone(),
        rope_layout: c.rope_layout,
        head_dim: c.head_dim,
        k_values: measured.iter().map(|&ki| rec.k_values[ki]).collect(),
        ca_k: rank_ki.map_or(0, |ki| rec.k_values[ki]),
        queries: rank_ki.map_or(0, |ki| rec.count[ki] as usize),
        sources,
        layers,
        uncalibrated: rank_ki.is_none(),
        activations: None, // (calibrate records the model's)
    }
}

/// Mean overlap of the top-`top` FC sets of two profiles over every (layer, KV head) and
/// (layer, query head), and what two random sets would share on average (`top²/n_fc`).
pub fn top_overlap(a: &Profile, b: &Profile, top: usize) -> (f64, f64, f64) {
    let ov = |x: &HeadProfile, y: &HeadProfile| x.ranked_fcs.iter().take(top).filter(|f| y.ranked_fcs[..top.min(y.ranked_fcs.len())].contains(f)).count() as f64;
    let mean = |pairs: Vec<f64>| pairs.iter().sum::<f64>() / pairs.len().max(1) as f64;
    let kv = mean(a.layers.iter().zip(&b.layers).flat_map(|(la, lb)| la.kv_heads.iter().zip(&lb.kv_heads).map(|(x, y)| ov(x, y)).collect::<Vec<_>>()).collect());
    let q = mean(a.layers.iter().zip(&b.layers).flat_map(|(la, lb)| la.q_heads.iter().zip(&lb.q_heads).map(|(x, y)| ov(x, y)).collect::<Vec<_>>()).collect());
    let n_fc = a.head_dim / 2;
    (kv, q, (top * top) as f64 / n_fc.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_follows_mean_ca_and_skips_uncounted_k() {
        let c = crate::ModelConfig { architecture: "llama".into(), name: "t".into(), n_layers: 1, hidden: 8, n_heads: 2, n_kv_heads: 1, head_dim: 6, ffn_hidden: 8, vocab_size: 8, context_length: 64, rope_theta: 1e4, rms_eps: 1e-5, rope_layout: crate::RopeLayout::Adjacent, tied_embeddings: true, qkv_bias: false };
        let mut r = CaRecorder::new(vec![4, 8, 1000], 1, 2, 1, 3);
        // Layer 0 counted twice at K = 4 and 8, never at 1000.
        r.count = vec![2, 2, 0];
        for h in 0..2 {
            for (f, v) in [0.2, 1.6, 0.8].iter().enumerate() {
                r.q_sum[(h * 3 + f) * 3 + 1] = *v; // K = 8
                r.q_sum[(h * 3 + f) * 3] = 2.0 - v; // K = 4 ranks the other way
            }
        }
        r.kv_sum.clone_from(&r.q_sum[..9].to_vec());
        let p = profile_from(&r, &c, "sha", 128, vec![]);
        assert_eq!((p.ca_k, p.k_values.clone(), p.queries), (8, vec![4, 8], 2));
        assert_eq!(p.layers[0].q_heads[1].ranked_fcs, vec![1, 2, 0]);
        assert_eq!(p.layers[0].kv_heads[0].ca, vec![0.8, 0.4, 0.1]);
        assert_eq!(p.layers[0].kv_heads[0].ca_by_k[&4], vec![0.2, 0.6, 0.9]);
        assert!(p.check(&c, "sha").is_ok());
        assert_eq!(top_overlap(&p, &p, 2), (2.0, 2.0, 4.0 / 3.0));
    }
}
