//! One generation in progress: its prompt and tokens so far, sampler, detokenizer and stop
//! matcher, and whether it waits for input or has logits to sample from. The engine feeds
//! several of them in one forward pass ([`Engine::step`]) and samples each on its own
//! ([`Engine::advance`]), so sequences can join and leave a running batch between steps.
//!
//! [`Engine::step`]: crate::Engine::step
//! [`Engine::advance`]: crate::Engine::advance

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::EngineError;
use crate::constraint::Constraint;
use crate::engine::{Completion, FinishReason, GeneratedToken};
use crate::params::PreparedRequest;
use crate::sampling::{Logprob, Sampler, TokenLogprobs, log_softmax_top};
use crate::stop::{Release, StopMatcher};
use crate::tokenizer::{IncrementalDecoder, TextTokenizer, TokenizerError};

/// A generation started with [`Engine::begin`](crate::Engine::begin).
pub struct Sequence {
    pub(crate) slot: usize,
    /// Which of the slot's sequences this is (see `Engine::begin`).
    pub(crate) epoch: u64,
    prompt_len: usize,
    max_tokens: usize,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// How many of the most likely tokens each step reports, when log-probabilities are asked
    /// for; the tokenizer names them.
    logprobs: Option<(usize, TextTokenizer)>,
    /// The response format's constraint, advanced with every sampled token.
    constraint: Option<Constraint>,
    /// The prompt, then every sampled token.
    context: Vec<u32>,
    /// Tokens of `context` already in the model's cache.
    pub(crate) fed: usize,
    /// Prompt tokens the slot held before the sequence began (not evaluated).
    cached: usize,
    /// Logits of the last fed position, while they wait to be sampled.
    logits: Option<Vec<f32>>,
    /// Tokens sampled so far.
    sampled: usize,
    text: String,
    started: Instant,
    prefill_time: Duration,
    finished: bool,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("slot", &self.slot)
            .field("prompt_len", &self.prompt_len)
            .field("fed", &self.fed)
            .field("sampled", &self.sampled)
            .field("finished", &self.finished)
            .finish()
    }
}

impl Sequence {
    pub(crate) fn new(
        slot: usize,
        epoch: u64,
        req: &PreparedRequest,
        tokenizer: &TextTokenizer,
        cached: usize,
    ) -> Self {
        let prompt_len = req.prompt_tokens.len();
        // Room for a typical completion up front; a budget as long as a huge context grows into it.
        let mut context = Vec::with_capacity(prompt_len + req.max_tokens.min(4096));
        context.extend_from_slice(&req.prompt_tokens);
        Sequence {
            slot,
            epoch,
            prompt_len,
            max_tokens: req.max_tokens,
            sampler: Sampler::new(&req.params),
            decoder: IncrementalDecoder::with_context(tokenizer.clone(), &req.prompt_tokens),
            stops: StopMatcher::new(&req.params.stop),
            logprobs: req.params.logprobs.map(|n| (n, tokenizer.clone())),
            constraint: req.constraint.clone(),
            context,
            fed: cached.min(prompt_len.saturating_sub(1)),
            cached: cached.min(prompt_len.saturating_sub(1)),
            logits: None,
            sampled: 0,
            text: String::new(),
            started: Instant::now(),
            prefill_time: Duration::ZERO,
            finished: false,
        }
    }

    /// The slot (KV cache) this sequence occupies.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Whether logits wait to be sampled by [`Engine::advance`](crate::Engine::advance); if
    /// not, the sequence waits to be fed by [`Engine::step`](crate::Engine::step).
    pub fn has_logits(&self) -> bool {
        self.logits.is_some()
    }

    /// Prompt tokens taken from the prompt cache rather than evaluated.
    pub fn cached_tokens(&self) -> usize {
        self.cached
    }

    /// The logits waiting to be sampled, for tests that compare them.
    #[doc(hidden)]
    pub fn pending_logits(&self) -> Option<&[f32]> {
        self.logits.as_deref()
    }

    /// Whether the prompt has been fed and the first token sampled.
    pub fn is_prefilled(&self) -> bool {
        self.sampled > 0
    }

    /// Whether [`Engine::advance`](crate::Engine::advance) has returned its completion.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The tokens the next step feeds: up to `chunk` of the prompt, or the last sampled token.
    pub(crate) fn next_input(&self, chunk: usize) -> &[u32] {
        let end = self.context.len().min(self.fed + chunk);
        &self.context[self.fed..end]
    }

    /// Records that `n` more tokens were fed; `logits` are those of the last one and are kept
    /// once the whole context is fed.
    pub(crate) fn fed_tokens(&mut self, n: usize, logits: &[f32]) {
        self.fed += n;
        if self.fed == self.context.len() {
            self.logits = Some(logits.to_vec());
        }
    }

    fn finish(&mut self, reason: FinishReason) -> Completion {
        self.finished = true;
        self.logits = None;
        if self.sampled == 0 {
            self.prefill_time = self.started.elapsed();
        }
        Completion {
            finish_reason: reason,
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached,
            completion_tokens: self.sampled,
            text: std::mem::take(&mut self.text),
            prefill_time: self.prefill_time,
            decode_time: self.started.elapsed().saturating_sub(self.prefill_time),
        }
    }

