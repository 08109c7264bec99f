//! Structured output: a constraint, compiled from a JSON Schema (or a Lark grammar), that
//! decides at each step which tokens may come next, so a generation can only produce text the
//! schema accepts.
//!
//! The grammar engine is `llguidance` (the one behind llama.cpp's and vLLM's guidance
//! backends). It needs every token's bytes, arranged in a trie: [`ConstraintEnv`] builds that
//! once per loaded model from the engine's tokenizer and is shared by every request; each
//! request compiles its own [`Constraint`] (at admission, so a schema that does not compile is
//! refused before a generation exists), and each sequence carries its own, advanced with every
//! token it samples. The prompt cache holds prompt tokens only, so a constraint is unaffected
//! by what a slot reuses.
//!
//! JSON is generated compactly (`", "` between items, `": "` after keys, no other
//! whitespace): with free whitespace a small model can loop on blank lines forever, and a
//! compact answer parses the same.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use llguidance::api::{GrammarWithLexer, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};
use tokenizers::normalizers::Sequence;
use tokenizers::pre_tokenizers::{self, PreTokenizerWrapper, metaspace::PrependScheme};
use tokenizers::{DecoderWrapper, NormalizerWrapper, Tokenizer};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::EngineError;
use crate::tokenizer::TextTokenizer;

/// What the generated text must be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (the schema `{"type": "object"}`).
    JsonObject,
    /// JSON valid against this JSON Schema.
    JsonSchema(Value),
    /// Text in the language of this grammar, in llguidance's Lark dialect (which can embed JSON
    /// Schemas with `%json { ... }`, e.g. a tool call wrapped in a model's own tags).
    Lark(String),
}

impl OutputFormat {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            OutputFormat::JsonObject => json_grammar(json!({"type": "object"})),
            OutputFormat::JsonSchema(schema) => json_grammar(schema.clone()),
            OutputFormat::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// The JSON options every schema is compiled with (see the module's documentation); they
/// replace any `x-guidance` options the schema carries.
fn json_grammar(mut schema: Value) -> TopLevelGrammar {
    if let Some(object) = schema.as_object_mut() {
        object.insert(
            "x-guidance".into(),
            json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
    }
    TopLevelGrammar::from_grammar(GrammarWithLexer::from_json_schema(schema))
}

/// The token trie and grammar compiler of one loaded model: expensive to build (it walks the
/// whole vocabulary), so it is built once, on the first request that asks for a format, and
/// shared by every request after it. Cheap to clone.
#[derive(Clone)]
pub struct ConstraintEnv {
    factory: Arc<OnceLock<Result<ParserFactory, String>>>,
    tokenizer: TextTokenizer,
    /// The length of the model's logit vectors (it may exceed the tokenizer's vocabulary).
    vocab_size: usize,
}

impl std::fmt::Debug for ConstraintEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintEnv")
            .field("vocab_size", &self.vocab_size)
            .field("built", &self.factory.get().is_some())
            .finish()
    }
}

impl ConstraintEnv {
    /// An environment for a model whose logits have `vocab_size` entries and whose tokens
    /// `tokenizer` names. Nothing is built until the first [`compile`](Self::compile).
    pub fn new(tokenizer: TextTokenizer, vocab_size: usize) -> Self {
        ConstraintEnv {
            factory: Arc::new(OnceLock::new()),
            tokenizer,
            vocab_size,
        }
    }

    fn factory(&self) -> Result<&ParserFactory, EngineError> {
        self.factory
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let factory = model_factory(&self.tokenizer, self.vocab_size);
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    ok = factory.is_ok(),
                    "structured-output token trie built"
                );
                factory
            })
            .as_ref()
            .map_err(|e| {
                EngineError::InvalidParams(format!(
                    "response_format: this model's tokenizer cannot be constrained: {e}"
                ))
            })
    }

    /// Compiles `format` into a constraint for one generation. A schema or grammar that does not
    /// compile is an [`EngineError::InvalidParams`] whose message names the problem.
    pub fn compile(&self, format: &OutputFormat) -> Result<Constraint, EngineError> {
        compile_with(self.factory()?, format)
    }
}

