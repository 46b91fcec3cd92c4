//! Picks the next token from a step's logits: greedy, or temperature + top-k + top-p sampling
//! with a seeded RNG so the same seed replays the same tokens.
//!
//! Vocabularies reach 152k entries, so filters use partial selection (`select_nth_unstable`)
//! over the candidates instead of sorting the whole vocabulary.
use std::cmp::Ordering;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::SamplingParams;

/// Checks sampling parameters; the message says which one is wrong and what is allowed.
pub fn validate(p: &SamplingParams) -> Result<(), String> {
    if !p.temperature.is_finite() || !(0.0..=100.0).contains(&p.temperature) {
        return Err(format!("temperature must be in [0, 100] (0 = greedy), got {}", p.temperature));
    }
    if !(p.top_p.is_finite() && p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err(format!("top_p must be in (0, 1] (1 = off), got {}", p.top_p));
    }
    Ok(())
}

pub struct Sampler {
    temperature: f32,
    /// 0 = off.
    top_k: usize,
    /// ≥ 1 = off.
    top_p: f32,
    rng: StdRng,
    /// (weight, token id) candidates, reused across steps to avoid a 152k allocation per token.
    scratch: Vec<(f32, u32)>,
}

/// Larger weight first; equal weights: lower id first (so ties resolve like greedy).
fn by_weight_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Index of the largest logit, lowest id on ties; NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || (logits[best].is_nan() && !l.is_nan()) {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// Parameters are assumed valid (see [`validate`]).
    pub fn new(p: &SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            rng: StdRng::seed_from_u64(p.seed),
            scratch: Vec::new(),
        }
    }

    /// Next token id for `logits` (vocab).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let max = logits.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max);
        if self.temperature <= 0.0 || self.top_k == 1 || !max.is_finite() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        // Candidates as (unnormalized softmax weight in [0, 1], id): one exp per logit, and the
        // weight orders like the logit. NaN logits weigh nothing.
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| {
            let w = if l.is_nan() { 0.0 } else { ((l - max) * inv_t).exp() };
            (w, i as u32)
        }));
        let n = cand.len();
        if self.top_k > 0 && self.top_k < n {
            cand.select_nth_unstable_by(self.top_k - 1, by_weight_desc);
            cand.truncate(self.top_k);
        }
        let total: f64 = cand.iter().map(|c| c.0 as f64).sum();

        // Nucleus: smallest top-ranked prefix holding ≥ top_p of the mass (at least one token).
        // Sort only a growing head of the candidates: the nucleus is usually small.
        let keep = if self.top_p >= 1.0 {
            cand.len()
        } else {
            let target = self.top_p as f64 * total;
            let mut head = 64.min(cand.len());
            loop {
                if head < cand.len() {
                    cand.select_nth_unstable_by(head - 1, by_weight_desc);
                }
                cand[..head].sort_unstable_by(by_weight_desc);
                let mut acc = 0.0;
                let cut = cand[..head].iter().position(|c| {
                    acc += c.0 as f64;
                    acc >= target
                });
                match cut {
                    Some(i) => break i + 1,
                    None if head == cand.len() => break head, // rounding: keep all
                    None => head = (head * 4).min(cand.len()),
                }
            }
        };
        let kept = &cand[..keep];
        let mass: f64 = kept.iter().map(|c| c.0 as f64).sum();
        let mut u = self.rng.random::<f64>() * mass;
        for c in kept {
            u -= c.0 as f64;
            if u < 0.0 {
                return c.1;
            }
        }
        // Floating-point leftovers land on the most likely kept token.
        kept.iter().min_by(|a, b| by_weight_desc(a, b)).map_or(0, |c| c.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, seed }
    }

    /// Pseudo-random logits over a large vocab (deterministic, no RNG crate needed).
    fn big_logits(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as u64 * 2654435761 % 1000) as f32) / 100.0).collect()
    }

    #[test]
    fn greedy_is_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(&params(0.0, 0, 1.0, 7));
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(s.sample(&[f32::NAN, -5.0, -4.0]), 2);
        let l = big_logits(152_000);
        assert_eq!(s.sample(&l), argmax(&l));
    }

    #[test]
    fn same_seed_same_tokens() {
        let l = big_logits(50_000);
        let draw = |seed, k, p| {
            let mut s = Sampler::new(&params(1.5, k, p, seed));
            (0..50).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        for (k, p) in [(0, 1.0), (40, 1.0), (0, 0.9), (100, 0.5)] {
            assert_eq!(draw(1, k, p), draw(1, k, p), "top_k={k} top_p={p}");
            assert_ne!(draw(1, k, p), draw(2, k, p), "top_k={k} top_p={p}: seeds should differ");
        }
    }

    #[test]
    fn top_k_one_and_tiny_top_p_equal_greedy() {
        let l = big_logits(152_000);
        let want = argmax(&l);
        let mut k1 = Sampler::new(&params(2.0, 1, 1.0, 3));
        let mut p0 = Sampler::new(&params(2.0, 0, 1e-6, 3));
        let mut both = Sampler::new(&params(2.0, 50, 1e-6, 3));
        for _ in 0..20 {
            assert_eq!(k1.sample(&l), want);
            assert_eq!(p0.sample(&l), want);
            assert_eq!(both.sample(&l), want);
        }
    }

    /// Frequencies of 3 tokens with p = (0.5, 0.3, 0.2) under each filter.
    fn freqs(top_k: usize, top_p: f32) -> [f64; 3] {
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(&params(1.0, top_k, top_p, 42));
        let mut c = [0usize; 3];
        let n = 40_000;
        for _ in 0..n {
            c[s.sample(&logits) as usize] += 1;
        }
        c.map(|x| x as f64 / n as f64)
    }

    fn close(got: [f64; 3], want: [f64; 3]) {
        for i in 0..3 {
            assert!((got[i] - want[i]).abs() < 0.015, "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn distribution_matches_softmax_and_filters() {
        close(freqs(0, 1.0), [0.5, 0.3, 0.2]);
        close(freqs(2, 1.0), [0.625, 0.375, 0.0]);
        close(freqs(0, 0.7), [0.625, 0.375, 0.0]); // 0.5 < 0.7 ≤ 0.8: keep two
        close(freqs(0, 0.5), [1.0, 0.0, 0.0]);
        // Temperature 2 flattens: p ∝ sqrt(p).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(&params(2.0, 0, 1.0, 9));
        let mut c = [0usize; 3];
        for _ in 0..40_000 {
            c[s.sample(&logits) as usize] += 1;
        }
        let z: f64 = [0.5f64, 0.3, 0.2].iter().map(|p| p.sqrt()).sum();
        close(c.map(|x| x as f64 / 40_000.0), [0.5f64.sqrt() / z, 0.3f64.sqrt() / z, 0.2f64.sqrt() / z]);
    }

    #[test]
    fn validate_rejects_bad_params() {
        assert!(validate(&SamplingParams::default()).is_ok());
        assert!(validate(&params(0.7, 40, 0.95, 1)).is_ok());
        for p in [
            params(f32::NAN, 0, 1.0, 0),
            params(-0.1, 0, 1.0, 0),
            params(100.5, 0, 1.0, 0),
            params(f32::INFINITY, 0, 1.0, 0),
            params(1.0, 0, 0.0, 0),
            params(1.0, 0, 1.5, 0),
            params(1.0, 0, f32::NAN, 0),
        ] {
            let e = validate(&p).expect_err(&format!("{p:?} should be rejected"));
            assert!(e.contains("temperature") || e.contains("top_p"), "{e}");
        }
    }
}
