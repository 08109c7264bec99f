//! Which local model paths the hive opens.
//!
//! Without allowed model directories (`--allow-model-dir`) the hive loads any path it is
//! asked for, as its user can read it: the queen decides who may ask for what. With them, a
//! local path is used only when it resolves (symlinks and `..` followed, as the kernel would
//! follow them on open) to a file under one of those directories or to a file of the hive's
//! own catalog; anything else is refused before the file is opened. A refusal reads the same
//! whether the path exists or not, so that it cannot be used to probe the hive's disk; the
//! detail goes to the hive's log.

use std::path::{Component, Path, PathBuf};

use job_server::ApiError;
use rbee_contract::ErrorCode;

/// The allowed model directories, canonical. Empty: every path is allowed.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelDirs {
    dirs: Vec<PathBuf>,
}

/// Why a local path cannot be used.
#[derive(Debug)]
pub(crate) enum PathRefusal {
    /// Outside the allowed directories and the catalog (or cannot be resolved at all).
    Outside,
    /// Under an allowed directory, but nothing is there.
    Missing,
    /// Any path is allowed, and this one cannot be resolved.
    Unusable(std::io::Error),
}

impl ModelDirs {
    /// Canonicalizes each directory; one that does not exist or is not a directory is an
    /// error naming it (a startup error: the operator wrote it).
    pub fn new(dirs: &[PathBuf]) -> Result<Self, String> {
        let mut canonical = Vec::with_capacity(dirs.len());
        for dir in dirs {
            let resolved = std::fs::canonicalize(dir)
                .map_err(|err| format!("allowed model directory {}: {err}", dir.display()))?;
            if !resolved.is_dir() {
                return Err(format!(
                    "allowed model directory {} is not a directory",
                    dir.display()
                ));
            }
            if !canonical.contains(&resolved) {
                canonical.push(resolved);
            }
        }
        Ok(ModelDirs { dirs: canonical })
    }

    pub fn is_confined(&self) -> bool {
        !self.dirs.is_empty()
    }

    /// As the heartbeat reports them.
    pub fn reported(&self) -> Vec<String> {
        self.dirs
            .iter()
            .map(|dir| dir.to_string_lossy().into_owned())
            .collect()
    }

    /// The canonical file `path` names, if the hive may load it. `catalog` holds the files of
    /// the hive's ready catalog entries, which are allowed too. Nothing is opened: only the
    /// path's components are resolved.
    pub fn resolve(
        &self,
        path: &Path,
        catalog: impl FnOnce() -> Vec<PathBuf>,
    ) -> Result<PathBuf, PathRefusal> {
        if !self.is_confined() {
            return std::fs::canonicalize(path).map_err(PathRefusal::Unusable);
        }
        match std::fs::canonicalize(path) {
            Ok(resolved) => {
                if self.dirs.iter().any(|dir| resolved.starts_with(dir))
                    || catalog()
                        .iter()
                        .filter_map(|file| std::fs::canonicalize(file).ok())
                        .any(|file| file == resolved)
                {
                    Ok(resolved)
                } else {
                    Err(PathRefusal::Outside)
                }
            }
            // Missing is only said of a path whose parent resolves into an allowed directory
            // and whose last component is a plain name that is not a (dangling) link: that
            // tells nothing about any file outside those directories.
            Err(_) => {
                let plain_name =
                    matches!(path.components().next_back(), Some(Component::Normal(_)));
                let parent = path
                    .parent()
                    .map(|p| {
                        if p.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            p
                        }
                    })
                    .and_then(|p| std::fs::canonicalize(p).ok());
                let dangling_link = std::fs::symlink_metadata(path).is_ok();
                match parent {
                    Some(parent)
                        if plain_name
                            && !dangling_link
                            && self.dirs.iter().any(|dir| parent.starts_with(dir)) =>
                    {
                        Err(PathRefusal::Missing)
                    }
                    _ => Err(PathRefusal::Outside),
                }
            }
        }
    }
}

