//! Chat templates as models ship them: SmolLM2's (from its GGUF file), a Llama-2 template that
//! polices role order with `raise_exception`, and a Llama-3 template that writes `bos_token`.

use std::fs::File;

use candle_core::quantized::gguf_file::Content;
use rbee_engine::chat::{ChatError, ChatTemplate, ChatTurn};
use rbee_engine::tokenizer::TextTokenizer;

/// The template of `meta-llama/Llama-2-7b-chat-hf`'s `tokenizer_config.json`.
const LLAMA2_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// The template of `meta-llama/Meta-Llama-3-8B-Instruct`'s `tokenizer_config.json`.
const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

fn turns(pairs: &[(&str, &str)]) -> Vec<ChatTurn> {
    pairs.iter().map(|(r, c)| ChatTurn::new(*r, *c)).collect()
}

fn smollm2_tokenizer() -> Option<TextTokenizer> {
    let path = model_gen::paths::smollm2_gguf()
        .expect("SmolLM2 is missing: run `cargo xtask fetch-smollm2` (or set RBEE_SMOLLM2_GGUF)");
    let content = Content::read(&mut File::open(&path).unwrap()).unwrap();
    Some(TextTokenizer::from_gguf(&content).unwrap())
}

#[test]
fn smollm2_template_adds_its_default_system_prompt() {
    let Some(tokenizer) = smollm2_tokenizer() else {
        return;
    };
    let template = ChatTemplate::for_tokenizer(&tokenizer).unwrap();
    let prompt = template
        .render(&turns(&[("user", "What is 2+2?")]), true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // The rendered prompt tokenizes with its control tokens as single ids.
    let ids = tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);
}

#[test]
fn smollm2_template_keeps_a_given_system_prompt_and_history() {
    let Some(tokenizer) = smollm2_tokenizer() else {
        return;
    };
    let template = ChatTemplate::for_tokenizer(&tokenizer).unwrap();
    let conversation = turns(&[
        ("system", "Answer in French."),
        ("user", "Hello"),
        ("assistant", "Bonjour"),
        ("user", "Thanks"),
    ]);
    assert_eq!(
        template.render(&conversation, false).unwrap(),
        "<|im_start|>system\nAnswer in French.<|im_end|>\n\
         <|im_start|>user\nHello<|im_end|>\n\
         <|im_start|>assistant\nBonjour<|im_end|>\n\
         <|im_start|>user\nThanks<|im_end|>\n"
    );
}

#[test]
fn llama2_template_renders_system_prompt_and_turns() {
    let template =
        ChatTemplate::new(LLAMA2_TEMPLATE, Some("<s>".into()), Some("</s>".into())).unwrap();
    let prompt = template
        .render(
            &turns(&[
                ("system", "Be kind."),
                ("user", " Hi "),
                ("assistant", "Hello!"),
                ("user", "Bye"),
            ]),
            true,
        )
        .unwrap();
    assert_eq!(
        prompt,
        "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\n Hi [/INST] Hello! </s><s>[INST] Bye [/INST]"
    );
}

#[test]
fn llama2_template_rejects_roles_out_of_order() {
    let template =
        ChatTemplate::new(LLAMA2_TEMPLATE, Some("<s>".into()), Some("</s>".into())).unwrap();
    let err = template
        .render(&turns(&[("user", "a"), ("user", "b")]), true)
        .unwrap_err();
    match &err {
        ChatError::Rejected(message) => assert_eq!(
            message,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(err.to_string().contains("roles must alternate"));
}

#[test]
fn llama3_template_starts_with_bos_token() {
    let template = ChatTemplate::new(
        LLAMA3_TEMPLATE,
        Some("<|begin_of_text|>".into()),
        Some("<|eot_id|>".into()),
    )
    .unwrap();
    let prompt = template
        .render(
            &turns(&[("system", "You are terse."), ("user", "  Hi!\n")]),
            true,
        )
        .unwrap();
    assert_eq!(
        prompt,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn template_bugs_are_render_errors() {
    let template = ChatTemplate::new("{{ messages[0].content.nope() }}", None, None).unwrap();
    let err = template
        .render(&turns(&[("user", "x")]), false)
        .unwrap_err();
    assert!(matches!(err, ChatError::Render(_)), "{err:?}");
}

#[test]
fn trim_and_lstrip_blocks_match_transformers() {
    // transformers renders with trim_blocks and lstrip_blocks: block tags own their line.
    let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}";
    let template = ChatTemplate::new(source, None, None).unwrap();
    assert_eq!(
        template
            .render(&turns(&[("user", "a"), ("user", "b")]), false)
            .unwrap(),
        "U:a\nU:b\n"
    );
}
