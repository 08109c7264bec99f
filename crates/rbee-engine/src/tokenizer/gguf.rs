//! Rebuilds a `tokenizers::Tokenizer` from the `tokenizer.ggml.*` metadata of a GGUF file, so
//! that a lone `.gguf` tokenizes exactly like the `tokenizer.json` it was converted from.

use candle_core::quantized::gguf_file::Content;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

use super::eog::Declared;
use super::gguf_meta::{Meta, missing};
use super::pretokenize::PreTokenization;
use super::{Spec, TokenizerError};

/// SentencePiece's visible space.
const SPIECE_SPACE: &str = "\u{2581}";

/// `tokenizer.ggml.token_type` values, as llama.cpp writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_code(code: i64) -> Self {
        match code {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }

    /// Tokens that must be matched verbatim in the input, before the model sees the text.
    fn is_added(self) -> bool {
        matches!(self, Self::Unknown | Self::Control | Self::UserDefined)
    }
}

pub(super) fn spec_from_gguf(content: &Content) -> Result<Spec, TokenizerError> {
    let meta = Meta(&content.metadata);
    let model = meta
        .string("tokenizer.ggml.model")?
        .ok_or_else(|| missing("tokenizer.ggml.model"))?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
    if tokens.is_empty() {
        return Err(TokenizerError::Metadata(
            "`tokenizer.ggml.tokens` is empty".into(),
        ));
    }
    let types: Vec<TokenType> = match meta.ints("tokenizer.ggml.token_type")? {
        Some(codes) if codes.len() == tokens.len() => {
            codes.into_iter().map(TokenType::from_code).collect()
        }
        Some(codes) => {
            return Err(TokenizerError::Metadata(format!(
                "`tokenizer.ggml.token_type` has {} entries for {} tokens",
                codes.len(),
                tokens.len()
            )));
        }
        None => vec![TokenType::Normal; tokens.len()],
    };

    let (mut inner, add_bos_default) = match model {
        "gpt2" => byte_level_bpe(&meta, &tokens)?,
        "llama" => (sentencepiece_bpe(&meta, &tokens, &types)?, true),
        other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
    };

    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, kind)| kind.is_added())
        .map(|(text, kind)| {
            AddedToken::from(*text, *kind != TokenType::UserDefined).normalized(false)
        })
        .collect();
    inner.add_special_tokens(&added);

    let token_id = |key: &str| -> Result<Option<u32>, TokenizerError> {
        let id = meta.u32(key)?;
        Ok(id.filter(|&id| {
            let known = (id as usize) < tokens.len();
            if !known {
                tracing::warn!(key, id, "GGUF names a token id outside the vocabulary");
            }
            known
        }))
    };
    let fallback_id = |text: &str| tokens.iter().position(|t| *t == text).map(|i| i as u32);
    let (bos_id, eos_id) = if model == "llama" {
        (
            token_id("tokenizer.ggml.bos_token_id")?.or_else(|| fallback_id("<s>")),
            token_id("tokenizer.ggml.eos_token_id")?.or_else(|| fallback_id("</s>")),
        )
    } else {
        (
            token_id("tokenizer.ggml.bos_token_id")?,
            token_id("tokenizer.ggml.eos_token_id")?.or_else(|| fallback_id("<|endoftext|>")),
        )
    };

    let mut declared_ends = Declared {
        eot: token_id("tokenizer.ggml.eot_token_id")?,
        eom: token_id("tokenizer.ggml.eom_token_id")?,
        fim_pad: token_id("tokenizer.ggml.fim_pad_token_id")?,
        fim_rep: token_id("tokenizer.ggml.fim_rep_token_id")?,
        fim_sep: token_id("tokenizer.ggml.fim_sep_token_id")?,
        others: Vec::new(),
    };
    if let Some(ids) = meta.ints("tokenizer.ggml.eos_token_ids")? {
        declared_ends.others.extend(
            ids.into_iter()
                .filter(|&id| id >= 0 && (id as usize) < tokens.len())
                .map(|id| id as u32),
        );
    }

    Ok(Spec {
        inner,
        vocab_size: tokens.len(),
        bos_id,
        eos_id,
        declared_ends,
        add_bos: meta
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(add_bos_default),
        add_eos: meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        chat_template: meta.string("tokenizer.chat_template")?.map(str::to_owned),
    })
}

