//! Tokenizing parts of a text as plain text: control-token text (`<|im_end|>`) inside them
//! becomes ordinary text tokens instead of the control token.
//!
//! Chat messages need this: the template's control tokens are real, a user's typed copy of
//! one is text. Hugging Face's tokenizer splits its input at special tokens before anything
//! else and tokenizes the pieces in between on their own; [`encode_with_text_spans`] keeps
//! exactly the splits that lie outside the text-only spans and tokenizes each piece between
//! them with special-token matching off. A text without such spans tokenizes as before.

use std::collections::HashSet;
use std::ops::Range;

use tokenizers::Tokenizer;

use super::TokenizerError;

/// The texts of a vocabulary's special (control) tokens, for finding them in a string the way
/// the tokenizer matches them: leftmost first, the longest at a position.
#[derive(Debug, Default)]
pub(super) struct SpecialTexts {
    texts: HashSet<String>,
    /// Distinct text lengths in bytes, longest first.
    lengths: Vec<usize>,
    /// Whether some special text starts with this byte.
    first_bytes: Vec<bool>,
}

impl SpecialTexts {
    pub(super) fn new(texts: impl IntoIterator<Item = String>) -> Self {
        let texts: HashSet<String> = texts.into_iter().filter(|t| !t.is_empty()).collect();
        let mut lengths: Vec<usize> = texts.iter().map(String::len).collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();
        let mut first_bytes = vec![false; 256];
        for text in &texts {
            first_bytes[usize::from(text.as_bytes()[0])] = true;
        }
        Self {
            texts,
            lengths,
            first_bytes,
        }
    }

    /// Byte ranges of special-token text in `text`.
    pub(super) fn find(&self, text: &str) -> Vec<Range<usize>> {
        let bytes = text.as_bytes();
        let mut found = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            // A first byte of a special text is never a UTF-8 continuation byte, so `at` is a
            // character boundary whenever this holds.
            if self.first_bytes[usize::from(bytes[at])]
                && let Some(len) = self.lengths.iter().copied().find(|&len| {
                    text.get(at..at + len)
                        .is_some_and(|candidate| self.texts.contains(candidate))
                })
            {
                found.push(at..at + len);
                at += len;
            } else {
                at += 1;
            }
        }
        found
    }
}

/// Ids for `text`, in which special tokens that overlap a range of `text_spans` are not
/// recognised: that text is tokenized as text. `tokenizer` matches special tokens, `literal`
/// is the same tokenizer with special-token matching off; `special_ids` are the special
/// tokens' ids.
pub(super) fn encode_with_text_spans(
    tokenizer: &Tokenizer,
    literal: &Tokenizer,
    special_ids: &HashSet<u32>,
    text: &str,
    text_spans: &[Range<usize>],
) -> Result<Vec<u32>, TokenizerError> {
    let encode_err = |e: tokenizers::Error| TokenizerError::Encode(e.to_string());
    // Byte offsets tell where the tokenizer split the text at special tokens.
    let encoding = tokenizer.encode(text, false).map_err(encode_err)?;
    let mut ids = Vec::with_capacity(encoding.len());
    let mut piece_start = 0;
    let literal_piece = |ids: &mut Vec<u32>, range: Range<usize>| -> Result<(), TokenizerError> {
        let piece = text.get(range).ok_or_else(|| {
            TokenizerError::Encode("a special token's offsets split a character".into())
        })?;
        if !piece.is_empty() {
            let encoding = literal.encode_fast(piece, false).map_err(encode_err)?;
            ids.extend_from_slice(encoding.get_ids());
        }
        Ok(())
    };
    for (&id, &(start, end)) in encoding.get_ids().iter().zip(encoding.get_offsets()) {
        let typed = text_spans
            .iter()
            .any(|span| start < span.end && span.start < end);
        if !special_ids.contains(&id) || typed || start < piece_start {
            continue;
        }
        literal_piece(&mut ids, piece_start..start)?;
        ids.push(id);
        piece_start = end;
    }
    literal_piece(&mut ids, piece_start..text.len())?;
    Ok(ids)
}
