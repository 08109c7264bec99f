//! Text ⇄ token ids for a model, whatever form its vocabulary ships in.
//!
//! A [`TextTokenizer`] wraps a `tokenizers::Tokenizer` built either from a Hugging Face
//! `tokenizer.json` or from the `tokenizer.ggml.*` metadata of a GGUF file (byte-level BPE
//! `gpt2` and SentencePiece `llama` vocabularies), together with what generation needs around
//! it: BOS/EOS policy, every end-of-generation id, and the model's chat template source.
//! [`IncrementalDecoder`] turns a stream of generated ids into text without ever splitting a
//! character. Rendering chat templates is [`crate::chat`]'s job, not this module's.

mod eog;
mod gguf;
mod gguf_meta;
mod hf_files;
mod incremental;
mod literal;
mod pretokenize;

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::Content;
use tokenizers::Tokenizer;

pub use incremental::IncrementalDecoder;
use literal::SpecialTexts;

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid tokenizer metadata in GGUF file: {0}")]
    Metadata(String),
    #[error(
        "unsupported GGUF tokenizer model `{0}`: only `gpt2` (byte-level BPE) and `llama` \
         (SentencePiece) vocabularies are supported"
    )]
    UnsupportedModel(String),
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode tokens: {0}")]
    Decode(String),
}

/// What a source-specific loader hands over to [`TextTokenizer`].
struct Spec {
    inner: Tokenizer,
    vocab_size: usize,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// End-of-generation ids the model declares besides its EOS.
    declared_ends: eog::Declared,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
}

#[derive(Debug, Clone)]
struct NamedToken {
    id: u32,
    text: String,
}

/// A model's tokenizer. Cloning is cheap (the vocabulary is shared), which lets an
/// [`IncrementalDecoder`] own one.
#[derive(Clone)]
pub struct TextTokenizer(Arc<Shared>);

struct Shared {
    inner: Tokenizer,
    vocab_size: usize,
    bos: Option<NamedToken>,
    eos: Option<NamedToken>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
    special_texts: SpecialTexts,
    special_ids: HashSet<u32>,
    /// `inner` with special-token matching off, built the first time a text needs it.
    literal: OnceLock<Tokenizer>,
    /// Every token's own bytes, built the first time log-probabilities name a token; `None`
    /// when the vocabulary's encoding is neither byte-level nor byte-fallback.
    bytes: OnceLock<Option<Vec<Vec<u8>>>>,
}

impl TextTokenizer {
    /// Loads a Hugging Face `tokenizer.json`; `tokenizer_config.json`, `chat_template.jinja`
    /// and `generation_config.json` beside it are read when present.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        hf_files::spec_from_file(path).map(Self::from_spec)
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(content: &Content) -> Result<Self, TokenizerError> {
        gguf::spec_from_gguf(content).map(Self::from_spec)
    }

    fn from_spec(spec: Spec) -> Self {
        let inner = spec.inner;
        let added = inner.get_added_tokens_decoder();
        let named = |id: u32| {
            let text = match added.get(&id) {
                Some(token) => Some(token.content.clone()),
                None => inner.decode(&[id], false).ok(),
            };
            text.map(|text| NamedToken { id, text })
        };
        let bos = spec.bos_id.and_then(named);
        let eos = spec.eos_id.and_then(named);

        let eos_ids = eog::end_of_generation_ids(
            spec.eos_id,
            &spec.declared_ends,
            |text| inner.token_to_id(text),
            |id| inner.id_to_token(id),
        );
        let special = || added.iter().filter(|(_, token)| token.special);
        let special_texts = SpecialTexts::new(special().map(|(_, token)| token.content.clone()));
        let special_ids = special().map(|(id, _)| *id).collect();

        Self(Arc::new(Shared {
            vocab_size: spec.vocab_size.max(inner.get_vocab_size(true)),
            inner,
            bos,
            eos,
            eos_ids,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            chat_template: spec.chat_template,
            special_texts,
            special_ids,
            literal: OnceLock::new(),
            bytes: OnceLock::new(),
        }))
    }

