//! Admin keys: which client requests administer the cluster, and the layers that let only an
//! admin key make them once admin keys are configured.
//!
//! Administering means stopping the cluster (`POST /v1/shutdown`) or changing what a hive
//! holds or runs (the `worker_spawn`, `worker_delete`, `model_download` and `model_delete`
//! operations). Everything else a client does (inference, the lists, `/metrics`, the OpenAI
//! routes) needs only an API key. This is not authentication: these layers sit inside the
//! client layer, which has already refused a missing or invalid key with `401`; here a valid
//! key that is not an admin key is refused with `403 forbidden`. With no admin keys
//! configured every client key administers, as it did before admin keys existed.
//!
//! What a request may have a hive load is decided here too ([`check_model`]), for the job
//! API (`infer`, `worker_spawn`) and the OpenAI routes alike. Without any client keys (one
//! person on loopback) every model and path goes. Otherwise an admin key may name any model;
//! any other key may name the models the cluster already has (served by a worker, ready in a
//! hive's catalog, or a path under a hive's allowed model directories) and have those cold
//! started, and an `hf:` reference no catalog holds only while no admin keys are configured
//! (a hub download is an admin's decision once there are admins). Any other path is refused
//! with `403`, whether or not it exists: the queen never looks. A hive with allowed model
//! directories holds every path to them itself, whoever asks.

use std::path::{Component, Path};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use daemon_kit::BearerAuth;
use job_server::ApiError;
use rbee_contract::model_ref::ParsedModelRef;
use rbee_contract::{ErrorCode, ModelState, Operation, WorkerState};

use crate::config::QueenConfig;
use crate::state::Queen;
use crate::wire::Health;

/// The admin keys, as a bearer check. Open (everyone is an admin) when none are configured.
#[derive(Clone, Debug)]
pub(crate) struct AdminKeys(BearerAuth);

impl AdminKeys {
    pub(crate) fn new(config: &QueenConfig) -> Self {
        AdminKeys(BearerAuth::new(
            config.admin_keys.iter().cloned(),
            "admin key",
        ))
    }

    /// Whether the request's bearer is an admin key, compared in constant time.
    fn admits(&self, request: &Request) -> bool {
        self.0.check(request.headers()).is_ok()
    }
}

/// Which models a request may have the cluster load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ModelAccess {
    /// Any model or path: the cluster has no client keys, or the request holds an admin key.
    Any,
    /// The models the cluster has; an `hf:` reference no catalog holds only when `hub`.
    Known { hub: bool },
}

tokio::task_local! {
    /// The access of the request whose job is being created: set around the job server's
    /// `create` (by [`guard_operations`] and the OpenAI routes), read by the executor's
    /// `admit`, which runs inside it, so that the job carries what its request was let
    /// through for.
    static ACCESS: ModelAccess;
}

/// Runs `future` (a request on its way to creating a job) with `access` as the request's.
pub(crate) async fn with_access<F: std::future::Future>(
    access: ModelAccess,
    future: F,
) -> F::Output {
    ACCESS.scope(access, future).await
}

/// Runs `create` (a job's creation) with `access` as the request's.
pub(crate) fn creating_with<T>(access: ModelAccess, create: impl FnOnce() -> T) -> T {
    ACCESS.sync_scope(access, create)
}

/// The access of the request whose job is being admitted; the narrowest when none was set,
/// so a way of creating jobs that forgets to say fails closed.
pub(crate) fn current_access() -> ModelAccess {
    ACCESS
        .try_with(|access| *access)
        .unwrap_or(ModelAccess::Known { hub: false })
}

/// Tells a request's [`ModelAccess`] from its bearer.
#[derive(Clone, Debug)]
pub(crate) struct ModelPolicy {
    /// No client keys at all: the queen only listens on loopback, for one person.
    open: bool,
    admins: BearerAuth,
}

impl ModelPolicy {
    pub(crate) fn new(config: &QueenConfig) -> Self {
        ModelPolicy {
            open: config.api_keys.is_empty() && config.admin_keys.is_empty(),
            admins: BearerAuth::new(config.admin_keys.iter().cloned(), "admin key"),
        }
    }

    /// The access of a request that already passed the client-key check.
    pub(crate) fn access(&self, headers: &HeaderMap) -> ModelAccess {
        if self.open || (!self.admins.is_open() && self.admins.check(headers).is_ok()) {
            ModelAccess::Any
        } else {
            ModelAccess::Known {
                hub: self.admins.is_open(),
            }
        }
    }
}

