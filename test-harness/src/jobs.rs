use rbee_contract::JobCreated;
use serde_json::Value;

use crate::sse::{RawStream, read_raw_stream};

/// A client of one daemon's job API (`POST` creates a job, `GET sse_url` streams it), sending
/// `token` as a bearer token on every request when there is one.
#[derive(Debug, Clone)]
pub struct JobApi {
    pub url: String,
    pub token: Option<String>,
    http: reqwest::Client,
}

impl JobApi {
    pub fn new(url: &str, token: Option<&str>) -> JobApi {
        JobApi {
            url: url.to_string(),
            token: token.map(String::from),
            http: reqwest::Client::new(),
        }
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// `POST {url}{path}` with `body`, whatever the answer.
    pub async fn submit(&self, path: &str, body: &Value) -> reqwest::Response {
        self.authorized(self.http.post(format!("{}{path}", self.url)).json(body))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// [`submit`](Self::submit), expecting `201` and a `JobCreated` body.
    pub async fn submit_ok(&self, path: &str, body: &Value) -> JobCreated {
        let response = self.submit(path, body).await;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, 201, "{text}");
        serde_json::from_str(&text).expect("a JobCreated body")
    }

    /// `GET` the job's stream, expecting `200`.
    pub async fn open_stream(&self, created: &JobCreated) -> reqwest::Response {
        let response = self
            .authorized(self.http.get(format!("{}{}", self.url, created.sse_url)))
            .send()
            .await
            .expect("GET the job stream");
        assert_eq!(response.status(), 200);
        response
    }

    /// Creates a job at `path` and reads its stream to the end.
    pub async fn run(&self, path: &str, body: &Value) -> RawStream {
        let created = self.submit_ok(path, body).await;
        read_raw_stream(self.open_stream(&created).await)
            .await
            .expect("a readable job stream")
    }
}
