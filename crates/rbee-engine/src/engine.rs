use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;

use crate::chat::{ChatError, ChatTemplate};
use crate::cpu::SeqTokens;
use crate::model::{self, CausalLm, ModelInfo};
use crate::params::{GenerationParams, PreparedRequest, Prompt};
use crate::prompt_cache::{PromptCache, PromptCacheOptions};
use crate::prompter::Prompter;
use crate::sampling::TokenLogprobs;
use crate::sequence::Sequence;
use crate::tokenizer::TextTokenizer;
use crate::{DeviceSpec, EngineError};

/// Longest slice of prompt fed to the model in one forward pass. Bounds a step's activations
/// (chunk × layer width) without costing throughput; the attention scores a step holds do not
/// grow with it (a few rows of context per head and sequence).
const PREFILL_CHUNK: usize = 512;

/// Longest slice of prompt fed in a step that other sequences share: long enough to keep the
/// four-token kernels busy, short enough that the others' next tokens are not held up long.
/// Every step also stays within [`PREFILL_CHUNK`] tokens in all.
const SHARED_PREFILL_CHUNK: usize = 64;

/// What to load and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// A `.gguf` file, or a safetensors llama checkpoint in hub layout given as its directory
    /// or as its `config.json`.
    pub model_path: PathBuf,
    pub device: DeviceSpec,
    /// Sequences to run at once (continuous batching), at least 1, each with its own KV cache,
    /// on either forward path (the engine's CPU path, or candle's path on any device).
    pub slots: usize,
    /// Positions a prompt plus its completion may occupy, in each slot; `None` takes the
    /// context the model was trained for. More than that is allowed, with a warning, as
    /// llama.cpp allows it: the engine's CPU path computes RoPE for any position, though the
    /// model's answers past its trained context may degrade. Where the code that runs the model
    /// has a fixed limit (candle's llama: 4,096 positions; candle's qwen2 and safetensors llama:
    /// the trained context), the context is capped there, also with a warning. The result is
    /// [`ModelInfo::context_length`].
    pub context_length: Option<usize>,
}

/// One step of model loading, for progress displays.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadProgress {
    /// 0 to 1, never decreasing.
    pub fraction: f32,
    pub message: String,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub token_id: u32,
    /// 0-based position among the generated tokens.
    pub index: usize,
    /// Text this token releases. Empty while the token ends inside a multi-byte character or
    /// inside what may become a stop sequence; such text arrives with a later token.
    pub text: String,
    /// The token's log-probability and the most likely alternatives, when the request asked
    /// for them ([`GenerationParams::logprobs`]). A token whose text is held back has them all
    /// the same. The end-of-sequence token that ends a generation has none: like OpenAI's API,
    /// rbee reports the tokens of the answer, not its end marker.
    pub logprobs: Option<TokenLogprobs>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The token callback asked to stop.
    Cancelled,
}

/// The outcome of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens not evaluated because the slot already held their keys and values (the
    /// prompt cache); always below `prompt_tokens`.
    pub cached_tokens: usize,
    /// Tokens sampled, counting a final end-of-sequence token.
    pub completion_tokens: usize,
    /// Everything released through [`GeneratedToken::text`], concatenated.
    pub text: String,
    /// Time to process the prompt and sample the first token.
    pub prefill_time: Duration,
    /// Time spent producing the tokens after the first.
    pub decode_time: Duration,
}

/// A loaded model with its tokenizer and chat template, ready to generate.
///
/// All methods block; a server runs the engine on a thread of its own. `generate` runs one
/// generation to its end; `begin`, `step` and `advance` run several side by side, one per slot.
pub struct Engine {
    model: Box<dyn CausalLm>,
    device: Device,
    info: ModelInfo,
    tokenizer: TextTokenizer,
    prompter: Prompter,
    slots: usize,
    /// How many sequences each slot has been given: a [`Sequence`] of an older one is stale.
    slot_epochs: Vec<u64>,
    /// What each slot's KV cache holds, and the store of recent prefixes.
    cache: PromptCache,
}

// The worker moves the engine onto a thread of its own.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Engine>();
};

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("info", &self.info)
            .field("device", &self.device)
            .finish()
    }
}

