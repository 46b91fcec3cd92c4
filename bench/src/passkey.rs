//! Synthetic passkey retrieval: a 5-digit key hidden at a depth of repeated filler. The
//! filler and needle are prefilled densely once per prompt; each setting then decodes the question
//! tokens one step at a time and the answer greedily, the selector active throughout. Scored by
//! exact match of the key.
use std::time::Instant;

use fasa_engine::{AttnConfig, EngineError, Model, Result};
use serde::{Deserialize, Serialize};

use crate::fidelity::Setting;
use crate::{argmax, prefill};

#[derive(Debug, Clone)]
pub struct PasskeyOptions {
    /// Prompt lengths in tokens (about: filler is whole sentences).
    pub lengths: Vec<usize>,
    /// Needle depths as fractions of the filler.
    pub depths: Vec<f64>,
    pub keys_per_depth: usize,
    /// Tokens generated for the answer.
    pub answer_tokens: usize,
}

impl Default for PasskeyOptions {
    fn default() -> Self {
        Self { lengths: vec![1024, 2048, 4096, 8192], depths: vec![0.1, 0.5, 0.9], keys_per_depth: 2, answer_tokens: 7 }
    }
}

/// Results of one (length, budget, setting): hits out of prompts, dense beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PasskeyRow {
    pub length: usize,
    pub budget: usize,
    pub spec: String,
    pub hits: usize,
    pub total: usize,
    /// The same prompts under dense attention.
    pub dense_hits: usize,
    /// What the model answered, per prompt (first digits found, else the text).
    pub answers: Vec<String>,
}

const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n";
const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const QUESTION: &str = "\nWhat is the pass key? The pass key is";

/// A deterministic 5-digit key (10000–99999) for prompt `i`.
pub fn key(i: usize) -> u32 {
    let mut s = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    s ^= s >> 31;
    10_000 + (s % 90_000) as u32
}

/// `(context ids prefilled densely, question ids decoded step by step)` of a prompt of about
/// `length` tokens with `key` at `depth` of the filler.
pub fn prompt(model: &Model, length: usize, depth: f64, key: u32) -> Result<(Vec<u32>, Vec<u32>)> {
    let tok = |s: &str| model.tokenizer().encode(s, false);
    let needle = format!("The pass key is {key}. Remember it. {key} is the pass key.\n");
    let fixed = tok(INTRO)?.len() + tok(&needle)?.len() + tok(QUESTION)?.len() + 12;
    let per = tok(FILLER)?.len().max(1);
    let n_fill = length.saturating_sub(fixed) / per;
    let before = ((n_fill as f64) * depth).round() as usize;
    let text = format!("{INTRO}{}{needle}{}", FILLER.repeat(before), FILLER.repeat(n_fill - before));
    Ok((tok(&text)?, tok(QUESTION)?))
}

/// The first run of digits in `s`, else `s` trimmed.
fn digits(s: &str) -> String {
    let d: String = s.chars().skip_while(|c| !c.is_ascii_digit()).take_while(|c| c.is_ascii_digit()).collect();
    if d.is_empty() { s.trim().to_string() } else { d }
}

/// Decodes question then answer on `work` (a copy of `base`) under `cfg`; returns the answer.
fn answer(model: &mut Model, base: usize, work: usize, cfg: &AttnConfig, ctx_len: usize, question: &[u32], n_answer: usize) -> Result<String> {
    if !model.pool().copy_slot(base, work) {
        return Err(EngineError::InvalidRequest("cannot copy the base slot".into()));
    }
    model.configure_slot(work, &cfg.clone().for_context(ctx_len + question.len() + n_answer), false);
    let mut pos = ctx_len;
    let mut logits = Vec::new();
    for &t in question {
        logits = model.forward(&[t], pos, work)?;
        pos += 1;
    }
    let mut out = Vec::new();
    for i in 0..n_answer {
        let t = argmax(&logits);
        if model.tokenizer().is_end_of_generation(t) {
            break;
        }
        out.push(t);
        if i + 1 < n_answer {
            logits = model.forward(&[t], pos, work)?;
            pos += 1;
        }
    }
    Ok(digits(&model.tokenizer().decode(&out)?))
}

/// Every length × depth × key, dense and each (budget, setting).
pub fn run(model: &mut Model, opts: &PasskeyOptions, budgets: &[usize], settings: &[Setting], base: usize, work: usize, verbose: bool) -> Result<Vec<PasskeyRow>> {
    let mut rows = Vec::new();
    let mut prompt_no = 0;
    for &len in &opts.lengths {
        // Question and answer must fit after the prompt: at the model's full context the prompt
        // is made that much shorter.
        let room = model.info().max_context.saturating_sub(opts.answer_tokens + 24);
        if room < 64 {
            return Err(EngineError::ContextTooLong { prompt: len, limit: model.info().max_context });
        }
        let prompt_len = len.min(room);
        let t0 = Instant::now();
        // (budget, setting) → answers; index 0 of the settings list is dense.
        let mut cfgs: Vec<(usize, String, AttnConfig)> = vec![(len, "dense".into(), AttnConfig::dense())];
        for &b in budgets {
            for s in settings {
                let cfg = s.config(b).map_err(EngineError::InvalidRequest)?.fit_pool(model.info().config.n_fcs());
                cfgs.push((b, s.spec.clone(), cfg));
            }
        }
        let mut answers: Vec<Vec<(u32, String)>> = vec![vec![]; cfgs.len()];
        for &depth in &opts.depths {
            for _ in 0..opts.keys_per_depth {
                let k = key(prompt_no);
                prompt_no += 1;
                let (ctx, q) = prompt(model, prompt_len, depth, k)?;
                model.configure_slot(base, &AttnConfig::dense(), false);
                prefill(model, &ctx, 0, base)?;
                for (i, (_, _, cfg)) in cfgs.iter().enumerate() {
                    let a = answer(model, base, work, cfg, ctx.len(), &q, opts.answer_tokens)?;
                    answers[i].push((k, a));
                }
            }
        }
        let hits = |a: &[(u32, String)]| a.iter().filter(|(k, s)| *s == k.to_string()).count();
        let dense_hits = hits(&answers[0]);
        for (i, (b, spec, _)) in cfgs.iter().enumerate() {
            let row = PasskeyRow { length: len, budget: *b, spec: spec.clone(), hits: hits(&answers[i]), total: answers[i].len(), dense_hits, answers: answers[i].iter().map(|(_, s)| s.clone()).collect() };
            if verbose {
                eprintln!("passkey {len} B={b} {spec}: {}/{} (dense {dense_hits})", row.hits, row.total);
            }
            rows.push(row);
        }
        if verbose {
            eprintln!("passkey {len}: {:.1} s", t0.elapsed().as_secs_f64());
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_five_digits_and_answers_are_parsed() {
        for i in 0..100 {
            assert_eq!(key(i).to_string().len(), 5);
        }
        assert_ne!(key(0), key(1));
        assert_eq!(digits(" 12345. Remember"), "12345");
        assert_eq!(digits(" none"), "none");
    }
}
