use serde::{Deserialize, Serialize};

/// The most sequences a worker decodes at once (`llm-worker-rbee --slots`, `rbee-hive
/// --worker-slots`): one KV cache each.
pub const MAX_WORKER_SLOTS: u32 = 256;

/// What a worker reports about itself in every heartbeat. The first heartbeat registers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerInfo {
    pub worker_id: String,
    /// Base URL the queen uses to reach the worker, e.g. `http://127.0.0.1:9301`.
    pub url: String,
    /// The model reference the worker was started with.
    pub model: String,
    /// `cpu`, `cuda:N` or `metal:N`.
    pub device: String,
    pub state: WorkerState,
    pub slots_total: u32,
    pub slots_free: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hive_id: Option<String>,
    /// The model's context length, once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Process up, model loading.
    Loading,
    /// Model loaded, accepting requests.
    Ready,
    /// Loading failed; the worker will not become ready.
    Failed,
    /// Draining before exit.
    Stopping,
    /// Known from a registry but silent for too long (set by the receiver, never by a worker).
    Stale,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerHeartbeat {
    pub worker: WorkerInfo,
    /// The prefix keys (`rbee_contract::prefix`) of the prompts whose KV cache the worker
    /// holds, at most 1,024, most recently used first. Each heartbeat replaces the set the
    /// queen keeps for the worker; the queen routes a request to the worker holding the
    /// longest start of it. Absent from a worker without a prompt cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cached_prefixes: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Metal,
}

/// A compute device of a hive. Memory is system RAM for the CPU and VRAM for GPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceInfo {
    /// `cpu`, `cuda:N` or `metal:N`.
    pub id: String,
    pub kind: DeviceKind,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    Downloading,
    Ready,
    Failed,
}

/// A model in a hive's catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelEntry {
    pub id: String,
    pub source: String,
    pub state: ModelState,
    pub size_bytes: u64,
}

/// A catalog entry with what `model_get` and `model_list` tell beyond the heartbeat's
/// [`ModelEntry`]: the file, its verified sha256, times (Unix seconds) and why it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelDetails {
    #[serde(flatten)]
    pub entry: ModelEntry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a hive reports in every heartbeat. The first heartbeat registers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HiveInfo {
    pub hive_id: String,
    pub url: String,
    pub devices: Vec<DeviceInfo>,
    pub workers: Vec<WorkerInfo>,
    pub models: Vec<ModelEntry>,
    /// The directories (canonical, absolute) whose model files the hive loads for anyone
    /// (`--allow-model-dir`); empty when the hive loads any path it is asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_dirs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HiveHeartbeat {
    pub hive: HiveInfo,
}
