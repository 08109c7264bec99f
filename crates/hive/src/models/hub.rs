//! The model hub as the hive sees it: an `hf-hub` client on the configured endpoint with its
//! cache inside the model directory, the file listing of a repository (sizes and sha256 of
//! its LFS files), and the choice of a GGUF file when a reference names only the repository.

use std::path::{Path, PathBuf};

use hf_hub::Cache;
use hf_hub::api::tokio::{Api, ApiBuilder};
use rbee_contract::model_ref::is_hub_file;
use serde::Deserialize;

use super::reference::HubRef;

/// The quantizations picked, in order, when `hf:org/repo` names no file.
pub(crate) const PREFERRED_QUANTS: [&str; 4] = ["Q4_K_M", "Q4_0", "Q8_0", "F16"];

/// A file of a repository, as the hub lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RemoteFile {
    pub name: String,
    pub size: u64,
    /// The sha256 the hub gives for LFS files (every weights file).
    pub sha256: Option<String>,
    /// The name of the file's blob in the `hf-hub` cache: the hub's etag for it.
    pub etag: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HubError {
    #[error("the hub at {endpoint} has no repository {repo}")]
    NoRepo { endpoint: String, repo: String },
    #[error("{repo} has no file {file}; its GGUF files: {available}")]
    NoFile {
        repo: String,
        file: String,
        available: String,
    },
    #[error("{repo} has no .gguf file; name a GGUF repository")]
    NoGguf { repo: String },
    #[error(
        "{repo} has several GGUF files and none of {preferred}: name one, e.g. hf:{repo}:{example}",
        preferred = PREFERRED_QUANTS.join(", ")
    )]
    Ambiguous { repo: String, example: String },
    #[error("the hub did not report the size of {file} in {repo}")]
    NoSize { repo: String, file: String },
    #[error("cannot reach the hub at {endpoint}: {cause}")]
    Unreachable { endpoint: String, cause: String },
    #[error("cannot set up the hub client: {0}")]
    Client(String),
}

/// The hub client and where its files go.
pub(crate) struct Hub {
    endpoint: String,
    token: Option<String>,
    cache_dir: PathBuf,
}

#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default, rename = "blobId")]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    #[serde(default)]
    size: Option<u64>,
}

impl Hub {
    /// A client for `endpoint` (e.g. `https://huggingface.co`) whose cache is `cache_dir`.
    pub fn new(endpoint: &str, token: Option<String>, cache_dir: PathBuf) -> Result<Hub, HubError> {
        let hub = Hub {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            token,
            cache_dir,
        };
        // Settings that cannot make a client are refused when the hive starts, not at the
        // first download.
        hub.api()?;
        Ok(hub)
    }

    /// An `hf-hub` client with the hive's settings. Each download gets its own: its
    /// connections belong to the runtime that runs that download (see `download::transfer`).
    pub fn api(&self) -> Result<Api, HubError> {
        ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .build()
            .map_err(|err| HubError::Client(err.to_string()))
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Where `hf-hub` keeps the files of `repo`: `models--org--repo` in the cache.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir
            .join(format!("models--{repo}").replace('/', "--"))
    }

    /// The files `hf-hub` keeps while it downloads `file` (the partial blob and its lock).
    pub fn partial_files(&self, repo: &str, file: &RemoteFile) -> Vec<PathBuf> {
        let Some(etag) = &file.etag else {
            return Vec::new();
        };
        let blobs = self.repo_dir(repo).join("blobs");
        vec![
            blobs.join(format!("{etag}.sync.part")),
            blobs.join(format!("{etag}.lock")),
        ]
    }

    /// The repository's files, from `GET /api/models/{repo}/revision/main?blobs=true`.
    pub async fn files(&self, repo: &str) -> Result<Vec<RemoteFile>, HubError> {
        let unreachable = |cause: String| HubError::Unreachable {
            endpoint: self.endpoint.clone(),
            cause,
        };
        let response = self
            .api()?
            .model(repo.to_owned())
            .info_request()
            .query(&[("blobs", "true")])
            .send()
            .await
            .map_err(|err| unreachable(err.to_string()))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(HubError::NoRepo {
                endpoint: self.endpoint.clone(),
                repo: repo.to_owned(),
            });
        }
        if !status.is_success() {
            return Err(unreachable(format!("listing {repo} answered {status}")));
        }
        let listing: Listing = response
            .json()
            .await
            .map_err(|err| unreachable(format!("the listing of {repo} is unreadable: {err}")))?;
        Ok(listing
            .siblings
            .into_iter()
            .map(|s| {
                let sha256 = s.lfs.as_ref().map(|lfs| lfs.sha256.to_ascii_lowercase());
                RemoteFile {
                    size: s
                        .lfs
                        .as_ref()
                        .and_then(|lfs| lfs.size)
                        .or(s.size)
                        .unwrap_or(u64::MAX),
                    etag: sha256.clone().or(s.blob_id),
                    sha256,
                    name: s.rfilename,
                }
            })
            .collect())
    }
}