/// A `gpt2` vocabulary: byte-level BPE with explicit merges. Returns whether BOS is added by
/// default for this pre-tokenizer family.
fn byte_level_bpe(meta: &Meta<'_>, tokens: &[&str]) -> Result<(Tokenizer, bool), TokenizerError> {
    let vocab = vocabulary(tokens);
    let merge_lines = meta
        .strings("tokenizer.ggml.merges")?
        .ok_or_else(|| missing("tokenizer.ggml.merges"))?;
    let mut merges: Merges = Vec::with_capacity(merge_lines.len());
    let mut skipped = 0usize;
    for line in merge_lines {
        // Byte-level pieces never contain a real space, so the first one is the separator.
        let usable = line.split_once(' ').filter(|(left, right)| {
            vocab.contains_key(*left)
                && vocab.contains_key(*right)
                && vocab.contains_key(&format!("{left}{right}"))
        });
        match usable {
            Some((left, right)) => merges.push((left.to_owned(), right.to_owned())),
            None => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "GGUF merges that do not produce vocabulary tokens were ignored"
        );
    }

    let pre = PreTokenization::for_gguf_name(meta.string("tokenizer.ggml.pre")?);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| TokenizerError::Metadata(format!("byte-level BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(pre.pre_tokenizer()?))
        .with_decoder(Some(ByteLevel::default()));
    Ok((tokenizer, pre.add_bos_default))
}

/// A `llama` (SentencePiece) vocabulary, expressed the way HF converts one: a BPE whose merges
/// come from the piece scores, with byte fallback for characters outside the vocabulary.
fn sentencepiece_bpe(
    meta: &Meta<'_>,
    tokens: &[&str],
    types: &[TokenType],
) -> Result<Tokenizer, TokenizerError> {
    let scores = match meta.floats("tokenizer.ggml.scores")? {
        Some(scores) if scores.len() == tokens.len() => scores,
        Some(scores) => {
            return Err(TokenizerError::Metadata(format!(
                "`tokenizer.ggml.scores` has {} entries for {} tokens",
                scores.len(),
                tokens.len()
            )));
        }
        None => {
            tracing::warn!("SentencePiece vocabulary without scores; ranking merges by token id");
            (0..tokens.len()).map(|i| -(i as f32)).collect()
        }
    };
    let vocab = vocabulary(tokens);
    let merges = merges_from_scores(tokens, &scores, &vocab);
    let unk = meta
        .u32("tokenizer.ggml.unknown_token_id")?
        .and_then(|id| tokens.get(id as usize))
        .or_else(|| {
            types
                .iter()
                .position(|t| *t == TokenType::Unknown)
                .map(|i| &tokens[i])
        })
        .map(|t| (*t).to_owned());

    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| TokenizerError::Metadata(format!("SentencePiece BPE: {e}")))?;

    let add_space_prefix = meta
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let replace_spaces = NormalizerWrapper::Replace(
        Replace::new(" ", SPIECE_SPACE).map_err(|e| TokenizerError::Metadata(e.to_string()))?,
    );
    let normalizer = if add_space_prefix {
        NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new(SPIECE_SPACE.to_owned())),
            replace_spaces,
        ]))
    } else {
        replace_spaces
    };
    let mut decoders = vec![
        DecoderWrapper::Replace(
            Replace::new(SPIECE_SPACE, " ").map_err(|e| TokenizerError::Metadata(e.to_string()))?,
        ),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(normalizer))
        .with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Token text to id; a text that appears twice keeps its first id, as a lookup table must.
fn vocabulary(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry((*token).to_owned()).or_insert(id as u32);
    }
    if vocab.len() < tokens.len() {
        tracing::debug!(
            duplicates = tokens.len() - vocab.len(),
            "vocabulary has repeated token texts"
        );
    }
    vocab
}

/// Merges implied by a scored SentencePiece vocabulary, in the order HF's converter produces
/// (`generate_merges` in transformers): every split of a piece into two vocabulary pieces is a
/// merge ranked by the whole piece's score, higher first; ties go to longer left, then longer
/// right halves, then to vocabulary order.
fn merges_from_scores(tokens: &[&str], scores: &[f32], vocab: &Vocab) -> Merges {
    struct Candidate {
        left: u32,
        right: u32,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut candidates = Vec::new();
    let mut local = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if vocab.get(*piece) != Some(&(id as u32)) {
            continue;
        }
        local.clear();
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&left), Some(&right)) = (vocab.get(left), vocab.get(right)) {
                local.push(Candidate {
                    left,
                    right,
                    score: scores[id],
                    left_chars: piece[..split].chars().count(),
                    right_chars: piece[split..].chars().count(),
                });
            }
        }
        local.sort_by_key(|c| (c.left, c.right));
        candidates.append(&mut local);
    }
    // A stable sort, descending on every key, as Python's `sorted(..., reverse=True)`.
    candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    candidates
        .into_iter()
        .map(|c| {
            (
                tokens[c.left as usize].to_owned(),
                tokens[c.right as usize].to_owned(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_the_score_of_the_merged_piece() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let vocab = vocabulary(&tokens);
        let merges = merges_from_scores(&tokens, &scores, &vocab);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        // "bc" scores best; "abc" splits two ways, the longer left half ranking first.
        assert_eq!(pairs, [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]);
    }
}
