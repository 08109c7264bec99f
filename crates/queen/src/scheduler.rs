//! Placement decisions over a snapshot of the registry: which worker runs an inference,
//! which hive starts a worker, which hive an operation goes to. Pure functions, no I/O.

use std::cmp::Reverse;
use std::collections::HashSet;

use job_server::{ApiError, JobFailure};
use rbee_contract::prefix::{held_prefix, prefix_key_ends, prefix_keys};
use rbee_contract::{
    DeviceInfo, DeviceKind, ErrorCode, HiveInfo, InferRequest, ModelEntry, WorkerInfo, WorkerState,
};

use crate::registry::{HiveView, WorkerView};
use crate::wire::Health;

/// Where an inference for a model should go.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Placement {
    /// The ready worker serving the model, with a free slot, that holds the longest prefix
    /// of the request in its prompt cache, or the least loaded one.
    Worker(WorkerInfo),
    /// Ready workers serve the model, but every slot is taken: wait in the model's line.
    Full,
    /// No worker is ready, but one serving the model is loading: wait for it.
    Wait { worker_id: String },
    /// No worker serves the model: start one.
    Spawn,
}

/// A request's prefix keys ([`rbee_contract::prefix`]) and the bytes of its content each
/// one covers, computed once per job.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestPrefix {
    pub keys: Vec<u64>,
    ends: Vec<usize>,
}

impl RequestPrefix {
    pub fn of(request: &InferRequest) -> Self {
        RequestPrefix {
            keys: prefix_keys(request),
            ends: prefix_key_ends(request),
        }
    }

    /// The bytes of the request a worker holding `held` has cached, when that is at least
    /// half of the request; else 0. A smaller share saves little (a system prompt that every
    /// conversation shares, say), and counting it would pull every new conversation onto the
    /// one worker that holds it, to crowd out the histories cached there.
    fn cached_share(&self, held: &HashSet<u64>) -> usize {
        let total = self.ends.last().copied().unwrap_or(0);
        match held_prefix(&self.keys, held) {
            0 => 0,
            n => {
                let bytes = self.ends[n - 1];
                if bytes * 2 >= total { bytes } else { 0 }
            }
        }
    }
}

/// Among ready, healthy workers serving `model`, not `excluded` and with a free slot: the one
/// whose prompt cache holds the most of the request, counted when it is at least half of it
/// ([`RequestPrefix::cached_share`]); then the most free slots, then the fewest jobs in flight,
/// then the fewest cached keys (so that new conversations spread over the workers rather than
/// evict each other's history on one). Stale, failed, stopping and loading workers are never
/// chosen.
///
/// The cache is weighed against load this far and no further: a worker without a free slot
/// is never chosen while another has one, however much of the request it holds, since
/// waiting for its slot can take a whole generation, longer than evaluating the prompt afresh;
/// and when every slot is taken the job waits in the model's line and then goes by the same
/// rule.
///
/// A worker's free slots are its `slots_total` less the jobs the queen itself has in flight
/// on it: only the queen sends work to workers, and its own count is current where a
/// heartbeat's `slots_free` can be an interval old (a slot that came free a moment ago would
/// otherwise sit idle until the next heartbeat).
pub(crate) fn place(
    model: &str,
    request: &RequestPrefix,
    workers: &[WorkerView],
    excluded: &HashSet<String>,
) -> Placement {
    let serving = || {
        workers.iter().filter(|w| {
            w.health == Health::Healthy
                && w.info.model == model
                && !excluded.contains(&w.info.worker_id)
        })
    };
    let room = |w: &WorkerView| w.info.slots_total.saturating_sub(w.in_flight);
    let ready = || serving().filter(|w| w.info.state == WorkerState::Ready);
    let best = ready().filter(|w| room(w) > 0).min_by_key(|w| {
        (
            Reverse(request.cached_share(&w.prefixes)),
            Reverse(room(w)),
            w.in_flight,
            w.prefixes.len(),
            w.info.worker_id.clone(),
        )
    });
    if let Some(best) = best {
        return Placement::Worker(best.info.clone());
    }
    if ready().next().is_some() {
        return Placement::Full;
    }
    match serving().find(|w| w.info.state == WorkerState::Loading) {
        Some(loading) => Placement::Wait {
            worker_id: loading.info.worker_id.clone(),
        },
        None => Placement::Spawn,
    }
}