impl Engine {
    /// Loads the model at `opts.model_path` onto `opts.device`, reporting progress as it goes.
    pub fn load(
        opts: &LoadOptions,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Engine, EngineError> {
        let device = opts.device.open()?;
        let mut loaded = model::load(&opts.model_path, &device, opts.context_length, progress)?;
        let slots = loaded.model.hold_sequences(opts.slots.max(1));
        let prompter = Prompter::new(
            loaded.tokenizer.clone(),
            chat_template(&loaded.tokenizer),
            loaded.info.context_length,
            loaded.info.vocab_size,
        );
        tracing::info!(
            name = %loaded.info.name,
            architecture = %loaded.info.architecture,
            dtype = loaded.info.format.dtype(),
            context_length = loaded.info.context_length,
            device = %opts.device,
            slots,
            "model loaded"
        );
        Ok(Engine {
            model: loaded.model,
            device,
            info: loaded.info,
            tokenizer: loaded.tokenizer,
            prompter,
            slots,
            slot_epochs: vec![0; slots],
            cache: PromptCache::new(slots),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Validates `params`, renders and tokenizes the prompt, and resolves the token budget.
    pub fn prepare(
        &self,
        prompt: Prompt,
        params: GenerationParams,
    ) -> Result<PreparedRequest, EngineError> {
        self.prompter.prepare(prompt, params)
    }

    /// A handle that prepares requests without the engine, so that a server can tokenize on
    /// its request threads while the engine's own thread generates.
    pub fn prompter(&self) -> Prompter {
        self.prompter.clone()
    }

    /// How many sequences this engine runs at once: the `slots` it was loaded with.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Sets how the prompt cache behaves (by default slots reuse what they hold, with no store).
    /// The engine's CPU path reuses prefixes; a model on candle's path evaluates every prompt
    /// whole and reports no cached tokens.
    pub fn set_prompt_cache(&mut self, options: PromptCacheOptions) {
        self.cache.set_options(options);
    }

    pub fn prompt_cache(&self) -> PromptCacheOptions {
        self.cache.options()
    }

    /// Bytes the prompt cache's store of recent prefixes holds now (at most
    /// [`PromptCacheOptions::store_bytes`]).
    pub fn prompt_cache_store_bytes(&self) -> usize {
        self.cache.store_used()
    }

    /// Of the `free` slots, the one a request for `req` should take: the one holding the
    /// longest prefix of its prompt, else the one least recently taken. `None` when `free`
    /// names no slot of this engine.
    pub fn choose_slot(&self, free: &[usize], req: &PreparedRequest) -> Option<usize> {
        self.cache.choose_slot(free, &req.prompt_tokens)
    }

    /// Routing keys (see [`begin_with_routing_keys`](Self::begin_with_routing_keys)) of the
    /// requests whose prefixes the slots and the prompt cache's store hold, most recently used
    /// first, without repeats, at most [`MAX_ROUTING_KEYS`](crate::MAX_ROUTING_KEYS).
    pub fn routing_keys_held(&self) -> Vec<u64> {
        self.cache.routing_keys()
    }

    /// Adds `key` to the routing keys of what `slot` holds, for
    /// [`routing_keys_held`](Self::routing_keys_held): a chat server adds the key of the answer
    /// a sequence generated (its tokens stay in the slot), which the conversation's next turn
    /// sends back. Nothing is added for a slot that holds no tokens (the model runs on
    /// candle's path, or the slot's last step failed).
    pub fn add_routing_key(&mut self, slot: usize, key: u64) {
        self.cache.add_key(slot, key);
    }

    /// Runs one generation in slot 0. `on_token` sees every token with the text it releases
    /// and can end the generation at once by returning `Break` (the result is then
    /// `Cancelled`).
    pub fn generate(
        &mut self,
        req: &PreparedRequest,
        on_token: &mut dyn FnMut(GeneratedToken) -> ControlFlow<()>,
    ) -> Result<Completion, EngineError> {
        let mut seq = self.begin(0, req)?;
        loop {
            self.step(&mut [&mut seq])?;
            if seq.has_logits()
                && let Some(completion) = self.advance(&mut seq, on_token)?
            {
                return Ok(completion);
            }
        }
    }

    /// Starts a generation in `slot` (below [`slots`](Self::slots)). Nothing is computed yet:
    /// [`step`](Self::step) feeds its prompt, then [`advance`](Self::advance) samples each
    /// token. The slot's earlier sequence, if any, is forgotten: stepping it again is an error.
    ///
    /// The prefix of the prompt that the slot's KV cache already holds, or that the prompt
    /// cache's store holds (copied into the slot), is not fed again; see
    /// [`Completion::cached_tokens`].
    pub fn begin(&mut self, slot: usize, req: &PreparedRequest) -> Result<Sequence, EngineError> {
        self.begin_with_routing_keys(slot, req, &[])
    }

    /// [`begin`](Self::begin), recording `keys` (hashes a router computes over the request's
    /// messages) with what the slot will hold, for [`routing_keys_held`](Self::routing_keys_held).
    pub fn begin_with_routing_keys(
        &mut self,
        slot: usize,
        req: &PreparedRequest,
        keys: &[u64],
    ) -> Result<Sequence, EngineError> {
        let Some(epoch) = self.slot_epochs.get(slot) else {
            return Err(EngineError::Inference(format!(
                "slot {slot} is beyond the {} this engine runs",
                self.slots
            )));
        };
        if req.prompt_tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let epoch = epoch + 1;
        let reuse = self
            .cache
            .take(slot, &req.prompt_tokens, keys, self.model.prefix_cache())?;
        if reuse.cached > 0 {
            tracing::debug!(
                slot,
                cached_tokens = reuse.cached,
                from_store = reuse.from_store,
                prompt_tokens = req.prompt_tokens.len(),
                "prompt prefix reused"
            );
        }
        // The slot's cache may have changed: an earlier sequence of the slot is stale now.
        self.slot_epochs[slot] = epoch;
        Ok(Sequence::new(
            slot,
            epoch,
            req,
            &self.tokenizer,
            reuse.cached,
        ))
    }

    /// Feeds every sequence that waits for input in one forward pass: the token
    /// [`advance`](Self::advance) chose last, or the next chunk of a prompt not yet fed.
    /// Sequences that have logits waiting are skipped. A step feeds at most 512 tokens: every
    /// waiting next token first, then prompt chunks of at most 64 tokens each while other
    /// sequences share the step (512 for a sequence alone), in order, as far as the budget
    /// goes; a prompt left out continues in the next step. So a long prompt delays the others'
    /// next tokens by little, and a step's working memory grows with the slots only by a few rows
    /// of attention scores per head and sequence.
    pub fn step(&mut self, seqs: &mut [&mut Sequence]) -> Result<(), EngineError> {
        if let Some(stale) = seqs
            .iter()
            .find(|s| self.slot_epochs.get(s.slot) != Some(&s.epoch))
        {
            return Err(EngineError::Inference(format!(
                "a sequence of slot {} was replaced by a later one",
                stale.slot
            )));
        }
        let waiting: Vec<usize> = (0..seqs.len())
            .filter(|&i| !seqs[i].has_logits() && !seqs[i].is_finished())
            .collect();
        let chunk = if waiting.len() == 1 {
            PREFILL_CHUNK
        } else {
            SHARED_PREFILL_CHUNK
        };
        // Decoding sequences first, then prompts, within the step's budget.
        let (decoding, prompting): (Vec<usize>, Vec<usize>) =
            waiting.into_iter().partition(|&i| seqs[i].is_prefilled());
        let mut budget = PREFILL_CHUNK;
        let mut feeding = Vec::with_capacity(decoding.len() + prompting.len());
        let mut inputs: Vec<(usize, Vec<u32>, usize)> = Vec::with_capacity(feeding.capacity());
        for i in decoding.into_iter().chain(prompting) {
            let take = chunk.min(budget);
            if take == 0 {
                break;
            }
            let seq = &seqs[i];
            let tokens = seq.next_input(take).to_vec();
            budget -= tokens.len();
            inputs.push((seq.slot, tokens, seq.fed));
            feeding.push(i);
        }
        if inputs.is_empty() {
            return Ok(());
        }
        let logits = self.forward_many(&inputs)?;
        let vocab = logits.len() / inputs.len();
        for ((&i, (_, tokens, _)), logits) in
            feeding.iter().zip(&inputs).zip(logits.chunks_exact(vocab))
        {
            seqs[i].fed_tokens(tokens.len(), logits);
        }
        Ok(())
    }

    /// Samples the next token of a sequence whose logits are waiting (see
    /// [`Sequence::has_logits`]) and hands it to `on_token`; returns the completion when the
    /// sequence has ended.
    pub fn advance(
        &self,
        seq: &mut Sequence,
        on_token: &mut dyn FnMut(GeneratedToken) -> ControlFlow<()>,
    ) -> Result<Option<Completion>, EngineError> {
        seq.advance(&self.info.eos_token_ids, on_token)
    }

    /// Feeds `tokens` to slot 0 at positions from `pos` and returns the last one's logits,
    /// without sampling, so the reference tests can feed llama.cpp's tokens and compare
    /// logits. Slot 0's sequence, if any, is forgotten.
    #[doc(hidden)]
    pub fn logits_for_test(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        self.slot_epochs[0] += 1;
        self.forward_many(&[(0, tokens.to_vec(), pos)])
    }

    /// One forward pass over `(slot, tokens, pos)` entries; the last logits of each entry,
    /// `[entry][vocab]`.
    fn forward_many(
        &mut self,
        inputs: &[(usize, Vec<u32>, usize)],
    ) -> Result<Vec<f32>, EngineError> {
        let logits = self.forward_uncached(inputs);
        // A model on candle's path keeps no prompt cache, so it reuses nothing: recording its
        // tokens would advertise (to routing) a cache it does not use.
        if self.model.prefix_cache().is_none() {
            return logits;
        }
        for (slot, tokens, pos) in inputs {
            match &logits {
                Ok(_) => self.cache.fed(*slot, tokens, *pos),
                Err(_) => self.cache.forget_from(*slot, *pos),
            }
        }
        logits
    }

    /// [`forward_many`](Self::forward_many) without recording what the slots hold.
    fn forward_uncached(
        &mut self,
        inputs: &[(usize, Vec<u32>, usize)],
    ) -> Result<Vec<f32>, EngineError> {
        let entries: Vec<SeqTokens<'_>> = inputs
            .iter()
            .map(|(slot, tokens, pos)| SeqTokens {
                seq: *slot,
                tokens,
                pos: *pos,
            })
            .collect();
        self.model.feed(&entries)
    }
}

/// The model's own template, or ChatML when it has none. A template that does not compile is
/// kept as the error every chat request answers with; raw prompts still work.
fn chat_template(tokenizer: &TextTokenizer) -> Result<ChatTemplate, ChatError> {
    let template = ChatTemplate::for_tokenizer(tokenizer);
    if let Err(e) = &template {
        tracing::warn!(error = %e, "chat requests will fail: the model's chat template does not compile");
    }
    template
}
