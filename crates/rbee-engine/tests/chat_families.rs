//! Each generated family's vocabulary and chat template, as its GGUF metadata carries them
//! (model-gen writes them the way llama.cpp's converter does): the tokens that end a generation
//! are the ones llama.cpp's `llama_vocab_is_eog` reports for the generated files (checked with
//! llama-cpp-python 0.3.36), and end-of-turn text typed inside a message is tokenized as text
//! while the template's own copies stay control tokens.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::quantized::gguf_file::{Content, VersionedMagic};
use model_gen::{Arch, GgufType, ModelSpec};
use rbee_engine::tokenizer::TextTokenizer;
use rbee_engine::{ChatTemplate, ChatTurn};

/// Each family with the token its template ends a turn with, and every token that ends a
/// generation.
fn families() -> Vec<(ModelSpec, &'static str, &'static [&'static str])> {
    const QWEN: &[&str] = &["<|endoftext|>", "<|im_end|>"];
    const GEMMA: &[&str] = &["<eos>", "<end_of_turn>"];
    vec![
        (ModelSpec::tiny_arch(Arch::Llama), "</s>", &["</s>"]),
        (
            ModelSpec::tiny_llama3(),
            "<|eot_id|>",
            &["<|end_of_text|>", "<|eot_id|>"],
        ),
        (ModelSpec::tiny_arch(Arch::Qwen2), "<|im_end|>", QWEN),
        (ModelSpec::tiny_arch(Arch::Qwen3), "<|im_end|>", QWEN),
        (ModelSpec::tiny_arch(Arch::Gemma2), "<end_of_turn>", GEMMA),
        (ModelSpec::tiny_arch(Arch::Gemma3), "<end_of_turn>", GEMMA),
        (
            ModelSpec::tiny_arch(Arch::Phi3),
            "<|end|>",
            &["</s>", "<|endoftext|>", "<|end|>"],
        ),
    ]
}

fn tokenizer(spec: &ModelSpec) -> TextTokenizer {
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata: model_gen::gguf_metadata(spec, GgufType::F32)
            .into_iter()
            .collect::<HashMap<_, _>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    TextTokenizer::from_gguf(&content).unwrap()
}

fn turns(pairs: &[(&str, &str)]) -> Vec<ChatTurn> {
    pairs.iter().map(|(r, c)| ChatTurn::new(*r, *c)).collect()
}

/// A chat prompt's ids as the engine prepares them (before any BOS it adds).
fn chat_ids(tokenizer: &TextTokenizer, messages: &[ChatTurn]) -> Vec<u32> {
    let find = |text: &str| -> Vec<Range<usize>> { tokenizer.find_special_text(text) };
    let rendered = ChatTemplate::for_tokenizer(tokenizer)
        .unwrap()
        .render_tracking(messages, true, &find)
        .unwrap();
    tokenizer
        .encode_with_text_spans(&rendered.text, &rendered.typed_control_text)
        .unwrap()
}

/// The rendered prompt encoded whole: typed control-token text read as control tokens.
fn whole_ids(tokenizer: &TextTokenizer, messages: &[ChatTurn]) -> Vec<u32> {
    let rendered = ChatTemplate::for_tokenizer(tokenizer)
        .unwrap()
        .render(messages, true)
        .unwrap();
    tokenizer.encode(&rendered, false).unwrap()
}

#[test]
fn every_family_ends_where_llama_cpp_ends() {
    for (spec, end_of_turn, ends) in families() {
        let tokenizer = tokenizer(&spec);
        let mut texts: Vec<String> = tokenizer
            .eos_token_ids()
            .iter()
            .map(|&id| tokenizer.token_to_str(id).unwrap())
            .collect();
        texts.sort();
        let mut expected: Vec<&str> = ends.to_vec();
        expected.sort();
        assert_eq!(texts, expected, "{}", spec.arch);
        assert!(texts.iter().any(|t| t == end_of_turn), "{}", spec.arch);
        assert_eq!(
            tokenizer.eos_token_ids()[0],
            tokenizer
                .token_to_id(tokenizer.eos_token().unwrap())
                .unwrap(),
            "{}: the declared EOS comes first",
            spec.arch
        );
    }
}

#[test]
fn in_every_family_typed_end_of_turn_text_stays_text() {
    for (spec, end_of_turn, _) in families() {
        let tokenizer = tokenizer(&spec);
        let id = tokenizer.token_to_id(end_of_turn).unwrap();
        let count = |ids: &[u32]| ids.iter().filter(|&&i| i == id).count();

        let plain = turns(&[
            ("user", "Hello world"),
            ("assistant", "Once upon a time"),
            ("user", "What is the number 42?"),
        ]);
        assert_eq!(
            chat_ids(&tokenizer, &plain),
            whole_ids(&tokenizer, &plain),
            "{}",
            spec.arch
        );

        let typed = turns(&[
            ("user", "Hello world"),
            ("assistant", "Once upon a time"),
            ("user", &format!("say {end_of_turn} now")),
        ]);
        let ids = chat_ids(&tokenizer, &typed);
        let whole = whole_ids(&tokenizer, &typed);
        assert!(count(&ids) >= 1, "{}: the template's own", spec.arch);
        assert_eq!(count(&whole) - count(&ids), 1, "{}: {ids:?}", spec.arch);
    }
}
