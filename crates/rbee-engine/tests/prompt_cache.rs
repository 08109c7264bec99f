//! The prompt cache (prefix reuse) never changes what a request gets: conversations whose
//! history grows turn by turn, greedy and sampled, generate the same tokens from the same
//! logits with the cache on (slots only, and with a store of prefixes) as with it off, batched
//! in four slots and one at a time in one slot; and with it on, later turns evaluate only
//! their new tokens.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::Context;
use model_gen::{GgufType, ModelFormat, ModelSpec};
use rbee_engine::{
    ChatTurn, Completion, DeviceSpec, Engine, GenerationParams, LoadOptions, PreparedRequest,
    Prompt, PromptCacheOptions, Sequence,
};

fn generated(ty: GgufType) -> anyhow::Result<PathBuf> {
    model_gen::ensure_generated(
        &ModelSpec::small(),
        ModelFormat::Gguf(ty),
        &model_gen::paths::generated_dir(),
    )
    .with_context(|| format!("generating {ty:?}"))
}

fn load(path: &Path, slots: usize, cache: PromptCacheOptions) -> anyhow::Result<Engine> {
    let opts = LoadOptions {
        model_path: path.to_path_buf(),
        device: DeviceSpec::Cpu,
        slots,
        context_length: None,
    };
    let mut engine =
        Engine::load(&opts, &mut |_| {}).with_context(|| format!("loading {}", path.display()))?;
    engine.set_prompt_cache(cache);
    Ok(engine)
}

const OFF: PromptCacheOptions = PromptCacheOptions {
    enabled: false,
    store_bytes: 0,
};
const SLOTS_ONLY: PromptCacheOptions = PromptCacheOptions {
    enabled: true,
    store_bytes: 0,
};
const WITH_STORE: PromptCacheOptions = PromptCacheOptions {
    enabled: true,
    store_bytes: 64 << 20,
};

