//! Prompt cache (prefix reuse): what each slot's KV cache holds, and a bounded store of recent
//! prefixes taken out of slots.
//!
//! Chat clients send the whole conversation every turn. A slot keeps the tokens whose keys and
//! values it holds after its sequence ends; a new request goes to the free slot that holds the
//! longest common prefix with its prompt, and only the rest of the prompt is evaluated. When a
//! slot's tokens would be mostly overwritten by an unrelated request, a copy of their keys and
//! values goes into a least-recently-used store bounded in bytes; a later request that starts
//! with a stored prefix gets it copied back into its slot. Positions are absolute and each
//! position's keys and values depend only on the tokens before it, and the engine computes a
//! position the same way whatever else shares its step, so a request gets exactly the tokens it
//! would get without the cache.

use crate::EngineError;
use crate::cpu::{CpuLlama, KvPrefix};

/// How the prompt cache behaves; see [`Engine::set_prompt_cache`](crate::Engine::set_prompt_cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptCacheOptions {
    /// Whether a request reuses the prefix of its prompt that a slot (or the store) holds.
    /// Off, every prompt is evaluated from its first token.
    pub enabled: bool,
    /// Bytes the store of recent prefixes may hold (0: no store, only what the slots hold).
    pub store_bytes: usize,
}

impl Default for PromptCacheOptions {
    /// Slots reuse what they hold; no store (it costs memory the caller should choose).
    fn default() -> Self {
        PromptCacheOptions {
            enabled: true,
            store_bytes: 0,
        }
    }
}

/// Prefixes shorter than this are not worth a copy into the store.
const MIN_STORED: usize = 16;

/// Most routing keys [`PromptCache::routing_keys`] returns.
pub const MAX_ROUTING_KEYS: usize = 1024;

/// What a slot's KV cache holds.
#[derive(Default)]
struct Held {
    /// The tokens at positions `0..tokens.len()` of the slot's cache.
    tokens: Vec<u32>,
    /// Routing keys of the request that produced them.
    keys: Vec<u64>,
    /// When a request last took the slot (the cache's clock).
    used: u64,
}

/// A prefix taken out of a slot.
struct Stored {
    tokens: Vec<u32>,
    keys: Vec<u64>,
    kv: KvPrefix,
    used: u64,
}

/// Where a request's cached prefix came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Reuse {
    /// Prompt tokens whose keys and values are already in the slot.
    pub cached: usize,
    /// Whether they were copied back from the store.
    pub from_store: bool,
}

pub(crate) struct PromptCache {
    options: PromptCacheOptions,
    slots: Vec<Held>,
    store: Vec<Stored>,
    store_used: usize,
    clock: u64,
}

impl PromptCache {
    pub(crate) fn new(slots: usize) -> Self {
        PromptCache {
            options: PromptCacheOptions::default(),
            slots: (0..slots).map(|_| Held::default()).collect(),
            store: Vec::new(),
            store_used: 0,
            clock: 0,
        }
    }

    pub(crate) fn options(&self) -> PromptCacheOptions {
        self.options
    }

    /// Applies `options`; a smaller store drops its least recently used prefixes to fit.
    pub(crate) fn set_options(&mut self, options: PromptCacheOptions) {
        self.options = options;
        if !options.enabled {
            self.store.clear();
            self.store_used = 0;
        }
        self.evict_to(options.store_bytes);
    }

    /// Bytes the store holds now.
    pub(crate) fn store_used(&self) -> usize {
        self.store_used
    }

    /// Records that `tokens` were fed to `slot` at positions from `pos`: the slot's cache now
    /// holds its tokens before `pos`, then these.
    pub(crate) fn fed(&mut self, slot: usize, tokens: &[u32], pos: usize) {
        if let Some(held) = self.slots.get_mut(slot) {
            held.tokens.truncate(pos);
            held.tokens.extend_from_slice(tokens);
        }
    }

    /// Forgets what `slot` holds from position `pos` on (a step that failed may have left
    /// those positions half written).
    pub(crate) fn forget_from(&mut self, slot: usize, pos: usize) {
        if let Some(held) = self.slots.get_mut(slot) {
            held.tokens.truncate(pos);
        }
    }

