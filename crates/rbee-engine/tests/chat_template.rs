//! Chat templates as models ship them: SmolLM2's (from its GGUF file), a Llama-2 template that
//! polices role order with `raise_exception`, a Llama-3 template that writes `bos_token`, and
//! the published templates of Llama 3.1 and 3.2, Qwen2.5, Qwen3, Gemma 2 and 3 and Phi-3.5
//! (`tests/data/templates`, verbatim from the models' `tokenizer_config.json`), each rendering
//! a conversation to the prompt its model was trained on.

use std::fs::File;
use std::path::Path;

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

fn published(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/templates")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn compiled(name: &str, bos: &str, eos: &str) -> ChatTemplate {
    ChatTemplate::new(&published(name), Some(bos.into()), Some(eos.into()))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// system, user, assistant, user: the conversation every published template renders below.
fn conversation() -> Vec<ChatTurn> {
    turns(&[
        ("system", "You are terse."),
        ("user", "Hi!"),
        ("assistant", "Hello."),
        ("user", "What is 2+2?"),
    ])
}

#[test]
fn llama_3_1_renders_headers_with_its_knowledge_date() {
    // Llama 3.3 ships the same template.
    let template = compiled("llama-3.1.jinja", "<|begin_of_text|>", "<|eot_id|>");
    assert_eq!(
        template.render(&conversation(), true).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n\
         You are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    // Without a system message the header is still written, with an empty system prompt.
    assert_eq!(
        template.render(&turns(&[("user", " Hi! ")]), true).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn llama_3_2_writes_todays_date_with_strftime_now() {
    let template = compiled("llama-3.2.jinja", "<|begin_of_text|>", "<|eot_id|>");
    let prompt = template.render(&conversation(), true).unwrap();
    let (head, rest) = prompt.split_once("Today Date: ").unwrap();
    let (date, tail) = rest.split_once("\n\n").unwrap();
    assert_eq!(
        head,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Cutting Knowledge Date: December 2023\n"
    );
    // `strftime_now("%d %b %Y")`: e.g. "06 Dec 2026", the current date rather than the
    // template's fallback of 26 Jul 2024.
    let parts: Vec<&str> = date.split(' ').collect();
    assert_eq!(parts.len(), 3, "{date:?}");
    assert!(parts[0].len() == 2 && parts[0].parse::<u32>().is_ok_and(|d| (1..=31).contains(&d)));
    assert!(
        [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
        ]
        .contains(&parts[1])
    );
    assert!(parts[2].parse::<u32>().is_ok_and(|y| y >= 2025), "{date:?}");
    assert_eq!(
        tail,
        "You are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

const CHATML_CONVERSATION: &str = "<|im_start|>system\nYou are terse.<|im_end|>\n\
    <|im_start|>user\nHi!<|im_end|>\n\
    <|im_start|>assistant\nHello.<|im_end|>\n\
    <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
    <|im_start|>assistant\n";

#[test]
fn qwen2_5_renders_chatml_with_its_default_system_prompt() {
    let template = compiled("qwen2.5.jinja", "", "<|im_end|>");
    assert_eq!(
        template.render(&conversation(), true).unwrap(),
        CHATML_CONVERSATION
    );
    assert_eq!(
        template.render(&turns(&[("user", "Hi!")]), true).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn qwen3_renders_chatml_and_drops_old_reasoning() {
    let template = compiled("qwen3.jinja", "", "<|im_end|>");
    assert_eq!(
        template.render(&conversation(), true).unwrap(),
        CHATML_CONVERSATION
    );
    // Reasoning of turns before the last user message is dropped (`messages[::-1]`,
    // `namespace`, `.split('</think>')`); a final assistant turn keeps it.
    let thinking = turns(&[
        ("user", "Hi!"),
        ("assistant", "<think>\nGreet back.\n</think>\n\nHello."),
        ("user", "What is 2+2?"),
        ("assistant", "<think>\nAdd.\n</think>\n\n4"),
    ]);
    assert_eq!(
        template.render(&thinking, false).unwrap(),
        "<|im_start|>user\nHi!<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n<think>\nAdd.\n</think>\n\n4<|im_end|>\n"
    );
}

#[test]
fn gemma_2_renders_turns_and_refuses_a_system_message() {
    let template = compiled("gemma-2.jinja", "<bos>", "<eos>");
    let without_system = &conversation()[1..];
    assert_eq!(
        template.render(without_system, true).unwrap(),
        "<bos><start_of_turn>user\nHi!<end_of_turn>\n\
         <start_of_turn>model\nHello.<end_of_turn>\n\
         <start_of_turn>user\nWhat is 2+2?<end_of_turn>\n\
         <start_of_turn>model\n"
    );
    match template.render(&conversation(), true).unwrap_err() {
        ChatError::Rejected(message) => assert_eq!(message, "System role not supported"),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn gemma_3_folds_the_system_message_into_the_first_user_turn() {
    let template = compiled("gemma-3.jinja", "<bos>", "<eos>");
    assert_eq!(
        template.render(&conversation(), true).unwrap(),
        "<bos><start_of_turn>user\nYou are terse.\n\nHi!<end_of_turn>\n\
         <start_of_turn>model\nHello.<end_of_turn>\n\
         <start_of_turn>user\nWhat is 2+2?<end_of_turn>\n\
         <start_of_turn>model\n"
    );
    let err = template
        .render(&turns(&[("user", "a"), ("user", "b")]), true)
        .unwrap_err();
    assert!(matches!(err, ChatError::Rejected(_)), "{err:?}");
}

#[test]
fn phi_3_5_renders_its_role_tags() {
    let template = compiled("phi-3.5.jinja", "<s>", "<|endoftext|>");
    assert_eq!(
        template.render(&conversation(), true).unwrap(),
        "<|system|>\nYou are terse.<|end|>\n\
         <|user|>\nHi!<|end|>\n\
         <|assistant|>\nHello.<|end|>\n\
         <|user|>\nWhat is 2+2?<|end|>\n\
         <|assistant|>\n"
    );
    // Without the generation prompt the template closes with EOS.
    assert_eq!(
        template.render(&turns(&[("user", "Hi!")]), false).unwrap(),
        "<|user|>\nHi!<|end|>\n<|endoftext|>"
    );
}
