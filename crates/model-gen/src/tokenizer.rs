//! The generated SentencePiece-style vocabulary, written as `tokenizer.json`,
//! `tokenizer_config.json` and GGUF `tokenizer.ggml.*` metadata.
//!
//! The vocabulary is the chat format's leading special tokens (`<unk>`, `<s>`, `</s>` for
//! llama 2), the 256 byte tokens, every printable ASCII character and `▁`, then word-start
//! pieces (`▁` followed by letters), and last the format's control tokens (`<|im_start|>`,
//! `<|eot_id|>`, ...), where real checkpoints keep their added tokens. The multi-character
//! pieces form a prefix-closed set and none continues a word, so the only possible merges
//! extend a word-start piece by one character. Greedy BPE by merge rank, llama.cpp's
//! score-driven merging and a unigram (Viterbi) segmentation over the scores all end in the
//! same tokens: the longest word-start piece, then single characters, then byte fallback.

use serde::Serialize;
use serde::ser::SerializeMap;

use crate::spec::ModelSpec;

/// Ids of the llama 2 format ([`ChatFormat::Llama2`], the vocabulary of [`Vocab::new`]).
pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// llama-2 style, without a BOS (the tokenizer adds it: `add_bos_token` is true).
pub const CHAT_TEMPLATE: &str = r"{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}";

/// Meta-Llama-3-8B-Instruct's template: BOS, then a header and `<|eot_id|>` per message.
pub const LLAMA3_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Qwen2-Instruct's ChatML template (with its default system message).
pub const CHATML_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Gemma 3's template (Gemma 2's, plus a system message folded into the first user turn).
pub const GEMMA_CHAT_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"#;

/// Phi-3.5-mini-instruct's template.
pub const PHI3_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_BYTE: i32 = 6;

const SPACE: char = '▁';
/// `▁` plus the 94 printable ASCII characters other than space.
const N_CHARS: usize = 1 + 94;

/// The smallest llama 2 vocabulary the generator can build: specials, bytes and single
/// characters.
pub const MIN_VOCAB: usize = 3 + 256 + N_CHARS;

/// A family's special tokens and chat template, as its converted GGUF files carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChatFormat {
    /// `<s>` / `</s>`, `[INST]` turns.
    Llama2,
    /// `<|begin_of_text|>` as BOS, header turns ending in `<|eot_id|>`, which is the EOS
    /// (as in the Llama 3 instruct checkpoints).
    Llama3,
    /// Qwen's `<|im_start|>` / `<|im_end|>` turns: EOS `<|im_end|>`, BOS `<|endoftext|>`
    /// (set but not added: `add_bos_token` is false).
    ChatMl,
    /// Gemma's `<pad>`, `<eos>`, `<bos>`, `<unk>` at ids 0 to 3, `<start_of_turn>` /
    /// `<end_of_turn>` turns (EOS `<eos>`; `<end_of_turn>` ends a generation by its text),
    /// and no space prefix.
    Gemma,
    /// Phi-3's `<|user|>`, `<|assistant|>`, `<|system|>` turns ending in `<|end|>`; EOS
    /// `<|endoftext|>`, BOS `<s>` not added.
    Phi3,
}