/// Whether a request with `access` may name `model` (as a job names it, trimmed). A
/// malformed reference passes: admission refuses it with `400`.
pub(crate) fn check_model(queen: &Queen, access: ModelAccess, model: &str) -> Result<(), ApiError> {
    let ModelAccess::Known { hub } = access else {
        return Ok(());
    };
    if cluster_has(queen, model) {
        return Ok(());
    }
    match ParsedModelRef::parse(model) {
        Err(_) => Ok(()),
        Ok(ParsedModelRef::Hub(_)) if hub => Ok(()),
        Ok(ParsedModelRef::Hub(_)) => {
            tracing::info!(
                model,
                "refused a hub download to a key that is not an admin key"
            );
            Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "`{model}` is not in any hive's catalog, and downloading a model from the hub \
                     needs an admin key (RBEE_ADMIN_KEYS)"
                ),
            ))
        }
        Ok(ParsedModelRef::Local(_)) => {
            tracing::info!(
                model,
                "refused a model the cluster does not have to a key that is not an admin key"
            );
            let who = if hub {
                "this cluster has no admin keys (RBEE_ADMIN_KEYS), so no key may name one"
            } else {
                "any other model needs an admin key (RBEE_ADMIN_KEYS)"
            };
            Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "`{model}` is not a model this cluster has (served by a worker, in a hive's \
                     catalog or under a hive's allowed model directories); {who}"
                ),
            ))
        }
    }
}

/// Whether `model` is served by a worker, ready in a hive's catalog, or a path under the
/// allowed model directories of a hive.
fn cluster_has(queen: &Queen, model: &str) -> bool {
    queen
        .registry
        .worker_views()
        .iter()
        .any(|w| w.info.model == model && w.info.state != WorkerState::Failed)
        || queen.registry.hive_views().iter().any(|hive| {
            hive.health == Health::Healthy
                && (hive
                    .info
                    .models
                    .iter()
                    .any(|m| m.state == ModelState::Ready && (m.id == model || m.source == model))
                    || in_model_dirs(&hive.info.model_dirs, model))
        })
}

/// Whether `model` is an absolute path under one of `dirs`, read as written: no `..`, so that
/// the text cannot climb out. Symlinks are the hive's to resolve; it refuses any that lead out.
pub(crate) fn in_model_dirs(dirs: &[String], model: &str) -> bool {
    let path = Path::new(model);
    path.is_absolute()
        && !path.components().any(|c| matches!(c, Component::ParentDir))
        && dirs
            .iter()
            .any(|dir| path.starts_with(dir) && path != Path::new(dir))
}

/// The state of the job API's guard.
#[derive(Clone)]
pub(crate) struct OperationGuard {
    admins: AdminKeys,
    policy: ModelPolicy,
    queen: Arc<Queen>,
}

impl OperationGuard {
    pub(crate) fn new(queen: Arc<Queen>) -> Self {
        OperationGuard {
            admins: AdminKeys::new(&queen.config),
            policy: ModelPolicy::new(&queen.config),
            queen,
        }
    }
}

/// Whether `operation` changes the cluster rather than reading it or running inference.
/// Every operation is named, so a new one cannot slip through without a decision.
pub(crate) fn administers(operation: &Operation) -> bool {
    match operation {
        Operation::WorkerSpawn(_)
        | Operation::WorkerDelete(_)
        | Operation::ModelDownload(_)
        | Operation::ModelDelete(_) => true,
        Operation::Infer(_)
        | Operation::WorkerList(_)
        | Operation::WorkerGet(_)
        | Operation::ModelList(_)
        | Operation::ModelGet(_) => false,
    }
}

/// axum middleware for routes that only an admin may call.
pub(crate) async fn require_admin(
    State(admins): State<AdminKeys>,
    request: Request,
    next: Next,
) -> Response {
    if admins.admits(&request) {
        next.run(request).await
    } else {
        forbidden("stopping the cluster needs an admin key (RBEE_ADMIN_KEYS)")
    }
}

/// axum middleware for the job API: a `POST` whose operation [`administers`] the cluster
/// needs an admin key, and the model of an `infer` or `worker_spawn` must pass
/// [`check_model`]. The body is read (within the body limit the caller layers outside this
/// one) and peeked at the way the job server parses it, then passed on unchanged; a body the
/// job server would refuse anyway is passed on for it to answer.
pub(crate) async fn guard_operations(
    State(guard): State<OperationGuard>,
    request: Request,
    next: Next,
) -> Response {
    let access = guard.policy.access(request.headers());
    if request.method() != Method::POST || access == ModelAccess::Any {
        return with_access(access, next.run(request)).await;
    }
    let admin = guard.admins.admits(&request);
    let (parts, body) = request.into_parts();
    let bytes = match Bytes::from_request(Request::from_parts(parts.clone(), body), &()).await {
        Ok(bytes) => bytes,
        Err(rejection) => {
            return ApiError::bad_request(rejection.body_text())
                .with_status(rejection.status())
                .into_response();
        }
    };
    if let Some(operation) = peek_operation(&bytes) {
        if !admin && administers(&operation) {
            return forbidden(&format!(
                "the `{}` operation changes the cluster and needs an admin key (RBEE_ADMIN_KEYS)",
                operation.name()
            ));
        }
        let model = match &operation {
            Operation::Infer(request) => Some(&request.model),
            Operation::WorkerSpawn(request) => Some(&request.model),
            _ => None,
        };
        if let Some(model) = model
            && let Err(err) = check_model(&guard.queen, access, model.trim())
        {
            return err.into_response();
        }
    }
    with_access(
        access,
        next.run(Request::from_parts(parts, Body::from(bytes))),
    )
    .await
}

