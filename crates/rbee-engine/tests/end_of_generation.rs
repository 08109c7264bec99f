//! Which tokens end a generation, for the vocabularies of the common families as their GGUF
//! files declare them. The expected sets are llama.cpp's (`special_eog_ids` in
//! `llama-vocab.cpp`): the declared EOS, EOT and EOM ids, fill-in-the-middle padding,
//! repository and file-separator tokens, and every token spelled like a usual end of turn.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use rbee_engine::tokenizer::TextTokenizer;

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;

/// A GGUF tokenizer whose vocabulary is the 26 lowercase letters followed by `specials`
/// (control tokens), with `keys` added to the metadata. `model` is `gpt2` (byte-level BPE) or
/// `llama` (SentencePiece).
fn tokenizer(model: &str, specials: &[&str], keys: &[(&str, u32)]) -> TextTokenizer {
    let mut tokens: Vec<(String, i32)> = ('a'..='z').map(|c| (c.to_string(), NORMAL)).collect();
    tokens.extend(specials.iter().map(|s| (s.to_string(), CONTROL)));
    let mut metadata: HashMap<String, Value> = HashMap::from([
        ("tokenizer.ggml.model".into(), Value::String(model.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.0.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(tokens.iter().map(|t| Value::I32(t.1)).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(tokens.iter().map(|_| Value::F32(0.0)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
    ]);
    for (key, id) in keys {
        metadata.insert((*key).into(), Value::U32(*id));
    }
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    TextTokenizer::from_gguf(&content).unwrap()
}

fn texts(tokenizer: &TextTokenizer) -> Vec<String> {
    tokenizer
        .eos_token_ids()
        .iter()
        .map(|&id| tokenizer.token_to_str(id).unwrap())
        .collect()
}

/// Id of the `n`th special token of [`tokenizer`]'s vocabulary.
fn special(n: u32) -> u32 {
    26 + n
}

#[test]
fn llama_3_instruct_ends_at_eot_end_of_text_and_eom() {
    let specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ];
    // Instruct files declare `<|eot_id|>` as their EOS.
    let tokenizer = tokenizer(
        "gpt2",
        &specials,
        &[
            ("tokenizer.ggml.bos_token_id", special(0)),
            ("tokenizer.ggml.eos_token_id", special(5)),
        ],
    );
    assert_eq!(
        texts(&tokenizer),
        ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]
    );
    // A base model's file declares `<|end_of_text|>`; the turn ends still count.
    let base = self::tokenizer(
        "gpt2",
        &specials,
        &[("tokenizer.ggml.eos_token_id", special(1))],
    );
    assert_eq!(
        texts(&base),
        ["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
    );
}

#[test]
fn gemma_ends_at_eos_and_end_of_turn() {
    let specials = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ];
    let tokenizer = tokenizer(
        "llama",
        &specials,
        &[
            ("tokenizer.ggml.bos_token_id", special(2)),
            ("tokenizer.ggml.eos_token_id", special(1)),
        ],
    );
    assert_eq!(texts(&tokenizer), ["<eos>", "<end_of_turn>"]);
    // A declared EOT comes right after the EOS.
    let declared = self::tokenizer(
        "llama",
        &specials,
        &[
            ("tokenizer.ggml.eos_token_id", special(1)),
            ("tokenizer.ggml.eot_token_id", special(5)),
        ],
    );
    assert_eq!(texts(&declared), ["<eos>", "<end_of_turn>"]);
}

#[test]
fn qwen_ends_at_im_end_endoftext_and_the_fill_in_the_middle_separators() {
    let specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<think>",
    ];
    let tokenizer = tokenizer(
        "gpt2",
        &specials,
        &[
            ("tokenizer.ggml.eos_token_id", special(2)),
            ("tokenizer.ggml.bos_token_id", special(0)),
        ],
    );
    assert_eq!(
        texts(&tokenizer),
        [
            "<|im_end|>",
            "<|endoftext|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>"
        ]
    );
    for id in tokenizer.eos_token_ids() {
        assert!(tokenizer.is_eos(*id));
    }
    assert!(!tokenizer.is_eos(special(1)), "<|im_start|> does not end");
}

#[test]
fn phi_3_ends_at_end_endoftext_and_eos() {
    let specials = [
        "<unk>",
        "<s>",
        "</s>",
        "<|endoftext|>",
        "<|assistant|>",
        "<|end|>",
        "<|user|>",
        "<|system|>",
    ];
    let tokenizer = tokenizer(
        "llama",
        &specials,
        &[
            ("tokenizer.ggml.bos_token_id", special(1)),
            ("tokenizer.ggml.eos_token_id", special(3)),
        ],
    );
    assert_eq!(texts(&tokenizer), ["<|endoftext|>", "<|end|>", "</s>"]);
}

#[test]
fn harmony_vocabularies_do_not_end_at_end() {
    // gpt-oss ends a message with `<|end|>` and goes on; `<|return|>` and `<|call|>` end.
    let specials = [
        "<|start|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|endoftext|>",
    ];
    let tokenizer = tokenizer(
        "gpt2",
        &specials,
        &[("tokenizer.ggml.eos_token_id", special(2))],
    );
    assert_eq!(
        texts(&tokenizer),
        ["<|return|>", "<|call|>", "<|endoftext|>"]
    );
}

#[test]
fn declared_ids_end_generation_whatever_their_text() {
    let specials = [
        "<s>",
        "</s>",
        "<my_turn_end>",
        "<my_message_end>",
        "<my_pad>",
    ];
    let tokenizer = tokenizer(
        "llama",
        &specials,
        &[
            ("tokenizer.ggml.eos_token_id", special(1)),
            ("tokenizer.ggml.eot_token_id", special(2)),
            ("tokenizer.ggml.eom_token_id", special(3)),
            ("tokenizer.ggml.fim_pad_token_id", special(4)),
        ],
    );
    assert_eq!(
        texts(&tokenizer),
        ["</s>", "<my_turn_end>", "<my_message_end>", "<my_pad>"]
    );
}
