use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::chat::ChatTemplate;
use crate::model::{self, CausalLm, ModelInfo};
use crate::params::{GenerationParams, PreparedRequest, Prompt};
use crate::prompter::Prompter;
use crate::sampling::Sampler;
use crate::stop::{Release, StopMatcher};
use crate::tokenizer::{IncrementalDecoder, TextTokenizer, TokenizerError};
use crate::{DeviceSpec, EngineError};

/// Longest slice of prompt fed to the model in one forward pass. Bounds the attention scores
/// held at once (heads × chunk × context floats) without costing throughput.
const PREFILL_CHUNK: usize = 512;

/// What to load and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// A `.gguf` file, or a safetensors llama checkpoint in hub layout given as its directory
    /// or as its `config.json`.
    pub model_path: PathBuf,
    pub device: DeviceSpec,
}

/// One step of model loading, for progress displays.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadProgress {
    /// 0 to 1, never decreasing.
    pub fraction: f32,
    pub message: String,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedToken {
    pub token_id: u32,
    /// 0-based position among the generated tokens.
    pub index: usize,
    /// Text this token releases. Empty while the token ends inside a multi-byte character or
    /// inside what may become a stop sequence; such text arrives with a later token.
    pub text: String,
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
/// All methods block; a server runs the engine on a thread of its own. One generation runs at
/// a time (`generate` takes `&mut self`).
pub struct Engine {
    model: Box<dyn CausalLm>,
    device: Device,
    info: ModelInfo,
    tokenizer: TextTokenizer,
    prompter: Prompter,
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
        let loaded = model::load(&opts.model_path, &device, progress)?;
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
            "model loaded"
        );
        Ok(Engine {
            model: loaded.model,
            device,
            info: loaded.info,
            tokenizer: loaded.tokenizer,
            prompter,
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

    /// Runs one generation. `on_token` sees every token with the text it releases and can end
    /// the generation at once by returning `Break` (the result is then `Cancelled`).
    pub fn generate(
        &mut self,
        req: &PreparedRequest,
        on_token: &mut dyn FnMut(GeneratedToken) -> ControlFlow<()>,
    ) -> Result<Completion, EngineError> {
        let started = Instant::now();
        self.model.reset()?;
        let prompt_len = req.prompt_tokens.len();
        let mut sampler = Sampler::new(&req.params);
        let mut decoder =
            IncrementalDecoder::with_context(self.tokenizer.clone(), &req.prompt_tokens);
        let decode_err = |e: TokenizerError| EngineError::Tokenizer(e.to_string());
        let mut stops = StopMatcher::new(&req.params.stop);
        let mut context = Vec::with_capacity(prompt_len + req.max_tokens);
        context.extend_from_slice(&req.prompt_tokens);
        let mut text = String::new();
        let mut prefill_time = Duration::ZERO;

        let mut logits = self.prefill(&req.prompt_tokens)?;
        for index in 0..req.max_tokens {
            let token = sampler.sample(&mut logits, &context)?;
            if index == 0 {
                prefill_time = started.elapsed();
            }
            sampler.accept(token);
            context.push(token);
            let finish = |reason| Completion {
                finish_reason: reason,
                prompt_tokens: prompt_len,
                completion_tokens: index + 1,
                text: String::new(),
                prefill_time,
                decode_time: started.elapsed().saturating_sub(prefill_time),
            };

            if self.info.eos_token_ids.contains(&token) {
                // Whatever was held back (a partial character or a stop-sequence prefix that
                // never completed) is final now; it rides on the EOS token, whose own text is not
                // emitted.
                let rest = decoder.finish().map_err(decode_err)?.unwrap_or_default();
                let tail = match stops.push(&rest) {
                    Release::Text(t) => t + &stops.flush(),
                    Release::Stopped(t) => t,
                };
                if !tail.is_empty() {
                    text.push_str(&tail);
                    let _ = on_token(GeneratedToken {
                        token_id: token,
                        index,
                        text: tail,
                    });
                }
                return Ok(Completion {
                    text,
                    ..finish(FinishReason::Stop)
                });
            }

            let last = index + 1 == req.max_tokens;
            let mut piece = decoder.push(token).map_err(decode_err)?.unwrap_or_default();
            if last {
                piece.push_str(&decoder.finish().map_err(decode_err)?.unwrap_or_default());
            }
            let (mut released, stopped) = match stops.push(&piece) {
                Release::Text(t) => (t, false),
                Release::Stopped(t) => (t, true),
            };
            if last && !stopped {
                released.push_str(&stops.flush());
            }
            text.push_str(&released);
            let flow = on_token(GeneratedToken {
                token_id: token,
                index,
                text: released,
            });
            if stopped {
                return Ok(Completion {
                    text,
                    ..finish(FinishReason::Stop)
                });
            }
            if flow.is_break() {
                return Ok(Completion {
                    text,
                    ..finish(FinishReason::Cancelled)
                });
            }
            if last {
                return Ok(Completion {
                    text,
                    ..finish(FinishReason::Length)
                });
            }
            logits = self.forward(&[token], prompt_len + index)?;
        }
        // `prepare` guarantees max_tokens >= 1, so the loop always returns; a hand-built request
        // with zero tokens to generate ends here.
        Ok(Completion {
            finish_reason: FinishReason::Length,
            prompt_tokens: prompt_len,
            completion_tokens: 0,
            text,
            prefill_time: started.elapsed(),
            decode_time: Duration::ZERO,
        })
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut logits = None;
        for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            logits = Some(self.forward(chunk, i * PREFILL_CHUNK)?);
        }
        logits.ok_or(EngineError::EmptyPrompt)
    }

    /// Feeds `tokens` at positions starting from `pos`; returns the last position's logits.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, EngineError> {
        let model = &mut self.model;
        let device = &self.device;
        // On CPU, `with_context` runs the pass inside candle's own thread pool, which keeps its
        // workers warm between the many small parallel sections of a forward pass.
        device
            .with_context(|| {
                let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
                let logits = model.forward(&input, pos)?;
                logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()
            })
            .map_err(EngineError::inference)
    }
}

/// The model's own template, or ChatML when it has none or its template does not compile.
fn chat_template(tokenizer: &TextTokenizer) -> ChatTemplate {
    match ChatTemplate::for_tokenizer(tokenizer) {
        Ok(template) => template,
        Err(e) => {
            tracing::warn!(error = %e, "the model's chat template does not compile; using ChatML");
            ChatTemplate::chatml()
        }
    }
}