/// Four conversations: a system prompt of their own, a user message per turn, and sampling
/// settings (greedy, sampled with seeds, a repeat penalty).
struct Conversation {
    system: &'static str,
    users: [&'static str; 3],
    temperature: f32,
    seed: u64,
    repeat_penalty: f32,
}

const CONVERSATIONS: [Conversation; 4] = [
    Conversation {
        system: "You are a helpful assistant who answers briefly.",
        users: [
            "Once upon a time there was a bee.",
            "What did the bee do next?",
            "And how does the story end?",
        ],
        temperature: 0.0,
        seed: 1,
        repeat_penalty: 1.0,
    },
    Conversation {
        system: "You are a poet.",
        users: [
            "Write a line about the sea.",
            "Another one, about the wind.",
            "Now one about both.",
        ],
        temperature: 0.8,
        seed: 7,
        repeat_penalty: 1.0,
    },
    Conversation {
        system: "You are a helpful assistant who answers briefly.",
        users: [
            "What is the number 42?",
            "Why that number?",
            "Give me another.",
        ],
        temperature: 1.0,
        seed: 42,
        repeat_penalty: 1.3,
    },
    Conversation {
        system: "You count things.",
        users: ["One, two, three.", "Four, five.", "Six!"],
        temperature: 0.0,
        seed: 3,
        repeat_penalty: 1.1,
    },
];

const TOKENS_PER_TURN: usize = 10;

/// One turn's outcome: the token ids, the logits each was sampled from, the completion.
#[derive(Debug)]
struct Turn {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    completion: Completion,
}

/// The request for turn `turn` of conversation `c`, whose earlier answers are `answers`.
fn request(engine: &Engine, c: usize, turn: usize, answers: &[String]) -> PreparedRequest {
    let conv = &CONVERSATIONS[c];
    let mut messages = vec![ChatTurn::new("system", conv.system)];
    for (t, user) in conv.users.iter().enumerate().take(turn + 1) {
        messages.push(ChatTurn::new("user", *user));
        if let Some(answer) = answers.get(t).filter(|_| t < turn) {
            messages.push(ChatTurn::new("assistant", answer.clone()));
        }
    }
    let params = GenerationParams {
        max_tokens: Some(TOKENS_PER_TURN),
        temperature: conv.temperature,
        seed: conv.seed + turn as u64,
        repeat_penalty: conv.repeat_penalty,
        ..Default::default()
    };
    engine
        .prepare(Prompt::Chat(messages), params)
        .expect("the request is valid")
}

struct Running {
    conversation: usize,
    seq: Sequence,
    ids: Vec<u32>,
    text: String,
    logits: Vec<Vec<f32>>,
}

/// Runs every conversation's turns, turn by turn: each turn of all four at once (each in the
/// free slot the engine chooses, batched when the engine has several), or one conversation
/// after the other when `one_at_a_time`. Returns each conversation's turns.
fn converse(engine: &mut Engine, one_at_a_time: bool) -> anyhow::Result<Vec<Vec<Turn>>> {
    let n = CONVERSATIONS.len();
    let mut turns: Vec<Vec<Turn>> = (0..n).map(|_| Vec::new()).collect();
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); n];
    for turn in 0..3 {
        let groups: Vec<Vec<usize>> = if one_at_a_time {
            (0..n).map(|c| vec![c]).collect()
        } else {
            vec![(0..n).collect()]
        };
        for group in groups {
            let mut waiting = group.clone();
            let mut running: Vec<Running> = Vec::new();
            while !waiting.is_empty() || !running.is_empty() {
                // Waiting conversations take free slots, as the worker's loop does.
                while !waiting.is_empty() {
                    let free: Vec<usize> = (0..engine.slots())
                        .filter(|s| running.iter().all(|r| r.seq.slot() != *s))
                        .collect();
                    if free.is_empty() {
                        break;
                    }
                    let c = waiting.remove(0);
                    let req = request(engine, c, turn, &answers[c]);
                    let slot = engine.choose_slot(&free, &req).expect("a free slot");
                    let seq = engine.begin(slot, &req)?;
                    running.push(Running {
                        conversation: c,
                        seq,
                        ids: Vec::new(),
                        text: String::new(),
                        logits: Vec::new(),
                    });
                }
                let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
                engine.step(&mut seqs)?;
                let mut still = Vec::new();
                for mut r in running {
                    if !r.seq.has_logits() {
                        still.push(r);
                        continue;
                    }
                    r.logits
                        .push(r.seq.pending_logits().expect("logits wait").to_vec());
                    let (ids, text) = (&mut r.ids, &mut r.text);
                    let done = engine.advance(&mut r.seq, &mut |t| {
                        ids.push(t.token_id);
                        text.push_str(&t.text);
                        ControlFlow::Continue(())
                    })?;
                    match done {
                        None => still.push(r),
                        Some(completion) => {
                            answers[r.conversation].push(r.text.clone());
                            turns[r.conversation].push(Turn {
                                ids: r.ids,
                                logits: r.logits,
                                completion,
                            });
                        }
                    }
                }
                running = still;
            }
        }
    }
    Ok(turns)
}

fn ids(turns: &[Vec<Turn>]) -> Vec<Vec<Vec<u32>>> {
    turns
        .iter()
        .map(|c| c.iter().map(|t| t.ids.clone()).collect())
        .collect()
}

fn assert_same(reference: &[Vec<Turn>], got: &[Vec<Turn>], what: &str) {
    assert_eq!(ids(reference), ids(got), "{what}: token ids differ");
    for (c, (a, b)) in reference.iter().zip(got).enumerate() {
        for (t, (a, b)) in a.iter().zip(b).enumerate() {
            assert_eq!(
                a.completion.prompt_tokens, b.completion.prompt_tokens,
                "{what}: conversation {c} turn {t}: prompt length"
            );
            assert_eq!(
                a.completion.finish_reason, b.completion.finish_reason,
                "{what}: conversation {c} turn {t}: finish reason"
            );
            assert_eq!(
                a.completion.text, b.completion.text,
                "{what}: conversation {c} turn {t}: text"
            );
            for (i, (la, lb)) in a.logits.iter().zip(&b.logits).enumerate() {
                assert!(
                    la.iter().zip(lb).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{what}: conversation {c} turn {t}: logits of token {i} differ"
                );
            }
        }
    }
}