/// Where a cold start goes: a hive, and the device its worker should use (`None` for a hive
/// that reports no devices, which then uses its default).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SpawnTarget {
    pub hive: HiveInfo,
    pub device: Option<String>,
}

/// Where a worker for `model` should be started, best first, from the hives' heartbeats.
///
/// Only healthy hives are candidates. The model's size is known when some hive's catalog lists
/// it (as its `id` or `source`); a device is a candidate when its free memory is at least that
/// size, every device when the size is unknown. The hive itself then checks the whole estimate
/// (weights, KV cache, overhead) before it starts the worker, and the caller moves on to the
/// next candidate when it refuses. Hives whose catalog holds the model come first (no
/// download), then a GPU before a CPU, then the most free memory, then the fewest workers.
/// When no device of a healthy hive is big enough, the answer is `no_capacity` with each
/// hive's best offer.
pub(crate) fn spawn_targets(
    hives: &[HiveView],
    model: &str,
) -> Result<Vec<SpawnTarget>, JobFailure> {
    let size = model_size(hives, model);
    let healthy = || hives.iter().filter(|h| h.health == Health::Healthy);
    let mut candidates: Vec<(&HiveView, Option<&DeviceInfo>)> = healthy()
        .flat_map(|h| {
            let devices: Vec<Option<&DeviceInfo>> = if h.info.devices.is_empty() {
                vec![None]
            } else {
                h.info
                    .devices
                    .iter()
                    .filter(|d| size.is_none_or(|size| d.memory_free_bytes >= size))
                    .map(Some)
                    .collect()
            };
            devices.into_iter().map(move |d| (h, d))
        })
        .collect();
    candidates.sort_by_key(|(h, device)| {
        let has_model = h.info.models.iter().any(|m| names(m, model));
        let (gpu, free, id) = device.map_or((false, 0, String::new()), |d| {
            (d.kind != DeviceKind::Cpu, d.memory_free_bytes, d.id.clone())
        });
        (
            !has_model,
            !gpu,
            Reverse(free),
            h.info.workers.len(),
            h.info.hive_id.clone(),
            id,
        )
    });
    if !candidates.is_empty() {
        return Ok(candidates
            .into_iter()
            .map(|(hive, device)| SpawnTarget {
                hive: hive.info.clone(),
                device: device.map(|d| d.id.clone()),
            })
            .collect());
    }
    let message = match (hives.is_empty(), healthy().next(), size) {
        (true, _, _) => format!(
            "no worker serves {model} and no hive is registered to start one; \
             start a hive with `rbee-keeper hive start`"
        ),
        (false, Some(_), Some(size)) => format!(
            "no hive has room for {model}: it needs at least {size} bytes, and {}",
            describe_room(healthy())
        ),
        _ => format!(
            "no worker serves {model} and no hive is healthy to start one ({}); \
             check the hives or start one with `rbee-keeper hive start`",
            describe_silence(hives)
        ),
    };
    Err(JobFailure::new(ErrorCode::NoCapacity, message))
}

fn names(entry: &ModelEntry, model: &str) -> bool {
    entry.id == model || entry.source == model
}

/// The model's size by any hive's catalog (the largest, should two disagree).
fn model_size(hives: &[HiveView], model: &str) -> Option<u64> {
    hives
        .iter()
        .flat_map(|h| &h.info.models)
        .filter(|m| names(m, model) && m.size_bytes > 0)
        .map(|m| m.size_bytes)
        .max()
}

