//! `n` choices of one OpenAI request.
//!
//! Each choice is an `infer` job of its own (one job, one sequence), all created at once:
//! they are dispatched together, and those on the same worker are decoded there in one batch.
//! The queen prefers, among the workers with a free slot, the one holding the longest prefix
//! of a request, which draws the choices to the worker that accepted the first of them. A
//! worker without enough free slots leaves the rest queued or sends them to another worker;
//! the answer is the same.
//!
//! With a `seed`, choice `i` samples with `seed + i`: the choices differ from one another and
//! the same request gives the same `n` choices again. Without one, each job draws its own
//! random seed.
//!
//! Each job's answer is rendered as a single choice (the one-choice path's renderer); this
//! module merges those into one answer: the choices' `index`, the `usage` with the prompt
//! counted once (every choice read the same prompt) and the completion tokens summed. A choice
//! that fails fails the request, and the other jobs are cancelled by dropping their
//! subscriptions, as a client that goes away cancels them all.

use std::pin::Pin;

use futures::stream::{SelectAll, Stream, StreamExt};
use job_server::JobSubscription;
use rbee_contract::{DONE_SENTINEL, JobEvent};
use serde_json::{Value, json};

use super::error::OpenAiError;
use super::render::Renderer;
use super::respond;

/// Most choices one request may ask for: each is a sequence of a worker's batch.
pub(crate) const MAX_CHOICES: u8 = 8;

/// The seed of each of `n` choices: `seed + i` with a seed, each its own random one without.
pub(crate) fn seeds(seed: Option<u64>, n: u8) -> Vec<Option<u64>> {
    (0..u64::from(n))
        .map(|i| seed.map(|s| s.wrapping_add(i)))
        .collect()
}

/// One running choice: its job's subscription, its first generating event and its renderer.
pub(crate) struct Choice {
    pub subscription: JobSubscription,
    pub first: JobEvent,
    pub renderer: Renderer,
}

/// Reads every choice to its end and answers with one JSON body. The first failure is the
/// answer; the other jobs are cancelled when their futures are dropped.
pub(crate) async fn answer(choices: Vec<Choice>) -> Result<String, OpenAiError> {
    let bodies = futures::future::try_join_all(choices.into_iter().map(|choice| async move {
        respond::answer(choice.subscription, &choice.renderer, choice.first).await
    }))
    .await?;
    Ok(merge_bodies(&bodies))
}

/// The answers of single-choice requests (each with `choices[0]`) as one answer whose choice
/// `i` is the `i`-th's. The id, model and creation time are the first's.
pub(crate) fn merge_bodies(bodies: &[String]) -> String {
    let mut parsed: Vec<Value> = bodies
        .iter()
        .map(|body| serde_json::from_str(body).unwrap_or(Value::Null))
        .collect();
    let usages: Vec<Value> = parsed.iter().map(|b| b["usage"].clone()).collect();
    let mut choices = Vec::with_capacity(parsed.len());
    for (index, body) in parsed.iter_mut().enumerate() {
        if let Some(list) = body.get_mut("choices").and_then(Value::as_array_mut) {
            for mut choice in list.drain(..) {
                choice["index"] = json!(index);
                choices.push(choice);
            }
        }
    }
    let Some(mut merged) = parsed.into_iter().next() else {
        return String::new();
    };
    merged["choices"] = Value::Array(choices);
    merged["usage"] = merge_usage(&usages);
    merged.to_string()
}

/// The usage of `n` choices of one prompt: the prompt (and what the cache supplied of it) as
/// the first choice read it, the completion tokens of all of them.
pub(crate) fn merge_usage(usages: &[Value]) -> Value {
    let Some(first) = usages.first() else {
        return Value::Null;
    };
    let mut merged = first.clone();
    let prompt = first["prompt_tokens"].as_u64().unwrap_or(0);
    let completion: u64 = usages
        .iter()
        .map(|u| u["completion_tokens"].as_u64().unwrap_or(0))
        .sum();
    merged["completion_tokens"] = json!(completion);
    merged["total_tokens"] = json!(prompt + completion);
    merged
}