    /// Token ids for `text`. Special tokens written in the text (`<|im_start|>`) are always
    /// recognised; `add_special_tokens` additionally adds BOS (and EOS) when the model asks for
    /// it. Prompts rendered from a chat template already carry their special tokens and should
    /// be encoded with `add_special_tokens = false`, as `transformers` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .0
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let body = encoding.get_ids();
        let mut ids = Vec::with_capacity(body.len() + 2);
        if add_special_tokens && self.0.add_bos {
            ids.extend(self.bos_token_id());
        }
        ids.extend_from_slice(body);
        if add_special_tokens && self.0.add_eos {
            ids.extend(self.0.eos.as_ref().map(|t| t.id));
        }
        Ok(ids)
    }

    /// Token ids for `text`, in which special-token text that overlaps one of the byte ranges
    /// `text_spans` is tokenized as ordinary text; elsewhere special tokens are recognised as
    /// [`encode`](Self::encode) does (no BOS or EOS is added). Without spans this is exactly
    /// `encode(text, false)`. A chat prompt passes the spans of control-token text that came
    /// from inside its messages.
    pub fn encode_with_text_spans(
        &self,
        text: &str,
        text_spans: &[Range<usize>],
    ) -> Result<Vec<u32>, TokenizerError> {
        if text_spans.is_empty() {
            return self.encode(text, false);
        }
        let literal = self.0.literal.get_or_init(|| {
            let mut literal = self.0.inner.clone();
            literal.set_encode_special_tokens(true);
            literal
        });
        literal::encode_with_text_spans(
            &self.0.inner,
            literal,
            &self.0.special_ids,
            text,
            text_spans,
        )
    }

    /// Byte ranges of `text` that the tokenizer would read as special (control) tokens, such
    /// as `<|im_end|>` typed into a message; the leftmost match first, the longest at a position.
    pub fn find_special_text(&self, text: &str) -> Vec<Range<usize>> {
        self.0.special_texts.find(text)
    }

    /// The text of `ids`; `skip_special` leaves out control tokens such as `<|im_end|>`.
    /// Ids outside the vocabulary are ignored.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.0
            .inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Number of token ids the vocabulary defines, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.0.vocab_size
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.0.bos.as_ref().map(|t| t.id)
    }

    /// Every id that ends generation: the declared EOS first, then EOT/EOM and any extra ids the
    /// model lists, then special tokens of the usual end-of-turn family present in the vocabulary.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.0.eos_ids
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.0.eos_ids.contains(&id)
    }

    /// Whether `encode(.., true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.0.add_bos && self.0.bos.is_some()
    }

    /// The vocabulary's own spelling of a token (`Ġthe`, `▁the`, `<|im_end|>`), for logs and
    /// debugging; use [`decode`](Self::decode) for text.
    pub fn token_to_str(&self, id: u32) -> Option<String> {
        self.0.inner.id_to_token(id)
    }

    /// A token's own bytes: its vocabulary piece with the byte-level (GPT-2, `Ġ`, `Ã©`) or
    /// byte-fallback (`<0xE2>`) encoding undone, a special token's text. A token that holds
    /// part of a multi-byte character has bytes that are not UTF-8 alone, where
    /// [`decode`](Self::decode) gives U+FFFD. `None` for an id outside the vocabulary or a
    /// vocabulary encoded otherwise.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let table = self.0.bytes.get_or_init(|| {
            // The constraint's table, built by the same reading of the vocabulary, marks
            // special tokens with llguidance's marker byte before their text: taken off here.
            let mut table = crate::constraint::token_bytes(&self.0.inner).ok()?;
            for &id in &self.0.special_ids {
                if let Some(word) = table.get_mut(id as usize)
                    && word.first() == Some(&toktrie::TokTrie::SPECIAL_TOKEN_MARKER)
                {
                    word.remove(0);
                }
            }
            Some(table)
        });
        table.as_ref()?.get(id as usize).map(Vec::as_slice)
    }

    /// The id of a token spelled as in the vocabulary (special tokens by their text).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.0.inner.token_to_id(token)
    }

    /// The model's Jinja chat template source, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.0.chat_template.as_deref()
    }

    /// BOS text, as chat templates expect it in `bos_token`.
    pub fn bos_token(&self) -> Option<&str> {
        self.0.bos.as_ref().map(|t| t.text.as_str())
    }

    /// EOS text, as chat templates expect it in `eos_token`.
    pub fn eos_token(&self) -> Option<&str> {
        self.0.eos.as_ref().map(|t| t.text.as_str())
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.0.inner
    }

    /// A decoder for one generated sequence.
    pub fn incremental_decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder::new(self.clone())
    }
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.0.vocab_size)
            .field("bos", &self.0.bos)
            .field("eos", &self.0.eos)
            .field("eos_ids", &self.0.eos_ids)
            .field("add_bos", &self.0.add_bos)
            .field("add_eos", &self.0.add_eos)
            .field("has_chat_template", &self.0.chat_template.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests;