impl PathRefusal {
    /// What the client is told about `model_ref`: a code and one line without the hive's
    /// paths or the system's error text.
    pub fn to_api_error(&self, model_ref: &str) -> ApiError {
        match self {
            PathRefusal::Outside => ApiError::new(ErrorCode::Forbidden, refused_message(model_ref)),
            PathRefusal::Missing => ApiError::new(
                ErrorCode::ModelNotFound,
                format!(
                    "there is no model file `{model_ref}` in this hive's allowed model directories"
                ),
            ),
            PathRefusal::Unusable(err) if err.kind() == std::io::ErrorKind::NotFound => {
                ApiError::new(
                    ErrorCode::ModelNotFound,
                    format!("model path `{model_ref}` does not exist on this hive"),
                )
            }
            PathRefusal::Unusable(_) => ApiError::bad_request(format!(
                "model path `{model_ref}` cannot be used on this hive (see the hive's log)"
            )),
        }
    }
}

/// The one refusal for a path outside the allowed directories, whatever is (or is not) there.
pub(crate) fn refused_message(model_ref: &str) -> String {
    format!(
        "model path `{model_ref}` is not one this hive may load: only files in its catalog or \
         under its allowed model directories (--allow-model-dir)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tree {
        _tmp: tempfile::TempDir,
        root: PathBuf,
    }

    fn tree() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir_all(root.join("models/sub")).unwrap();
        std::fs::create_dir_all(root.join("outside")).unwrap();
        std::fs::write(root.join("models/sub/m.gguf"), b"GGUF").unwrap();
        std::fs::write(root.join("outside/secret"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("outside/secret"), root.join("models/link")).unwrap();
        std::os::unix::fs::symlink(root.join("outside"), root.join("models/dirlink")).unwrap();
        std::os::unix::fs::symlink(root.join("nowhere"), root.join("models/dangling")).unwrap();
        Tree { _tmp: tmp, root }
    }

    #[test]
    fn only_files_under_the_dirs_or_in_the_catalog_resolve() {
        let t = tree();
        let dirs = ModelDirs::new(&[t.root.join("models")]).unwrap();
        let none = Vec::new;
        let ok = dirs
            .resolve(&t.root.join("models/sub/m.gguf"), none)
            .unwrap();
        assert_eq!(ok, t.root.join("models/sub/m.gguf"));
        // `..` inside the directory is fine when it stays inside.
        assert!(
            dirs.resolve(&t.root.join("models/sub/../sub/m.gguf"), none)
                .is_ok()
        );

        for outside in [
            t.root.join("outside/secret"),
            t.root.join("models/../outside/secret"),
            t.root.join("models/link"),
            t.root.join("models/dirlink/secret"),
            // The same refusal for paths that do not exist outside.
            t.root.join("outside/absent"),
            t.root.join("models/../outside/absent"),
            t.root.join("models/dirlink/absent"),
            t.root.join("models/dangling"),
        ] {
            assert!(
                matches!(dirs.resolve(&outside, none), Err(PathRefusal::Outside)),
                "{}",
                outside.display()
            );
        }
        assert!(matches!(
            dirs.resolve(&t.root.join("models/sub/absent.gguf"), none),
            Err(PathRefusal::Missing)
        ));
        // A catalog file is allowed wherever it is.
        let secret = t.root.join("outside/secret");
        assert!(dirs.resolve(&secret, || vec![secret.clone()]).is_ok());
    }

    #[test]
    fn without_dirs_every_path_resolves() {
        let t = tree();
        let open = ModelDirs::default();
        assert!(open.resolve(&t.root.join("models/link"), Vec::new).is_ok());
        assert!(matches!(
            open.resolve(&t.root.join("absent"), Vec::new),
            Err(PathRefusal::Unusable(_))
        ));
    }

    #[test]
    fn refusals_do_not_tell_existence() {
        let a = PathRefusal::Outside.to_api_error("/etc/passwd");
        let b = PathRefusal::Outside.to_api_error("/etc/passwd");
        assert_eq!((a.code, a.message), (b.code, b.message));
        assert!(ModelDirs::new(&[PathBuf::from("/no/such/dir/here")]).is_err());
    }
}
