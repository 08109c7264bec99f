//! The worker's shared picture of itself: load state, slots in use, queue handle.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use rbee_contract::{WorkerInfo, WorkerState};
use rbee_engine::Prompter;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::inference::Task;

/// Where model loading stands; watched by `/v1/ready`, the progress stream and heartbeats.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LoadState {
    Loading { fraction: f32, message: String },
    Ready { context_length: u32 },
    Failed { message: String },
}

pub(crate) struct WorkerShared {
    pub worker_id: String,
    pub url: String,
    pub model_ref: String,
    pub device: String,
    pub hive_id: Option<String>,
    pub queue_capacity: usize,
    /// Sequences generated at once: as configured until the model is loaded, then what the
    /// engine serves.
    slots: AtomicUsize,
    load: watch::Sender<LoadState>,
    /// Set once the model is loaded: prepares prompts off the inference thread.
    prompter: Mutex<Option<Prompter>>,
    queue: Mutex<Option<mpsc::Sender<Task>>>,
    /// Requests admitted but not finished (running plus waiting).
    in_flight: AtomicUsize,
    stopping: CancellationToken,
    /// Prefix keys of what the prompt cache holds, most recently used first; set by the
    /// inference thread whenever a generation starts.
    cached_prefixes: Mutex<Vec<u64>>,
    pub prompt_cache: PromptCacheCounters,
}

/// What the prompt cache saved, since the worker started (the worker's `/metrics`).
#[derive(Debug, Default)]
pub(crate) struct PromptCacheCounters {
    /// Generations that ended (any way but an error).
    pub generations: AtomicU64,
    /// Generations that found some of their prompt in the cache.
    pub hits: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens taken from the cache rather than evaluated.
    pub cached_tokens: AtomicU64,
    /// Bytes the store of prefixes holds now.
    pub store_bytes: AtomicU64,
}

impl PromptCacheCounters {
    /// Counts a generation that had `prompt_tokens`, `cached_tokens` of them from the cache.
    pub fn count(&self, prompt_tokens: usize, cached_tokens: usize) {
        self.generations.fetch_add(1, Ordering::Relaxed);
        if cached_tokens > 0 {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(cached_tokens as u64, Ordering::Relaxed);
    }
}

impl WorkerShared {
    pub fn new(config: &WorkerConfig, url: String) -> Self {
        let (load, _) = watch::channel(LoadState::Loading {
            fraction: 0.0,
            message: "starting".into(),
        });
        WorkerShared {
            worker_id: config.worker_id.clone(),
            url,
            model_ref: config.model_ref.clone(),
            device: config.device.to_string(),
            hive_id: config.hive_id.clone(),
            queue_capacity: config.queue_capacity,
            slots: AtomicUsize::new(config.slots.max(1)),
            load,
            prompter: Mutex::new(None),
            queue: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            stopping: CancellationToken::new(),
            cached_prefixes: Mutex::new(Vec::new()),
            prompt_cache: PromptCacheCounters::default(),
        }
    }

    /// The prefix keys (`rbee_contract::prefix`) of the requests whose KV cache the worker
    /// holds (its slots and its prompt cache's store), most recently used first, at most
    /// `rbee_contract::prefix::MAX_REPORTED_PREFIXES`; for the heartbeats.
    pub fn cached_prefixes(&self) -> Vec<u64> {
        lock(&self.cached_prefixes).clone()
    }

    pub fn set_cached_prefixes(&self, mut keys: Vec<u64>) {
        keys.truncate(rbee_contract::prefix::MAX_REPORTED_PREFIXES);
        *lock(&self.cached_prefixes) = keys;
    }

    pub fn load_state(&self) -> LoadState {
        self.load.borrow().clone()
    }

    pub fn watch_load(&self) -> watch::Receiver<LoadState> {
        self.load.subscribe()
    }

    pub fn set_load_state(&self, state: LoadState) {
        self.load.send_replace(state);
    }

    pub fn load_error(&self) -> Option<String> {
        match &*self.load.borrow() {
            LoadState::Failed { message } => Some(message.clone()),
            _ => None,
        }
    }

    pub fn set_ready(
        &self,
        prompter: Prompter,
        queue: mpsc::Sender<Task>,
        context_length: u32,
        slots: usize,
    ) {
        self.slots.store(slots.max(1), Ordering::SeqCst);
        *lock(&self.prompter) = Some(prompter);
        *lock(&self.queue) = Some(queue);
        self.set_load_state(LoadState::Ready { context_length });
    }

    pub fn prompter(&self) -> Option<Prompter> {
        lock(&self.prompter).clone()
    }

    pub fn queue(&self) -> Option<mpsc::Sender<Task>> {
        lock(&self.queue).clone()
    }

    /// Drops the queue's sender so the inference thread ends after its current task.
    pub fn close_queue(&self) {
        lock(&self.queue).take();
    }

    pub fn begin_stopping(&self) {
        self.stopping.cancel();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Resolves once the worker begins to stop.
    pub async fn stopping(&self) {
        self.stopping.cancelled().await;
    }

    pub fn slots(&self) -> usize {
        self.slots.load(Ordering::SeqCst)
    }

    /// Counts a request in; `None` when running plus waiting would exceed a generation in
    /// every slot and `queue_capacity` waiting ones.
    pub fn try_enter(self: &std::sync::Arc<Self>) -> Option<InFlight> {
        let limit = self.slots() + self.queue_capacity;
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|before| InFlight {
                shared: std::sync::Arc::clone(self),
                ahead: before,
            })
    }

    pub fn info(&self) -> WorkerInfo {
        let (state, context_length) = match &*self.load.borrow() {
            _ if self.is_stopping() => (WorkerState::Stopping, None),
            LoadState::Loading { .. } => (WorkerState::Loading, None),
            LoadState::Ready { context_length } => (WorkerState::Ready, Some(*context_length)),
            LoadState::Failed { .. } => (WorkerState::Failed, None),
        };
        let slots = self.slots();
        let in_flight = self.in_flight.load(Ordering::SeqCst);
        let slots_free = if state == WorkerState::Ready {
            slots.saturating_sub(in_flight)
        } else {
            0
        };
        WorkerInfo {
            worker_id: self.worker_id.clone(),
            url: self.url.clone(),
            model: self.model_ref.clone(),
            device: self.device.clone(),
            state,
            slots_total: u32::try_from(slots).unwrap_or(u32::MAX),
            slots_free: u32::try_from(slots_free).unwrap_or(u32::MAX),
            hive_id: self.hive_id.clone(),
            context_length,
        }
    }
}

/// One admitted request; leaving (drop) frees its place.
pub(crate) struct InFlight {
    shared: std::sync::Arc<WorkerShared>,
    /// Requests that were in flight (running or waiting) when this one entered.
    pub ahead: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
