use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// One event of a job stream, the same type at every hop.
///
/// Every job ends with exactly one terminal event, [`JobEvent::Done`] or [`JobEvent::Error`],
/// after which the stream sends `data: [DONE]` and closes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// Waiting for a free slot; `position` 1 is next.
    Queued {
        position: u32,
    },
    /// A human-readable progress line.
    Narration {
        message: String,
    },
    Downloading {
        model: String,
        bytes_done: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes_total: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes_per_second: Option<f64>,
    },
    Spawning {
        worker_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hive_id: Option<String>,
    },
    /// Model loading; `fraction` runs from 0.0 to 1.0.
    Loading {
        model: String,
        fraction: f32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Generation began; the prompt has this many tokens.
    Started {
        prompt_tokens: u32,
    },
    /// Text released by the token at `index` (0-based among generated tokens). `text` can be
    /// empty when the token ends inside a multi-byte character or a possible stop sequence.
    /// `logprobs` is present when the request asked for them (absent on the token that ends
    /// the generation, whose text is only what was held back).
    Token {
        text: String,
        token_id: u32,
        index: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logprobs: Option<TokenLogprobs>,
    },
    /// A structured result, e.g. a worker or model list.
    Data {
        data: serde_json::Value,
    },
    Done {
        finish_reason: FinishReason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl JobEvent {
    pub fn is_terminal(&self) -> bool {
        matches!(self, JobEvent::Done { .. } | JobEvent::Error { .. })
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        JobEvent::Error {
            code,
            message: message.into(),
        }
    }

    pub fn narration(message: impl Into<String>) -> Self {
        JobEvent::Narration {
            message: message.into(),
        }
    }
}

/// The log-probabilities at the step that sampled a token: the log-softmax of the model's
/// logits, before penalties, temperature and sampling filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenLogprobs {
    /// The sampled token's own text (decoded alone, special tokens kept), which is not
    /// necessarily what the event's `text` released.
    pub token: String,
    /// Natural log of its probability; -9999 stands for a probability of 0.
    pub logprob: f32,
    /// The token's own bytes (its vocabulary piece with the tokenizer's byte encoding
    /// undone). A token that holds part of a multi-byte character has bytes that are not
    /// UTF-8 alone, and `token` is then their lossy text; the bytes of consecutive tokens
    /// join into the character. Absent when the worker could not tell them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Vec<u8>>,
    /// The most likely tokens, most likely first, as many as the request's `logprobs`.
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TopLogprob {
    pub token_id: u32,
    pub token: String,
    /// The token's own bytes, as [`TokenLogprobs::bytes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Vec<u8>>,
    pub logprob: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The operation completed (non-generating jobs).
    Complete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// Prompt tokens the worker did not evaluate because its prompt cache held them (counted
    /// in `prompt_tokens` too). Absent from peers that do not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            cached_tokens: None,
        }
    }

    /// The same usage, reporting `cached_tokens` prompt tokens taken from the prompt cache.
    pub fn with_cached_tokens(self, cached_tokens: u32) -> Self {
        Usage {
            cached_tokens: Some(cached_tokens),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_logprobs_are_optional_on_the_wire() {
        let plain = r#"{"event":"token","text":"Hi","token_id":5,"index":0}"#;
        let event: JobEvent = serde_json::from_str(plain).unwrap();
        assert_eq!(serde_json::to_string(&event).unwrap(), plain);

        let with = JobEvent::Token {
            text: String::new(),
            token_id: 7,
            index: 1,
            logprobs: Some(TokenLogprobs {
                token: "\u{fffd}".into(),
                logprob: -0.5,
                bytes: Some(vec![0xE2]),
                top_logprobs: vec![TopLogprob {
                    token_id: 7,
                    token: "\u{fffd}".into(),
                    bytes: Some(vec![0xE2]),
                    logprob: -0.5,
                }],
            }),
        };
        let json = serde_json::to_value(&with).unwrap();
        assert_eq!(json["logprobs"]["bytes"], serde_json::json!([226]));
        assert_eq!(
            json["logprobs"]["top_logprobs"][0]["bytes"],
            serde_json::json!([226])
        );
        assert_eq!(json["logprobs"]["top_logprobs"][0]["token_id"], 7);
        assert_eq!(json["logprobs"]["logprob"], -0.5);
        assert_eq!(serde_json::from_value::<JobEvent>(json).unwrap(), with);
    }
}
