use std::fmt;

/// Everything that can go wrong between loading a model and finishing a generation.
///
/// Messages are written for the person who sent the request or started the worker;
/// [`EngineError::kind`] gives callers a stable class to map onto their own error codes.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model files could not be read or do not form a usable checkpoint.
    #[error("cannot load model: {0}")]
    Load(String),
    /// The files are readable but describe a model family or format this engine does not run.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt_tokens} tokens but the model's context holds {context_length}; \
         shorten the prompt to leave room for at least one generated token"
    )]
    ContextLengthExceeded {
        prompt_tokens: usize,
        context_length: usize,
    },
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    /// The chat template could not render the conversation (often a role order it rejects).
    #[error("chat template error: {0}")]
    Template(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A failure inside the forward pass or sampling; not caused by the request.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The requested device is unknown, absent, or not compiled into this build.
    #[error("device error: {0}")]
    Device(String),
}

/// The class of an [`EngineError`], stable across message changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Load,
    UnsupportedModel,
    EmptyPrompt,
    ContextLengthExceeded,
    InvalidParams,
    Template,
    Tokenizer,
    Inference,
    Device,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Load => "load",
            ErrorKind::UnsupportedModel => "unsupported_model",
            ErrorKind::EmptyPrompt => "empty_prompt",
            ErrorKind::ContextLengthExceeded => "context_length_exceeded",
            ErrorKind::InvalidParams => "invalid_params",
            ErrorKind::Template => "template",
            ErrorKind::Tokenizer => "tokenizer",
            ErrorKind::Inference => "inference",
            ErrorKind::Device => "device",
        }
    }

    /// True when the request itself is at fault (the caller should answer "bad request"),
    /// false when the model, the machine or the engine is.
    pub fn is_client_error(self) -> bool {
        matches!(
            self,
            ErrorKind::EmptyPrompt
                | ErrorKind::ContextLengthExceeded
                | ErrorKind::InvalidParams
                | ErrorKind::Template
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EngineError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Load(_) => ErrorKind::Load,
            EngineError::UnsupportedModel(_) => ErrorKind::UnsupportedModel,
            EngineError::EmptyPrompt => ErrorKind::EmptyPrompt,
            EngineError::ContextLengthExceeded { .. } => ErrorKind::ContextLengthExceeded,
            EngineError::InvalidParams(_) => ErrorKind::InvalidParams,
            EngineError::Template(_) => ErrorKind::Template,
            EngineError::Tokenizer(_) => ErrorKind::Tokenizer,
            EngineError::Inference(_) => ErrorKind::Inference,
            EngineError::Device(_) => ErrorKind::Device,
        }
    }

    pub(crate) fn load(context: impl fmt::Display, err: impl fmt::Display) -> Self {
        EngineError::Load(format!("{context}: {}", without_backtrace(err.to_string())))
    }

    pub(crate) fn inference(err: candle_core::Error) -> Self {
        EngineError::Inference(without_backtrace(err.to_string()))
    }
}

/// candle appends a captured backtrace to its error messages when `RUST_BACKTRACE` is set;
/// messages are for the person who sent the request, so the backtrace goes.
fn without_backtrace(mut message: String) -> String {
    if let Some(at) = message.find("\n   0: ") {
        message.truncate(at);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_backtraces_are_cut_from_messages() {
        let err = candle_core::Error::Msg("bad magic".into());
        let with_bt = candle_core::Error::WithBacktrace {
            inner: Box::new(err),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let message = EngineError::load("model.gguf", with_bt).to_string();
        assert_eq!(message, "cannot load model: model.gguf: bad magic");
    }
}