impl ChatFormat {
    /// Special tokens at the start of the vocabulary, from id 0.
    fn leading(self) -> &'static [&'static str] {
        match self {
            Self::Llama2 | Self::Phi3 => &["<unk>", "<s>", "</s>"],
            Self::Llama3 => &["<unk>", "<|begin_of_text|>", "<|end_of_text|>"],
            Self::ChatMl => &["<unk>"],
            Self::Gemma => &["<pad>", "<eos>", "<bos>", "<unk>"],
        }
    }

    /// Control tokens at the end of the vocabulary, in this order.
    fn trailing(self) -> &'static [&'static str] {
        match self {
            Self::Llama2 => &[],
            Self::Llama3 => &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            Self::ChatMl => &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            Self::Gemma => &["<start_of_turn>", "<end_of_turn>"],
            Self::Phi3 => &[
                "<|endoftext|>",
                "<|assistant|>",
                "<|system|>",
                "<|end|>",
                "<|user|>",
            ],
        }
    }

    pub fn bos_token(self) -> &'static str {
        match self {
            Self::Llama2 | Self::Phi3 => "<s>",
            Self::Llama3 => "<|begin_of_text|>",
            Self::ChatMl => "<|endoftext|>",
            Self::Gemma => "<bos>",
        }
    }

    pub fn eos_token(self) -> &'static str {
        match self {
            Self::Llama2 => "</s>",
            Self::Llama3 => "<|eot_id|>",
            Self::ChatMl => "<|im_end|>",
            Self::Gemma => "<eos>",
            Self::Phi3 => "<|endoftext|>",
        }
    }

    pub fn unk_token(self) -> &'static str {
        "<unk>"
    }

    /// The padding token the converted files name, where they name one.
    pub fn pad_token(self) -> Option<&'static str> {
        match self {
            Self::Llama2 | Self::Llama3 => None,
            Self::ChatMl | Self::Phi3 => Some("<|endoftext|>"),
            Self::Gemma => Some("<pad>"),
        }
    }

    /// Whether the tokenizer prepends BOS (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(self) -> bool {
        matches!(self, Self::Llama2 | Self::Llama3 | Self::Gemma)
    }

    /// Whether a space is prepended to the text before tokenizing. Gemma's converter writes
    /// `tokenizer.ggml.add_space_prefix = false`; the others leave llama.cpp's SentencePiece
    /// default (true).
    pub fn add_space_prefix(self) -> bool {
        !matches!(self, Self::Gemma)
    }

    pub fn chat_template(self) -> &'static str {
        match self {
            Self::Llama2 => CHAT_TEMPLATE,
            Self::Llama3 => LLAMA3_CHAT_TEMPLATE,
            Self::ChatMl => CHATML_CHAT_TEMPLATE,
            Self::Gemma => GEMMA_CHAT_TEMPLATE,
            Self::Phi3 => PHI3_CHAT_TEMPLATE,
        }
    }

    /// Every special token, leading then trailing.
    pub fn special_tokens(self) -> impl Iterator<Item = &'static str> {
        self.leading().iter().chain(self.trailing()).copied()
    }

    /// The smallest vocabulary of this format: specials, bytes and single characters.
    pub fn min_vocab(self) -> usize {
        self.leading().len() + 256 + N_CHARS + self.trailing().len()
    }
}

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
    pub format: ChatFormat,
}

impl Vocab {
    /// The llama 2 vocabulary of exactly `size` entries (`size >= MIN_VOCAB`, checked by
    /// `ModelSpec::validate`).
    pub fn new(size: usize) -> Self {
        Self::with_format(size, ChatFormat::Llama2)
    }

    /// The vocabulary of `spec`: its size and chat format.
    pub fn for_spec(spec: &ModelSpec) -> Self {
        Self::with_format(spec.vocab, spec.chat)
    }

    /// Exactly `size` entries with the special tokens of `format`
    /// (`size >= format.min_vocab()`).
    pub fn with_format(size: usize, format: ChatFormat) -> Self {
        assert!(
            size >= format.min_vocab(),
            "vocab {size} is below the minimum {}",
            format.min_vocab()
        );
        let mut tokens: Vec<String> = format.leading().iter().map(|s| s.to_string()).collect();
        let mut token_types: Vec<i32> = format
            .leading()
            .iter()
            .map(|&t| {
                if t == format.unk_token() {
                    TOKEN_TYPE_UNKNOWN
                } else {
                    TOKEN_TYPE_CONTROL
                }
            })
            .collect();
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            token_types.push(TOKEN_TYPE_BYTE);
        }
        let first_normal = tokens.len();
        let trailing = format.trailing();

