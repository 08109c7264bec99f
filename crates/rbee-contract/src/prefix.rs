//! Prefix keys: what lets the queen send a request to the worker whose prompt cache holds the
//! longest start of it, without either side sending prompts or tokens around.
//!
//! A request's keys are a chain of 64-bit hashes, each covering the request's content from the
//! start up to a point: for chat, one key per message (key *i* hashes key *i − 1* with message
//! *i*'s role and content); for a raw prompt, one key per [`PROMPT_BLOCK_BYTES`] of its text,
//! then one for the whole text when it does not end on a block boundary. Because each key
//! covers everything before it, a request that extends another (the next turn of a
//! conversation) starts with the other's keys, and holding key *i* means holding the content
//! through point *i*.
//!
//! A worker remembers the keys of the requests whose KV cache it keeps and reports them in its
//! heartbeats ([`WorkerHeartbeat::cached_prefixes`](crate::WorkerHeartbeat)); the queen counts
//! how much of a new request each worker holds ([`held_prefix`]). The keys steer routing only:
//! a worker decides what it can reuse from the tokens themselves, so a collision (or a key
//! held by a worker that has since evicted its entry) costs a less well placed request, never
//! a wrong answer.
//!
//! The hash is this module's own (a multiply-rotate round per 8-byte word and a final
//! avalanche), not the standard library's, whose output may change between Rust versions and
//! is seeded per process: the queen and the workers, each built at another time, must agree.

use std::collections::HashSet;

use crate::{ChatMessage, ChatRole, InferRequest};

/// The text a raw prompt's key covers beyond the one before it.
pub const PROMPT_BLOCK_BYTES: usize = 256;

/// The most keys a worker reports in one heartbeat (8 KiB of keys).
pub const MAX_REPORTED_PREFIXES: usize = 1024;

const CHAT_SEED: u64 = 0x7262_6565_6368_6174; // "rbeechat"
const PROMPT_SEED: u64 = 0x7262_6565_7072_6d74; // "rbeeprmt"
/// Marks the key of a prompt's last, partial block, so that it never equals a full block's.
const TAIL_MARK: u64 = 0x7461_696c;

/// The request's prefix keys, shortest prefix first: per message for `messages`, per
/// [`PROMPT_BLOCK_BYTES`] of text for `prompt` (see the module's documentation). Empty for a
/// request with neither.
pub fn prefix_keys(request: &InferRequest) -> Vec<u64> {
    match (&request.messages, &request.prompt) {
        (Some(messages), _) => chat_prefix_keys(messages),
        (None, Some(prompt)) => prompt_prefix_keys(prompt),
        (None, None) => Vec::new(),
    }
}

/// How much of the request's content each of its [`prefix_keys`] covers, in bytes from the
/// start: for chat, the contents of the messages through the key's message; for a prompt, the
/// text through the key's block. The queen weighs a held prefix by it.
pub fn prefix_key_ends(request: &InferRequest) -> Vec<usize> {
    match (&request.messages, &request.prompt) {
        (Some(messages), _) => messages
            .iter()
            .scan(0, |end, message| {
                *end += message.content.len();
                Some(*end)
            })
            .collect(),
        (None, Some(prompt)) => {
            let blocks = prompt.len().div_ceil(PROMPT_BLOCK_BYTES);
            (1..=blocks)
                .map(|block| (block * PROMPT_BLOCK_BYTES).min(prompt.len()))
                .collect()
        }
        (None, None) => Vec::new(),
    }
}

/// One key per message, each covering every message up to and including it.
pub fn chat_prefix_keys(messages: &[ChatMessage]) -> Vec<u64> {
    let mut previous = CHAT_SEED;
    messages
        .iter()
        .map(|message| {
            previous = chat_key(previous, message);
            previous
        })
        .collect()
}

/// The key of one more message after a conversation whose keys are `keys`: what a worker
/// records for the answer it generated, which the conversation's next turn sends back as an
/// `assistant` message, so that the next turn matches through the answer.
pub fn next_chat_key(keys: &[u64], message: &ChatMessage) -> u64 {
    chat_key(keys.last().copied().unwrap_or(CHAT_SEED), message)
}