fn compile_with(factory: &ParserFactory, format: &OutputFormat) -> Result<Constraint, EngineError> {
    let grammar = format.grammar();
    let parser = catch_unwind(AssertUnwindSafe(|| factory.create_parser(grammar)))
        .map_err(|_| "the grammar compiler failed on this schema".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| EngineError::InvalidParams(format!("response_format: {e}")))?;
    let matcher = Matcher::new(Ok(parser));
    if let Some(e) = matcher.get_error() {
        return Err(EngineError::InvalidParams(format!("response_format: {e}")));
    }
    // A schema can compile and still allow no text at all (a `$ref` that only refers to
    // itself): the first step's mask tells, so such a request is refused here rather than
    // failing its generation at the first token. Computed on a copy, which is then dropped.
    if let Err(e) = matcher.deep_clone().compute_mask() {
        return Err(EngineError::InvalidParams(format!(
            "response_format: no answer can satisfy this schema ({})",
            first_line(&e.to_string())
        )));
    }
    Ok(Constraint { matcher })
}

/// The first line of an llguidance error, whose further lines dump the parser's state.
fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or_default().trim()
}

/// Checks that `format` compiles, without a model: the grammar is compiled against a
/// vocabulary of the 256 single bytes. Whether a schema compiles does not depend on the
/// vocabulary, so a server that holds no model (the queen) refuses a bad schema with the same
/// message a worker would.
pub fn check_output_format(format: &OutputFormat) -> Result<(), EngineError> {
    static BYTES: OnceLock<Result<ParserFactory, String>> = OnceLock::new();
    let factory = BYTES
        .get_or_init(|| {
            let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
            words.push(special(b"</s>"));
            let info = TokRxInfo::new(words.len() as u32, 256);
            factory_over(words, info, None)
        })
        .as_ref()
        .map_err(|e| EngineError::Inference(format!("the byte vocabulary: {e}")))?;
    compile_with(factory, format).map(drop)
}

/// The constraint of one generation: which tokens may come next, advanced with each token.
pub struct Constraint {
    matcher: Matcher,
}

