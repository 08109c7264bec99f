//! The JSON fixtures pin the wire shape: each one must parse into the typed value and
//! serialize back to the same JSON. A failing test here means a protocol change.

use rbee_contract::{
    ApiErrorBody, ChatRole, DeviceKind, DevicesResponse, ErrorCode, FinishReason, HiveHeartbeat,
    JobEvent, NoCapacityBody, Operation, ResponseFormat, WorkerHeartbeat, WorkerState,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// Parses the fixture and checks that serializing gives the same JSON back.
fn round_trip<T: DeserializeOwned + Serialize>(name: &str) -> T {
    let json = fixture(name);
    let typed: T = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(
        serde_json::to_value(&typed).unwrap(),
        json,
        "{name} does not round-trip"
    );
    typed
}

#[test]
fn infer_operation_shape() {
    let Operation::Infer(req) = round_trip::<Operation>("infer_operation.json") else {
        panic!("not an infer operation");
    };
    assert_eq!(req.prompt.as_deref(), Some("The capital of France is"));
    assert_eq!(req.max_tokens, Some(16));
    assert_eq!(req.stop, vec!["\n".to_string()]);
}

#[test]
fn infer_with_a_json_schema_shape() {
    let Operation::Infer(req) = round_trip::<Operation>("infer_json_schema_operation.json") else {
        panic!("not an infer operation");
    };
    let Some(ResponseFormat::JsonSchema { schema }) = &req.response_format else {
        panic!("no json_schema response format: {:?}", req.response_format);
    };
    assert_eq!(schema["required"][1], "population");
    req.validate().unwrap();
    let any_object: Operation = serde_json::from_str(
        r#"{"operation":"infer","model":"m","prompt":"hi","response_format":{"type":"json_object"}}"#,
    )
    .unwrap();
    let Operation::Infer(any_object) = any_object else {
        panic!("not an infer operation");
    };
    assert_eq!(
        any_object.response_format,
        Some(ResponseFormat::JsonObject {})
    );
}

#[test]
fn chat_operation_shape() {
    let Operation::Infer(req) = round_trip::<Operation>("chat_operation.json") else {
        panic!("not an infer operation");
    };
    let messages = req.messages.unwrap();
    assert_eq!(messages[1].role, ChatRole::User);
}

#[test]
fn tool_chat_operation_shape() {
    let Operation::Infer(req) = round_trip::<Operation>("tool_chat_operation.json") else {
        panic!("not an infer operation");
    };
    req.validate().unwrap();
    assert_eq!(req.tools.len(), 1);
    assert_eq!(req.tools[0].name, "get_weather");
    let messages = req.messages.unwrap();
    assert_eq!(messages[1].tool_calls[0].arguments, r#"{"city": "Paris"}"#);
    assert_eq!(messages[2].role, ChatRole::Tool);
    assert_eq!(messages[2].tool_call_id.as_deref(), Some("call_0a1b2c"));
}

#[test]
fn worker_spawn_shape() {
    let op = round_trip::<Operation>("worker_spawn_operation.json");
    assert_eq!(op.name(), "worker_spawn");
}

#[test]
fn every_event_kind_round_trips() {
    let events: Vec<JobEvent> = round_trip("events.json");
    assert_eq!(events.len(), 10);
    let terminal: Vec<_> = events.iter().filter(|e| e.is_terminal()).collect();
    assert_eq!(terminal.len(), 2);
    assert!(matches!(
        events[8],
        JobEvent::Done {
            finish_reason: FinishReason::Length,
            ..
        }
    ));
    assert!(matches!(
        events[9],
        JobEvent::Error {
            code: ErrorCode::WorkerLost,
            ..
        }
    ));
}

#[test]
fn heartbeats_round_trip() {
    let worker: WorkerHeartbeat = round_trip("worker_heartbeat.json");
    assert_eq!(worker.worker.state, WorkerState::Ready);
    let hive: HiveHeartbeat = round_trip("hive_heartbeat.json");
    assert_eq!(hive.hive.devices.len(), 2);
}

#[test]
fn error_body_round_trips() {
    let body: ApiErrorBody = round_trip("error_body.json");
    assert_eq!(body.error.code, ErrorCode::ContextLengthExceeded);
    assert_eq!(body.error.code.http_status(), 400);
}

#[test]
fn unknown_operation_is_rejected() {
    let err = serde_json::from_str::<Operation>(r#"{"operation":"fly","model":"m"}"#).unwrap_err();
    assert!(err.to_string().contains("unknown variant"), "{err}");
}

#[test]
fn wrong_types_and_unknown_fields_are_rejected() {
    for bad in [
        r#"{"operation":"infer","model":"m","prompt":"hi","max_tokens":-1}"#,
        r#"{"operation":"infer","model":"m","prompt":"hi","max_tokens":"ten"}"#,
        r#"{"operation":"infer","model":"m","prompt":"hi","temprature":0.5}"#,
        r#"{"operation":"infer","prompt":"hi"}"#,
        r#"{"operation":"infer","model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
        r#"{"operation":"infer","model":"m","prompt":"hi","response_format":{"type":"yaml"}}"#,
        r#"{"operation":"infer","model":"m","prompt":"hi","response_format":{"type":"json_schema"}}"#,
        r#"{"operation":"infer","model":"m","prompt":"hi","response_format":{"type":"json_object","schema":{}}}"#,
    ] {
        assert!(
            serde_json::from_str::<Operation>(bad).is_err(),
            "accepted: {bad}"
        );
    }
}

#[test]
fn unknown_error_codes_stay_readable() {
    let ev: JobEvent =
        serde_json::from_str(r#"{"event":"error","code":"from_the_future","message":"x"}"#)
            .unwrap();
    assert!(matches!(
        ev,
        JobEvent::Error {
            code: ErrorCode::Unknown,
            ..
        }
    ));
}

#[test]
fn devices_answer_round_trips() {
    let devices: DevicesResponse = round_trip("devices.json");
    assert_eq!(devices.cpu.kind, DeviceKind::Cpu);
    let all = devices.all();
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].id.as_str(), all[1].id.as_str()), ("cpu", "cuda:0"));
}

#[test]
fn no_capacity_body_is_an_error_body_with_the_numbers() {
    let body: NoCapacityBody = round_trip("no_capacity.json");
    assert_eq!(body.error.code, ErrorCode::NoCapacity);
    let e = &body.estimate;
    assert_eq!(
        e.required_bytes,
        e.weights_bytes + e.kv_cache_bytes + e.overhead_bytes
    );
    assert!(!e.fits());
    assert_eq!(e.slots, 2);
    // A client that only knows the generic error shape still reads it.
    let generic: ApiErrorBody = serde_json::from_value(fixture("no_capacity.json")).unwrap();
    assert_eq!(generic.error.code, ErrorCode::NoCapacity);
    // An older hive's body, without `slots`, counted one sequence's KV cache.
    let mut old = fixture("no_capacity.json");
    old.as_object_mut().unwrap().remove("slots");
    let old: NoCapacityBody = serde_json::from_value(old).unwrap();
    assert_eq!(old.estimate.slots, 1);
}

#[test]
fn model_details_round_trip_and_old_entries_still_parse() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Models {
        models: Vec<rbee_contract::ModelDetails>,
    }
    let models: Models = round_trip("model_details.json");
    assert_eq!(
        models.models[0].entry.state,
        rbee_contract::ModelState::Ready
    );
    assert_eq!(
        models.models[1].error.as_deref(),
        Some("the download does not match its sha256")
    );
    // A heartbeat's plain entry is a valid details object with nothing more to say.
    let hive: HiveHeartbeat = round_trip("hive_heartbeat.json");
    let plain = serde_json::to_value(&hive.hive.models[0]).unwrap();
    let details: rbee_contract::ModelDetails = serde_json::from_value(plain).unwrap();
    assert_eq!(details.entry, hive.hive.models[0]);
    assert!(details.file.is_none());
}

#[test]
fn usage_reports_cached_tokens_and_older_usage_still_parses() {
    let old: rbee_contract::Usage =
        serde_json::from_str(r#"{"prompt_tokens": 6, "completion_tokens": 1, "total_tokens": 7}"#)
            .unwrap();
    assert_eq!(old, rbee_contract::Usage::new(6, 1));
    assert_eq!(old.cached_tokens, None);
    assert!(!serde_json::to_string(&old).unwrap().contains("cached"));
    let cached = rbee_contract::Usage::new(6, 1).with_cached_tokens(5);
    let json = serde_json::to_value(cached).unwrap();
    assert_eq!(json["cached_tokens"], 5);
    assert_eq!(
        serde_json::from_value::<rbee_contract::Usage>(json).unwrap(),
        cached
    );
}