    /// Ends the sequence as cancelled, e.g. when its client went away between steps; its
    /// completion counts what was generated so far.
    pub fn cancel(&mut self) -> Completion {
        self.finish(FinishReason::Cancelled)
    }

    /// Samples a token from the waiting logits, releases its text through `on_token`, and
    /// either ends the sequence (its completion) or leaves the token to be fed next.
    pub(crate) fn advance(
        &mut self,
        eos_token_ids: &[u32],
        on_token: &mut dyn FnMut(GeneratedToken) -> ControlFlow<()>,
    ) -> Result<Option<Completion>, EngineError> {
        if self.finished {
            return Err(EngineError::Inference("the sequence has ended".into()));
        }
        let Some(mut logits) = self.logits.take() else {
            return Err(EngineError::Inference(
                "the sequence waits to be fed; there is nothing to sample".into(),
            ));
        };
        let index = self.sampled;
        if index >= self.max_tokens {
            return Ok(Some(self.finish(FinishReason::Length)));
        }
        let decode_err = |e: TokenizerError| EngineError::Tokenizer(e.to_string());
        // A response format masks the tokens it does not allow before anything else looks at the
        // logits, so log-probabilities describe the constrained distribution (as OpenAI's do):
        // a token the format rules out is never reported as an alternative.
        if let Some(constraint) = &mut self.constraint {
            constraint.mask_logits(&mut logits)?;
            if !logits.iter().any(|l| l.is_finite()) {
                return Err(EngineError::Inference(
                    "the response format allows no token of this model's vocabulary here".into(),
                ));
            }
        }
        // The sampler changes the logits in place; log-probabilities describe them unchanged.
        let raw = self.logprobs.as_ref().map(|_| logits.clone());
        let token = self.sampler.sample(&mut logits, &self.context)?;
        if index == 0 {
            self.prefill_time = self.started.elapsed();
        }
        self.sampler.accept(token);
        // An end-of-sequence token is allowed only where the text is complete; it ends the
        // generation below and is not part of the text the constraint reads.
        let complete = match &mut self.constraint {
            Some(constraint) if !eos_token_ids.contains(&token) => {
                constraint.accept(token)?;
                constraint.is_finished()
            }
            _ => false,
        };
        self.context.push(token);
        self.sampled += 1;

        if eos_token_ids.contains(&token) {
            // Whatever was held back (a partial character or a stop-sequence prefix that never
            // completed) is final now; it rides on the EOS token, whose own text is not emitted.
            let rest = self
                .decoder
                .finish()
                .map_err(decode_err)?
                .unwrap_or_default();
            let tail = match self.stops.push(&rest) {
                Release::Text(t) => t + &self.stops.flush(),
                Release::Stopped(t) => t,
            };
            if !tail.is_empty() {
                self.text.push_str(&tail);
                let _ = on_token(GeneratedToken {
                    token_id: token,
                    index,
                    text: tail,
                    logprobs: None,
                });
            }
            return Ok(Some(self.finish(FinishReason::Stop)));
        }

        let last = index + 1 == self.max_tokens;
        // The text ends here: the budget is spent, or the response format is complete.
        let ends = last || complete;
        let mut piece = self
            .decoder
            .push(token)
            .map_err(decode_err)?
            .unwrap_or_default();
        if ends {
            piece.push_str(
                &self
                    .decoder
                    .finish()
                    .map_err(decode_err)?
                    .unwrap_or_default(),
            );
        }
        let (mut released, stopped) = match self.stops.push(&piece) {
            Release::Text(t) => (t, false),
            Release::Stopped(t) => (t, true),
        };
        if ends && !stopped {
            released.push_str(&self.stops.flush());
        }
        self.text.push_str(&released);
        let logprobs = match (&self.logprobs, raw) {
            (Some((n, tokenizer)), Some(raw)) => Some(token_logprobs(tokenizer, &raw, token, *n)?),
            _ => None,
        };
        let flow = on_token(GeneratedToken {
            token_id: token,
            index,
            text: released,
            logprobs,
        });
        if stopped || complete {
            return Ok(Some(self.finish(FinishReason::Stop)));
        }
        if flow.is_break() {
            return Ok(Some(self.finish(FinishReason::Cancelled)));
        }
        if last {
            return Ok(Some(self.finish(FinishReason::Length)));
        }
        Ok(None)
    }
}

/// The log-probabilities of `token` and the `n` most likely tokens under `logits`, named.
fn token_logprobs(
    tokenizer: &TextTokenizer,
    logits: &[f32],
    token: u32,
    n: usize,
) -> Result<TokenLogprobs, EngineError> {
    let (logprob, top) = log_softmax_top(logits, token, n);
    let named = |token_id: u32, logprob: f32| -> Result<Logprob, EngineError> {
        let text = tokenizer
            .decode(&[token_id], false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let bytes = tokenizer
            .token_bytes(token_id)
            .map_or_else(|| text.as_bytes().to_vec(), <[u8]>::to_vec);
        Ok(Logprob {
            token_id,
            text,
            bytes,
            logprob,
        })
    };
    Ok(TokenLogprobs {
        token: named(token, logprob)?,
        top: top
            .into_iter()
            .map(|(id, lp)| named(id, lp))
            .collect::<Result<_, _>>()?,
    })
}
