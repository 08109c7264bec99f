//! The GGUF-built tokenizer against SmolLM2-135M-Instruct's real vocabulary (byte-level BPE,
//! `smollm` pre-tokenizer). Expected ids were derived independently of this crate: a plain
//! Python GPT-2 BPE (byte-to-unicode map, the GPT-2 word regex after isolating digits, greedy
//! lowest-rank merges) over the GGUF's `tokens`/`merges`, cross-checked by hand against the
//! vocabulary for the pieces named below.
//!
//! The model file is found by `model_gen::paths::smollm2_gguf` (`cargo xtask fetch-smollm2`);
//! without it these tests fail rather than pass unchecked.

use std::fs::File;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::Content;
use rbee_engine::tokenizer::{IncrementalDecoder, TextTokenizer};

fn model_path() -> Option<PathBuf> {
    Some(
        model_gen::paths::smollm2_gguf().expect(
            "SmolLM2 is missing: run `cargo xtask fetch-smollm2` (or set RBEE_SMOLLM2_GGUF)",
        ),
    )
}

fn load() -> Option<(TextTokenizer, Content)> {
    let path = model_path()?;
    let mut file = File::open(&path).expect("open GGUF");
    let content = Content::read(&mut file).expect("read GGUF header");
    let tokenizer = TextTokenizer::from_gguf(&content).expect("build tokenizer from GGUF");
    Some((tokenizer, content))
}

/// (text, ids) pairs; see the module doc for how the ids were obtained.
const CASES: &[(&str, &[u32])] = &[
    ("The", &[504]),
    (" The", &[378]),
    ("The capital of France is", &[504, 3575, 282, 4649, 314]),
    // Every digit is its own pre-token: the vocabulary has no multi-digit pieces at all.
    ("12345", &[33, 34, 35, 36, 37]),
    // "½" is a number too (`\p{N}`): split from its space it is "Â½", while the GPT-2 regex
    // alone would give " ½" = "ĠÂ" + "½" = [3351, 138].
    (" ½ cup", &[216, 16738, 7118]),
    // GPT-2's `\s+(?!\S)` leaves the last space to the word that follows.
    ("  leading spaces", &[216, 2899, 5600]),
    ("line one\nline two\n\n", &[1311, 582, 198, 1311, 827, 1116]),
    ("\t tab", &[197, 10147]),
    ("héllo wörld", &[88, 2756, 31394, 267, 29989, 400]),
    (
        "I ❤️ 🦀 Rust",
        &[57, 4636, 247, 114, 31752, 15107, 116, 218, 36828],
    ),
    ("日本語", &[23274, 115, 40993, 179, 120, 248]),
    ("<|im_start|>user\nHi<|im_end|>", &[1, 4093, 198, 26843, 2]),
    (
        "Hello, world! It's 3.14 and 2024-01-02.",
        &[
            19556, 28, 905, 17, 657, 506, 216, 35, 30, 33, 36, 284, 216, 34, 32, 34, 36, 29, 32,
            33, 29, 32, 34, 30,
        ],
    ),
];

#[test]
fn metadata_is_what_smollm2_declares() {
    let Some((tokenizer, content)) = load() else {
        return;
    };
    let pre = content.metadata["tokenizer.ggml.pre"].to_string().unwrap();
    assert_eq!(pre, "smollm");
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.bos_token_id(), Some(1));
    assert_eq!(tokenizer.bos_token(), Some("<|im_start|>"));
    assert_eq!(tokenizer.eos_token(), Some("<|im_end|>"));
    assert!(!tokenizer.add_bos(), "SmolLM2 sets add_bos_token = false");
    // The declared EOS first, then `<|endoftext|>`, the document end SmolLM2 also emits, and
    // `<reponame>`, which llama.cpp takes for the fill-in-the-middle repository token: the set
    // llama.cpp 0.3.36 (llama-cpp-python) reports for this file is {0, 2, 4}.
    assert_eq!(tokenizer.eos_token_ids(), &[2, 0, 4]);
    assert!(tokenizer.is_eos(0) && tokenizer.is_eos(2) && !tokenizer.is_eos(1));
    assert!(
        !tokenizer.is_eos(3) && !tokenizer.is_eos(5),
        "<repo_name>, <file_sep>"
    );
    assert!(tokenizer.chat_template().unwrap().contains("<|im_start|>"));
    assert_eq!(tokenizer.token_to_str(378).as_deref(), Some("ĠThe"));
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(2));
}

#[test]
fn pieces_of_a_plain_sentence_are_whole_words() {
    let Some((tokenizer, _)) = load() else {
        return;
    };
    let ids = tokenizer.encode("The capital of France is", false).unwrap();
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| tokenizer.token_to_str(id).unwrap())
        .collect();
    assert_eq!(pieces, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]);
}

