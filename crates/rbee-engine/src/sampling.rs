//! Token selection from a logit vector.
//!
//! Order of operations: penalties on raw logits, then temperature, then top-k, min-p and
//! top-p (each on what the previous filter left), then one draw from a per-request RNG.
//! Temperature 0 skips the filters and the RNG: it is argmax after penalties.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{EngineError, GenerationParams};

/// Lowest log-probability reported, as OpenAI's API does for tokens the model rules out
/// entirely (a logit of -inf); JSON has no infinity.
const LOGPROB_FLOOR: f32 = -9999.0;

/// One token and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    pub token_id: u32,
    /// The token's own text, decoded alone with special tokens kept (e.g. `<|im_end|>`). A
    /// token that holds part of a multi-byte character decodes to U+FFFD.
    pub text: String,
    /// The token's own bytes: its vocabulary piece with the byte-level (GPT-2) or
    /// byte-fallback (`<0xE2>`) encoding undone, a special token's text. A token that holds
    /// part of a multi-byte character has bytes that are not UTF-8 alone; consecutive tokens'
    /// bytes join into the character. `text`'s UTF-8 when the vocabulary's encoding is
    /// neither.
    pub bytes: Vec<u8>,
    /// Natural log of the token's probability, at least -9999.
    pub logprob: f32,
}

/// Log-probabilities at the step that sampled a token: the log-softmax of the model's raw
/// logits, before penalties, temperature and the top-k/top-p/min-p filters (vLLM's default and
/// what OpenAI reports), so they describe the model, not the sampling settings. With a response
/// format, the logits of the tokens it rules out are -inf first: the distribution is the
/// constrained one, as OpenAI's is.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The sampled token.
    pub token: Logprob,
    /// The most likely tokens, most likely first (ties: lower id first); as many as the
    /// request asked for, fewer only when the vocabulary is smaller or a response format
    /// allows fewer tokens at this step.
    pub top: Vec<Logprob>,
}

/// The sampled token's log-probability and the `n` most likely `(id, logprob)` under the
/// log-softmax of `logits`. Non-finite logits count as probability 0.
pub(crate) fn log_softmax_top(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let log_norm = f64::from(max) + sum.ln();
    let logprob = |l: f32| {
        if l.is_finite() {
            ((f64::from(l) - log_norm) as f32).max(LOGPROB_FLOOR)
        } else {
            LOGPROB_FLOOR
        }
    };
    // A sorted head of at most `n`: most logits lose to its last entry with one comparison.
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (id, &l) in logits.iter().enumerate() {
            if !l.is_finite() || (top.len() == n && l <= top[n - 1].1) {
                continue;
            }
            let at = top.partition_point(|&(_, t)| t >= l);
            top.insert(at, (id as u32, l));
            top.truncate(n);
        }
    }
    let chosen = logits
        .get(token as usize)
        .map_or(LOGPROB_FLOOR, |&l| logprob(l));
    (
        chosen,
        top.into_iter().map(|(id, l)| (id, logprob(l))).collect(),
    )
}

/// A candidate token and its unnormalized probability.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    weight: f64,
}

pub(crate) struct Sampler {
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repeat_penalty: f32,
    repeat_last_n: usize,
    presence_penalty: f32,
    frequency_penalty: f32,
    rng: StdRng,
    generated_counts: HashMap<u32, u32>,
    candidates: Vec<Candidate>,
}

impl Sampler {
    pub(crate) fn new(params: &GenerationParams) -> Self {
        Sampler {
            temperature: params.temperature,
            top_k: params.top_k.filter(|&k| k > 0),
            top_p: params.top_p.filter(|&p| p < 1.0),
            min_p: params.min_p.filter(|&p| p > 0.0),
            repeat_penalty: params.repeat_penalty,
            repeat_last_n: params.repeat_last_n,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            rng: StdRng::seed_from_u64(params.seed),
            generated_counts: HashMap::new(),
            candidates: Vec::new(),
        }
    }

    /// Records a generated token for the presence and frequency penalties.
    pub(crate) fn accept(&mut self, token: u32) {
        *self.generated_counts.entry(token).or_default() += 1;
    }

    /// Picks the next token. `context` is the prompt followed by the tokens generated so far;
    /// the repetition penalty looks at its tail. `logits` is modified in place.
    pub(crate) fn sample(
        &mut self,
        logits: &mut [f32],
        context: &[u32],
    ) -> Result<u32, EngineError> {
        self.apply_penalties(logits, context);
        if self.temperature == 0.0 || self.top_k == Some(1) {
            return argmax(logits).ok_or_else(no_valid_logit);
        }
        self.collect_candidates(logits);
        if self.candidates.is_empty() {
            return Err(no_valid_logit());
        }
        if let Some(k) = self.top_k {
            self.keep_top_k(k);
        }
        self.logits_to_weights();
        if let Some(min_p) = self.min_p {
            // Weights are relative to the best candidate (weight 1), so min-p is a plain cut.
            let min_p = f64::from(min_p);
            self.candidates.retain(|c| c.weight >= min_p);
        }
        if let Some(top_p) = self.top_p {
            self.keep_top_p(f64::from(top_p));
        }
        Ok(self.draw())
    }

