//! The OpenAPI document of the queen's public API, generated from the code.
//!
//! The OpenAI routes and every JSON type are described by the handlers and types themselves
//! (`utoipa` derives on the queen's types, and on the contract's behind rbee-contract's
//! `openapi` feature). The routes whose handlers live elsewhere (the job protocol in
//! `job-server`) or are plain (health, lists, shutdown, metrics, heartbeats) are described
//! by the operations in [`paths`]. The committed copy is `docs/openapi.json`; a test fails
//! when it is stale.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::openai::doc::*;
use crate::wire::{Health, HiveList, HiveStatus, WorkerList};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "queen-rbee",
        description = "The public API of rbee's queen: the job protocol, the cluster's lists, \
            shutdown, health, metrics and the OpenAI-compatible API. Every route but `/health` \
            needs `Authorization: Bearer <key>` when keys are configured: client API keys, or \
            the cluster token on the heartbeat routes. With admin keys configured, shutdown \
            and the job operations `worker_spawn`, `worker_delete`, `model_download` and \
            `model_delete` need an admin key (`403 forbidden` with an API key); an admin key \
            is accepted wherever an API key is.",
        license(name = "Apache-2.0"),
    ),
    paths(
        paths::health,
        paths::worker_heartbeat,
        paths::hive_heartbeat,
        paths::list_workers,
        paths::list_hives,
        paths::create_job,
        paths::stream_job,
        paths::cancel_job,
        paths::shutdown,
        paths::metrics,
        list_models,
        get_model,
        chat_completions,
        completions,
    ),
    components(schemas(
        rbee_contract::Operation,
        rbee_contract::JobEvent,
        rbee_contract::JobCreated,
        rbee_contract::ApiErrorBody,
        rbee_contract::WorkerHeartbeat,
        rbee_contract::HiveHeartbeat,
        WorkerList,
        HiveList,
        HiveStatus,
        Health,
        ModelList,
        Model,
        ChatCompletionRequest,
        ChatMessageIn,
        RoleIn,
        ContentIn,
        ContentPart,
        CompletionRequest,
        PromptIn,
        StopIn,
        StreamOptions,
        ResponseFormatIn,
        JsonSchemaIn,
        ToolIn,
        FunctionIn,
        ToolChoiceIn,
        NamedToolChoice,
        NamedFunction,
        ChatToolCallIn,
        FunctionCallIn,
        ToolCallOut,
        FunctionCallOut,
        ToolCallDelta,
        FunctionDelta,
        ChatCompletion,
        ChatChoice,
        AssistantMessage,
        ChatCompletionChunk,
        ChunkChoice,
        Delta,
        Completion,
        CompletionChunk,
        TextChoice,
        UsageOut,
        PromptTokensDetails,
        ErrorResponse,
        ErrorObject,
    )),
    modifiers(&BearerSchemes),
    tags(
        (name = "jobs", description = "The job protocol (docs/job-protocol.md)"),
        (name = "cluster", description = "Hives, workers and the cluster's lifecycle"),
        (name = "openai", description = "The OpenAI-compatible API (docs/openai.md)"),
    )
)]
struct QueenApi;

struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            (
                "api_key",
                "A client API key (RBEE_API_KEYS); an admin key (RBEE_ADMIN_KEYS) also serves",
            ),
            (
                "admin_key",
                "An admin key (RBEE_ADMIN_KEYS), needed to administer the cluster when admin \
                 keys are configured; without them any API key administers",
            ),
            (
                "cluster_token",
                "The cluster token shared by queen, hives and workers (RBEE_CLUSTER_TOKEN)",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

/// The document as pretty-printed JSON with a trailing newline, as committed in
/// `docs/openapi.json`.
pub fn openapi_json() -> String {
    let mut doc = QueenApi::openapi();
    // The version would make every release a diff of the document; the API has its own.
    doc.info.version = "1".to_string();
    let mut json = doc
        .to_pretty_json()
        .unwrap_or_else(|err| format!("{{\"error\": \"{err}\"}}"));
    json.push('\n');
    json
}

/// Operations whose handlers live outside the queen's code or need no description of their
/// own. These functions exist only for their `#[utoipa::path]` attributes.
#[allow(dead_code)]
mod paths {
    use rbee_contract::{
        ApiErrorBody, HiveHeartbeat, JobCreated, JobEvent, Operation, WorkerHeartbeat,
    };

    use crate::wire::{HiveList, WorkerList};

    /// Liveness; the only route without authentication.
    #[utoipa::path(get, path = "/health", tag = "cluster",
        responses((status = 200, description = "`{\"status\":\"ok\"}`", body = Object)))]
    fn health() {}

    /// A worker's heartbeat; the first registers it.
    #[utoipa::path(post, path = "/v1/worker-heartbeat", tag = "cluster",
        security(("cluster_token" = [])),
        request_body = WorkerHeartbeat,
        responses(
            (status = 204, description = "Recorded"),
            (status = 400, body = ApiErrorBody),
            (status = 401, body = ApiErrorBody),
        ))]
    fn worker_heartbeat() {}

    /// A hive's heartbeat; the first registers it.
    #[utoipa::path(post, path = "/v1/hive-heartbeat", tag = "cluster",
        security(("cluster_token" = [])),
        request_body = HiveHeartbeat,
        responses(
            (status = 204, description = "Recorded"),
            (status = 400, body = ApiErrorBody),
            (status = 401, body = ApiErrorBody),
        ))]
    fn hive_heartbeat() {}

    /// Every worker heard from recently; silent ones have state `stale`.
    #[utoipa::path(get, path = "/v1/workers", tag = "cluster",
        security(("api_key" = [])),
        responses((status = 200, body = WorkerList), (status = 401, body = ApiErrorBody)))]
    fn list_workers() {}

    /// Every hive heard from recently, with its health.
    #[utoipa::path(get, path = "/v1/hives", tag = "cluster",
        security(("api_key" = [])),
        responses((status = 200, body = HiveList), (status = 401, body = ApiErrorBody)))]
    fn list_hives() {}

    /// Creates a job; it starts at once. With admin keys configured, `worker_spawn`,
    /// `worker_delete`, `model_download` and `model_delete` need an admin key.
    #[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
        security(("api_key" = []), ("admin_key" = [])),
        params(("cancel_on_disconnect" = Option<bool>, Query,
            description = "Closing the stream cancels the job (default true)")),
        request_body = Operation,
        responses(
            (status = 201, body = JobCreated, headers(("Location" = String))),
            (status = 400, body = ApiErrorBody, description = "Malformed or unsupported; no job"),
            (status = 401, body = ApiErrorBody),
            (status = 403, body = ApiErrorBody,
                description = "An operation that changes the cluster, with an API key that is \
                    not an admin key; no job"),
            (status = 404, body = ApiErrorBody, description = "Unknown hive"),
            (status = 503, body = ApiErrorBody, description = "Busy or shutting down"),
        ))]
    fn create_job() {}

    /// The job's events as SSE: `id: <seq>` and `data: <JobEvent>`, then `data: [DONE]`.
    #[utoipa::path(get, path = "/v1/jobs/{job_id}/stream", tag = "jobs",
        security(("api_key" = [])),
        params(
            ("job_id" = String, Path),
            ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event"),
        ),
        responses(
            (status = 200, description = "`text/event-stream` of `JobEvent`s",
                content((JobEvent = "text/event-stream"))),
            (status = 401, body = ApiErrorBody),
            (status = 404, body = ApiErrorBody),
            (status = 410, body = ApiErrorBody, description = "Resume point no longer buffered"),
        ))]
    fn stream_job() {}

    /// Cancels a job.
    #[utoipa::path(delete, path = "/v1/jobs/{job_id}", tag = "jobs",
        security(("api_key" = [])),
        params(("job_id" = String, Path)),
        responses(
            (status = 202, description = "Cancelling; the stream ends with `cancelled`"),
            (status = 204, description = "The job had already ended"),
            (status = 401, body = ApiErrorBody),
            (status = 404, body = ApiErrorBody),
        ))]
    fn cancel_job() {}

    /// Stops every hive (and their workers), then the queen. Needs an admin key when admin
    /// keys are configured.
    #[utoipa::path(post, path = "/v1/shutdown", tag = "cluster",
        security(("admin_key" = []), ("api_key" = [])),
        responses(
            (status = 202, description = "`{\"status\":\"shutting_down\"}`", body = Object),
            (status = 401, body = ApiErrorBody),
            (status = 403, body = ApiErrorBody,
                description = "An API key that is not an admin key, with admin keys configured"),
        ))]
    fn shutdown() {}

    /// Prometheus metrics.
    #[utoipa::path(get, path = "/metrics", tag = "cluster",
        security(("api_key" = [])),
        responses(
            (status = 200, description = "Prometheus text format", content((String = "text/plain"))),
            (status = 401, body = ApiErrorBody),
        ))]
    fn metrics() {}
}