/// The file a reference means among the repository's `files`: the one it names, else the
/// first preferred quantization, else the only GGUF file.
pub(crate) fn choose(reference: &HubRef, files: &[RemoteFile]) -> Result<RemoteFile, HubError> {
    let repo = reference.repo();
    // The listing comes from whatever `HF_ENDPOINT` names: a file name it gives is only a
    // candidate when a user could have written it in a reference, so it cannot lead the
    // download outside the model directory (`../x.gguf`, `/abs.gguf`).
    let ggufs: Vec<&RemoteFile> = files
        .iter()
        .filter(|f| is_gguf(&f.name) && is_hub_file(&f.name))
        .collect();
    let chosen = match reference.file() {
        Some(wanted) => {
            files
                .iter()
                .find(|f| f.name == wanted)
                .ok_or_else(|| HubError::NoFile {
                    repo: repo.clone(),
                    file: wanted.to_owned(),
                    available: list_names(&ggufs),
                })?
        }
        None => {
            let preferred = PREFERRED_QUANTS.iter().find_map(|quant| {
                ggufs
                    .iter()
                    .find(|f| quant_of(&f.name).is_some_and(|q| q.eq_ignore_ascii_case(quant)))
            });
            match (preferred, ggufs.as_slice()) {
                (Some(file), _) => file,
                (None, [only]) => only,
                (None, []) => return Err(HubError::NoGguf { repo }),
                (None, [first, ..]) => {
                    return Err(HubError::Ambiguous {
                        repo,
                        example: first.name.clone(),
                    });
                }
            }
        }
    };
    if chosen.size == u64::MAX {
        return Err(HubError::NoSize {
            repo,
            file: chosen.name.clone(),
        });
    }
    Ok(chosen.clone())
}

fn is_gguf(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".gguf")
}

/// The quantization tag of a GGUF file name: the last `.`- or `-`-separated word before
/// `.gguf`, e.g. `Q4_K_M` in `model-Q4_K_M.gguf` or `model.Q4_K_M.gguf`.
fn quant_of(name: &str) -> Option<&str> {
    let stem = Path::new(name).file_name()?.to_str()?;
    let stem = stem.get(..stem.len().checked_sub(".gguf".len())?)?;
    stem.rsplit(['.', '-']).next()
}

fn list_names(files: &[&RemoteFile]) -> String {
    if files.is_empty() {
        return "none".into();
    }
    files
        .iter()
        .map(|f| f.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::reference::{ModelRef, parse};

    fn file(name: &str) -> RemoteFile {
        RemoteFile {
            name: name.into(),
            size: 10,
            sha256: None,
            etag: None,
        }
    }

    fn hub(text: &str) -> HubRef {
        match parse(text).unwrap() {
            ModelRef::Hub(hub) => hub,
            ModelRef::Local(_) => unreachable!(),
        }
    }

    fn chosen(text: &str, names: &[&str]) -> Result<String, String> {
        let files: Vec<RemoteFile> = names.iter().map(|n| file(n)).collect();
        choose(&hub(text), &files)
            .map(|f| f.name)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn preferred_quantizations_win_in_order() {
        let all = [
            "README.md",
            "m.F16.gguf",
            "m.Q8_0.gguf",
            "m-Q4_0.gguf",
            "m.Q4_K_M.gguf",
            "m.Q2_K.gguf",
        ];
        assert_eq!(chosen("hf:o/r", &all).unwrap(), "m.Q4_K_M.gguf");
        assert_eq!(chosen("hf:o/r", &all[..4]).unwrap(), "m-Q4_0.gguf");
        assert_eq!(chosen("hf:o/r", &all[..3]).unwrap(), "m.Q8_0.gguf");
        assert_eq!(
            chosen("hf:o/r", &["m.f16.gguf", "m.Q2_K.gguf"]).unwrap(),
            "m.f16.gguf"
        );
        assert_eq!(
            chosen("hf:o/r", &["only.Q4_1.gguf", "x.txt"]).unwrap(),
            "only.Q4_1.gguf"
        );
        assert_eq!(chosen("hf:o/r:m.Q2_K.gguf", &all).unwrap(), "m.Q2_K.gguf");
    }

    #[test]
    fn missing_or_ambiguous_files_are_explained() {
        assert!(
            chosen("hf:o/r", &["a.txt"])
                .unwrap_err()
                .contains("no .gguf")
        );
        assert!(
            chosen("hf:o/r", &["a.Q2_K.gguf", "b.Q3_K.gguf"])
                .unwrap_err()
                .contains("hf:o/r:a.Q2_K.gguf")
        );
        let missing = chosen("hf:o/r:x.gguf", &["a.Q2_K.gguf"]).unwrap_err();
        assert!(missing.contains("no file x.gguf") && missing.contains("a.Q2_K.gguf"));
    }

    #[test]
    fn a_listing_cannot_lead_the_download_out_of_the_model_directory() {
        let hostile = [
            "../../escape.Q4_K_M.gguf",
            "/abs/m.Q4_0.gguf",
            "d/../m.Q8_0.gguf",
        ];
        assert!(chosen("hf:o/r", &hostile).unwrap_err().contains("no .gguf"));
        let mut with_good = hostile.to_vec();
        with_good.push("sub/m.Q2_K.gguf");
        assert_eq!(chosen("hf:o/r", &with_good).unwrap(), "sub/m.Q2_K.gguf");
    }
}
