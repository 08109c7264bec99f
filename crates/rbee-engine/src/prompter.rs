//! Turning a request into model input: chat rendering, tokenization, context checks.

use std::sync::Arc;

use crate::EngineError;
use crate::chat::{ChatError, ChatTemplate};
use crate::constraint::ConstraintEnv;
use crate::params::{GenerationParams, PreparedRequest, Prompt};
use crate::tokenizer::{TextTokenizer, TokenizerError};

/// Prepares requests for one loaded model. Cheap to clone, `Send + Sync`: it holds the
/// tokenizer and chat template but not the weights.
#[derive(Debug, Clone)]
pub struct Prompter {
    tokenizer: TextTokenizer,
    /// The model's chat template, or why it does not compile: then chat requests fail with
    /// that reason, while raw prompts still work.
    template: Arc<Result<ChatTemplate, ChatError>>,
    context_length: usize,
    vocab_size: usize,
    /// Compiles response formats; its token trie is built on first use and shared by clones.
    constraints: ConstraintEnv,
}

impl Prompter {
    pub(crate) fn new(
        tokenizer: TextTokenizer,
        template: Result<ChatTemplate, ChatError>,
        context_length: usize,
        vocab_size: usize,
    ) -> Self {
        Prompter {
            constraints: ConstraintEnv::new(tokenizer.clone(), vocab_size),
            tokenizer,
            template: Arc::new(template),
            context_length,
            vocab_size,
        }
    }

    /// Validates `params`, renders and tokenizes the prompt, resolves the token budget and
    /// compiles the response format, if any (the first format a model sees builds its token
    /// trie, which takes a moment: call this off an async reactor).
    pub fn prepare(
        &self,
        prompt: Prompt,
        params: GenerationParams,
    ) -> Result<PreparedRequest, EngineError> {
        params.validate()?;
        let tokens = self.tokenize(&prompt)?;
        let only_bos = tokens.len() == 1 && Some(tokens[0]) == self.tokenizer.bos_token_id();
        if tokens.is_empty() || only_bos {
            return Err(EngineError::EmptyPrompt);
        }
        let context_length = self.context_length;
        if tokens.len() >= context_length {
            return Err(EngineError::ContextLengthExceeded {
                prompt_tokens: tokens.len(),
                context_length,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab_size
            )));
        }
        let room = context_length - tokens.len();
        let max_tokens = params.max_tokens.map_or(room, |m| m.min(room));
        let constraint = params
            .response_format
            .as_ref()
            .map(|format| self.constraints.compile(format))
            .transpose()?;
        Ok(PreparedRequest {
            prompt_tokens: tokens,
            max_tokens,
            params,
            constraint,
        })
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let tokenizer_err = |e: TokenizerError| EngineError::Tokenizer(e.to_string());
        match prompt {
            Prompt::Text(text) => self.tokenizer.encode(text, true).map_err(tokenizer_err),
            Prompt::Chat(turns) | Prompt::ChatWithTools { turns, .. } => {
                let tools = match prompt {
                    Prompt::ChatWithTools { tools, .. } => tools.as_slice(),
                    _ => &[],
                };
                if turns.is_empty() {
                    return Err(EngineError::EmptyPrompt);
                }
                let template = self
                    .template
                    .as_ref()
                    .as_ref()
                    .map_err(|e| EngineError::Template(e.to_string()))?;
                // Control tokens come only from the template: the same text typed inside a
                // message is tokenized as text.
                let rendered = template
                    .render_tracking_with_tools(turns, tools, true, &|text| {
                        self.tokenizer.find_special_text(text)
                    })
                    .map_err(|e| EngineError::Template(e.to_string()))?;
                // Templates carry their special tokens; BOS is added only when the template
                // left it out but the model expects it.
                let mut tokens = self
                    .tokenizer
                    .encode_with_text_spans(&rendered.text, &rendered.typed_control_text)
                    .map_err(tokenizer_err)?;
                if self.tokenizer.add_bos()
                    && let Some(bos) = self.tokenizer.bos_token_id()
                    && tokens.first() != Some(&bos)
                {
                    tokens.insert(0, bos);
                }
                Ok(tokens)
            }
        }
    }
}