/// `hive a has 1000 bytes free at most (cpu), hive b …`.
fn describe_room<'a>(hives: impl Iterator<Item = &'a HiveView>) -> String {
    hives
        .map(
            |h| match h.info.devices.iter().max_by_key(|d| d.memory_free_bytes) {
                Some(d) => format!(
                    "hive {} has {} bytes free at most ({})",
                    h.info.hive_id, d.memory_free_bytes, d.id
                ),
                None => format!("hive {} reports no device", h.info.hive_id),
            },
        )
        .collect::<Vec<_>>()
        .join(", ")
}

/// The hive an operation goes to: the one named, or the only one registered.
pub(crate) fn target_hive(hives: &[HiveView], named: Option<&str>) -> Result<HiveInfo, ApiError> {
    let hive = match named {
        Some(id) => hives.iter().find(|h| h.info.hive_id == id).ok_or_else(|| {
            ApiError::not_found(format!(
                "no hive `{id}` is registered; known hives: {}",
                list_ids(hives)
            ))
        })?,
        None => match hives {
            [] => {
                return Err(ApiError::new(
                    ErrorCode::NoCapacity,
                    "no hive is registered; start one with `rbee-keeper hive start`",
                ));
            }
            [only] => only,
            several => {
                return Err(ApiError::bad_request(format!(
                    "several hives are registered ({}); name one with `hive_id`",
                    list_ids(several)
                )));
            }
        },
    };
    if hive.health == Health::Stale {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "hive `{}` has sent no heartbeat for {} s",
                hive.info.hive_id,
                hive.silent_for.as_secs()
            ),
        ));
    }
    Ok(hive.info.clone())
}