    fn apply_penalties(&self, logits: &mut [f32], context: &[u32]) {
        if self.repeat_penalty != 1.0 && self.repeat_last_n > 0 {
            let window = &context[context.len().saturating_sub(self.repeat_last_n)..];
            let seen: HashSet<u32> = window.iter().copied().collect();
            for id in seen {
                if let Some(logit) = logits.get_mut(id as usize) {
                    if *logit >= 0.0 {
                        *logit /= self.repeat_penalty;
                    } else {
                        *logit *= self.repeat_penalty;
                    }
                }
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            for (&id, &count) in &self.generated_counts {
                if let Some(logit) = logits.get_mut(id as usize) {
                    *logit -= self.presence_penalty + self.frequency_penalty * count as f32;
                }
            }
        }
    }

    fn collect_candidates(&mut self, logits: &[f32]) {
        let inv_temp = 1.0 / f64::from(self.temperature);
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(id, &l)| Candidate {
                    id: id as u32,
                    weight: f64::from(l) * inv_temp,
                }),
        );
    }

    /// Before [`Self::logits_to_weights`], `weight` holds the scaled logit; ordering is the same.
    fn keep_top_k(&mut self, k: usize) {
        if k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(k - 1, by_weight_desc);
            self.candidates.truncate(k);
        }
    }

    /// Turns scaled logits into weights `exp(l - max)`, so the best candidate weighs 1.
    fn logits_to_weights(&mut self) {
        let max = self
            .candidates
            .iter()
            .map(|c| c.weight)
            .fold(f64::NEG_INFINITY, f64::max);
        for c in &mut self.candidates {
            c.weight = (c.weight - max).exp();
        }
    }

    /// Keeps the most likely candidates whose mass reaches `top_p` of the total. Sorting the
    /// whole vocabulary every step is the expensive part of sampling, so this sorts a growing
    /// head of the list and stops as soon as that head holds enough mass.
    fn keep_top_p(&mut self, top_p: f64) {
        let total: f64 = self.candidates.iter().map(|c| c.weight).sum();
        let target = top_p * total;
        let n = self.candidates.len();
        let mut head = n.min(64);
        loop {
            if head < n {
                self.candidates
                    .select_nth_unstable_by(head - 1, by_weight_desc);
            }
            self.candidates[..head].sort_unstable_by(by_weight_desc);
            let mut cumulative = 0.0;
            for i in 0..head {
                cumulative += self.candidates[i].weight;
                if cumulative >= target {
                    self.candidates.truncate(i + 1);
                    return;
                }
            }
            if head == n {
                return;
            }
            head = (head * 4).min(n);
        }
    }

    fn draw(&mut self) -> u32 {
        let total: f64 = self.candidates.iter().map(|c| c.weight).sum();
        let mut remaining = self.rng.random::<f64>() * total;
        for c in &self.candidates {
            remaining -= c.weight;
            if remaining < 0.0 {
                return c.id;
            }
        }
        // Rounding can leave a sliver of mass after the last candidate.
        self.candidates.last().map_or(0, |c| c.id)
    }
}

fn by_weight_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.weight.total_cmp(&a.weight)
}

/// The index of the largest finite logit; ties go to the lowest index.
fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || l == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
}

