//! The pre-tokenizer of a byte-level BPE vocabulary, chosen from GGUF's `tokenizer.ggml.pre`.
//!
//! A GGUF file does not store the pre-tokenizer itself, only a name that llama.cpp's converter
//! derived from a hash of the original tokenizer's output. The table below maps those names to the
//! split regexes of the original `tokenizer.json` files (llama.cpp keeps hand-adapted copies of
//! the same expressions because its regex engine is more limited; ours is the one HF uses).

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

use super::TokenizerError;

/// GPT-2's word splitter, the base of most byte-level BPE vocabularies.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's splitter: case-insensitive contractions, numbers in groups of up to three digits.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's splitter: like Llama 3's but every digit stands alone.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken splitter, which also splits camel case.
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)";

/// OpenAI's o200k splitter (GPT-4o, Llama 4).
const O200K: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// BLOOM-style splitter: words with their leading space, punctuation apart.
const BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// Every digit on its own, applied before the GPT-2 splitter by StarCoder-derived vocabularies.
const DIGIT: &str = r"\p{N}";

/// How to split text before byte-level BPE, for one `tokenizer.ggml.pre` family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PreTokenization {
    /// Applied in order, each one isolating its matches from the rest of the text.
    regexes: &'static [&'static str],
    /// Llama 3 looks a whole pre-token up in the vocabulary before merging (`ignore_merges`).
    pub(super) ignore_merges: bool,
    /// Whether a BOS token is prepended when the GGUF file does not say.
    pub(super) add_bos_default: bool,
}

impl PreTokenization {
    const fn new(regexes: &'static [&'static str]) -> Self {
        Self {
            regexes,
            ignore_merges: false,
            add_bos_default: false,
        }
    }

    /// The pre-tokenization for a `tokenizer.ggml.pre` name; unknown names get GPT-2's, with a
    /// warning, since that is the closest thing to a common denominator.
    pub(super) fn for_gguf_name(name: Option<&str>) -> Self {
        match name.unwrap_or("default") {
            "default" | "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "phi-2" | "jina-es"
            | "jina-de" | "gigachat" | "jina-v1-en" | "jina-v2-es" | "jina-v2-de"
            | "jina-v2-code" | "trillion" => Self::new(&[GPT2]),
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone"
            | "minerva-7b" => Self::new(&[DIGIT, GPT2]),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "dbrx"
            | "smaug-bpe" => Self {
                ignore_merges: true,
                add_bos_default: true,
                ..Self::new(&[LLAMA3])
            },
            "chatglm-bpe" => Self::new(&[LLAMA3]),
            "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" | "hunyuan" => {
                Self::new(&[QWEN2])
            }
            "tekken" | "pixtral" => Self {
                add_bos_default: true,
                ..Self::new(&[TEKKEN])
            },
            "gpt-4o" | "llama4" => Self::new(&[O200K]),
            "falcon" => Self::new(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"]),
            "bloom" | "poro-chat" | "gpt3-finnish" => Self::new(&[BLOOM]),
            "viking" => Self::new(&[BLOOM, DIGIT]),
            other => {
                tracing::warn!(
                    pre = other,
                    "unknown GGUF pre-tokenizer; splitting words the GPT-2 way, \
                     which may tokenize some text differently from the original model"
                );
                Self::new(&[GPT2])
            }
        }
    }

    /// The split regexes followed by the byte-to-character mapping of byte-level BPE.
    pub(super) fn pre_tokenizer(&self) -> Result<PreTokenizerWrapper, TokenizerError> {
        let mut steps = Vec::with_capacity(self.regexes.len() + 1);
        for regex in self.regexes {
            let split = Split::new(
                SplitPattern::Regex((*regex).to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Metadata(format!("pre-tokenizer regex {regex:?}: {e}")))?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, true, false,
        )));
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(steps)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_family_compiles() {
        for name in [
            "default",
            "smollm",
            "llama-bpe",
            "qwen2",
            "tekken",
            "gpt-4o",
            "falcon",
            "bloom",
            "viking",
            "chatglm-bpe",
        ] {
            PreTokenization::for_gguf_name(Some(name))
                .pre_tokenizer()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn families_differ_where_the_models_do() {
        assert_eq!(
            PreTokenization::for_gguf_name(Some("smollm")).regexes,
            &[DIGIT, GPT2]
        );
        assert!(PreTokenization::for_gguf_name(Some("llama-bpe")).ignore_merges);
        assert!(!PreTokenization::for_gguf_name(Some("qwen2")).ignore_merges);
        assert_eq!(
            PreTokenization::for_gguf_name(Some("no-such-tokenizer")),
            PreTokenization::for_gguf_name(Some("gpt-2"))
        );
        assert_eq!(
            PreTokenization::for_gguf_name(None),
            PreTokenization::for_gguf_name(Some("gpt-2"))
        );
    }
}
