//! `GET /v1/models`: the models the cluster can answer with, from the heartbeat registry.
//!
//! A model is listed when a ready worker serves it or a hive's catalog holds it ready; both
//! only while their heartbeats arrive on time. The id is the model string a request names
//! (the reference the worker was started with, or the catalog entry's id).

use std::collections::BTreeSet;

use rbee_contract::{ModelState, WorkerState};
use serde::Serialize;
use utoipa::ToSchema;

use crate::registry::Registry;
use crate::wire::Health;

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`
    pub object: &'static str,
    pub data: Vec<Model>,
}

/// `GET /v1/models/{id}`, and each entry of the list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// `model`
    pub object: &'static str,
    /// Always 0: heartbeats do not say when a model was made.
    pub created: u64,
    /// `rbee`
    pub owned_by: &'static str,
}

impl Model {
    fn new(id: String) -> Self {
        Model {
            id,
            object: "model",
            created: 0,
            owned_by: "rbee",
        }
    }
}

/// The listed models, sorted by id.
pub(crate) fn list(registry: &Registry) -> ModelList {
    let mut ids = BTreeSet::new();
    for worker in registry.worker_views() {
        if worker.health == Health::Healthy && worker.info.state == WorkerState::Ready {
            ids.insert(worker.info.model);
        }
    }
    for hive in registry.hive_views() {
        if hive.health == Health::Healthy {
            ids.extend(
                hive.info
                    .models
                    .into_iter()
                    .filter(|m| m.state == ModelState::Ready)
                    .map(|m| m.id),
            );
        }
    }
    ModelList {
        object: "list",
        data: ids.into_iter().map(Model::new).collect(),
    }
}

pub(crate) fn get(registry: &Registry, id: &str) -> Option<Model> {
    list(registry).data.into_iter().find(|m| m.id == id)
}

/// Whether a request for `model` can lead anywhere: a worker (ready or still loading)
/// serves it, a hive's catalog holds it under that id or source, or it names something a
/// hive can load (an `hf:` reference or a file path). Anything else is an unknown model.
pub(crate) fn could_serve(registry: &Registry, model: &str) -> bool {
    let looks_like_reference = model.starts_with("hf:")
        || model.contains('/')
        || model.contains('\\')
        || model.ends_with(".gguf")
        || model.ends_with(".safetensors");
    looks_like_reference
        || registry
            .worker_views()
            .iter()
            .any(|w| w.info.model == model && !matches!(w.info.state, WorkerState::Failed))
        || registry
            .hive_views()
            .iter()
            .flat_map(|h| &h.info.models)
            .any(|m| m.id == model || m.source == model)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rbee_contract::{HiveInfo, ModelEntry};

    use super::*;
    use crate::registry::tests::{hive, worker};

    #[test]
    fn ready_workers_and_catalog_models_are_listed_once() {
        let registry = Registry::new(Duration::from_secs(5));
        registry.worker_heartbeat(worker("w1", "/m/a.gguf", WorkerState::Ready, 1));
        registry.worker_heartbeat(worker("w2", "/m/a.gguf", WorkerState::Ready, 1));
        registry.worker_heartbeat(worker("w3", "/m/loading.gguf", WorkerState::Loading, 1));
        let entry = |id: &str, state| ModelEntry {
            id: id.into(),
            source: format!("hf:org/{id}"),
            state,
            size_bytes: 1,
        };
        registry.hive_heartbeat(HiveInfo {
            models: vec![
                entry("smol", ModelState::Ready),
                entry("half", ModelState::Downloading),
            ],
            ..hive("h1", Vec::new())
        });
        let ids: Vec<String> = list(&registry).data.into_iter().map(|m| m.id).collect();
        assert_eq!(ids, ["/m/a.gguf", "smol"]);
        assert_eq!(
            serde_json::to_value(list(&registry)).unwrap()["data"][1],
            serde_json::json!({"id": "smol", "object": "model", "created": 0, "owned_by": "rbee"})
        );
        assert!(get(&registry, "smol").is_some());
        assert!(get(&registry, "half").is_none());

        assert!(could_serve(&registry, "/m/loading.gguf"));
        assert!(could_serve(&registry, "hf:org/half"));
        assert!(could_serve(&registry, "half"));
        assert!(could_serve(&registry, "./elsewhere.gguf"));
        assert!(!could_serve(&registry, "gpt-4"));
    }
}