impl Clone for Constraint {
    /// A constraint in the same state, advanced independently of this one.
    fn clone(&self) -> Self {
        Constraint {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("finished", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// Sets the logit of every token the constraint does not allow next to -inf. Entries past
    /// the trie's vocabulary (none, when the environment was built for these logits) are left.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        // A schema can dead-end after a start (a required property whose `$ref` only refers to
        // itself): that is the request's to fix, so the client hears why, not an internal error.
        let mask = self.matcher.compute_mask().map_err(|e| {
            let e = e.to_string();
            tracing::debug!(error = e, "the response format allows nothing here");
            EngineError::InvalidParams(format!(
                "response_format: the answer cannot be continued under this schema ({})",
                first_line(&e)
            ))
        })?;
        let n = logits.len().min(mask.len());
        mask.iter_unset_entries(|id| {
            if id < n {
                logits[id] = f32::NEG_INFINITY;
            }
        });
        Ok(())
    }

    /// Advances the constraint past `token`, which must be one it allowed.
    pub fn accept(&mut self, token: u32) -> Result<(), EngineError> {
        self.matcher
            .consume_token(token as TokenId)
            .map_err(constraint_error)
    }

    /// Whether the text so far is complete and nothing may follow it (only an end of sequence
    /// would be allowed): the generation is done.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the text so far is a complete answer (more may still be allowed to follow).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

fn constraint_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Inference(format!("the output constraint failed: {e}"))
}

/// A special token's trie entry: llguidance never lets a grammar's text produce one.
fn special(name: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(name.len() + 1);
    bytes.push(TokTrie::SPECIAL_TOKEN_MARKER);
    bytes.extend_from_slice(name);
    bytes
}

fn model_factory(tokenizer: &TextTokenizer, vocab_size: usize) -> Result<ParserFactory, String> {
    let mut words = token_bytes(tokenizer.inner())?;
    words.resize(vocab_size.max(words.len()), Vec::new());
    words.truncate(vocab_size);
    // Ids without text (padding past the tokenizer's vocabulary) must never be chosen.
    for (id, word) in words.iter_mut().enumerate() {
        if word.is_empty() {
            *word = special(format!("<[{id}]>").as_bytes());
        }
    }
    let eos: Vec<u32> = tokenizer
        .eos_token_ids()
        .iter()
        .copied()
        .filter(|&id| (id as usize) < vocab_size)
        .collect();
    let Some(&first_eos) = eos.first() else {
        return Err("the model has no end-of-sequence token".into());
    };
    // An end-of-generation token ends the answer wherever it is sampled, so it is never text
    // inside one, even where the vocabulary lists it as an ordinary token (`</s>` found by its
    // text): as a special token it is allowed only where the answer is complete.
    for &id in &eos {
        let word = &mut words[id as usize];
        if word.first() != Some(&TokTrie::SPECIAL_TOKEN_MARKER) {
            *word = special(word);
        }
    }
    let mut info = TokRxInfo::new(vocab_size as u32, first_eos);
    info.tok_bos = tokenizer.bos_token_id();
    factory_over(
        words,
        info,
        Some((without_space_prefix(tokenizer.inner()), eos)),
    )
}

/// `tokenizer` without the space a SentencePiece-style tokenizer puts before a text: llguidance
/// tokenizes pieces of the answer (text it forces), which must come out as they would inside
/// the answer, not as the start of a new text.
fn without_space_prefix(tokenizer: &Tokenizer) -> Tokenizer {
    fn normalizer(n: NormalizerWrapper) -> Option<NormalizerWrapper> {
        match n {
            NormalizerWrapper::Prepend(_) => None,
            NormalizerWrapper::Sequence(seq) => {
                let rest: Vec<NormalizerWrapper> = seq
                    .as_ref()
                    .iter()
                    .filter_map(|n| normalizer(n.clone()))
                    .collect();
                (!rest.is_empty()).then(|| NormalizerWrapper::Sequence(Sequence::new(rest)))
            }
            n => Some(n),
        }
    }
    fn pre_tokenizer(p: PreTokenizerWrapper) -> PreTokenizerWrapper {
        match p {
            PreTokenizerWrapper::Metaspace(mut m) => {
                m.prepend_scheme = PrependScheme::Never;
                PreTokenizerWrapper::Metaspace(m)
            }
            PreTokenizerWrapper::Sequence(seq) => {
                PreTokenizerWrapper::Sequence(pre_tokenizers::sequence::Sequence::new(
                    seq.as_ref().iter().cloned().map(pre_tokenizer).collect(),
                ))
            }
            p => p,
        }
    }
    let mut plain = tokenizer.clone();
    if let Some(n) = tokenizer.get_normalizer().cloned() {
        plain.with_normalizer(normalizer(n));
    }
    if let Some(p) = tokenizer.get_pre_tokenizer().cloned() {
        plain.with_pre_tokenizer(Some(pre_tokenizer(p)));
    }
    plain
}

fn factory_over(
    words: Vec<Vec<u8>>,
    info: TokRxInfo,
    tokenizer: Option<(Tokenizer, Vec<u32>)>,
) -> Result<ParserFactory, String> {
    catch_unwind(move || {
        let mut trie = TokTrie::from(&info, &words);
        let tokenizer = match tokenizer {
            Some((tokenizer, eos)) => {
                trie = trie.with_eos_tokens(&eos);
                Some(tokenizer)
            }
            None => None,
        };
        let env: TokEnv = Arc::new(TrieEnv { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(factory)
    })
    .unwrap_or_else(|_| Err("building the token trie failed".into()))
}

/// The token trie, and the tokenizer llguidance asks to tokenize text it forces.
struct TrieEnv {
    trie: TokTrie,
    tokenizer: Option<Tokenizer>,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            match self.tokenizer.as_ref().map(|t| t.encode(text, false)) {
                Some(Ok(encoding)) => encoding.get_ids().to_vec(),
                _ => self.trie.greedy_tokenize(text.as_bytes()),
            }
        })
    }
}

/// The bytes of every token of `tokenizer`, indexed by id: special tokens carry llguidance's
/// marker byte; the byte-level (GPT-2 style) and byte-fallback (SentencePiece style) encodings
/// of the vocabulary are undone.
pub(crate) fn token_bytes(tokenizer: &Tokenizer) -> Result<Vec<Vec<u8>>, String> {
    let mut byte_level = false;
    let mut byte_fallback = false;
    let mut space = None;
    fn inspect(
        d: &DecoderWrapper,
        byte_level: &mut bool,
        byte_fallback: &mut bool,
        space: &mut Option<char>,
    ) {
        match d {
            DecoderWrapper::ByteLevel(_) => *byte_level = true,
            DecoderWrapper::ByteFallback(_) => *byte_fallback = true,
            DecoderWrapper::Metaspace(m) => *space = Some(m.get_replacement()),
            DecoderWrapper::Replace(r) => {
                // The pattern is private; its serialized form names it.
                if let Ok(v) = serde_json::to_value(r)
                    && v["content"] == " "
                    && let Some(p) = v["pattern"]["String"].as_str()
                    && let (Some(c), None) = (p.chars().next(), p.chars().nth(1))
                {
                    *space = Some(c);
                }
            }
            DecoderWrapper::Sequence(seq) => {
                for d in seq.get_decoders() {
                    inspect(d, byte_level, byte_fallback, space);
                }
            }
            _ => {}
        }
    }
    if let Some(d) = tokenizer.get_decoder() {
        inspect(d, &mut byte_level, &mut byte_fallback, &mut space);
    }
    if !byte_level && !byte_fallback && space.is_none() {
        return Err(format!(
            "its decoder ({}) is neither byte-level nor byte-fallback",
            tokenizer
                .get_decoder()
                .and_then(|d| serde_json::to_value(d).ok())
                .map_or("none".into(), |v| v["type"].to_string())
        ));
    }
    let unicode_to_byte = byte_level_map();
    let n = tokenizer.get_vocab_size(true);
    let mut words = vec![Vec::new(); n];
    let added = tokenizer.get_added_tokens_decoder();
    for (id, word) in words.iter_mut().enumerate() {
        let id32 = id as u32;
        if let Some(token) = added.get(&id32) {
            *word = if token.special {
                special(token.content.as_bytes())
            } else {
                token.content.as_bytes().to_vec()
            };
            continue;
        }
        let Some(name) = tokenizer.id_to_token(id32) else {
            continue;
        };
        if byte_level {
            // A token with a character outside the byte alphabet is left without bytes: it is
            // never allowed.
            if let Some(bytes) = name
                .chars()
                .map(|c| unicode_to_byte.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
            {
                *word = bytes;
            }
        } else if byte_fallback
            && name.len() == 6
            && name.starts_with("<0x")
            && name.ends_with('>')
            && let Ok(b) = u8::from_str_radix(&name[3..5], 16)
        {
            *word = vec![b];
        } else {
            let text = match space {
                Some(c) => name.replace(c, " "),
                None => name,
            };
            *word = text.into_bytes();
        }
    }
    Ok(words)
}

/// GPT-2's byte-level alphabet: the character each byte is written as in the vocabulary.
fn byte_level_map() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    let mut map = std::collections::HashMap::with_capacity(256);
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("below the surrogates");
            next += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_that_compile_pass_the_check() {
        check_output_format(&OutputFormat::JsonObject).unwrap();
        check_output_format(&OutputFormat::JsonSchema(json!({
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/$defs/B"}},
            "required": ["a"],
            "$defs": {"B": {"type": "string", "maxLength": 4}},
        })))
        .unwrap();
    }

    #[test]
    fn a_bad_schema_is_refused_with_the_reason() {
        for (schema, says) in [
            (json!({"type": "nonsense"}), "nonsense"),
            (json!({"$ref": "#/$defs/Missing"}), "Missing"),
            (
                json!({"type": "integer", "minimum": 5, "maximum": 1}),
                "nsatisfiable",
            ),
            // Compiles, but nothing can start it.
            (json!({"$ref": "#"}), "no answer can satisfy"),
            (
                json!({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}),
                "no answer can satisfy",
            ),
        ] {
            let err = check_output_format(&OutputFormat::JsonSchema(schema.clone())).unwrap_err();
            assert!(matches!(err, EngineError::InvalidParams(_)), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("response_format"), "{msg}");
            assert!(msg.contains(says), "{schema}: {msg}");
        }
    }

    /// A byte-level vocabulary of the 256 bytes (ids 0 to 255) and `</s>` (256), an ordinary
    /// token that the tokenizer's configuration names as its end of sequence.
    fn plain_eos_tokenizer(dir: &std::path::Path) -> TextTokenizer {
        let mut by_byte: Vec<(char, u8)> = byte_level_map().into_iter().collect();
        by_byte.sort_by_key(|&(_, b)| b);
        let mut vocab: serde_json::Map<String, Value> = by_byte
            .into_iter()
            .map(|(c, b)| (c.to_string(), json!(b)))
            .collect();
        vocab.insert("</s>".into(), json!(256));
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                        "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []},
        });
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            json!({"eos_token": "</s>"}).to_string(),
        )
        .unwrap();
        TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
    }

    #[test]
    fn an_end_of_sequence_token_is_never_text_inside_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = plain_eos_tokenizer(dir.path());
        assert_eq!(tokenizer.eos_token_ids(), [256]);
        let env = ConstraintEnv::new(tokenizer, 257);
        let allowed = |constraint: &mut Constraint, id: usize| {
            let mut logits = vec![0.0f32; 257];
            constraint.mask_logits(&mut logits).unwrap();
            logits[id].is_finite()
        };

        // Inside a string `</s>` would be fine text, but sampled it ends the answer there.
        let mut string = env
            .compile(&OutputFormat::JsonSchema(json!({"type": "string"})))
            .unwrap();
        string.accept(u32::from(b'"')).unwrap();
        assert!(allowed(&mut string, usize::from(b'a')));
        assert!(!allowed(&mut string, 256), "the end token inside a string");

        // Where the answer is complete, it ends it.
        let mut number = env
            .compile(&OutputFormat::JsonSchema(json!({"type": "integer"})))
            .unwrap();
        number.accept(u32::from(b'7')).unwrap();
        assert!(number.is_accepting());
        assert!(
            allowed(&mut number, 256),
            "the end token after a complete answer"
        );
    }

    #[test]
    fn a_schema_that_dead_ends_mid_answer_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let env = ConstraintEnv::new(plain_eos_tokenizer(dir.path()), 257);
        // `a` is required and can never be written: the answer starts, then nothing fits.
        let mut constraint = env
            .compile(&OutputFormat::JsonSchema(json!({
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/X"}},
                "required": ["a"],
                "$defs": {"X": {"$ref": "#/$defs/X"}},
            })))
            .unwrap();
        let mut logits = vec![0.0f32; 257];
        for &b in br#"{"a":"# {
            constraint.mask_logits(&mut logits).unwrap();
            constraint.accept(u32::from(b)).unwrap();
        }
        let err = constraint.mask_logits(&mut logits).unwrap_err();
        assert!(matches!(err, EngineError::InvalidParams(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("response_format: the answer cannot be continued"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn the_byte_alphabet_covers_every_byte_once() {
        let map = byte_level_map();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'a'], b'a');
    }
}
