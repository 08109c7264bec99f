//! The generated SentencePiece-style vocabulary, written as `tokenizer.json`,
//! `tokenizer_config.json` and GGUF `tokenizer.ggml.*` metadata.
//!
//! The vocabulary is `<unk>`, `<s>`, `</s>`, the 256 byte tokens, every printable ASCII
//! character and `▁`, then word-start pieces (`▁` followed by letters). The multi-character
//! pieces form a prefix-closed set and none continues a word, so the only possible merges
//! extend a word-start piece by one character. Greedy BPE by merge rank, llama.cpp's
//! score-driven merging and a unigram (Viterbi) segmentation over the scores all end in the
//! same tokens: the longest word-start piece, then single characters, then byte fallback.

use serde::Serialize;
use serde::ser::SerializeMap;

use crate::spec::ModelSpec;

pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// llama-2 style, without a BOS (the tokenizer adds it: `add_bos_token` is true).
pub const CHAT_TEMPLATE: &str = r"{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}";

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_BYTE: i32 = 6;

const SPACE: char = '▁';
const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];
/// `▁` plus the 94 printable ASCII characters other than space.
const N_CHARS: usize = 1 + 94;

/// The smallest vocabulary the generator can build: specials, bytes and single characters.
pub const MIN_VOCAB: usize = SPECIALS.len() + 256 + N_CHARS;

/// Common words come first so that ordinary test text tokenizes into multi-character pieces
/// even in a small vocabulary; all of their prefixes are pieces too.
const WORDS: &[&str] = &[
    "the", "The", "Hello", "hello", "world", "World", "Once", "once", "upon", "time", "there",
    "was", "a", "and", "of", "to", "in", "In", "is", "it", "It", "you", "that", "he", "she", "for",
    "on", "are", "as", "with", "his", "her", "they", "at", "be", "this", "This", "have", "from",
    "or", "one", "had", "by", "word", "but", "not", "what", "What", "all", "were", "we", "when",
    "your", "can", "said", "use", "an", "each", "which", "do", "how", "How", "their", "if", "will",
    "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "would", "make",
    "like", "him", "into", "has", "look", "two", "more", "write", "go", "see", "number", "no",
    "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "its", "now",
    "find", "long", "down", "day", "did", "get", "come", "made", "may", "part", "model", "token",
    "bee", "rust", "story", "little", "girl", "boy", "cat", "dog",
];

/// The vocabulary, in token-id order, with llama.cpp's per-token metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
}

impl Vocab {
    /// Builds exactly `size` entries (`size >= MIN_VOCAB`, checked by `ModelSpec::validate`).
    pub fn new(size: usize) -> Self {
        assert!(
            size >= MIN_VOCAB,
            "vocab {size} is below the minimum {MIN_VOCAB}"
        );
        let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        let mut token_types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            token_types.push(TOKEN_TYPE_BYTE);
        }
        let first_normal = tokens.len();

        let mut pieces = NormalPieces::new(size - first_normal);
        pieces.push(SPACE.to_string());
        for c in '!'..='~' {
            pieces.push(c.to_string());
        }
        for word in WORDS {
            pieces.push_word(word);
        }
        // Then every lowercase word start, shortest first, until the vocabulary is full.
        let mut frontier = vec![String::new()];
        while !pieces.is_full() {
            let mut next = Vec::with_capacity(frontier.len() * 26);
            for stem in &frontier {
                for c in 'a'..='z' {
                    let word = format!("{stem}{c}");
                    pieces.push(format!("{SPACE}{word}"));
                    next.push(word);
                }
            }
            frontier = next;
        }

        let n_normal = pieces.list.len();
        // Scores in (-1.5, -1]: every piece costs about the same, so fewer pieces always
        // score higher and a unigram segmentation agrees with BPE (see the module docs).
        let mut scores = vec![0f32; first_normal];
        scores.extend((0..n_normal).map(|rank| -1.0 - 0.5 * rank as f32 / n_normal as f32));
        tokens.extend(pieces.list);
        token_types.resize(size, TOKEN_TYPE_NORMAL);
        Self {
            tokens,
            scores,
            token_types,
        }
    }

    /// BPE merges, in rank order: each word-start piece from its prefix and last character.
    pub fn merges(&self) -> Vec<(&str, &str)> {
        self.tokens
            .iter()
            .zip(&self.token_types)
            .filter(|(t, ty)| **ty == TOKEN_TYPE_NORMAL && t.chars().count() > 1)
            .map(|(t, _)| {
                let split = t.char_indices().last().map(|(i, _)| i).unwrap_or(0);
                t.split_at(split)
            })
            .collect()
    }
}

/// Normal pieces in insertion order, without duplicates, up to a capacity.
struct NormalPieces {
    list: Vec<String>,
    seen: std::collections::HashSet<String>,
    capacity: usize,
}

impl NormalPieces {
    fn new(capacity: usize) -> Self {
        Self {
            list: Vec::with_capacity(capacity),
            seen: std::collections::HashSet::with_capacity(capacity),
            capacity,
        }
    }

    fn is_full(&self) -> bool {
        self.list.len() >= self.capacity
    }

    fn push(&mut self, piece: String) {
        if !self.is_full() && self.seen.insert(piece.clone()) {
            self.list.push(piece);
        }
    }

    /// Adds `▁word` after all of its prefixes, keeping the set prefix-closed.
    fn push_word(&mut self, word: &str) {
        for (end, c) in word.char_indices() {
            self.push(format!("{SPACE}{}", &word[..end + c.len_utf8()]));
        }
    }
}

