//! A model hub on loopback: repositories of real files in the Hugging Face hub's URL layout,
//! for the hive's `hf-hub` client to download from (`HF_ENDPOINT`).
//!
//! Routes, as the hub answers them: `GET /api/models/{org}/{repo}[/revision/{rev}]` (the
//! listing, with `siblings` carrying `size`, `blobId` and `lfs.sha256`), and `GET`/`HEAD
//! /{org}/{repo}/resolve/{rev}/{file}` with `Range` support and the `etag`, `x-linked-etag`,
//! `x-linked-size`, `x-repo-commit`, `content-range` and `content-length` headers `hf-hub`
//! reads. Unknown repositories and files are `404`. Each hub can misbehave in one way
//! ([`Fault`]), and records every file request so a test can see how a download went.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::loopback::serve_on_loopback;

/// The commit every repository of the test hub is at.
pub const HUB_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// How a [`TestHub`] misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The first response whose body covers file offset `at` is cut there: the connection
    /// drops mid-file once; later requests are served whole.
    DropOnceAt(u64),
    /// Every file is served with one byte changed, under the headers of the real file.
    Corrupt,
    /// Every response whose body covers file offset `at` sends the bytes before it and then
    /// nothing more, keeping the connection open: a download that hangs until cancelled.
    StallAt(u64),
    /// The listing claims every file is an exabyte, more than any disk holds.
    HugeListing,
}

/// One file request the hub answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRequest {
    pub method: String,
    pub file: String,
    /// The first byte asked for (0 without a `Range`).
    pub start: u64,
    /// The last byte asked for, inclusive.
    pub end: u64,
}

struct HubFile {
    path: PathBuf,
    size: u64,
    sha256: String,
}

struct HubState {
    /// `org/repo` → file name → file.
    repos: BTreeMap<String, BTreeMap<String, HubFile>>,
    fault: Fault,
    dropped: Mutex<bool>,
    requests: Mutex<Vec<FileRequest>>,
}

/// A loopback hub serving files from disk.
pub struct TestHub {
    pub url: String,
    state: Arc<HubState>,
    task: JoinHandle<()>,
}

/// Builds a [`TestHub`]: repositories and their files, then [`start`](Self::start).
pub struct TestHubBuilder {
    repos: BTreeMap<String, BTreeMap<String, PathBuf>>,
    fault: Fault,
}

impl TestHub {
    pub fn builder() -> TestHubBuilder {
        TestHubBuilder {
            repos: BTreeMap::new(),
            fault: Fault::None,
        }
    }

