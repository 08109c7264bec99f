//! The OpenAI routes and their API-key check.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use daemon_kit::BearerAuth;
use job_server::{JobOptions, JobServer};
use rbee_contract::{ErrorCode, InferRequest, Operation};

use super::body::{ChatCompletionRequest, CompletionRequest};
use super::choices;
use super::error::{ErrorResponse, OpenAiError};
use super::models::{self, Model, ModelList};
use super::render::{ChatCompletion, Completion, Renderer};
use super::request::{ValidRequest, parse_chat, parse_completion};
use super::respond::{self, JOB_ID_HEADER};
use crate::admin::{self, ModelPolicy};
use crate::executor::QueenExecutor;
use crate::state::Queen;

#[derive(Clone)]
struct OpenAiState {
    queen: Arc<Queen>,
    jobs: JobServer<QueenExecutor>,
    /// What a key may have a hive load, as on the job API.
    policy: ModelPolicy,
}

/// The OpenAI routes, behind `auth` (the client API keys) answered in OpenAI's error shape.
pub(crate) fn router(
    queen: Arc<Queen>,
    jobs: JobServer<QueenExecutor>,
    auth: BearerAuth,
) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(OpenAiState {
            policy: ModelPolicy::new(&queen.config),
            queen,
            jobs,
        })
        .layer(axum::middleware::from_fn_with_state(auth, require_key))
}

/// Like [`BearerAuth::check`], with the `401` in OpenAI's shape so that SDKs raise their
/// authentication error.
async fn require_key(State(auth): State<BearerAuth>, request: Request, next: Next) -> Response {
    if auth.is_open() {
        return next.run(request).await;
    }
    match bearer(request.headers()) {
        Some(key) if auth.accepts(key) => next.run(request).await,
        Some(_) => OpenAiError::unauthorized("incorrect API key provided").into_response(),
        None => {
            OpenAiError::unauthorized("no API key provided: send `Authorization: Bearer <API key>`")
                .into_response()
        }
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> OpenAiError {
    let mut err =
        OpenAiError::bad_request(None, format!("{method} is not allowed on {}", uri.path()));
    err.status = StatusCode::METHOD_NOT_ALLOWED;
    err
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// List the models the cluster can answer with.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    security(("api_key" = [])),
    responses(
        (status = 200, body = ModelList),
        (status = 401, body = ErrorResponse),
    ))]
async fn list_models(State(state): State<OpenAiState>) -> Json<ModelList> {
    Json(models::list(&state.queen.registry))
}

/// One listed model.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "A model id; may contain `/`")),
    responses(
        (status = 200, body = Model),
        (status = 401, body = ErrorResponse),
        (status = 404, body = ErrorResponse, description = "The model is not listed"),
    ))]
async fn get_model(
    State(state): State<OpenAiState>,
    Path(id): Path<String>,
) -> Result<Json<Model>, OpenAiError> {
    models::get(&state.queen.registry, &id)
        .map(Json)
        .ok_or_else(|| {
            OpenAiError::from_code(
                ErrorCode::ModelNotFound,
                format!("the model `{id}` is not served by any worker or hive catalog"),
            )
        })
}

/// Chat completion, streaming (`text/event-stream` of `ChatCompletionChunk`s, then
/// `data: [DONE]`) or not.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    security(("api_key" = [])),
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "`application/json` without `stream`; with it, \
            `text/event-stream` of `ChatCompletionChunk` lines ending with `data: [DONE]`",
            content(
                (ChatCompletion = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse),
        (status = 404, body = ErrorResponse, description = "Unknown model"),
        (status = 429, body = ErrorResponse, description = "Saturated; see `Retry-After`"),
        (status = 502, body = ErrorResponse, description = "The worker was lost"),
        (status = 503, body = ErrorResponse, description = "No capacity; see `Retry-After`"),
    ))]
async fn chat_completions(
    State(state): State<OpenAiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let request = parse_chat(&body_bytes(body)?)?;
    state.run(request, &headers).await
}

