//! Placement decisions over a snapshot of the registry: which worker runs an inference,
//! which hive starts a worker, which hive an operation goes to. Pure functions, no I/O.

use std::cmp::Reverse;
use std::collections::HashSet;

use job_server::{ApiError, JobFailure};
use rbee_contract::{ErrorCode, HiveInfo, WorkerInfo, WorkerState};

use crate::registry::{HiveView, WorkerView};
use crate::wire::Health;

/// Where an inference for a model should go.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Placement {
    /// The least loaded ready worker serving the model.
    Worker(WorkerInfo),
    /// No worker is ready, but one serving the model is loading: wait for it.
    Wait { worker_id: String },
    /// No worker serves the model: start one.
    Spawn,
}

/// Ready, healthy workers serving `model` and not `excluded`, most free slots first, then
/// fewest jobs the queen itself has in flight on them (heartbeats lag behind the queen's own
/// sends). Stale, failed, stopping and loading workers are never chosen.
pub(crate) fn place(model: &str, workers: &[WorkerView], excluded: &HashSet<String>) -> Placement {
    let serving = || {
        workers.iter().filter(|w| {
            w.health == Health::Healthy
                && w.info.model == model
                && !excluded.contains(&w.info.worker_id)
        })
    };
    let best = serving()
        .filter(|w| w.info.state == WorkerState::Ready)
        .min_by_key(|w| {
            // A heartbeat's free slots can be an interval old; the queen's own in-flight count
            // is current, so it comes off the reported room.
            let room = w.info.slots_free.saturating_sub(w.in_flight);
            (Reverse(room), w.in_flight, w.info.worker_id.clone())
        });
    if let Some(best) = best {
        return Placement::Worker(best.info.clone());
    }
    match serving().find(|w| w.info.state == WorkerState::Loading) {
        Some(loading) => Placement::Wait {
            worker_id: loading.info.worker_id.clone(),
        },
        None => Placement::Spawn,
    }
}

/// The hive that should start a worker for `model`: a healthy one, preferring hives whose
/// catalog already holds the model, then those running fewest workers.
pub(crate) fn spawn_hive(hives: &[HiveView], model: &str) -> Result<HiveInfo, JobFailure> {
    let best = hives
        .iter()
        .filter(|h| h.health == Health::Healthy)
        .min_by_key(|h| {
            let has_model = h
                .info
                .models
                .iter()
                .any(|m| m.id == model || m.source == model);
            (!has_model, h.info.workers.len(), h.info.hive_id.clone())
        });
    if let Some(hive) = best {
        return Ok(hive.info.clone());
    }
    let message = if hives.is_empty() {
        format!(
            "no worker serves {model} and no hive is registered to start one; \
             start a hive with `rbee-keeper hive start`"
        )
    } else {
        format!(
            "no worker serves {model} and no hive is healthy to start one ({}); \
             check the hives or start one with `rbee-keeper hive start`",
            describe_silence(hives)
        )
    };
    Err(JobFailure::new(ErrorCode::NoCapacity, message))
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

    use rbee_contract::{ModelEntry, ModelState};

    use super::*;
    use crate::registry::tests::{hive, worker};

    fn view(info: WorkerInfo, health: Health, in_flight: u32) -> WorkerView {
        WorkerView {
            info,
            health,
            in_flight,
        }
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
        assert_eq!(chosen(place("m", &workers, &HashSet::new())), "b");

        let workers = vec![
            view(worker("a", "m", WorkerState::Ready, 1), Health::Healthy, 2),
            view(worker("b", "m", WorkerState::Ready, 1), Health::Healthy, 1),
        ];
        assert_eq!(chosen(place("m", &workers, &HashSet::new())), "b");
        let excluded = HashSet::from(["b".to_string()]);
        assert_eq!(chosen(place("m", &workers, &excluded)), "a");
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
        assert_eq!(place("m", &workers, &HashSet::new()), Placement::Spawn);

        let mut with_loading = workers.clone();
        with_loading.push(view(
            worker("d", "m", WorkerState::Loading, 0),
            Health::Healthy,
            0,
        ));
        assert_eq!(
            place("m", &with_loading, &HashSet::new()),
            Placement::Wait {
                worker_id: "d".into()
            }
        );

        // A worker with no free slot is still chosen: it queues the request itself.
        let busy = vec![view(
            worker("e", "m", WorkerState::Ready, 0),
            Health::Healthy,
            3,
        )];
        assert_eq!(chosen(place("m", &busy, &HashSet::new())), "e");
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
        assert_eq!(spawn_hive(&hives, "m").unwrap().hive_id, "z");
        assert_eq!(spawn_hive(&hives, "other").unwrap().hive_id, "b");

        let none = spawn_hive(&[], "m").unwrap_err();
        assert_eq!(none.code, ErrorCode::NoCapacity);
        assert!(none.message.contains("rbee-keeper hive start"), "{none}");
        let stale = spawn_hive(&hives[..1], "m").unwrap_err();
        assert_eq!(stale.code, ErrorCode::NoCapacity);
        assert!(stale.message.contains("a silent for 20 s"), "{stale}");
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