fn chat_key(previous: u64, message: &ChatMessage) -> u64 {
    let mut h = Hasher::new(previous);
    h.word(role_code(message.role));
    h.bytes(message.content.as_bytes());
    h.finish()
}

/// One key per full [`PROMPT_BLOCK_BYTES`] of the prompt's bytes, each covering the text from
/// the start through its block, and one more for the whole text when a partial block is left.
pub fn prompt_prefix_keys(prompt: &str) -> Vec<u64> {
    let bytes = prompt.as_bytes();
    let mut keys = Vec::with_capacity(bytes.len() / PROMPT_BLOCK_BYTES + 1);
    let mut previous = PROMPT_SEED;
    let mut blocks = bytes.chunks_exact(PROMPT_BLOCK_BYTES);
    for block in &mut blocks {
        let mut h = Hasher::new(previous);
        h.bytes(block);
        previous = h.finish();
        keys.push(previous);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut h = Hasher::new(previous);
        h.word(TAIL_MARK);
        h.bytes(tail);
        keys.push(h.finish());
    }
    keys
}

/// How many of `keys` a holder of `held` has: the position after the last key it holds. Each
/// key covers everything before it, so holding key *i* is holding the whole prefix through
/// *i*, even when a bounded report left out some earlier keys.
pub fn held_prefix(keys: &[u64], held: &HashSet<u64>) -> usize {
    keys.iter()
        .rposition(|key| held.contains(key))
        .map_or(0, |i| i + 1)
}

fn role_code(role: ChatRole) -> u64 {
    match role {
        ChatRole::System => 1,
        ChatRole::User => 2,
        ChatRole::Assistant => 3,
        ChatRole::Tool => 4,
    }
}

const P1: u64 = 0x9E37_79B9_7F4A_7C15;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// A small streaming hash: each 8-byte little-endian word is folded in by a bijective
/// xor-multiply-rotate-multiply round; `finish` applies MurmurHash3's 64-bit finalizer.
struct Hasher(u64);

impl Hasher {
    fn new(seed: u64) -> Self {
        Hasher(seed)
    }

    fn word(&mut self, word: u64) {
        self.0 = (self.0 ^ word)
            .wrapping_mul(P1)
            .rotate_left(31)
            .wrapping_mul(P2);
    }