#[test]
fn encodes_like_the_reference_tokenizer() {
    let Some((tokenizer, _)) = load() else {
        return;
    };
    for (text, expected) in CASES {
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(&ids, expected, "encoding {text:?}");
        // add_bos is false for SmolLM2, so special tokens change nothing here.
        assert_eq!(&tokenizer.encode(text, true).unwrap(), expected);
    }
}

#[test]
fn decoding_round_trips() {
    let Some((tokenizer, _)) = load() else {
        return;
    };
    for (text, expected) in CASES {
        assert_eq!(&tokenizer.decode(expected, false).unwrap(), text);
    }
    assert_eq!(
        tokenizer.decode(&[1, 4093, 198, 26843, 2], true).unwrap(),
        "user\nHi"
    );
}

#[test]
fn incremental_decoding_never_splits_a_character() {
    let Some((tokenizer, _)) = load() else {
        return;
    };
    let text = "Héllo 🦀 wörld, 日本語! 12 ❤️";
    let ids = tokenizer.encode(text, false).unwrap();
    let mut decoder = tokenizer.incremental_decoder();
    let mut out = String::new();
    let mut held_back = 0;
    for &id in &ids {
        match decoder.push(id).unwrap() {
            Some(piece) => {
                assert!(!piece.contains('\u{FFFD}'), "half a character in {piece:?}");
                out.push_str(&piece);
            }
            None => held_back += 1,
        }
    }
    assert_eq!(decoder.finish().unwrap(), None);
    assert_eq!(out, text);
    assert!(held_back > 0, "the emoji and CJK bytes span several tokens");
}

#[test]
fn incremental_decoding_skips_special_tokens_and_keeps_context() {
    let Some((tokenizer, _)) = load() else {
        return;
    };
    let prompt = tokenizer
        .encode(
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .unwrap();
    let reply = tokenizer.encode(" Hello there!<|im_end|>", false).unwrap();
    let mut decoder = IncrementalDecoder::with_context(tokenizer.clone(), &prompt);
    let mut out = String::new();
    for &id in &reply {
        out.extend(decoder.push(id).unwrap());
    }
    out.extend(decoder.finish().unwrap());
    assert_eq!(out, " Hello there!");
}

#[test]
fn a_saved_tokenizer_json_loads_with_its_config() {
    let Some((tokenizer, _)) = load() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("rbee-tokenizer-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = tokenizer.inner().to_string(false).unwrap();
    std::fs::write(dir.join("tokenizer.json"), json).unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": true},
        "add_bos_token": true,
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": tokenizer.chat_template().unwrap()},
        ],
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, 5]}"#,
    )
    .unwrap();

    let loaded = TextTokenizer::from_file(&dir.join("tokenizer.json"));
    std::fs::remove_dir_all(&dir).unwrap();
    let loaded = loaded.unwrap();

    for (text, expected) in CASES {
        assert_eq!(&loaded.encode(text, false).unwrap(), expected, "{text:?}");
    }
    assert!(loaded.add_bos());
    assert_eq!(loaded.encode("The", true).unwrap(), [1, 504]);
    assert_eq!(loaded.eos_token(), Some("<|im_end|>"));
    // EOS, then by id: `<|endoftext|>`, `<reponame>` and the listed 5.
    assert_eq!(loaded.eos_token_ids(), &[2, 0, 4, 5]);
    assert_eq!(loaded.chat_template(), tokenizer.chat_template());
}

#[test]
fn token_bytes_of_a_split_character_join_into_its_utf8() {
    let (tokenizer, _) = load().expect("SmolLM2");
    // Byte-level BPE spells bytes as characters (`Ġ` a space); the emoji has no piece of its
    // own and is split across tokens whose bytes are not UTF-8 alone.
    for text in ["🐝", " café 🐝", "naïve ½"] {
        let ids = tokenizer.encode(text, false).unwrap();
        let mut joined = Vec::new();
        for &id in &ids {
            joined.extend_from_slice(tokenizer.token_bytes(id).expect("every token has bytes"));
        }
        assert_eq!(joined, text.as_bytes(), "{text}: {ids:?}");
    }
    let bee = tokenizer.encode("🐝", false).unwrap();
    assert!(bee.len() > 1, "{bee:?}");
    let first = tokenizer.token_bytes(bee[0]).unwrap();
    assert!(std::str::from_utf8(first).is_err(), "{first:?}");
    assert_eq!(tokenizer.decode(&bee[..1], false).unwrap(), "\u{fffd}");
    // A word piece is its text with the space spelled out; a special token is its text.
    let the = tokenizer.encode(" The", false).unwrap();
    assert_eq!(tokenizer.token_bytes(the[0]), Some(&b" The"[..]));
    let end = tokenizer.token_to_id("<|im_end|>").unwrap();
    assert_eq!(tokenizer.token_bytes(end), Some(&b"<|im_end|>"[..]));
}