        let mut pieces = NormalPieces::new(size - first_normal - trailing.len());
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
        scores.resize(size, 0.0);
        tokens.extend(pieces.list);
        token_types.resize(first_normal + n_normal, TOKEN_TYPE_NORMAL);
        tokens.extend(trailing.iter().map(|t| t.to_string()));
        token_types.resize(size, TOKEN_TYPE_CONTROL);
        Self {
            tokens,
            scores,
            token_types,
            format,
        }
    }

    /// The id of `token`, if the vocabulary has it.
    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.tokens
            .iter()
            .position(|t| t == token)
            .map(|i| i as u32)
    }

    fn special_id(&self, token: &str) -> u32 {
        self.id_of(token)
            .expect("every special token of the format is in its vocabulary")
    }

    pub fn bos_id(&self) -> u32 {
        self.special_id(self.format.bos_token())
    }

    pub fn eos_id(&self) -> u32 {
        self.special_id(self.format.eos_token())
    }

    pub fn unk_id(&self) -> u32 {
        self.special_id(self.format.unk_token())
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.format.pad_token().map(|t| self.special_id(t))
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
/// the SentencePiece normalizer and decoder, the format's special tokens as added tokens, and
/// a BOS-adding post-processor where the format adds BOS.
pub fn tokenizer_json(vocab: &Vocab) -> Result<String, serde_json::Error> {
    let merges = vocab.merges();
    let format = vocab.format;
    let mut normalizers = Vec::with_capacity(2);
    if format.add_space_prefix() {
        normalizers.push(Normalizer::Prepend { prepend: "▁" });
    }
    normalizers.push(Normalizer::Replace {
        pattern: Pattern { string: " " },
        content: "▁",
    });
    let file = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens: format
            .special_tokens()
            .map(|content| AddedToken {
                id: vocab.special_id(content),
                content,
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: false,
                special: true,
            })
            .collect(),
        normalizer: Normalizer::Sequence { normalizers },
        pre_tokenizer: None,
        post_processor: PostProcessor::template(
            format
                .add_bos()
                .then(|| (format.bos_token(), vocab.bos_id())),
        ),
        decoder: Decoder::sentencepiece(format.add_space_prefix()),
        model: BpeModel {
            kind: "BPE",
            dropout: None,
            unk_token: format.unk_token(),
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
    let format = spec.chat;
    serde_json::to_string_pretty(&TokenizerConfig {
        add_bos_token: format.add_bos(),
        add_eos_token: false,
        bos_token: format.bos_token(),
        eos_token: format.eos_token(),
        unk_token: format.unk_token(),
        pad_token: format.pad_token(),
        chat_template: format.chat_template(),
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
    /// `▁` back to spaces, byte tokens back to bytes, and the prepended space (if any)
    /// removed.
    fn sentencepiece(space_prefix: bool) -> Self {
        let mut decoders = vec![
            Decoder::Replace {
                pattern: Pattern { string: "▁" },
                content: " ",
            },
            Decoder::ByteFallback,
            Decoder::Fuse,
        ];
        if space_prefix {
            decoders.push(Decoder::Strip {
                content: " ",
                start: 1,
                stop: 0,
            });
        }
        Self::Sequence { decoders }
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
    /// Prepends `bos` (text and id) to every sequence, or nothing.
    fn template(bos: Option<(&'static str, u32)>) -> Self {
        let seq = |id, type_id| TemplatePiece::Sequence { id, type_id };
        let (single, pair) = match bos {
            Some((token, _)) => {
                let bos = |type_id| TemplatePiece::SpecialToken { id: token, type_id };
                (
                    vec![bos(0), seq("A", 0)],
                    vec![bos(0), seq("A", 0), bos(1), seq("B", 1)],
                )
            }
            None => (vec![seq("A", 0)], vec![seq("A", 0), seq("B", 1)]),
        };
        Self {
            kind: "TemplateProcessing",
            single,
            pair,
            special_tokens: SpecialTokens(bos),
        }
    }
}

#[derive(Serialize)]
enum TemplatePiece {
    SpecialToken { id: &'static str, type_id: u32 },
    Sequence { id: &'static str, type_id: u32 },
}

/// `{"<bos text>": {"id": ..., "ids": [...], "tokens": [...]}}`, or `{}`.
struct SpecialTokens(Option<(&'static str, u32)>);

impl Serialize for SpecialTokens {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(usize::from(self.0.is_some())))?;
        if let Some((token, id)) = self.0 {
            map.serialize_entry(
                token,
                &SpecialTokenIds {
                    id: token,
                    ids: [id],
                    tokens: [token],
                },
            )?;
        }
        map.end()
    }
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