    /// The length first, so that byte strings of different lengths padded alike differ.
    fn bytes(&mut self, bytes: &[u8]) {
        self.word(bytes.len() as u64);
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.word(u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(last));
        }
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        h ^= h >> 33;
        h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
        h ^ (h >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: ChatRole, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    fn conversation(turns: usize) -> Vec<ChatMessage> {
        let mut messages = vec![message(ChatRole::System, "You are terse.")];
        for turn in 0..turns {
            messages.push(message(ChatRole::User, &format!("question {turn}")));
            messages.push(message(ChatRole::Assistant, &format!("answer {turn}")));
        }
        messages
    }

    #[test]
    fn keys_are_pinned_across_builds() {
        // The queen and the workers may be built apart: these values must never change
        // (a change routes every cached conversation wrong until the workers are updated).
        let chat = chat_prefix_keys(&[
            message(ChatRole::System, "You are terse."),
            message(ChatRole::User, "Hi"),
        ]);
        let prompt = prompt_prefix_keys(&"a".repeat(300));
        let pinned = [chat[0], chat[1], prompt[0], prompt[1]];
        assert_eq!(
            pinned,
            [
                0x42e1_fdae_e379_f96b,
                0xae6f_4dfa_9af2_b917,
                0x524f_218e_6b54_ba91,
                0x6a92_ae84_9cb8_f1fe,
            ],
            "{pinned:#x?}"
        );
    }

    #[test]
    fn a_later_turn_starts_with_the_earlier_turns_keys() {
        let earlier = chat_prefix_keys(&conversation(2));
        let mut longer = conversation(2);
        longer.push(message(ChatRole::User, "and then?"));
        let later = chat_prefix_keys(&longer);
        assert_eq!(next_chat_key(&earlier, &longer[5]), later[5]);
        assert_eq!(next_chat_key(&[], &longer[0]), later[0]);
        assert_eq!(earlier.len(), 5);
        assert_eq!(later.len(), 6);
        assert_eq!(&later[..5], &earlier[..]);

        // A conversation that differs in one message shares only the keys before it.
        let mut edited = conversation(2);
        edited[2].content = "another answer".into();
        let edited = chat_prefix_keys(&edited);
        assert_eq!(&edited[..2], &earlier[..2]);
        assert!(edited[2..].iter().all(|k| !earlier.contains(k)));
    }

    #[test]
    fn role_and_message_boundaries_count() {
        let user = chat_prefix_keys(&[message(ChatRole::User, "hello")]);
        let system = chat_prefix_keys(&[message(ChatRole::System, "hello")]);
        assert_ne!(user, system);
        // The same text split into two messages is another conversation.
        let joined = chat_prefix_keys(&[message(ChatRole::User, "ab")]);
        let split = chat_prefix_keys(&[message(ChatRole::User, "a"), message(ChatRole::User, "b")]);
        assert_ne!(joined[0], split[1]);
        // Contents that pad to the same words still differ by length.
        let short = chat_prefix_keys(&[message(ChatRole::User, "a")]);
        let padded = chat_prefix_keys(&[message(ChatRole::User, "a\0")]);
        assert_ne!(short, padded);
    }

    #[test]
    fn a_longer_prompt_shares_the_full_blocks() {
        let base = "x".repeat(PROMPT_BLOCK_BYTES * 2 + 10);
        let keys = prompt_prefix_keys(&base);
        assert_eq!(keys.len(), 3, "two full blocks and the tail");
        let extended = prompt_prefix_keys(&format!("{base}{}", "y".repeat(PROMPT_BLOCK_BYTES)));
        assert_eq!(extended.len(), 4);
        assert_eq!(&extended[..2], &keys[..2]);
        assert_ne!(
            extended[2], keys[2],
            "the tail key covers only the shorter text"
        );
        assert_eq!(prompt_prefix_keys(&base), keys, "deterministic");
        assert_eq!(prompt_prefix_keys(&"x".repeat(PROMPT_BLOCK_BYTES)).len(), 1);
        assert!(prompt_prefix_keys("").is_empty());
        // A tail never stands for a full block of the same bytes.
        let short = prompt_prefix_keys("hello");
        assert_eq!(short.len(), 1);
        assert!(!extended.contains(&short[0]));
    }

    #[test]
    fn the_request_form_picks_the_keys() {
        let chat = InferRequest {
            messages: Some(conversation(1)),
            ..InferRequest::default()
        };
        assert_eq!(prefix_keys(&chat), chat_prefix_keys(&conversation(1)));
        let raw = InferRequest {
            prompt: Some("The capital of France is".into()),
            ..InferRequest::default()
        };
        assert_eq!(
            prefix_keys(&raw),
            prompt_prefix_keys("The capital of France is")
        );
        assert!(prefix_keys(&InferRequest::default()).is_empty());

        assert_eq!(prefix_key_ends(&chat), [14, 24, 32]);
        let long = InferRequest {
            prompt: Some("x".repeat(PROMPT_BLOCK_BYTES * 2 + 10)),
            ..InferRequest::default()
        };
        assert_eq!(prefix_key_ends(&long), [256, 512, 522]);
        assert_eq!(prefix_key_ends(&long).len(), prefix_keys(&long).len());
        assert_eq!(prefix_key_ends(&raw), [24]);
    }

    #[test]
    fn held_prefix_counts_through_the_last_key_held() {
        let keys = chat_prefix_keys(&conversation(2));
        let mut held = HashSet::new();
        assert_eq!(held_prefix(&keys, &held), 0);
        held.insert(keys[0]);
        assert_eq!(held_prefix(&keys, &held), 1);
        // Only a later key reported (a bounded report dropped the earlier ones): the whole
        // prefix through it is held all the same.
        let later = HashSet::from([keys[3]]);
        assert_eq!(held_prefix(&keys, &later), 4);
        held.extend(&keys);
        assert_eq!(held_prefix(&keys, &held), keys.len());
    }
}