type Lines = Pin<Box<dyn Stream<Item = (usize, Option<String>)> + Send>>;

/// The `data:` payloads of every choice's stream, interleaved as their tokens arrive, each
/// chunk with its choice's `index`; then one usage chunk (when the request asked for usage)
/// and one `[DONE]`.
pub(crate) fn lines(choices: Vec<Choice>) -> impl Stream<Item = String> + Send + 'static {
    let n = choices.len();
    let mut streams: SelectAll<Lines> = SelectAll::new();
    for (index, choice) in choices.into_iter().enumerate() {
        let lines = respond::lines(choice.subscription, choice.renderer, choice.first)
            .map(move |line| (index, Some(line)))
            // Marks the end of a choice's lines, so that a stream that ends without `[DONE]`
            // still counts as ended.
            .chain(futures::stream::once(async move { (index, None) }));
        streams.push(Box::pin(lines));
    }
    let merge = ChunkMerge::new(n);
    futures::stream::unfold(
        (Some(streams), merge, std::collections::VecDeque::new()),
        |(mut streams, mut merge, mut out)| async move {
            loop {
                if let Some(line) = out.pop_front() {
                    return Some((line, (streams, merge, out)));
                }
                let (index, line) = streams.as_mut()?.next().await?;
                out.extend(merge.take(index, line.as_deref()));
                if merge.is_over() {
                    // Dropping the other choices' streams cancels their jobs.
                    streams = None;
                    if out.is_empty() {
                        return None;
                    }
                }
            }
        },
    )
}

/// Merges the chunk lines of `n` single-choice streams into one stream's lines.
pub(crate) struct ChunkMerge {
    ended: Vec<bool>,
    /// Each choice's usage chunk, held until every choice has ended.
    usage: Vec<Option<Value>>,
    over: bool,
}

impl ChunkMerge {
    pub fn new(n: usize) -> Self {
        ChunkMerge {
            ended: vec![false; n],
            usage: vec![None; n],
            over: false,
        }
    }

    /// Whether the merged stream has sent its last line (`[DONE]`).
    pub fn is_over(&self) -> bool {
        self.over
    }

    /// The lines to send for choice `index`'s next line; `None` when its stream ended.
    pub fn take(&mut self, index: usize, line: Option<&str>) -> Vec<String> {
        if self.over || index >= self.ended.len() {
            return Vec::new();
        }
        let Some(line) = line.filter(|l| *l != DONE_SENTINEL) else {
            self.ended[index] = true;
            return self.finish_if_all_ended();
        };
        let Ok(mut chunk) = serde_json::from_str::<Value>(line) else {
            return vec![line.to_owned()];
        };
        if chunk.get("error").is_some() {
            // A choice that fails fails the request: its error, then the end.
            self.over = true;
            return vec![line.to_owned(), DONE_SENTINEL.to_owned()];
        }
        if chunk["choices"].as_array().is_some_and(Vec::is_empty) && chunk["usage"].is_object() {
            self.usage[index] = Some(chunk);
            return Vec::new();
        }
        match chunk.get_mut("choices").and_then(Value::as_array_mut) {
            Some(list) => {
                for choice in list.iter_mut() {
                    choice["index"] = json!(index);
                }
                vec![chunk.to_string()]
            }
            None => vec![line.to_owned()],
        }
    }

    fn finish_if_all_ended(&mut self) -> Vec<String> {
        if !self.ended.iter().all(|&e| e) {
            return Vec::new();
        }
        self.over = true;
        let mut out = Vec::new();
        if let Some(Some(first)) = self.usage.first() {
            let usages: Vec<Value> = self
                .usage
                .iter()
                .map(|u| u.as_ref().map_or(Value::Null, |u| u["usage"].clone()))
                .collect();
            let mut chunk = first.clone();
            chunk["usage"] = merge_usage(&usages);
            out.push(chunk.to_string());
        }
        out.push(DONE_SENTINEL.to_owned());
        out
    }
}

#[cfg(test)]
#[path = "choices_tests.rs"]
mod tests;
