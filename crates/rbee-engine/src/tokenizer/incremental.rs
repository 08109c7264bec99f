//! Streaming detokenization.
//!
//! Decoding one token at a time is wrong in two ways: a character may span several byte tokens,
//! and some decoders (SentencePiece's leading-space strip, byte-level merges) make a token's text
//! depend on its neighbours. So the decoder keeps a small window of ids: `prefix..read` was
//! already emitted, `read..` is pending. Each step decodes the window with and without the
//! pending ids and emits the difference, holding it back while it ends in U+FFFD (an incomplete
//! UTF-8 sequence).

use super::{TextTokenizer, TokenizerError};

/// Turns generated token ids into text pieces, never splitting a UTF-8 character. Special tokens
/// are left out of the text.
#[derive(Debug)]
pub struct IncrementalDecoder {
    tokenizer: TextTokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

/// How many prompt tokens [`IncrementalDecoder::with_context`] keeps: enough for the decoder to
/// see the first generated token in context, few enough to keep each step cheap.
const CONTEXT_TOKENS: usize = 5;

impl IncrementalDecoder {
    pub fn new(tokenizer: TextTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Starts after the last few `context` ids (typically the prompt), which are never emitted.
    /// With a SentencePiece vocabulary the first generated word then keeps its leading space,
    /// as it would in the middle of a text.
    pub fn with_context(tokenizer: TextTokenizer, context: &[u32]) -> Self {
        let context = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            tokenizer,
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Adds one id and returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        self.emit(false)
    }

    /// Returns whatever text is still held back (an unfinished character decodes as U+FFFD).
    /// The decoder can keep going afterwards.
    pub fn finish(&mut self) -> Result<Option<String>, TokenizerError> {
        self.emit(true)
    }

    fn emit(&mut self, flush: bool) -> Result<Option<String>, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let window = &self.ids[self.prefix_offset..];
        let emitted = self
            .tokenizer
            .decode(&window[..self.read_offset - self.prefix_offset], true)?;
        let text = self.tokenizer.decode(window, true)?;
        if !flush && text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new = match text.strip_prefix(emitted.as_str()) {
            Some(new) => new,
            // A decoder may rewrite earlier text once more tokens follow; fall back to the
            // length of what was emitted, as long as that is a character boundary.
            None => match text.get(emitted.len()..) {
                Some(new) => new,
                None => return Ok(None),
            },
        };
        if new.is_empty() {
            if flush {
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
            }
            return Ok(None);
        }
        let new = new.to_owned();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(new))
    }
}