/// The operation in a job request body, parsed as the job server parses it (as a JSON value
/// first, so that a duplicated `operation` field means the same here as there).
fn peek_operation(body: &[u8]) -> Option<Operation> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    serde_json::from_value(value).ok()
}

fn forbidden(message: &str) -> Response {
    ApiError::new(ErrorCode::Forbidden, message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_operations_that_change_a_hive_administer() {
        let admin = [
            r#"{"operation":"worker_spawn","model":"m","device":"cpu"}"#,
            r#"{"operation":"model_delete","model":"m"}"#,
            r#"{"operation":"model_download","model":"m"}"#,
        ];
        for body in admin {
            let op = peek_operation(body.as_bytes()).expect(body);
            assert!(administers(&op), "{body}");
        }
        let client = [
            r#"{"operation":"infer","model":"m","prompt":"hi"}"#,
            r#"{"operation":"model_list"}"#,
            r#"{"operation":"worker_list"}"#,
        ];
        for body in client {
            let op = peek_operation(body.as_bytes()).expect(body);
            assert!(!administers(&op), "{body}");
        }
    }

    #[test]
    fn a_duplicated_tag_is_read_as_the_job_server_reads_it() {
        // serde_json's map keeps the last value; a peek that kept the first would let an
        // `infer` tag smuggle in a `model_delete`.
        let body = br#"{"operation":"infer","operation":"model_delete","model":"m"}"#;
        let op = peek_operation(body).expect("the job server would accept this body");
        assert!(administers(&op), "{op:?}");
    }

    #[test]
    fn model_dirs_are_read_as_written() {
        let dirs = ["/srv/models".to_string()];
        assert!(in_model_dirs(&dirs, "/srv/models/m.gguf"));
        assert!(in_model_dirs(&dirs, "/srv/models/sub/m.gguf"));
        for outside in [
            "/srv/models",
            "/srv/models/../../etc/passwd",
            "/srv/modelsx/m.gguf",
            "srv/models/m.gguf",
            "../../etc/passwd",
            "/etc/passwd",
        ] {
            assert!(!in_model_dirs(&dirs, outside), "{outside}");
        }
        assert!(!in_model_dirs(&[], "/srv/models/m.gguf"));
    }

    fn keys(api: &[&str], admin: &[&str]) -> QueenConfig {
        QueenConfig {
            api_keys: api.iter().map(|k| k.to_string()).collect(),
            admin_keys: admin.iter().map(|k| k.to_string()).collect(),
            ..QueenConfig::default()
        }
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        headers
    }

    #[test]
    fn access_follows_the_keys() {
        let open = ModelPolicy::new(&keys(&[], &[]));
        assert_eq!(open.access(&HeaderMap::new()), ModelAccess::Any);
        let no_admins = ModelPolicy::new(&keys(&["k"], &[]));
        assert_eq!(
            no_admins.access(&bearer("k")),
            ModelAccess::Known { hub: true }
        );
        let both = ModelPolicy::new(&keys(&["k"], &["a"]));
        assert_eq!(both.access(&bearer("k")), ModelAccess::Known { hub: false });
        assert_eq!(both.access(&bearer("a")), ModelAccess::Any);
    }

    #[test]
    fn a_known_key_is_refused_paths_and_downloads_the_same_way() {
        let queen = Queen::new(keys(&["k"], &["a"]));
        let known = ModelAccess::Known { hub: false };
        let a = check_model(&queen, known, "../../etc/passwd").unwrap_err();
        let b = check_model(&queen, known, "/no/such/file.gguf").unwrap_err();
        assert_eq!(
            (a.code, b.code),
            (ErrorCode::Forbidden, ErrorCode::Forbidden)
        );
        assert!(a.message.contains("admin key"), "{}", a.message);
        assert!(!a.message.contains("  "), "{}", a.message);
        let hub = check_model(&queen, known, "hf:org/repo").unwrap_err();
        assert_eq!(hub.code, ErrorCode::Forbidden);
        assert!(check_model(&queen, ModelAccess::Known { hub: true }, "hf:org/repo").is_ok());
        assert!(check_model(&queen, ModelAccess::Any, "/etc/passwd").is_ok());
        // Malformed references are admission's to refuse, with 400.
        assert!(check_model(&queen, known, "s3:bucket/m").is_ok());
    }

    #[test]
    fn bodies_the_job_server_refuses_are_not_peeked() {
        for body in ["", "[]", "{", r#"{"operation":"warp_drive"}"#] {
            assert!(peek_operation(body.as_bytes()).is_none(), "{body}");
        }
    }
}