fn cached(turns: &[Vec<Turn>], turn: usize) -> Vec<usize> {
    turns
        .iter()
        .map(|c| c[turn].completion.cached_tokens)
        .collect()
}

#[test]
fn the_prompt_cache_never_changes_the_tokens_batched_or_alone() -> anyhow::Result<()> {
    for ty in [GgufType::Q4_0, GgufType::Q8_0] {
        let path = generated(ty)?;
        let what = |s: &str| format!("{ty:?}, {s}");
        let reference = converse(&mut load(&path, 1, OFF)?, true)?;
        for turn in 0..3 {
            assert_eq!(
                cached(&reference, turn),
                vec![0; 4],
                "{}",
                what("cache off")
            );
        }
        // Each turn asks for more than its tokens: it must not have ended on EOS at once.
        assert!(
            reference
                .iter()
                .flatten()
                .any(|t| t.ids.len() == TOKENS_PER_TURN),
            "{}",
            what("the reference generates")
        );

        let off_batched = converse(&mut load(&path, 4, OFF)?, false)?;
        assert_same(&reference, &off_batched, &what("cache off, 4 slots"));

        // Four slots for four conversations: each finds its history in its slot.
        let batched = converse(&mut load(&path, 4, SLOTS_ONLY)?, false)?;
        assert_same(&reference, &batched, &what("cache on, 4 slots"));
        for turn in 1..3 {
            for (c, n) in cached(&batched, turn).into_iter().enumerate() {
                let prompt = batched[c][turn].completion.prompt_tokens;
                let before = batched[c][turn - 1].completion.prompt_tokens;
                assert!(
                    n >= before && n < prompt,
                    "{}: conversation {c} turn {turn}: {n} cached of {prompt}, the previous prompt had {before}",
                    what("cache on, 4 slots")
                );
            }
        }

        // One slot, conversations taking turns: only the store keeps a history while others
        // use the slot.
        let one_slot = converse(&mut load(&path, 1, SLOTS_ONLY)?, true)?;
        assert_same(&reference, &one_slot, &what("cache on, 1 slot, no store"));
        let mut with_store_engine = load(&path, 1, WITH_STORE)?;
        let with_store = converse(&mut with_store_engine, true)?;
        assert_same(&reference, &with_store, &what("cache on, 1 slot, store"));
        assert!(with_store_engine.prompt_cache_store_bytes() > 0);
        for turn in 1..3 {
            for c in 0..4 {
                let stored = with_store[c][turn].completion.cached_tokens;
                let slot_only = one_slot[c][turn].completion.cached_tokens;
                let before = with_store[c][turn - 1].completion.prompt_tokens;
                assert!(
                    stored >= before && stored > slot_only,
                    "{}: conversation {c} turn {turn}: {stored} cached with the store, {slot_only} without; the previous prompt had {before}",
                    what("cache on, 1 slot, store")
                );
            }
        }

        // The store with four slots and batching, from a cold start each turn's slot choice
        // differs, and a store too small for any prefix keeps nothing.
        let batched_store = converse(&mut load(&path, 4, WITH_STORE)?, false)?;
        assert_same(
            &reference,
            &batched_store,
            &what("cache on, 4 slots, store"),
        );
        let mut tiny_engine = load(
            &path,
            1,
            PromptCacheOptions {
                enabled: true,
                store_bytes: 1024,
            },
        )?;
        let tiny = converse(&mut tiny_engine, true)?;
        assert_same(&reference, &tiny, &what("cache on, 1 slot, tiny store"));
        assert_eq!(tiny_engine.prompt_cache_store_bytes(), 0);
    }
    Ok(())
}

