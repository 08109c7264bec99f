use crate::EngineError;
use crate::chat::{ChatTool, ChatTurn};
use crate::constraint::{Constraint, OutputFormat};

/// What to continue: raw text, or a conversation rendered with the model's chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Tokenized as is; the model's BOS token is added when its tokenizer asks for one.
    Text(String),
    /// Rendered with the model's chat template (ChatML when it has none), ending with the
    /// prompt for the assistant's turn.
    Chat(Vec<ChatTurn>),
    /// A conversation offered functions to call: the template writes them into the prompt
    /// (see [`ChatTemplate`](crate::ChatTemplate) for templates without tool support).
    ChatWithTools {
        turns: Vec<ChatTurn>,
        tools: Vec<ChatTool>,
    },
}

/// How to pick tokens and when to stop.
///
/// The defaults follow llama-server: mild temperature with top-k, top-p and min-p filtering,
/// no penalties, and a seed drawn afresh from the operating system's entropy each time
/// `default()` is called, so two requests that leave it out sample differently (llama.cpp's
/// default seed means "random" too). A caller that wants reproducible text sets `seed`.
///
/// The limits a client must respect (temperature at most 2, sixteen stop sequences, ...) are
/// the wire contract's (`rbee_contract::validation`), applied before a request gets here;
/// [`GenerationParams::validate`] checks only that sampling is defined for the values.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Most tokens to generate; `None` means until the context is full.
    pub max_tokens: Option<usize>,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Keep only the k most likely tokens; `None` or 0 disables the filter.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probabilities sum to at least p; in (0, 1].
    pub top_p: Option<f32>,
    /// Drop tokens less likely than `min_p` times the most likely one; in [0, 1].
    pub min_p: Option<f32>,
    /// Divides positive (multiplies negative) logits of tokens seen in the last
    /// `repeat_last_n` tokens of prompt and output; 1 is off.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted from a generated token's logit once per previous occurrence.
    pub frequency_penalty: f32,
    /// Seeds the sampler's random number generator; with the same seed and parameters, the
    /// same prompt gives the same text. Greedy decoding draws nothing.
    pub seed: u64,
    /// Generation ends, with `Stop`, when the output contains any of these; the stop text itself
    /// is not returned.
    pub stop: Vec<String>,
    /// `Some(n)`: every generated token reports its log-probability and those of the `n` most
    /// likely tokens at its step (see [`TokenLogprobs`](crate::TokenLogprobs)). `None` computes
    /// nothing.
    pub logprobs: Option<usize>,
    /// `Some`: the generated text is constrained to this format while sampling (a token the
    /// format does not allow next is never chosen), and generation ends, with `Stop`, as soon as
    /// the text is complete. Compiled when the request is prepared: a schema that does not
    /// compile fails [`Prompter::prepare`](crate::Prompter::prepare).
    pub response_format: Option<OutputFormat>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_tokens: None,
            temperature: 0.8,
            top_k: Some(40),
            top_p: Some(0.95),
            min_p: Some(0.05),
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: rand::random(),
            stop: Vec::new(),
            logprobs: None,
            response_format: None,
        }
    }
}

impl GenerationParams {
    /// Deterministic decoding: always the most likely token.
    pub fn greedy() -> Self {
        GenerationParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            ..Self::default()
        }
    }

    /// Checks that sampling is defined for every value (a temperature that is a number and
    /// not negative, probabilities in range, a positive repeat penalty, finite penalties,
    /// stop sequences that are not empty); the message names the offending field. These are
    /// the domains of the sampler's arithmetic, not client limits: those are the wire
    /// contract's, which every request meets before it reaches the engine.
    pub fn validate(&self) -> Result<(), EngineError> {
        let invalid = |msg: String| Err(EngineError::InvalidParams(msg));
        if self.max_tokens == Some(0) {
            return invalid("max_tokens must be at least 1".into());
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return invalid(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return invalid(format!("top_p must be in (0, 1], got {p}"));
        }
        if let Some(p) = self.min_p
            && !(0.0..=1.0).contains(&p)
        {
            return invalid(format!("min_p must be in [0, 1], got {p}"));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return invalid(format!(
                "repeat_penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !value.is_finite() {
                return invalid(format!("{name} must be a finite number, got {value}"));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return invalid("stop sequences must not be empty".into());
        }
        Ok(())
    }
}

/// A request that has been tokenized and checked against the model: it cannot fail validation
/// later, and its token budget is resolved.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    pub(crate) prompt_tokens: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) params: GenerationParams,
    /// `params.response_format`, compiled.
    pub(crate) constraint: Option<Constraint>,
}

impl PreparedRequest {
    pub fn prompt_tokens(&self) -> &[u32] {
        &self.prompt_tokens
    }

    /// The number of tokens generation may produce: the requested `max_tokens`, capped by the
    /// room the prompt leaves in the context.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn params(&self) -> &GenerationParams {
        &self.params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_greedy_are_valid() {
        GenerationParams::default().validate().unwrap();
        GenerationParams::greedy().validate().unwrap();
    }

    #[test]
    fn each_default_draws_its_own_seed() {
        // Two draws of a 64-bit seed from the OS's entropy agree with probability 2^-64.
        assert_ne!(
            GenerationParams::default().seed,
            GenerationParams::default().seed
        );
        assert_ne!(
            GenerationParams::greedy().seed,
            GenerationParams::greedy().seed
        );
    }

    #[test]
    fn the_client_limits_are_not_the_engines() {
        // Values past the wire contract's limits but inside the sampler's domain: the
        // contract refuses them at the edge; the engine has no second copy of those limits.
        let beyond_the_contract = GenerationParams {
            temperature: 5.0,
            presence_penalty: 3.0,
            frequency_penalty: -3.0,
            stop: vec!["x".repeat(1000); 40],
            ..Default::default()
        };
        beyond_the_contract.validate().unwrap();
    }

    #[test]
    fn out_of_range_values_are_rejected_with_the_field_name() {
        let cases: Vec<(GenerationParams, &str)> = vec![
            (
                GenerationParams {
                    max_tokens: Some(0),
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                GenerationParams {
                    temperature: -0.1,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerationParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerationParams {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerationParams {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerationParams {
                    min_p: Some(-0.5),
                    ..Default::default()
                },
                "min_p",
            ),
            (
                GenerationParams {
                    repeat_penalty: 0.0,
                    ..Default::default()
                },
                "repeat_penalty",
            ),
            (
                GenerationParams {
                    presence_penalty: f32::INFINITY,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                GenerationParams {
                    frequency_penalty: f32::NAN,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                GenerationParams {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop",
            ),
        ];
        for (params, field) in cases {
            let err = params.validate().unwrap_err();
            assert!(matches!(err, EngineError::InvalidParams(_)));
            assert!(err.to_string().contains(field), "{err} should name {field}");
        }
    }
}