/// Text completion of a raw prompt, streaming (`CompletionChunk`s) or not.
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    security(("api_key" = [])),
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "`application/json` without `stream`; with it, \
            `text/event-stream` of `CompletionChunk` lines ending with `data: [DONE]`",
            content(
                (Completion = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse),
        (status = 404, body = ErrorResponse, description = "Unknown model"),
        (status = 429, body = ErrorResponse, description = "Saturated; see `Retry-After`"),
        (status = 502, body = ErrorResponse, description = "The worker was lost"),
        (status = 503, body = ErrorResponse, description = "No capacity; see `Retry-After`"),
    ))]
async fn completions(
    State(state): State<OpenAiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let request = parse_completion(&body_bytes(body)?)?;
    state.run(request, &headers).await
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, OpenAiError> {
    body.map_err(|rejection| {
        let mut err = OpenAiError::bad_request(None, rejection.body_text());
        err.status = rejection.status();
        err
    })
}

impl OpenAiState {
    /// Runs the request as an `infer` job of the queen's own job server and answers from
    /// its events.
    async fn run(
        &self,
        request: ValidRequest,
        headers: &HeaderMap,
    ) -> Result<Response, OpenAiError> {
        let ValidRequest {
            kind,
            infer,
            stream,
            user,
            tools,
            n,
        } = request;
        let model = infer.model.clone();
        let logprobs = infer.logprobs.is_some();
        if !models::could_serve(&self.queen.registry, &model) {
            return Err(OpenAiError::from_code(
                ErrorCode::ModelNotFound,
                format!(
                    "the model `{model}` does not exist: no worker serves it and no hive \
                     catalog holds it (see GET /v1/models)"
                ),
            ));
        }
        // After the 404 for a name nothing could serve, which is about the cluster's lists, not
        // any disk: what a key may have a hive load is the same check as the job API's.
        let access = self.policy.access(headers);
        admin::check_model(&self.queen, access, model.trim())?;
        let created_at = unix_now();
        let include_usage = stream.is_some_and(|s| s.include_usage);
        // Each choice is a job of its own, created and subscribed at once; dropping the
        // subscriptions (a failure, or the client going away) cancels them all.
        let mut jobs = Vec::with_capacity(usize::from(n));
        for seed in choices::seeds(infer.seed, n) {
            let created = admin::creating_with(access, || {
                self.jobs.create(
                    Operation::Infer(InferRequest {
                        seed,
                        ..infer.clone()
                    }),
                    JobOptions {
                        cancel_on_disconnect: true,
                    },
                )
            })?;
            let subscription = self.jobs.subscribe(&created.job_id, None)?;
            jobs.push((created.job_id, subscription));
        }
        let job_ids: Vec<String> = jobs.iter().map(|(id, _)| id.clone()).collect();
        tracing::info!(job_id = %job_ids.join(","), %model, user = user.as_deref().unwrap_or(""),
            streaming = stream.is_some(), n, "OpenAI request");
        let openings = futures::future::try_join_all(
            jobs.iter_mut()
                .map(|(_, subscription)| respond::opening(subscription)),
        )
        .await?;
        let mut answers = Vec::with_capacity(jobs.len());
        for ((job_id, subscription), first) in jobs.into_iter().zip(openings) {
            let mut renderer =
                Renderer::new(kind, &job_id, created_at, model.clone(), include_usage)
                    .with_logprobs(logprobs)
                    .with_tools(tools.clone());
            // One answer, one id: the first choice's.
            renderer.id = Renderer::new(kind, &job_ids[0], created_at, String::new(), false).id;
            answers.push(choices::Choice {
                subscription,
                first,
                renderer,
            });
        }
        let mut response = match (stream, answers.len()) {
            (Some(_), 1) => {
                let only = answers.remove(0);
                respond::stream(only.subscription, only.renderer, only.first)
            }
            (None, 1) => {
                let only = answers.remove(0);
                respond::json(only.subscription, &only.renderer, only.first).await?
            }
            (Some(_), _) => respond::sse(choices::lines(answers)),
            (None, _) => respond::json_body(choices::answer(answers).await?),
        };
        // The jobs behind the answer, for logs and `DELETE /v1/jobs/{id}`: one id per choice.
        if let Ok(value) = HeaderValue::from_str(&job_ids.join(",")) {
            response.headers_mut().insert(JOB_ID_HEADER, value);
        }
        Ok(response)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
