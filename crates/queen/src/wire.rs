//! JSON shapes of the queen's own routes beyond the shared contract: the answers of
//! `GET /v1/workers` and `GET /v1/hives`.

use rbee_contract::{HiveInfo, WorkerInfo};
use serde::{Deserialize, Serialize};

/// `GET /v1/workers`: every worker the queen heard from recently. A worker that missed three
/// heartbeats is listed with state `stale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerList {
    pub workers: Vec<WorkerInfo>,
}

/// `GET /v1/hives`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HiveList {
    pub hives: Vec<HiveStatus>,
}

/// A hive as its last heartbeat described it, with what the queen makes of its silence:
/// `{...HiveInfo, "status": "healthy" | "stale", "last_seen_ms_ago": N}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HiveStatus {
    #[serde(flatten)]
    pub hive: HiveInfo,
    pub status: Health,
    pub last_seen_ms_ago: u64,
}

/// Whether a component's heartbeats arrive on time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    /// Three intervals without a heartbeat: listed, but not scheduled on.
    Stale,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hive_status_is_hive_info_plus_two_fields() {
        let status = HiveStatus {
            hive: HiveInfo {
                hive_id: "h1".into(),
                url: "http://127.0.0.1:7835".into(),
                devices: Vec::new(),
                workers: Vec::new(),
                models: Vec::new(),
                model_dirs: Vec::new(),
            },
            status: Health::Stale,
            last_seen_ms_ago: 1500,
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"hive_id": "h1", "url": "http://127.0.0.1:7835", "devices": [],
                               "workers": [], "models": [], "status": "stale", "last_seen_ms_ago": 1500})
        );
        let back: HiveStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }
}