    /// Of the `free` slots, the one holding the longest common prefix with `prompt`; among
    /// equals, the one least recently taken, so that what the others hold lives longer (then
    /// the first in `free`).
    pub(crate) fn choose_slot(&self, free: &[usize], prompt: &[u32]) -> Option<usize> {
        let usable = reusable(prompt);
        // `max_by_key` keeps the last of equals: reversed, the first in `free`.
        free.iter()
            .rev()
            .copied()
            .filter(|&s| s < self.slots.len())
            .max_by_key(|&s| {
                let held = &self.slots[s];
                let common = if self.options.enabled {
                    common_prefix(&held.tokens, usable)
                } else {
                    0
                };
                (common, std::cmp::Reverse(held.used))
            })
    }

    /// Prepares `slot` for a request with `prompt` and routing `keys`: keeps the longest prefix
    /// of the prompt found in the slot or the store (copied into the slot from there), after
    /// keeping the slot's own tokens in the store when the request would overwrite most of
    /// them. `model` is `None` when the model cannot truncate its cache; nothing is then reused.
    pub(crate) fn take(
        &mut self,
        slot: usize,
        prompt: &[u32],
        keys: &[u64],
        model: Option<&mut CpuLlama>,
    ) -> Result<Reuse, EngineError> {
        self.clock += 1;
        let clock = self.clock;
        let Some(held) = self.slots.get_mut(slot) else {
            return Ok(Reuse::default());
        };
        held.used = clock;
        let (Some(model), true) = (model, self.options.enabled) else {
            // The sequence starts at position 0, which overwrites everything held.
            held.tokens.clear();
            held.keys = keys.to_vec();
            return Ok(Reuse::default());
        };
        // The model's cache may hold fewer positions than recorded if a step failed.
        held.tokens.truncate(model.cached_positions(slot));
        let usable = reusable(prompt);
        let in_slot = common_prefix(&held.tokens, usable);
        let stored = self
            .store
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, usable)))
            .max_by_key(|&(i, common)| (common, self.store[i].used));
        let held = &self.slots[slot];
        if held.tokens.len() >= MIN_STORED && 2 * in_slot < held.tokens.len() {
            let tokens = held.tokens.clone();
            let keys = held.keys.clone();
            let per_position = model.kv_bytes_per_position();
            self.keep(per_position, tokens, keys, |len| {
                model.save_prefix(slot, len)
            });
        }
        // `keep` may have reordered the store: look the winner up again by its tokens.
        let restore = match stored {
            Some((_, common)) if common > in_slot => self
                .store
                .iter()
                .position(|e| common_prefix(&e.tokens, usable) == common)
                .map(|i| (i, common)),
            _ => None,
        };
        let held = &mut self.slots[slot];
        // Only now: `keep` stored the slot's earlier tokens with the keys they came with.
        held.keys = keys.to_vec();
        let reuse = match restore {
            Some((i, common)) => {
                let entry = &mut self.store[i];
                model.restore_prefix(slot, &entry.kv, common)?;
                entry.used = clock;
                held.tokens.clear();
                held.tokens.extend_from_slice(&entry.tokens[..common]);
                Reuse {
                    cached: common,
                    from_store: true,
                }
            }
            None => {
                held.tokens.truncate(in_slot);
                Reuse {
                    cached: in_slot,
                    from_store: false,
                }
            }
        };
        Ok(reuse)
    }

    /// Puts a copy of a slot's cache (its `tokens`, `per_position` bytes each, copied by `save`)
    /// into the store, if it fits, dropping the least recently used prefixes to make room and
    /// those it extends. The copy is optional: if it cannot be made (its memory cannot be
    /// allocated), the request goes on without it.
    fn keep(
        &mut self,
        per_position: usize,
        tokens: Vec<u32>,
        keys: Vec<u64>,
        save: impl FnOnce(usize) -> Result<KvPrefix, EngineError>,
    ) {
        let limit = self.options.store_bytes;
        let bytes = tokens.len() * per_position;
        if bytes == 0 || bytes > limit {
            return;
        }
        // Already held by a prefix at least as long: only refresh it.
        if let Some(e) = self
            .store
            .iter_mut()
            .find(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(&tokens))
        {
            e.used = self.clock;
            return;
        }
        self.store.retain(|e| {
            let extended = tokens.starts_with(&e.tokens);
            if extended {
                self.store_used -= e.kv.bytes();
            }
            !extended
        });
        self.evict_to(limit - bytes);
        let kv = match save(tokens.len()) {
            Ok(kv) => kv,
            Err(err) => {
                tracing::warn!(error = %err, tokens = tokens.len(), "a prompt prefix was not stored");
                return;
            }
        };
        self.store_used += kv.bytes();
        self.store.push(Stored {
            tokens,
            keys,
            kv,
            used: self.clock,
        });
    }

    /// Drops the least recently used stored prefixes until the store holds at most `bytes`.
    fn evict_to(&mut self, bytes: usize) {
        while self.store_used > bytes {
            let Some((oldest, _)) = self.store.iter().enumerate().min_by_key(|(_, e)| e.used)
            else {
                break;
            };
            let gone = self.store.swap_remove(oldest);
            self.store_used -= gone.kv.bytes();
        }
    }

    /// Adds `key` to the routing keys of what `slot` holds (unless it holds nothing), e.g. the
    /// key of the answer its sequence generated, whose tokens it now holds too.
    pub(crate) fn add_key(&mut self, slot: usize, key: u64) {
        if let Some(held) = self.slots.get_mut(slot)
            && !held.tokens.is_empty()
            && !held.keys.contains(&key)
        {
            held.keys.push(key);
        }
    }

    /// The routing keys of what the slots and the store hold, most recently used first,
    /// without repeats, at most [`MAX_ROUTING_KEYS`].
    pub(crate) fn routing_keys(&self) -> Vec<u64> {
        let mut entries: Vec<(u64, &[u64])> = self
            .slots
            .iter()
            .filter(|h| !h.tokens.is_empty())
            .map(|h| (h.used, h.keys.as_slice()))
            .chain(self.store.iter().map(|e| (e.used, e.keys.as_slice())))
            .collect();
        entries.sort_by_key(|&(used, _)| std::cmp::Reverse(used));
        let mut seen = std::collections::HashSet::new();
        let mut keys = Vec::new();
        for (_, ks) in entries {
            for &k in ks {
                if keys.len() == MAX_ROUTING_KEYS {
                    return keys;
                }
                if seen.insert(k) {
                    keys.push(k);
                }
            }
        }
        keys
    }
}

