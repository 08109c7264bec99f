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

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use daemon_kit::BearerAuth;
use job_server::ApiError;
use rbee_contract::{ErrorCode, Operation};

use crate::config::QueenConfig;

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
/// needs an admin key. The body is read (within the body limit the caller layers outside
/// this one) and peeked at the way the job server parses it, then passed on unchanged; a body
/// the job server would refuse anyway is passed on for it to answer.
pub(crate) async fn guard_operations(
    State(admins): State<AdminKeys>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != Method::POST || admins.admits(&request) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = match Bytes::from_request(Request::from_parts(parts.clone(), body), &()).await {
        Ok(bytes) => bytes,
        Err(rejection) => {
            return ApiError::bad_request(rejection.body_text())
                .with_status(rejection.status())
                .into_response();
        }
    };
    if let Some(operation) = peek_operation(&bytes).filter(administers) {
        return forbidden(&format!(
            "the `{}` operation changes the cluster and needs an admin key (RBEE_ADMIN_KEYS)",
            operation.name()
        ));
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
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
    fn bodies_the_job_server_refuses_are_not_peeked() {
        for body in ["", "[]", "{", r#"{"operation":"warp_drive"}"#] {
            assert!(peek_operation(body.as_bytes()).is_none(), "{body}");
        }
    }
}
