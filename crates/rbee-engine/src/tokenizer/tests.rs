//! GGUF tokenizers built from small synthetic vocabularies, through the public API.

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::quantized::gguf_file::{self, Content, Value, VersionedMagic};

use super::{TextTokenizer, TokenizerError};

/// A SentencePiece vocabulary in which "hello world" merges into two words. Scores rank the
/// merged pieces: ll > ▁h > ▁w > or > ▁he > llo > ▁hello > ▁wor > ld > ▁world.
fn sentencepiece_metadata() -> Vec<(String, Value)> {
    let mut tokens: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    tokens.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
    for (piece, score) in [
        ("▁", -100.0),
        ("h", -101.0),
        ("e", -102.0),
        ("l", -103.0),
        ("o", -104.0),
        ("w", -105.0),
        ("r", -106.0),
        ("d", -107.0),
        ("ll", -1.0),
        ("▁h", -2.0),
        ("▁w", -3.0),
        ("or", -4.0),
        ("▁he", -5.0),
        ("llo", -6.0),
        ("▁hello", -7.0),
        ("▁wor", -8.0),
        ("ld", -9.0),
        ("▁world", -10.0),
    ] {
        tokens.push((piece.into(), score, 1));
    }
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            strings(tokens.iter().map(|t| t.0.clone()).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(tokens.iter().map(|t| Value::F32(t.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(tokens.iter().map(|t| Value::I32(t.2)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
    ]
}

fn content(metadata: Vec<(String, Value)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: metadata.into_iter().collect::<HashMap<_, _>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

/// Ids of the synthetic vocabulary: 3 specials, 256 bytes, then the pieces in order.
const BYTE_BASE: u32 = 3;
const SPACE: u32 = 259;
const HELLO: u32 = 259 + 14;
const WORLD: u32 = 259 + 17;

fn sentencepiece() -> TextTokenizer {
    TextTokenizer::from_gguf(&content(sentencepiece_metadata())).unwrap()
}

#[test]
fn sentencepiece_words_get_their_leading_space_piece() {
    let tokenizer = sentencepiece();
    assert_eq!(tokenizer.token_to_str(HELLO).as_deref(), Some("▁hello"));
    assert_eq!(tokenizer.token_to_str(WORLD).as_deref(), Some("▁world"));
    assert_eq!(
        tokenizer.encode("hello world", false).unwrap(),
        [HELLO, WORLD]
    );
    assert!(tokenizer.add_bos());
    assert_eq!(
        tokenizer.encode("hello world", true).unwrap(),
        [1, HELLO, WORLD]
    );
    assert_eq!(
        tokenizer.decode(&[1, HELLO, WORLD], true).unwrap(),
        "hello world"
    );
    assert_eq!(tokenizer.bos_token(), Some("<s>"));
    assert_eq!(tokenizer.eos_token(), Some("</s>"));
    assert_eq!(tokenizer.eos_token_ids(), &[2]);
}

#[test]
fn sentencepiece_falls_back_to_bytes_outside_the_vocabulary() {
    let tokenizer = sentencepiece();
    // Neither "!" nor "é" is a piece: they become their UTF-8 bytes; the space before "é"
    // stays a lone "▁".
    let ids = tokenizer.encode("hello world! é", false).unwrap();
    assert_eq!(
        ids,
        [
            HELLO,
            WORLD,
            BYTE_BASE + b'!' as u32,
            SPACE,
            BYTE_BASE + 0xC3,
            BYTE_BASE + 0xA9,
        ]
    );
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), "hello world! é");
}

#[test]
fn sentencepiece_special_tokens_in_text_are_single_ids() {
    let tokenizer = sentencepiece();
    // Text after a special token gets its own leading space piece, as llama.cpp and HF's
    // legacy Llama tokenizer both do.
    assert_eq!(
        tokenizer.encode("<s>hello</s>", false).unwrap(),
        [1, HELLO, 2]
    );
    assert_eq!(
        tokenizer.decode(&[1, HELLO, 2], false).unwrap(),
        "<s> hello</s>"
    );
}

#[test]
fn incremental_decoding_waits_for_the_whole_character() {
    let tokenizer = sentencepiece();
    let mut decoder = tokenizer.incremental_decoder();
    assert_eq!(decoder.push(HELLO).unwrap().as_deref(), Some("hello"));
    assert_eq!(decoder.push(BYTE_BASE + 0xC3).unwrap(), None);
    assert_eq!(
        decoder.push(BYTE_BASE + 0xA9).unwrap().as_deref(),
        Some("é")
    );
    assert_eq!(decoder.push(WORLD).unwrap().as_deref(), Some(" world"));
    assert_eq!(decoder.push(2).unwrap(), None);
    assert_eq!(decoder.finish().unwrap(), None);
}

#[test]
fn incremental_decoding_flushes_an_unfinished_character() {
    let tokenizer = sentencepiece();
    let mut decoder = tokenizer.incremental_decoder();
    assert_eq!(decoder.push(BYTE_BASE + 0xE2).unwrap(), None);
    assert_eq!(decoder.finish().unwrap().as_deref(), Some("\u{FFFD}"));
}

#[test]
fn context_keeps_the_first_words_leading_space() {
    let tokenizer = sentencepiece();
    let mut fresh = tokenizer.incremental_decoder();
    assert_eq!(fresh.push(WORLD).unwrap().as_deref(), Some("world"));
    let mut in_context = super::IncrementalDecoder::with_context(tokenizer, &[1, HELLO]);
    assert_eq!(in_context.push(WORLD).unwrap().as_deref(), Some(" world"));
}

#[test]
fn a_written_gguf_file_reads_back_into_the_same_tokenizer() {
    let metadata = sentencepiece_metadata();
    let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = Cursor::new(Vec::new());
    gguf_file::write(&mut file, &refs, &[]).unwrap();
    file.set_position(0);
    let read = Content::read(&mut file).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&read).unwrap();
    assert_eq!(
        tokenizer.encode("hello world", true).unwrap(),
        [1, HELLO, WORLD]
    );
}

#[test]
fn unsupported_and_incomplete_vocabularies_are_clear_errors() {
    let mut metadata = sentencepiece_metadata();
    metadata[0].1 = Value::String("bert".into());
    let err = TextTokenizer::from_gguf(&content(metadata)).unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedModel(ref m) if m == "bert"));
    assert!(err.to_string().contains("bert"), "{err}");

    let gpt2_without_merges = vec![
        (
            "tokenizer.ggml.model".to_owned(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_owned(),
            Value::Array(vec![Value::String("a".into())]),
        ),
    ];
    let err = TextTokenizer::from_gguf(&content(gpt2_without_merges)).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

    let err = TextTokenizer::from_gguf(&content(Vec::new())).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.model"), "{err}");
}

/// A byte-level BPE vocabulary covering "ab" with one merge, plus an end-of-turn control token.
#[test]
fn byte_level_vocabulary_with_merges_and_end_tokens() {
    let tokens = [
        "a",
        "b",
        "ab",
        "Ġ",
        "Ġab",
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
    ];
    let types = [1, 1, 1, 1, 1, 3, 3, 1];
    let metadata = vec![
        (
            "tokenizer.ggml.model".to_owned(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_owned(),
            Value::String("qwen2".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_owned(),
            Value::Array(tokens.iter().map(|t| Value::String((*t).into())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_owned(),
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".to_owned(),
            Value::Array(vec![
                Value::String("a b".into()),
                Value::String("Ġ ab".into()),
                Value::String("x y".into()),
            ]),
        ),
        ("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(5)),
        ("tokenizer.ggml.eot_token_id".to_owned(), Value::U32(7)),
    ];
    let tokenizer = TextTokenizer::from_gguf(&content(metadata)).unwrap();
    assert_eq!(tokenizer.encode("ab ab", true).unwrap(), [2, 4]);
    assert_eq!(tokenizer.encode("ab<|im_end|>", false).unwrap(), [2, 5]);
    assert_eq!(tokenizer.decode(&[2, 4, 5], true).unwrap(), "ab ab");
    assert_eq!(tokenizer.bos_token_id(), None);
    assert!(!tokenizer.add_bos());
    // EOS, the declared EOT, then the special `<|endoftext|>`; `<|eot_id|>` is declared but
    // not a control token, so only its declaration counts.
    assert_eq!(tokenizer.eos_token_ids(), &[5, 7, 6]);
}

#[test]
fn special_token_text_is_found_leftmost_and_longest_first() {
    let tokenizer = sentencepiece();
    let text = "a<s></s>b </s";
    let found: Vec<&str> = tokenizer
        .find_special_text(text)
        .into_iter()
        .map(|r| &text[r])
        .collect();
    assert_eq!(found, ["<s>", "</s>"]);
    let unk = tokenizer.find_special_text("<unk> é");
    assert_eq!(unk.len(), 1);
    assert_eq!(unk[0], 0..5);
}

#[test]
fn special_token_text_inside_text_spans_is_tokenized_as_text() {
    let tokenizer = sentencepiece();
    let text = "<s>hello</s>world</s>";
    // Without spans: exactly `encode(text, false)`.
    assert_eq!(
        tokenizer.encode_with_text_spans(text, &[]).unwrap(),
        tokenizer.encode(text, false).unwrap()
    );
    assert_eq!(
        tokenizer.encode(text, false).unwrap(),
        [1, HELLO, 2, WORLD, 2]
    );
    // The first `</s>` is text: it joins "hello" and "world" in one piece of text, spelled in
    // bytes (the vocabulary has no `<`, `/`, `s` or `>`); the last one stays a control token.
    let byte = |b: u8| BYTE_BASE + u32::from(b);
    let first_eos = 8..12;
    assert_eq!(
        tokenizer
            .encode_with_text_spans(text, &[first_eos])
            .unwrap(),
        [
            1,
            HELLO,
            byte(b'<'),
            byte(b'/'),
            byte(b's'),
            byte(b'>'),
            // "world" inside the piece has no leading space: "w", "or", "ld".
            259 + 5,
            259 + 11,
            259 + 16,
            2,
        ]
    );
}