/// The prompt tokens a cache may supply: all but the last, which is always evaluated for the
/// logits of the first generated token.
fn reusable(prompt: &[u32]) -> &[u32] {
    &prompt[..prompt.len().saturating_sub(1)]
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{Plan, SeqTokens};

    /// The tiny generated llama model on the engine's CPU path, holding one sequence.
    fn tiny_cpu_model() -> CpuLlama {
        use model_gen::{GgufType, ModelFormat, ModelSpec};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        model_gen::write_model(&ModelSpec::tiny(), ModelFormat::Gguf(GgufType::Q8_0), &path)
            .unwrap();
        let mut reader = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let content = candle_core::quantized::gguf_file::Content::read(&mut reader).unwrap();
        Plan::new(&gguf_info::Header::open(&path).unwrap(), 512)
            .unwrap()
            .load(&content, &mut reader, 1, &mut |_, _| {})
            .unwrap()
    }

    /// One request on slot 0 as the engine serves it: the cache prepares the slot, the model
    /// evaluates the rest of the prompt, the cache records what the slot now holds.
    fn request(cache: &mut PromptCache, model: &mut CpuLlama, prompt: &[u32]) -> Reuse {
        let reuse = cache
            .take(0, prompt, &[u64::from(prompt[0])], Some(&mut *model))
            .unwrap();
        let rest = &prompt[reuse.cached..];
        model
            .step(&[SeqTokens {
                seq: 0,
                tokens: rest,
                pos: reuse.cached,
            }])
            .unwrap();
        cache.fed(0, rest, reuse.cached);
        reuse
    }

    /// The first token of each stored prefix, sorted.
    fn stored(cache: &PromptCache) -> Vec<u32> {
        let mut firsts: Vec<u32> = cache.store.iter().map(|e| e.tokens[0]).collect();
        firsts.sort_unstable();
        firsts
    }

    #[test]
    fn the_store_drops_its_least_recently_used_prefix_first() {
        let mut model = tiny_cpu_model();
        let mut cache = PromptCache::new(1);
        // Prompts long enough for the slot's tokens to be kept when a request moves it on; a
        // prompt this short is not kept, so it moves the slot on without filling the store.
        let prompt = |first: u32| -> Vec<u32> { (first..=first + MIN_STORED as u32).collect() };
        let (a, b, c) = (prompt(100), prompt(200), prompt(300));
        let short = [400, 401];
        let entry = a.len() * model.kv_bytes_per_position();
        // Room for two prefixes, not three.
        cache.set_options(PromptCacheOptions {
            enabled: true,
            store_bytes: 2 * entry,
        });

        // Insert A, then B.
        request(&mut cache, &mut model, &a);
        request(&mut cache, &mut model, &b);
        assert_eq!(stored(&cache), [100]);
        request(&mut cache, &mut model, &short);
        assert_eq!(stored(&cache), [100, 200]);
        assert_eq!(cache.store_used(), 2 * entry);

        // Use A: it is copied back from the store.
        let reuse = request(&mut cache, &mut model, &a);
        assert_eq!(
            reuse,
            Reuse {
                cached: a.len() - 1,
                from_store: true
            }
        );
        assert_eq!(stored(&cache), [100, 200]);

        // Insert C: the store is full, and B, the least recently used, makes room; A, stored
        // first, stays.
        request(&mut cache, &mut model, &c);
        request(&mut cache, &mut model, &short);
        assert_eq!(stored(&cache), [100, 300]);
        assert_eq!(cache.store_used(), 2 * entry);

        // A and C are still served from the store, B is not.
        let reuse = request(&mut cache, &mut model, &c);
        assert_eq!((reuse.cached, reuse.from_store), (c.len() - 1, true));
        let reuse = request(&mut cache, &mut model, &a);
        assert_eq!((reuse.cached, reuse.from_store), (a.len() - 1, true));
        let reuse = request(&mut cache, &mut model, &b);
        assert_eq!((reuse.cached, reuse.from_store), (0, false));
    }

    #[test]
    fn the_last_prompt_token_is_never_cached() {
        assert_eq!(common_prefix(&[1, 2, 3], reusable(&[1, 2, 3])), 2);
        assert_eq!(common_prefix(&[1, 2, 3], reusable(&[1, 2, 4, 5])), 2);
        assert_eq!(common_prefix(&[1, 2, 3], reusable(&[7])), 0);
    }

    #[test]
    fn a_slot_is_chosen_by_its_common_prefix_then_by_age() {
        let mut cache = PromptCache::new(3);
        cache.fed(0, &[1, 2, 3, 4], 0);
        cache.fed(1, &[1, 2, 9], 0);
        cache.slots[2].used = 5;
        assert_eq!(cache.choose_slot(&[0, 1, 2], &[1, 2, 3, 4, 5]), Some(0));
        assert_eq!(cache.choose_slot(&[1, 2], &[1, 2, 3, 4, 5]), Some(1));
        // Nothing in common: the least recently taken slot.
        assert_eq!(cache.choose_slot(&[0, 1, 2], &[8, 8]), Some(0));
        cache.slots[0].used = 9;
        cache.slots[1].used = 7;
        assert_eq!(cache.choose_slot(&[0, 1, 2], &[8, 8]), Some(2));
        cache.set_options(PromptCacheOptions {
            enabled: false,
            store_bytes: 0,
        });
        assert_eq!(cache.choose_slot(&[0, 1], &[1, 2, 3, 4, 5]), Some(1));
    }

    #[test]
    fn routing_keys_come_most_recent_first_without_repeats() {
        let mut cache = PromptCache::new(2);
        cache.fed(0, &[1], 0);
        cache.fed(1, &[2], 0);
        cache.slots[0].keys = vec![10, 11];
        cache.slots[0].used = 1;
        cache.slots[1].keys = vec![10, 12];
        cache.slots[1].used = 2;
        assert_eq!(cache.routing_keys(), vec![10, 12, 11]);
        cache.slots[1].tokens.clear();
        assert_eq!(cache.routing_keys(), vec![10, 11]);
    }

    #[test]
    fn a_copy_that_cannot_be_made_is_not_stored_and_is_no_error() {
        let mut cache = PromptCache::new(1);
        cache.set_options(PromptCacheOptions {
            enabled: true,
            store_bytes: 1 << 20,
        });
        let tokens: Vec<u32> = (0..MIN_STORED as u32).collect();
        cache.keep(64, tokens, vec![10], |len| {
            assert_eq!(len, MIN_STORED);
            Err(EngineError::Inference(
                "cannot keep a prompt prefix: memory allocation failed".into(),
            ))
        });
        assert!(cache.store.is_empty());
        assert_eq!(cache.store_used(), 0);
        assert!(cache.routing_keys().is_empty());
    }

    #[test]
    fn an_added_key_joins_its_slots_keys_once_and_only_while_the_slot_holds_tokens() {
        let mut cache = PromptCache::new(2);
        cache.fed(0, &[1, 2], 0);
        cache.slots[0].keys = vec![10];
        cache.add_key(0, 13);
        cache.add_key(0, 13);
        cache.add_key(1, 14);
        cache.add_key(7, 15);
        assert_eq!(cache.routing_keys(), vec![10, 13]);
    }
}
