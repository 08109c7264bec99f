//! The generated vocabulary through the `tokenizers` crate.

use model_gen::tokenizer::{BOS_ID, MIN_VOCAB, Vocab, tokenizer_json};
use model_gen::{ModelSpec, write_hub_dir};
use tokenizers::Tokenizer;
use tokenizers::models::unigram::Unigram;

const TEXTS: &[&str] = &[
    "Hello world",
    "Once upon a time, there was a little girl.",
    "The quick brown fox jumps over the lazy dog",
    "  two leading spaces and  double  spaces ",
    "line one\nline two\ttabbed",
    "numbers 12345 and symbols <>[]{}!?",
    "héllo wörld — ünïcode 🐝 and 日本語",
    "<s> is a special token in the middle </s>",
    "xyzzy qwrtp zzz",
];

fn bpe(vocab_size: usize) -> Tokenizer {
    Tokenizer::from_bytes(tokenizer_json(&Vocab::new(vocab_size)).unwrap()).unwrap()
}

#[test]
fn vocab_has_exact_size_unique_tokens_and_prefix_closed_pieces() {
    for size in [MIN_VOCAB, 512, 2048, 32_000] {
        let vocab = Vocab::new(size);
        assert_eq!(vocab.tokens.len(), size);
        assert_eq!(vocab.scores.len(), size);
        assert_eq!(vocab.token_types.len(), size);
        let unique: std::collections::HashSet<&String> = vocab.tokens.iter().collect();
        assert_eq!(unique.len(), size, "duplicate tokens in vocab of {size}");
        for (token, ty) in vocab.tokens.iter().zip(&vocab.token_types) {
            if *ty == 1 && token.chars().count() > 1 {
                let mut prefix = token.clone();
                prefix.pop();
                assert!(unique.contains(&prefix), "{token:?} without its prefix");
                assert!(token.starts_with('▁'));
            }
        }
        assert_eq!(
            Vocab::new(size),
            vocab,
            "vocab of {size} is not deterministic"
        );
    }
}

#[test]
fn tokenizer_json_round_trips_text_and_adds_bos() {
    for size in [512, 32_000] {
        let tok = bpe(size);
        assert_eq!(tok.get_vocab_size(true), size);
        for text in TEXTS {
            let enc = tok.encode(*text, true).unwrap();
            assert_eq!(enc.get_ids()[0], BOS_ID, "{text:?}");
            let decoded = tok.decode(enc.get_ids(), true).unwrap();
            let expected = text.replace("<s>", "").replace("</s>", "");
            // Special tokens are dropped on decode; the text around them survives.
            if text.contains("<s>") {
                assert_eq!(
                    decoded.split_whitespace().collect::<Vec<_>>(),
                    expected.split_whitespace().collect::<Vec<_>>()
                );
            } else {
                assert_eq!(decoded, *text, "vocab {size}");
            }
        }
    }
}

#[test]
fn common_words_are_single_pieces_and_unknown_characters_fall_back_to_bytes() {
    let tok = bpe(512);
    let pieces = |text: &str| tok.encode(text, false).unwrap().get_tokens().to_vec();
    assert_eq!(pieces("Hello world"), ["▁Hello", "▁world"]);
    assert_eq!(
        pieces("Once upon a time"),
        ["▁Once", "▁upon", "▁a", "▁time"]
    );
    assert_eq!(pieces("é\n"), ["▁", "<0xC3>", "<0xA9>", "<0x0A>"]);
    // A word missing from the vocabulary: its longest word-start piece, then characters.
    assert_eq!(pieces("thexyz"), ["▁the", "x", "y", "z"]);
}

/// A loader that builds a unigram model from the GGUF scores (as some do for `llama`
/// vocabularies) must segment exactly like the BPE merges of `tokenizer.json`.
#[test]
fn unigram_over_the_scores_agrees_with_bpe_merges() {
    for size in [512, 32_000] {
        let vocab = Vocab::new(size);
        let bpe = bpe(size);
        let mut unigram = bpe.clone();
        let pieces: Vec<(String, f64)> = vocab
            .tokens
            .iter()
            .zip(&vocab.scores)
            .map(|(t, &s)| (t.clone(), f64::from(s)))
            .collect();
        unigram.with_model(Unigram::from(pieces, Some(0), true).unwrap());
        for text in TEXTS {
            assert_eq!(
                unigram.encode(*text, true).unwrap().get_ids(),
                bpe.encode(*text, true).unwrap().get_ids(),
                "{text:?} with vocab {size}"
            );
        }
    }
}

#[test]
fn hub_dir_tokenizer_files_load() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::tiny();
    write_hub_dir(&spec, dir.path()).unwrap();
    let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), spec.vocab);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["bos_token"], "<s>");
    assert_eq!(config["eos_token"], "</s>");
    assert_eq!(config["add_bos_token"], true);
    assert!(
        config["chat_template"]
            .as_str()
            .unwrap()
            .contains("messages")
    );
    let hf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(hf["architectures"][0], "LlamaForCausalLM");
    assert_eq!(hf["num_key_value_heads"], 2);
    assert_eq!(hf["vocab_size"], 512);
    assert_eq!(hf["tie_word_embeddings"], false);
}
