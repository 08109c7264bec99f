//! A hive's `GET /v1/devices` and `GET /v1/capacity` answers.

use serde::{Deserialize, Serialize};

use crate::{DeviceInfo, ErrorDetail};

/// The answer to a hive's `GET /v1/devices`: its CPU, always, and its GPUs, possibly none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicesResponse {
    pub hive_id: String,
    pub cpu: DeviceInfo,
    /// CUDA devices (`cuda:N`) and the Apple GPU (`metal:0`); empty on a machine without one.
    pub gpus: Vec<DeviceInfo>,
}

impl DevicesResponse {
    /// Every device, the CPU first: the list a hive's heartbeat carries.
    pub fn all(&self) -> Vec<DeviceInfo> {
        std::iter::once(self.cpu.clone())
            .chain(self.gpus.iter().cloned())
            .collect()
    }
}

/// How much memory a model needs on a device and how much the device has left for it.
///
/// `required_bytes` is `weights_bytes + kv_cache_bytes + overhead_bytes`; the model fits when
/// it is at most `available_bytes`. A worker decodes up to `slots` sequences at once, each
/// with its own KV cache, so `kv_cache_bytes` is `slots` caches of `context_length` positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityEstimate {
    /// `cpu`, `cuda:N` or `metal:N`.
    pub device: String,
    /// The model reference as asked.
    pub model: String,
    pub required_bytes: u64,
    pub available_bytes: u64,
    /// The weights as the worker holds them in memory.
    pub weights_bytes: u64,
    /// The KV caches of `slots` sequences at `context_length` positions each.
    pub kv_cache_bytes: u64,
    /// A fixed allowance for the worker's runtime, buffers and activations.
    pub overhead_bytes: u64,
    /// The context length the worker will use.
    pub context_length: u64,
    /// Sequences the worker will decode at once, each with a KV cache: the hive's worker
    /// slots for a model the worker batches, 1 for one it serves a sequence at a time. Absent
    /// (an older hive), it is 1.
    #[serde(default = "one_slot")]
    pub slots: u32,
    /// The worker's prompt cache store (prefixes kept in memory beyond the slots' KV caches),
    /// for a model the worker batches. Absent when 0 (or from an older hive).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prompt_cache_bytes: u64,
}

fn one_slot() -> u32 {
    1
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CapacityEstimate {
    pub fn fits(&self) -> bool {
        self.required_bytes <= self.available_bytes
    }
}

/// The `409` body of `GET /v1/capacity` when a model does not fit: the usual error object
/// (`code` is `no_capacity`) beside the numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoCapacityBody {
    pub error: ErrorDetail,
    #[serde(flatten)]
    pub estimate: CapacityEstimate,
}