fn no_valid_logit() -> EngineError {
    EngineError::Inference("the model produced no finite logit (NaN or -inf everywhere)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed seed, so the statistical tests below draw the same numbers on every run.
    fn params(temperature: f32) -> GenerationParams {
        GenerationParams {
            temperature,
            top_k: None,
            top_p: None,
            min_p: None,
            seed: 299_792_458,
            ..GenerationParams::default()
        }
    }

    /// Logits with a clear but not overwhelming winner at index 3.
    fn logits() -> Vec<f32> {
        vec![1.0, 0.5, 2.0, 3.0, -1.0, 2.5, 0.0, 1.5]
    }

    fn draws(p: &GenerationParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p);
        (0..n)
            .map(|_| s.sample(&mut logits(), &[]).unwrap())
            .collect()
    }

    #[test]
    fn greedy_picks_the_argmax() {
        assert_eq!(draws(&params(0.0), 5), vec![3; 5]);
    }

    #[test]
    fn argmax_skips_nan_and_reports_all_invalid() {
        let mut s = Sampler::new(&params(0.0));
        assert_eq!(s.sample(&mut [f32::NAN, 1.0, f32::NAN], &[]).unwrap(), 1);
        assert!(s.sample(&mut [f32::NAN, f32::NEG_INFINITY], &[]).is_err());
        let mut s = Sampler::new(&params(1.0));
        assert!(s.sample(&mut [f32::NAN, f32::NAN], &[]).is_err());
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = GenerationParams {
            top_k: Some(1),
            ..params(5.0)
        };
        assert_eq!(draws(&p, 50), vec![3; 50]);
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let p = GenerationParams {
            top_p: Some(1e-6),
            ..params(5.0)
        };
        assert_eq!(draws(&p, 50), vec![3; 50]);
    }

    #[test]
    fn top_k_restricts_to_the_k_best() {
        let p = GenerationParams {
            top_k: Some(2),
            ..params(100.0)
        };
        let out = draws(&p, 200);
        assert!(out.iter().all(|&t| t == 3 || t == 5), "{out:?}");
        assert!(out.contains(&3) && out.contains(&5));
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_head() {
        // Probabilities 0.5, 0.3, 0.2 (logits are their logs): top_p 0.7 keeps the first two.
        let base = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let p = GenerationParams {
            top_p: Some(0.7),
            ..params(1.0)
        };
        let mut s = Sampler::new(&p);
        let out: Vec<u32> = (0..300)
            .map(|_| s.sample(&mut base.clone(), &[]).unwrap())
            .collect();
        assert!(out.iter().all(|&t| t < 2), "{out:?}");
        assert!(out.contains(&0) && out.contains(&1));
    }

    #[test]
    fn top_p_over_a_large_flat_vocabulary_grows_its_head() {
        // 1000 equal tokens: half the mass needs 500 of them, well past the first head of 64.
        let p = GenerationParams {
            top_p: Some(0.5),
            ..params(1.0)
        };
        let mut s = Sampler::new(&p);
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            seen.insert(s.sample(&mut vec![0.0; 1000], &[]).unwrap());
        }
        assert!(
            seen.len() > 64 && seen.len() <= 500,
            "{} distinct tokens",
            seen.len()
        );
    }

    #[test]
    fn min_p_filters_unlikely_tokens() {
        // Relative to the best (index 0), index 1 has weight e^-1 ≈ 0.37 and index 2 e^-5.
        let base = [5.0f32, 4.0, 0.0];
        let p = GenerationParams {
            min_p: Some(0.1),
            ..params(1.0)
        };
        let mut s = Sampler::new(&p);
        let out: Vec<u32> = (0..500)
            .map(|_| s.sample(&mut base.clone(), &[]).unwrap())
            .collect();
        assert!(!out.contains(&2));
        assert!(out.contains(&0) && out.contains(&1));
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let a = GenerationParams {
            seed: 7,
            ..params(1.0)
        };
        let b = GenerationParams {
            seed: 8,
            ..params(1.0)
        };
        assert_eq!(draws(&a, 100), draws(&a, 100));
        assert_ne!(draws(&a, 100), draws(&b, 100));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 0.75 / 0.25.
        let base = [0.75f32.ln(), 0.25f32.ln()];
        let mut s = Sampler::new(&params(1.0));
        let n = 4000;
        let zeros = (0..n)
            .filter(|_| s.sample(&mut base.clone(), &[]).unwrap() == 0)
            .count();
        let share = zeros as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.04, "share of token 0: {share}");
    }

    #[test]
    fn repeat_penalty_lowers_recent_tokens() {
        let p = GenerationParams {
            repeat_penalty: 2.0,
            repeat_last_n: 2,
            ..params(0.0)
        };
        let mut s = Sampler::new(&p);
        let mut l = vec![3.0, 2.0, -1.0, 1.0];
        // Token 0 is outside the window of the last 2 tokens; 2 and 1 are inside.
        let next = s.sample(&mut l, &[0, 2, 1]).unwrap();
        assert_eq!(l, vec![3.0, 1.0, -2.0, 1.0]);
        assert_eq!(next, 0);
        // Now the winner itself is penalized and loses.
        let mut l = vec![3.0, 2.0];
        assert_eq!(s.sample(&mut l, &[0]).unwrap(), 1);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens() {
        let p = GenerationParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..params(0.0)
        };
        let mut s = Sampler::new(&p);
        s.accept(0);
        s.accept(0);
        s.accept(1);
        let mut l = vec![2.0, 2.0, 1.5];
        let next = s.sample(&mut l, &[]).unwrap();
        // 0: 2 - 0.5 - 0.5 = 1.0; 1: 2 - 0.5 - 0.25 = 1.25; 2 untouched.
        assert_eq!(l, vec![1.0, 1.25, 1.5]);
        assert_eq!(next, 2);
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_logits() {
        let l = logits();
        let (chosen, top) = log_softmax_top(&l, 3, 3);
        let total: f64 = (0..l.len() as u32)
            .map(|id| f64::from(log_softmax_top(&l, id, 0).0).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "probabilities sum to {total}");
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![3, 5, 2]);
        assert_eq!(top[0].1, chosen);
        // Differences of log-probabilities are differences of logits.
        assert!((top[0].1 - top[1].1 - 0.5).abs() < 1e-6);
        let (minus_inf, top) = log_softmax_top(&[0.0, f32::NEG_INFINITY, f32::NAN], 1, 5);
        assert_eq!(minus_inf, LOGPROB_FLOOR);
        assert_eq!(top, vec![(0, 0.0)]);
    }

    #[test]
    fn out_of_range_history_ids_are_ignored() {
        let p = GenerationParams {
            repeat_penalty: 1.5,
            ..params(0.0)
        };
        let mut s = Sampler::new(&p);
        s.accept(999);
        assert_eq!(s.sample(&mut logits(), &[999, 1000]).unwrap(), 3);
    }
}