    /// Every file request so far, in order (the `bytes=0-0` probes included).
    pub fn requests(&self) -> Vec<FileRequest> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the [`Fault::DropOnceAt`] connection drop happened.
    pub fn dropped(&self) -> bool {
        *self.state.dropped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sha256 the hub lists for a file.
    pub fn sha256(&self, repo: &str, file: &str) -> String {
        self.state.repos[repo][file].sha256.clone()
    }

    pub fn size(&self, repo: &str, file: &str) -> u64 {
        self.state.repos[repo][file].size
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestHubBuilder {
    /// Serves the file at `path` as `file` of the repository `repo` (`org/name`).
    pub fn file(mut self, repo: &str, file: &str, path: &Path) -> Self {
        self.repos
            .entry(repo.to_owned())
            .or_default()
            .insert(file.to_owned(), path.to_owned());
        self
    }

    pub fn fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }

    /// Hashes the files and serves them on a fresh loopback port.
    pub async fn start(self) -> TestHub {
        let repos = tokio::task::spawn_blocking(move || {
            self.repos
                .into_iter()
                .map(|(repo, files)| {
                    let files = files
                        .into_iter()
                        .map(|(name, path)| {
                            let bytes = std::fs::read(&path)
                                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                            let sha256 = hex(&Sha256::digest(&bytes));
                            let size = bytes.len() as u64;
                            (name, HubFile { path, size, sha256 })
                        })
                        .collect();
                    (repo, files)
                })
                .collect()
        })
        .await
        .expect("hash the hub's files");
        let state = Arc::new(HubState {
            repos,
            fault: self.fault,
            dropped: Mutex::new(false),
            requests: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/api/models/{org}/{repo}", get(listing))
            .route("/api/models/{org}/{repo}/revision/{rev}", get(listing_at))
            .route("/{org}/{repo}/resolve/{rev}/{*file}", get(file).head(file))
            .with_state(Arc::clone(&state));
        let (url, task) = serve_on_loopback(router).await;
        TestHub { url, state, task }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, axum::Json(json!({ "error": what }))).into_response()
}

async fn listing_at(
    State(state): State<Arc<HubState>>,
    UrlPath((org, repo, _rev)): UrlPath<(String, String, String)>,
) -> Response {
    listing(State(state), UrlPath((org, repo))).await
}

async fn listing(
    State(state): State<Arc<HubState>>,
    UrlPath((org, repo)): UrlPath<(String, String)>,
) -> Response {
    let id = format!("{org}/{repo}");
    let Some(files) = state.repos.get(&id) else {
        return not_found("Repository not found".into());
    };
    let siblings: Vec<_> = files
        .iter()
        .map(|(name, file)| {
            let size = if state.fault == Fault::HugeListing {
                1u64 << 60
            } else {
                file.size
            };
            json!({
                "rfilename": name,
                "size": size,
                "blobId": &file.sha256[..40],
                "lfs": { "sha256": file.sha256, "size": size, "pointerSize": 134 },
            })
        })
        .collect();
    axum::Json(json!({
        "id": id,
        "modelId": id,
        "sha": HUB_COMMIT,
        "siblings": siblings,
    }))
    .into_response()
}

async fn file(
    State(state): State<Arc<HubState>>,
    method: Method,
    UrlPath((org, repo, _rev, name)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(file) = state
        .repos
        .get(&format!("{org}/{repo}"))
        .and_then(|files| files.get(&name))
    else {
        return not_found(format!("Entry not found: {name}"));
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, file.size));
    let (start, end) = range.unwrap_or((0, file.size.saturating_sub(1)));
    state
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(FileRequest {
            method: method.to_string(),
            file: name.clone(),
            start,
            end,
        });
    let length = end + 1 - start;
    let mut response_headers = HeaderMap::new();
    let quoted = HeaderValue::from_str(&format!("\"{}\"", file.sha256)).expect("etag");
    response_headers.insert(header::ETAG, quoted.clone());
    response_headers.insert("x-linked-etag", quoted);
    response_headers.insert("x-linked-size", HeaderValue::from(file.size));
    response_headers.insert("x-repo-commit", HeaderValue::from_static(HUB_COMMIT));
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    let status = if range.is_some() {
        response_headers.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{end}/{}", file.size)).expect("range"),
        );
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    if method == Method::HEAD {
        return (status, response_headers).into_response();
    }
    let path = file.path.clone();
    let mut bytes = match tokio::task::spawn_blocking(move || read_range(&path, start, length))
        .await
        .expect("read task")
    {
        Ok(bytes) => bytes,
        Err(err) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response();
        }
    };
    if state.fault == Fault::Corrupt
        && let Some(first) = bytes.first_mut()
    {
        *first ^= 0xff;
    }
    let cut = match state.fault {
        Fault::DropOnceAt(at) if (start..=end).contains(&at) => {
            let mut dropped = state.dropped.lock().unwrap_or_else(|p| p.into_inner());
            let first = !*dropped;
            *dropped = true;
            first.then(|| usize::try_from(at - start).unwrap_or(0))
        }
        _ => None,
    };
    if let Fault::StallAt(at) = state.fault
        && (start..=end).contains(&at)
        && end > start
    {
        bytes.truncate(usize::try_from(at - start).unwrap_or(0));
        let head = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(bytes))]);
        let body = Body::from_stream(head.chain(futures::stream::pending()));
        return (status, response_headers, body).into_response();
    }
    let body = match cut {
        None => Body::from(bytes),
        Some(cut) => {
            bytes.truncate(cut);
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from(bytes)),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "the test hub drops the connection",
                )),
            ];
            Body::from_stream(futures::stream::iter(chunks))
        }
    };
    (status, response_headers, body).into_response()
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n`, clamped to the file; `None` when unsatisfiable.
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    let (first, last) = spec.split_once('-')?;
    let last_byte = size.checked_sub(1)?;
    let (start, end) = match (first.trim(), last.trim()) {
        ("", n) => (size.saturating_sub(n.parse().ok()?), last_byte),
        (a, "") => (a.parse().ok()?, last_byte),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(last_byte)),
    };
    (start <= end).then_some((start, end))
}

fn read_range(path: &Path, start: u64, length: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = vec![0; usize::try_from(length).unwrap_or(0)];
    file.read_exact(&mut bytes)?;
    Ok(bytes)
}
