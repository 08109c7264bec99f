//! The hive's account of memory set aside: spawns that passed the check and have not ended,
//! and the last estimate of each model its workers run, so that `held` (see `capacity`) can be
//! worked out from the list of children at any time.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rbee_contract::{DeviceInfo, DeviceKind, WorkerInfo};

use super::{Limits, footprint, overhead};

/// Spawns in progress and the estimates of the models workers run, shared by every check.
#[derive(Default)]
pub(crate) struct Ledger {
    state: Mutex<LedgerState>,
}

#[derive(Default)]
pub(crate) struct LedgerState {
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    /// `required_bytes` by `(model reference, device)`, as last estimated.
    required: HashMap<(String, String), u64>,
}

/// A spawn that was found to fit and has not ended yet.
#[derive(Debug, Clone)]
struct Pending {
    model: String,
    device: String,
    /// Children with the same model and device when the spawn was checked: once there are
    /// more, the spawn's own worker is among them and no longer counted twice.
    baseline: usize,
}

/// Memory set aside for a spawn until it ends (dropped): by then its worker is one of the
/// hive's children, counted as such, or it is gone.
pub(crate) struct Reservation {
    ledger: Arc<Ledger>,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ledger.lock().pending.remove(&self.id);
    }
}

impl Ledger {
    /// The ledger, locked: a check holds it from reading the children to reserving.
    pub fn lock(&self) -> MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LedgerState {
    /// Records what a worker of `model` on `device` needs, for later checks.
    pub fn remember(&mut self, model: &str, device: &str, required_bytes: u64) {
        self.required
            .insert((model.to_owned(), device.to_owned()), required_bytes);
    }

    /// Sets memory aside for a spawn of `model` on `device` (whose estimate was just
    /// remembered); `baseline` is how many children already run that model there.
    pub fn reserve(
        &mut self,
        ledger: &Arc<Ledger>,
        model: &str,
        device: &str,
        baseline: usize,
    ) -> Reservation {
        self.next_id += 1;
        let id = self.next_id;
        self.pending.insert(
            id,
            Pending {
                model: model.to_owned(),
                device: device.to_owned(),
                baseline,
            },
        );
        Reservation {
            ledger: Arc::clone(ledger),
            id,
        }
    }

    /// What the workers on `device`'s memory need: per model and device, the estimate times the
    /// number of workers, counting a spawn in progress until its worker shows up as a child.
    /// A worker of a model no check has sized yet is assumed to have the slots and context of
    /// `limits`.
    pub fn held(&mut self, workers: &[WorkerInfo], device: &DeviceInfo, limits: Limits) -> u64 {
        let mut counts: BTreeMap<(String, String), (usize, usize, usize)> = BTreeMap::new();
        for worker in workers
            .iter()
            .filter(|w| same_memory(&w.device, &device.id))
        {
            counts
                .entry((worker.model.clone(), worker.device.clone()))
                .or_default()
                .0 += 1;
        }
        for pending in self
            .pending
            .values()
            .filter(|p| same_memory(&p.device, &device.id))
        {
            let (_, baseline, spawning) = counts
                .entry((pending.model.clone(), pending.device.clone()))
                .or_default();
            *baseline = (*baseline).max(pending.baseline);
            *spawning += 1;
        }
        counts
            .into_iter()
            .map(|(key, (children, baseline, spawning))| {
                let count = children.max(baseline + spawning) as u64;
                let each =
                    *self
                        .required
                        .entry(key)
                        .or_insert_with_key(|(model, worker_device)| {
                            estimate_unknown(model, worker_device, device.kind, limits)
                        });
                each.saturating_mul(count)
            })
            .fold(0, u64::saturating_add)
    }
}

/// The CPU and the Apple GPU share the system's memory; each CUDA device has its own.
fn same_memory(a: &str, b: &str) -> bool {
    let system = |id: &str| id == "cpu" || id.starts_with("metal:");
    a == b || (system(a) && system(b))
}

/// The estimate of a worker's model that no check has seen (its spawn could not size it):
/// read from its path when it is one, else nothing is counted for it.
fn estimate_unknown(model: &str, worker_device: &str, kind: DeviceKind, limits: Limits) -> u64 {
    let kind = match worker_device {
        "cpu" => DeviceKind::Cpu,
        d if d.starts_with("metal:") => DeviceKind::Metal,
        _ => kind,
    };
    match footprint::of_path(Path::new(model), kind, limits.worker_ctx_size) {
        Ok(f) => f
            .weights_bytes
            .saturating_add(f.kv_cache_bytes(f.slots(limits.worker_slots)))
            .saturating_add(overhead(kind)),
        Err(reason) => {
            tracing::debug!(model, reason, "cannot estimate a running worker's memory");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use rbee_contract::WorkerState;

    use super::*;
    use crate::capacity::tests::{device, limits};

    const GIB: u64 = 1 << 30;

    fn worker(id: &str, model: &str, device: &str) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            url: "http://127.0.0.1:1".into(),
            model: model.into(),
            device: device.into(),
            state: WorkerState::Ready,
            slots_total: 1,
            slots_free: 1,
            hive_id: None,
            context_length: None,
        }
    }

    fn state_knowing(sizes: &[(&str, &str, u64)]) -> LedgerState {
        LedgerState {
            required: sizes
                .iter()
                .map(|(m, d, b)| ((m.to_string(), d.to_string()), *b))
                .collect(),
            ..LedgerState::default()
        }
    }

    #[test]
    fn held_counts_workers_on_the_same_memory_once() {
        let gpu = device("cuda:0", 24 * GIB, 20 * GIB);
        let mut state = state_knowing(&[("a", "cuda:0", 3 * GIB), ("b", "cuda:1", 5 * GIB)]);
        let workers = vec![
            worker("w1", "a", "cuda:0"),
            worker("w2", "a", "cuda:0"),
            worker("w3", "b", "cuda:1"),
        ];
        assert_eq!(state.held(&workers, &gpu, limits(1)), 6 * GIB);
        assert_eq!(state.held(&workers[2..], &gpu, limits(1)), 0);

        // A spawn of `a` in progress counts until its worker is a child.
        state.pending.insert(
            1,
            Pending {
                model: "a".into(),
                device: "cuda:0".into(),
                baseline: 2,
            },
        );
        assert_eq!(state.held(&workers, &gpu, limits(1)), 9 * GIB);
        let mut with_new = workers.clone();
        with_new.push(worker("w4", "a", "cuda:0"));
        assert_eq!(state.held(&with_new, &gpu, limits(1)), 9 * GIB, "not twice");
        // A worker that died meanwhile does not hide the pending spawn.
        assert_eq!(state.held(&workers[..1], &gpu, limits(1)), 9 * GIB);
        state.pending.clear();
        assert_eq!(state.held(&workers[..1], &gpu, limits(1)), 3 * GIB);
    }

    #[test]
    fn the_cpu_and_the_apple_gpu_share_memory() {
        assert!(same_memory("cpu", "cpu"));
        assert!(same_memory("cpu", "metal:0"));
        assert!(same_memory("metal:0", "cpu"));
        assert!(!same_memory("cpu", "cuda:0"));
        assert!(!same_memory("cuda:0", "cuda:1"));
        let cpu = device("cpu", 64 * GIB, 60 * GIB);
        let mut state = state_knowing(&[("m", "metal:0", 4 * GIB), ("c", "cpu", GIB)]);
        let workers = vec![worker("w1", "m", "metal:0"), worker("w2", "c", "cpu")];
        assert_eq!(state.held(&workers, &cpu, limits(1)), 5 * GIB);
    }

    #[test]
    fn a_worker_of_an_unreadable_model_counts_nothing_and_is_remembered() {
        let cpu = device("cpu", 64 * GIB, 60 * GIB);
        let mut state = LedgerState::default();
        let workers = vec![worker("w1", "/nonexistent/rbee/m.gguf", "cpu")];
        assert_eq!(state.held(&workers, &cpu, limits(1)), 0);
        assert_eq!(state.required.len(), 1);
    }
}
