use rbee_contract::FinishReason;
use serde_json::{Value, json};

use super::*;
use crate::openai::render::UsageOut;
use crate::openai::request::Kind;

fn renderer(kind: Kind, job: &str, include_usage: bool) -> Renderer {
    Renderer::new(kind, job, 1_700_000_000, "smol".into(), include_usage)
}

fn usage(prompt: u32, completion: u32) -> UsageOut {
    UsageOut {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: None,
    }
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap()
}

#[test]
fn seeds_are_the_seed_plus_the_choice_or_each_random() {
    assert_eq!(seeds(Some(7), 3), vec![Some(7), Some(8), Some(9)]);
    assert_eq!(seeds(Some(u64::MAX), 2), vec![Some(u64::MAX), Some(0)]);
    assert_eq!(seeds(None, 2), vec![None, None]);
    assert_eq!(seeds(Some(5), 1), vec![Some(5)]);
}

#[test]
fn answers_merge_into_indexed_choices_with_the_prompt_counted_once() {
    let bodies = vec![
        renderer(Kind::Chat, "a", false).response("Paris".into(), FinishReason::Stop, usage(6, 2)),
        renderer(Kind::Chat, "b", false).response(
            "Lyon is".into(),
            FinishReason::Length,
            usage(6, 4),
        ),
        renderer(Kind::Chat, "c", false).response("Nice".into(), FinishReason::Stop, usage(6, 1)),
    ];
    let merged = parse(&merge_bodies(&bodies));
    assert_eq!(merged["id"], "chatcmpl-a");
    assert_eq!(merged["object"], "chat.completion");
    let choices = merged["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, (text, reason)) in [("Paris", "stop"), ("Lyon is", "length"), ("Nice", "stop")]
        .iter()
        .enumerate()
    {
        assert_eq!(choices[i]["index"], i);
        assert_eq!(choices[i]["message"]["content"], *text);
        assert_eq!(choices[i]["finish_reason"], *reason);
    }
    assert_eq!(
        merged["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13})
    );

    let texts = vec![
        renderer(Kind::Text, "a", false).response("x".into(), FinishReason::Stop, usage(3, 1)),
        renderer(Kind::Text, "b", false).response("y".into(), FinishReason::Stop, usage(3, 2)),
    ];
    let merged = parse(&merge_bodies(&texts));
    assert_eq!(merged["choices"][1]["index"], 1);
    assert_eq!(merged["choices"][1]["text"], "y");
    assert_eq!(merged["usage"]["total_tokens"], 6);
}

#[test]
fn the_cached_prompt_tokens_are_the_first_choices() {
    let mut cached = usage(10, 1);
    cached.prompt_tokens_details =
        Some(crate::openai::render::PromptTokensDetails { cached_tokens: 4 });
    let merged = merge_usage(&[
        serde_json::to_value(cached).unwrap(),
        serde_json::to_value(usage(10, 2)).unwrap(),
    ]);
    assert_eq!(merged["prompt_tokens_details"]["cached_tokens"], 4);
    assert_eq!(merged["completion_tokens"], 3);
    assert_eq!(merged["total_tokens"], 13);
}

#[test]
fn streams_interleave_with_each_choices_index_then_one_usage_chunk_and_one_done() {
    let a = renderer(Kind::Chat, "a", true);
    let b = renderer(Kind::Chat, "b", true);
    let mut merge = ChunkMerge::new(2);
    let mut out = Vec::new();
    out.extend(merge.take(0, a.opening_chunk().as_deref()));
    out.extend(merge.take(1, b.opening_chunk().as_deref()));
    out.extend(merge.take(1, Some(&b.content_chunk("Ly"))));
    out.extend(merge.take(0, Some(&a.content_chunk("Pa"))));
    out.extend(merge.take(0, Some(&a.finish_chunk(FinishReason::Stop))));
    out.extend(merge.take(0, Some(&a.usage_chunk(usage(6, 1)))));
    out.extend(merge.take(0, Some(DONE_SENTINEL)));
    out.extend(merge.take(0, None));
    assert!(!merge.is_over(), "choice 1 is still generating");
    out.extend(merge.take(1, Some(&b.content_chunk("on"))));
    out.extend(merge.take(1, Some(&b.finish_chunk(FinishReason::Length))));
    out.extend(merge.take(1, Some(&b.usage_chunk(usage(6, 2)))));
    out.extend(merge.take(1, Some(DONE_SENTINEL)));
    assert!(merge.is_over());
    assert!(merge.take(1, None).is_empty());

    assert_eq!(out.last().map(String::as_str), Some(DONE_SENTINEL));
    assert_eq!(out.iter().filter(|l| *l == DONE_SENTINEL).count(), 1);
    let chunks: Vec<Value> = out[..out.len() - 1].iter().map(|l| parse(l)).collect();
    let indexes: Vec<u64> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["index"].as_u64())
        .collect();
    assert_eq!(indexes, vec![0, 1, 1, 0, 0, 1, 1]);
    let text_of = |i: u64| -> String {
        chunks
            .iter()
            .filter(|c| c["choices"][0]["index"].as_u64() == Some(i))
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect()
    };
    assert_eq!(text_of(0), "Pa");
    assert_eq!(text_of(1), "Lyon");
    let reasons: Vec<(u64, &str)> = chunks
        .iter()
        .filter_map(|c| {
            let choice = &c["choices"][0];
            Some((choice["index"].as_u64()?, choice["finish_reason"].as_str()?))
        })
        .collect();
    assert_eq!(reasons, vec![(0, "stop"), (1, "length")]);
    let usage_chunks: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
    assert_eq!(usage_chunks.len(), 1);
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    assert_eq!(
        usage_chunks[0]["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9})
    );
}

#[test]
fn without_include_usage_the_merged_stream_has_no_usage_chunk() {
    let a = renderer(Kind::Text, "a", false);
    let mut merge = ChunkMerge::new(2);
    let mut out = Vec::new();
    for i in 0..2 {
        out.extend(merge.take(i, Some(&a.content_chunk("x"))));
        out.extend(merge.take(i, Some(&a.finish_chunk(FinishReason::Stop))));
        out.extend(merge.take(i, Some(DONE_SENTINEL)));
    }
    assert_eq!(out.len(), 5);
    assert_eq!(out[4], DONE_SENTINEL);
    assert_eq!(parse(&out[2])["choices"][0]["index"], 1);
}

#[test]
fn a_failing_choice_ends_the_stream_with_its_error() {
    let a = renderer(Kind::Chat, "a", false);
    let mut merge = ChunkMerge::new(2);
    let mut out = merge.take(0, Some(&a.content_chunk("x")));
    let error = r#"{"error":{"message":"the worker was lost","type":"server_error","param":null,"code":"worker_lost"}}"#;
    out.extend(merge.take(1, Some(error)));
    assert!(merge.is_over());
    out.extend(merge.take(1, Some(DONE_SENTINEL)));
    out.extend(merge.take(0, Some(&a.content_chunk("y"))));
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(out[1], error);
    assert_eq!(out[2], DONE_SENTINEL);
}