fn list_ids(hives: &[HiveView]) -> String {
    if hives.is_empty() {
        return "none".into();
    }
    hives
        .iter()
        .map(|h| h.info.hive_id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_silence(hives: &[HiveView]) -> String {
    hives
        .iter()
        .map(|h| format!("{} silent for {} s", h.info.hive_id, h.silent_for.as_secs()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rbee_contract::{ChatMessage, ChatRole, ModelEntry, ModelState};

    use super::*;
    use crate::registry::tests::{hive, worker};

    fn view(info: WorkerInfo, health: Health, in_flight: u32) -> WorkerView {
        WorkerView {
            info,
            health,
            in_flight,
            prefixes: Default::default(),
        }
    }

    fn holding(mut view: WorkerView, keys: &[u64]) -> WorkerView {
        view.prefixes = std::sync::Arc::new(keys.iter().copied().collect());
        view
    }

    fn none() -> RequestPrefix {
        RequestPrefix::default()
    }

    fn chat(messages: &[(ChatRole, &str)]) -> RequestPrefix {
        RequestPrefix::of(&InferRequest {
            messages: Some(
                messages
                    .iter()
                    .map(|(role, content)| ChatMessage::new(*role, *content))
                    .collect(),
            ),
            ..InferRequest::default()
        })
    }

    #[test]
    fn the_worker_holding_most_of_the_request_with_a_free_slot_wins() {
        use ChatRole::{Assistant, System, User};
        let question = "q".repeat(300);
        let turn_2 = chat(&[
            (System, "Be terse."),
            (User, &question),
            (Assistant, "An answer."),
            (User, "Why?"),
        ]);
        let keys = &turn_2.keys;
        let ready = |id: &str| {
            let mut info = worker(id, "m", WorkerState::Ready, 2);
            info.slots_total = 2;
            info
        };
        // `a` is idle with nothing cached; `b` holds the system prompt every conversation
        // shares; `c` holds the first turn (its report left out the system prompt's key) and
        // runs a job: `c` holds the most.
        let workers = vec![
            view(ready("a"), Health::Healthy, 0),
            holding(view(ready("b"), Health::Healthy, 0), &[keys[0], 99]),
            holding(view(ready("c"), Health::Healthy, 1), &[keys[1]]),
        ];
        assert_eq!(chosen(place("m", &turn_2, &workers, &HashSet::new())), "c");

        // A new conversation: the shared system prompt is a small part of it, so it counts
        // for nothing and the idle worker with the emptier cache takes it.
        let other = chat(&[(System, "Be terse."), (User, &"o".repeat(300))]);
        assert_eq!(chosen(place("m", &other, &workers, &HashSet::new())), "a");
        // A long system prompt is worth going back for.
        let long_system = "s".repeat(1000);
        let shared = chat(&[(System, &long_system), (User, "Hi.")]);
        let keys_shared = &shared.keys;
        let workers_shared = vec![
            view(ready("a"), Health::Healthy, 0),
            holding(view(ready("b"), Health::Healthy, 1), &[keys_shared[0]]),
        ];
        assert_eq!(
            chosen(place("m", &shared, &workers_shared, &HashSet::new())),
            "b"
        );

        // `c` has no free slot: the job goes elsewhere at once rather than wait for it.
        let mut full = workers.clone();
        full[2].in_flight = 2;
        assert_eq!(chosen(place("m", &turn_2, &full, &HashSet::new())), "a");
        let excluded = HashSet::from(["a".to_string()]);
        assert_eq!(chosen(place("m", &turn_2, &full, &excluded)), "b");
        // Every slot taken: the job waits, even for the worker holding its prefix.
        let busy = vec![holding(view(ready("c"), Health::Healthy, 2), keys)];
        assert_eq!(place("m", &turn_2, &busy, &HashSet::new()), Placement::Full);

        // Nothing held anywhere, equal load: the worker with the emptier cache, so that a new
        // conversation does not crowd out another's history.
        let fresh = vec![
            holding(view(ready("a"), Health::Healthy, 0), &[7, 8]),
            holding(view(ready("b"), Health::Healthy, 0), &[9]),
        ];
        assert_eq!(chosen(place("m", &other, &fresh, &HashSet::new())), "b");
        // A raw prompt that extends one a worker ran goes back there too.
        let prompt = |text: String| {
            RequestPrefix::of(&InferRequest {
                prompt: Some(text),
                ..InferRequest::default()
            })
        };
        let first = prompt("p".repeat(1000));
        let longer = prompt(format!("{}{}", "p".repeat(1000), "more"));
        let ran = vec![
            view(ready("a"), Health::Healthy, 0),
            holding(view(ready("b"), Health::Healthy, 0), &first.keys),
        ];
        assert_eq!(chosen(place("m", &longer, &ran, &HashSet::new())), "b");
    }

    fn hive_view(info: HiveInfo, health: Health) -> HiveView {
        HiveView {
            info,
            health,
            silent_for: Duration::from_secs(if health == Health::Stale { 20 } else { 1 }),
        }
    }

    fn chosen(placement: Placement) -> String {
        match placement {
            Placement::Worker(info) => info.worker_id,
            other => panic!("expected a worker, got {other:?}"),
        }
    }

    #[test]
    fn most_free_slots_then_fewest_in_flight() {
        let mut roomy = worker("b", "m", WorkerState::Ready, 2);
        roomy.slots_total = 2;
        let workers = vec![
            view(worker("a", "m", WorkerState::Ready, 1), Health::Healthy, 0),
            view(roomy, Health::Healthy, 0),
            view(
                worker("c", "other", WorkerState::Ready, 4),
                Health::Healthy,
                0,
            ),
        ];
        assert_eq!(chosen(place("m", &none(), &workers, &HashSet::new())), "b");

        // Equal room (one slot each): the one with fewer jobs in flight.
        let mut a = worker("a", "m", WorkerState::Ready, 1);
        a.slots_total = 3;
        let mut b = worker("b", "m", WorkerState::Ready, 1);
        b.slots_total = 2;
        let workers = vec![view(a, Health::Healthy, 2), view(b, Health::Healthy, 1)];
        assert_eq!(chosen(place("m", &none(), &workers, &HashSet::new())), "b");
        let excluded = HashSet::from(["b".to_string()]);
        assert_eq!(chosen(place("m", &none(), &workers, &excluded)), "a");
    }

    #[test]
    fn stale_busy_states_and_loading_workers() {
        let workers = vec![
            view(worker("a", "m", WorkerState::Ready, 1), Health::Stale, 0),
            view(
                worker("b", "m", WorkerState::Stopping, 1),
                Health::Healthy,
                0,
            ),
            view(worker("c", "m", WorkerState::Failed, 0), Health::Healthy, 0),
        ];
        assert_eq!(
            place("m", &none(), &workers, &HashSet::new()),
            Placement::Spawn
        );

        let mut with_loading = workers.clone();
        with_loading.push(view(
            worker("d", "m", WorkerState::Loading, 0),
            Health::Healthy,
            0,
        ));
        assert_eq!(
            place("m", &none(), &with_loading, &HashSet::new()),
            Placement::Wait {
                worker_id: "d".into()
            }
        );

        // Every slot taken by the queen's own jobs: the job waits in line.
        let busy = vec![view(
            worker("e", "m", WorkerState::Ready, 0),
            Health::Healthy,
            1,
        )];
        assert_eq!(place("m", &none(), &busy, &HashSet::new()), Placement::Full);
        // A heartbeat that still says "busy" after the queen's job ended does not hold the
        // slot: the queen's count is current.
        let freed = vec![view(
            worker("e", "m", WorkerState::Ready, 0),
            Health::Healthy,
            0,
        )];
        assert_eq!(chosen(place("m", &none(), &freed, &HashSet::new())), "e");
    }

    #[test]
    fn spawn_prefers_healthy_hives_holding_the_model() {
        let mut stocked = hive("z", vec![worker("w", "x", WorkerState::Ready, 1)]);
        stocked.models.push(ModelEntry {
            id: "m".into(),
            source: "hf:org/m".into(),
            state: ModelState::Ready,
            size_bytes: 1,
        });
        let hives = vec![
            hive_view(hive("a", Vec::new()), Health::Stale),
            hive_view(hive("b", Vec::new()), Health::Healthy),
            hive_view(stocked, Health::Healthy),
        ];
        assert_eq!(spawn_targets(&hives, "m").unwrap()[0].hive.hive_id, "z");
        let other = spawn_targets(&hives, "other").unwrap();
        let order: Vec<&str> = other.iter().map(|t| t.hive.hive_id.as_str()).collect();
        assert_eq!(order, ["b", "z"], "the stale hive is never a candidate");
        assert_eq!(other[0].device, None);

        let none = spawn_targets(&[], "m").unwrap_err();
        assert_eq!(none.code, ErrorCode::NoCapacity);
        assert!(none.message.contains("rbee-keeper hive start"), "{none}");
        let stale = spawn_targets(&hives[..1], "m").unwrap_err();
        assert_eq!(stale.code, ErrorCode::NoCapacity);
        assert!(stale.message.contains("a silent for 20 s"), "{stale}");
    }

    fn device(id: &str, free: u64) -> DeviceInfo {
        DeviceInfo {
            id: id.into(),
            kind: if id == "cpu" {
                DeviceKind::Cpu
            } else {
                DeviceKind::Cuda
            },
            name: id.into(),
            memory_total_bytes: free * 2,
            memory_free_bytes: free,
            cores: None,
            compute_capability: None,
        }
    }

    fn equipped(id: &str, devices: Vec<DeviceInfo>, models: &[(&str, u64)]) -> HiveView {
        let mut info = hive(id, Vec::new());
        info.devices = devices;
        info.models = models
            .iter()
            .map(|(model, size)| ModelEntry {
                id: model.to_string(),
                source: format!("hf:org/{model}"),
                state: ModelState::Ready,
                size_bytes: *size,
            })
            .collect();
        hive_view(info, Health::Healthy)
    }

    fn target(hives: &[HiveView], model: &str) -> (String, Option<String>) {
        let chosen = spawn_targets(hives, model).unwrap().remove(0);
        (chosen.hive.hive_id, chosen.device)
    }

    fn on(hive: &str, device: &str) -> (String, Option<String>) {
        (hive.into(), Some(device.into()))
    }

    #[test]
    fn spawn_goes_to_a_device_with_room() {
        const GB: u64 = 1_000_000_000;
        // The catalog of `a` says how big `m` is; `b` has more room but no GPU big enough.
        let hives = vec![
            equipped(
                "a",
                vec![device("cpu", 4 * GB), device("cuda:0", 6 * GB)],
                &[("m", 5 * GB)],
            ),
            equipped(
                "b",
                vec![device("cpu", 30 * GB), device("cuda:0", 2 * GB)],
                &[],
            ),
        ];
        assert_eq!(target(&hives, "m"), on("a", "cuda:0"));
        // `a` has no room left: the size from its catalog rules out `b`'s small GPU.
        let full = vec![
            equipped(
                "a",
                vec![device("cpu", GB), device("cuda:0", 4 * GB)],
                &[("m", 5 * GB)],
            ),
            hives[1].clone(),
        ];
        assert_eq!(target(&full, "hf:org/m"), on("b", "cpu"));

        // Without the model anywhere, its size is unknown: a GPU first, then the most room;
        // every device is a candidate for when a hive refuses.
        let order: Vec<(String, Option<String>)> = spawn_targets(&hives, "new")
            .unwrap()
            .into_iter()
            .map(|t| (t.hive.hive_id, t.device))
            .collect();
        assert_eq!(
            order,
            [
                on("a", "cuda:0"),
                on("b", "cuda:0"),
                on("b", "cpu"),
                on("a", "cpu")
            ]
        );
        let cpus = vec![
            equipped("a", vec![device("cpu", 4 * GB)], &[]),
            equipped("b", vec![device("cpu", 30 * GB)], &[]),
        ];
        assert_eq!(target(&cpus, "new"), on("b", "cpu"));

        // A hive that holds the model wins over one with more room.
        let stocked = vec![
            equipped("a", vec![device("cpu", 30 * GB)], &[]),
            equipped("b", vec![device("cpu", 8 * GB)], &[("m", GB)]),
        ];
        assert_eq!(target(&stocked, "m"), on("b", "cpu"));
    }

    #[test]
    fn no_device_with_room_is_no_capacity_with_the_numbers() {
        const GB: u64 = 1_000_000_000;
        let hives = vec![
            equipped(
                "a",
                vec![device("cpu", GB), device("cuda:0", 3 * GB)],
                &[("m", 5 * GB)],
            ),
            equipped("b", vec![device("cpu", 2 * GB)], &[]),
            hive_view(hive("c", Vec::new()), Health::Stale),
        ];
        let err = spawn_targets(&hives, "m").unwrap_err();
        assert_eq!(err.code, ErrorCode::NoCapacity);
        for part in [
            "5000000000 bytes",
            "hive a has 3000000000 bytes free at most (cuda:0)",
            "hive b has 2000000000 bytes free at most (cpu)",
        ] {
            assert!(err.message.contains(part), "{part}: {err}");
        }
        assert!(!err.message.contains("hive c"), "{err}");
    }

    #[test]
    fn operations_go_to_the_named_or_only_hive() {
        let one = vec![hive_view(hive("a", Vec::new()), Health::Healthy)];
        assert_eq!(target_hive(&one, None).unwrap().hive_id, "a");
        assert_eq!(target_hive(&one, Some("a")).unwrap().hive_id, "a");

        let unknown = target_hive(&one, Some("b")).unwrap_err();
        assert_eq!(unknown.code, ErrorCode::NotFound);
        assert!(unknown.message.contains("known hives: a"), "{unknown}");

        let two = vec![
            hive_view(hive("a", Vec::new()), Health::Healthy),
            hive_view(hive("b", Vec::new()), Health::Stale),
        ];
        let ambiguous = target_hive(&two, None).unwrap_err();
        assert_eq!(ambiguous.code, ErrorCode::BadRequest);
        assert!(ambiguous.message.contains("a, b"), "{ambiguous}");
        assert_eq!(
            target_hive(&two, Some("b")).unwrap_err().code,
            ErrorCode::Unavailable
        );
        assert_eq!(
            target_hive(&[], None).unwrap_err().code,
            ErrorCode::NoCapacity
        );
    }
}
