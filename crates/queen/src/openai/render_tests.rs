use rbee_contract::ErrorCode;

use super::*;
use crate::openai::error::OpenAiError;

fn renderer(kind: Kind, include_usage: bool) -> Renderer {
    Renderer::new(kind, "j1", 1700000000, "smol".into(), include_usage)
}

const USAGE: UsageOut = UsageOut {
    prompt_tokens: 6,
    completion_tokens: 2,
    total_tokens: 8,
    prompt_tokens_details: None,
};

#[test]
fn chat_chunks_are_openais_wire_format() {
    let r = renderer(Kind::Chat, false);
    assert_eq!(
        r.opening_chunk().unwrap(),
        r#"{"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"smol","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#
    );
    assert_eq!(
        r.content_chunk(" Paris"),
        r#"{"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"smol","choices":[{"index":0,"delta":{"content":" Paris"},"logprobs":null,"finish_reason":null}]}"#
    );
    assert_eq!(
        r.finish_chunk(FinishReason::Stop),
        r#"{"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"smol","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}"#
    );
}

#[test]
fn with_include_usage_every_chunk_has_usage_and_the_last_one_carries_it() {
    let r = renderer(Kind::Chat, true);
    assert_eq!(
        r.content_chunk("a"),
        r#"{"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"smol","choices":[{"index":0,"delta":{"content":"a"},"logprobs":null,"finish_reason":null}],"usage":null}"#
    );
    assert_eq!(
        r.usage_chunk(USAGE),
        r#"{"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"smol","choices":[],"usage":{"prompt_tokens":6,"completion_tokens":2,"total_tokens":8}}"#
    );
}

#[test]
fn completion_chunks_carry_text_and_no_role() {
    let r = renderer(Kind::Text, false);
    assert_eq!(r.opening_chunk(), None);
    assert_eq!(
        r.content_chunk(" Paris"),
        r#"{"id":"cmpl-j1","object":"text_completion","created":1700000000,"model":"smol","choices":[{"index":0,"text":" Paris","logprobs":null,"finish_reason":null}]}"#
    );
    assert_eq!(
        r.finish_chunk(FinishReason::Length),
        r#"{"id":"cmpl-j1","object":"text_completion","created":1700000000,"model":"smol","choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length"}]}"#
    );
    assert_eq!(
        renderer(Kind::Text, true).usage_chunk(USAGE),
        r#"{"id":"cmpl-j1","object":"text_completion","created":1700000000,"model":"smol","choices":[],"usage":{"prompt_tokens":6,"completion_tokens":2,"total_tokens":8}}"#
    );
}

#[test]
fn whole_answers_have_choices_finish_reason_and_usage() {
    assert_eq!(
        renderer(Kind::Chat, false).response(" Paris.".into(), FinishReason::Stop, USAGE),
        r#"{"id":"chatcmpl-j1","object":"chat.completion","created":1700000000,"model":"smol","choices":[{"index":0,"message":{"role":"assistant","content":" Paris."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":6,"completion_tokens":2,"total_tokens":8}}"#
    );
    assert_eq!(
        renderer(Kind::Text, false).response(" Paris".into(), FinishReason::Length, USAGE),
        r#"{"id":"cmpl-j1","object":"text_completion","created":1700000000,"model":"smol","choices":[{"index":0,"text":" Paris","logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":6,"completion_tokens":2,"total_tokens":8}}"#
    );
}

#[test]
fn usage_comes_from_the_job_or_from_counting() {
    let tally = Tally {
        prompt_tokens: 4,
        completion_tokens: 3,
    };
    assert_eq!(
        tally.usage(None),
        UsageOut {
            prompt_tokens: 4,
            completion_tokens: 3,
            total_tokens: 7,
            prompt_tokens_details: None,
        }
    );
    assert_eq!(tally.usage(Some(Usage::new(6, 2))), USAGE);
}

#[test]
fn the_error_chunk_is_the_error_object() {
    let err = OpenAiError::from_code(ErrorCode::WorkerLost, "worker w1 went away");
    assert_eq!(
        error_chunk(&err.body()),
        r#"{"error":{"message":"worker w1 went away","type":"server_error","param":null,"code":"worker_lost"}}"#
    );
}

#[test]
fn usage_reports_the_cached_prompt_tokens_when_the_worker_did() {
    let usage = UsageOut::from(Usage::new(6, 2).with_cached_tokens(5));
    assert_eq!(
        renderer(Kind::Chat, true).usage_chunk(usage),
        r#"{"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"smol","choices":[],"usage":{"prompt_tokens":6,"completion_tokens":2,"total_tokens":8,"prompt_tokens_details":{"cached_tokens":5}}}"#
    );
    let text = renderer(Kind::Text, false).response("x".into(), FinishReason::Stop, usage);
    assert!(
        text.contains(r#""prompt_tokens_details":{"cached_tokens":5}"#),
        "{text}"
    );
}

#[test]
fn logprobs_bytes_are_the_tokens_own_bytes() {
    // "é" as two byte-fallback tokens: each decodes alone to U+FFFD, its bytes are its byte.
    let half = |byte: u8, id: u32| TokenEntry {
        logprobs: rbee_contract::TokenLogprobs {
            token: "\u{fffd}".into(),
            logprob: -0.25,
            bytes: Some(vec![byte]),
            top_logprobs: vec![rbee_contract::TopLogprob {
                token_id: id,
                token: "\u{fffd}".into(),
                bytes: Some(vec![byte]),
                logprob: -0.25,
            }],
        },
        offset: 0,
    };
    let tokens = [half(0xC3, 1), half(0xA9, 2)];
    let body: serde_json::Value = serde_json::from_str(
        &renderer(Kind::Chat, false)
            .with_logprobs(true)
            .response_with("é".into(), FinishReason::Stop, USAGE, &tokens),
    )
    .unwrap();
    let content = &body["choices"][0]["logprobs"]["content"];
    assert_eq!(content[0]["token"], "\u{fffd}");
    assert_eq!(content[0]["bytes"], serde_json::json!([0xC3]));
    assert_eq!(content[1]["bytes"], serde_json::json!([0xA9]));
    assert_eq!(
        content[1]["top_logprobs"][0]["bytes"],
        serde_json::json!([0xA9])
    );
    // A worker that sent no bytes: the token's UTF-8.
    let mut plain = half(0, 3);
    plain.logprobs.token = "hi".into();
    plain.logprobs.bytes = None;
    let body: serde_json::Value = serde_json::from_str(
        &renderer(Kind::Chat, false)
            .with_logprobs(true)
            .response_with("hi".into(), FinishReason::Stop, USAGE, &[plain]),
    )
    .unwrap();
    assert_eq!(
        body["choices"][0]["logprobs"]["content"][0]["bytes"],
        serde_json::json!([104, 105])
    );
}