/// `tokenizer.json` in the Hugging Face `tokenizers` format: a BPE model with byte fallback,
/// the SentencePiece normalizer and decoder, and a BOS-adding post-processor.
pub fn tokenizer_json(vocab: &Vocab) -> Result<String, serde_json::Error> {
    let merges = vocab.merges();
    let file = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens: SPECIALS
            .iter()
            .enumerate()
            .map(|(id, content)| AddedToken {
                id: id as u32,
                content,
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: false,
                special: true,
            })
            .collect(),
        normalizer: Normalizer::Sequence {
            normalizers: vec![
                Normalizer::Prepend { prepend: "▁" },
                Normalizer::Replace {
                    pattern: Pattern { string: " " },
                    content: "▁",
                },
            ],
        },
        pre_tokenizer: None,
        post_processor: PostProcessor::bos_template(),
        decoder: Decoder::sentencepiece(),
        model: BpeModel {
            kind: "BPE",
            dropout: None,
            unk_token: SPECIALS[0],
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: true,
            byte_fallback: true,
            ignore_merges: false,
            vocab: VocabMap(&vocab.tokens),
            merges,
        },
    };
    serde_json::to_string_pretty(&file)
}

/// `tokenizer_config.json`: special tokens, BOS policy and the chat template.
pub fn tokenizer_config_json(spec: &ModelSpec) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(&TokenizerConfig {
        add_bos_token: true,
        add_eos_token: false,
        bos_token: SPECIALS[BOS_ID as usize],
        eos_token: SPECIALS[EOS_ID as usize],
        unk_token: SPECIALS[UNK_ID as usize],
        pad_token: None,
        chat_template: CHAT_TEMPLATE,
        model_max_length: spec.context_length,
        clean_up_tokenization_spaces: false,
        tokenizer_class: "LlamaTokenizerFast",
    })
}

#[derive(Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<AddedToken<'a>>,
    normalizer: Normalizer,
    pre_tokenizer: Option<()>,
    post_processor: PostProcessor,
    decoder: Decoder,
    model: BpeModel<'a>,
}

#[derive(Serialize)]
struct AddedToken<'a> {
    id: u32,
    content: &'a str,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

#[derive(Serialize)]
struct Pattern {
    #[serde(rename = "String")]
    string: &'static str,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum Normalizer {
    Sequence {
        normalizers: Vec<Normalizer>,
    },
    Prepend {
        prepend: &'static str,
    },
    Replace {
        pattern: Pattern,
        content: &'static str,
    },
}

impl Decoder {
    /// `▁` back to spaces, byte tokens back to bytes, and the prepended space removed.
    fn sentencepiece() -> Self {
        Self::Sequence {
            decoders: vec![
                Decoder::Replace {
                    pattern: Pattern { string: "▁" },
                    content: " ",
                },
                Decoder::ByteFallback,
                Decoder::Fuse,
                Decoder::Strip {
                    content: " ",
                    start: 1,
                    stop: 0,
                },
            ],
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum Decoder {
    Sequence {
        decoders: Vec<Decoder>,
    },
    Replace {
        pattern: Pattern,
        content: &'static str,
    },
    ByteFallback,
    Fuse,
    Strip {
        content: &'static str,
        start: u32,
        stop: u32,
    },
}

#[derive(Serialize)]
struct PostProcessor {
    #[serde(rename = "type")]
    kind: &'static str,
    single: Vec<TemplatePiece>,
    pair: Vec<TemplatePiece>,
    special_tokens: SpecialTokens,
}

impl PostProcessor {
    fn bos_template() -> Self {
        let bos = |type_id| TemplatePiece::SpecialToken { id: "<s>", type_id };
        let seq = |id, type_id| TemplatePiece::Sequence { id, type_id };
        Self {
            kind: "TemplateProcessing",
            single: vec![bos(0), seq("A", 0)],
            pair: vec![bos(0), seq("A", 0), bos(1), seq("B", 1)],
            special_tokens: SpecialTokens {
                bos: SpecialTokenIds {
                    id: "<s>",
                    ids: [BOS_ID],
                    tokens: ["<s>"],
                },
            },
        }
    }
}

#[derive(Serialize)]
enum TemplatePiece {
    SpecialToken { id: &'static str, type_id: u32 },
    Sequence { id: &'static str, type_id: u32 },
}

#[derive(Serialize)]
struct SpecialTokens {
    #[serde(rename = "<s>")]
    bos: SpecialTokenIds,
}

#[derive(Serialize)]
struct SpecialTokenIds {
    id: &'static str,
    ids: [u32; 1],
    tokens: [&'static str; 1],
}

#[derive(Serialize)]
struct BpeModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: &'static str,
    continuing_subword_prefix: Option<&'static str>,
    end_of_word_suffix: Option<&'static str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: VocabMap<'a>,
    merges: Vec<(&'a str, &'a str)>,
}

/// Serializes as a `{piece: id}` map in id order, independent of serde_json's map features.
struct VocabMap<'a>(&'a [String]);

impl Serialize for VocabMap<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (id, token) in self.0.iter().enumerate() {
            map.serialize_entry(token, &id)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct TokenizerConfig {
    add_bos_token: bool,
    add_eos_token: bool,
    bos_token: &'static str,
    eos_token: &'static str,
    unk_token: &'static str,
    pad_token: Option<&'static str>,
    chat_template: &'static str,
    model_max_length: usize,
    clean_up_tokenization_spaces: bool,
    tokenizer_class: &'static str,
}