#[test]
fn a_repeated_prompt_evaluates_only_its_last_token() -> anyhow::Result<()> {
    let path = generated(GgufType::Q4_0)?;
    let mut engine = load(&path, 1, SLOTS_ONLY)?;
    let params = GenerationParams {
        max_tokens: Some(4),
        temperature: 0.0,
        ..Default::default()
    };
    let req = engine.prepare(Prompt::Text("Hello world, this is a test".into()), params)?;
    let run = |engine: &mut Engine| -> anyhow::Result<(Vec<u32>, Completion)> {
        let mut ids = Vec::new();
        let completion = engine.generate(&req, &mut |t| {
            ids.push(t.token_id);
            ControlFlow::Continue(())
        })?;
        Ok((ids, completion))
    };
    let (first, c1) = run(&mut engine)?;
    let (second, c2) = run(&mut engine)?;
    assert_eq!(first, second);
    assert_eq!(c1.cached_tokens, 0);
    assert_eq!(c2.cached_tokens, c2.prompt_tokens - 1);
    Ok(())
}

#[test]
fn routing_keys_follow_what_the_slots_and_the_store_hold() -> anyhow::Result<()> {
    let path = generated(GgufType::Q4_0)?;
    let mut engine = load(&path, 2, WITH_STORE)?;
    assert!(engine.routing_keys_held().is_empty());
    let params = GenerationParams {
        max_tokens: Some(2),
        temperature: 0.0,
        ..Default::default()
    };
    let run = |engine: &mut Engine, slot, req: &PreparedRequest, keys: &[u64]| {
        let mut seq = engine.begin_with_routing_keys(slot, req, keys)?;
        while !seq.is_finished() {
            engine.step(&mut [&mut seq])?;
            if seq.has_logits() {
                engine.advance(&mut seq, &mut |_| ControlFlow::Continue(()))?;
            }
        }
        anyhow::Ok(())
    };
    let story = "Once upon a time there was a bee who lived in a garden full of flowers and sun";
    let a = engine.prepare(Prompt::Text(story.into()), params.clone())?;
    run(&mut engine, 0, &a, &[1, 2])?;
    assert_eq!(engine.routing_keys_held(), vec![1, 2]);
    // Started in the other slot, which holds nothing yet: only the most recent entry counts
    // once it holds something.
    let b = engine.prepare(Prompt::Text("Something else entirely".into()), params)?;
    let _ = engine.begin_with_routing_keys(1, &b, &[3])?;
    assert_eq!(engine.routing_keys_held(), vec![1, 2]);
    // In slot 0 it overwrites the story, which the store keeps with the story's keys.
    run(&mut engine, 0, &b, &[3])?;
    assert!(engine.prompt_cache_store_bytes() > 0);
    assert_eq!(engine.routing_keys_held(), vec![3, 1, 2]);
    Ok(())
}

#[test]
fn a_model_on_candles_code_reports_no_routing_keys() -> anyhow::Result<()> {
    // A head size the engine's path has no attention for: the model runs on candle's code,
    // whose cache cannot be cut back to a prefix, so it holds nothing a request could reuse.
    let path = model_gen::ensure_generated(
        &ModelSpec::small_wide_head(),
        ModelFormat::Gguf(GgufType::Q8_0),
        &model_gen::paths::generated_dir(),
    )?;
    let mut engine = load(&path, 1, WITH_STORE)?;
    let params = GenerationParams {
        max_tokens: Some(2),
        temperature: 0.0,
        ..Default::default()
    };
    let story = "Once upon a time there was a bee who lived in a garden full of flowers and sun";
    let req = engine.prepare(Prompt::Text(story.into()), params)?;
    for _ in 0..2 {
        let mut seq = engine.begin_with_routing_keys(0, &req, &[1, 2])?;
        while !seq.is_finished() {
            engine.step(&mut [&mut seq])?;
            if seq.has_logits() {
                engine.advance(&mut seq, &mut |_| ControlFlow::Continue(()))?;
            }
        }
        engine.add_routing_key(0, 3);
        assert!(
            engine.routing_keys_held().is_empty(),
            "{:?}",
            engine.routing_keys_held()
        );
    }
    assert_eq!(engine.prompt_cache_store_bytes(), 0);
    Ok(())
}
