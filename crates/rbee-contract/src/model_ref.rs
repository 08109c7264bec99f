//! The grammar of model references, shared by every daemon that reads one, so that a
//! malformed reference is refused by the first hop it reaches, before any job exists.
//!
//! Three spellings: `hf:org/repo` (the hive picks a GGUF file of the repo), `hf:org/repo:file`
//! (that file; it may sit in a folder of the repo, `dir/file.gguf`) and a local path (any
//! file or directory the hive can read, as given). Anything else with a `scheme:` prefix is
//! refused. Hub names keep to the characters the hub itself allows, so a reference can never
//! smuggle `..`, an absolute path or a separator into the paths a hive writes.
//!
//! This is grammar only: no I/O. Whether a local path exists, and what it resolves to, is the
//! hive's to find out on its own file system.

use std::fmt;
use std::path::PathBuf;

/// The prefix of hub references.
pub const HUB_PREFIX: &str = "hf:";

/// Longest org, repo or path component accepted (the hub's own limit is 96).
const MAX_NAME: usize = 96;

/// A model reference, parsed. The wire carries it as text ([`crate::ModelRef`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedModelRef {
    Hub(HubRef),
    /// A path on a hive, as the user wrote it (not checked for existence).
    Local(PathBuf),
}

impl ParsedModelRef {
    /// Parses a reference as written on the wire; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, ModelRefError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ModelRefError::Empty);
        }
        if let Some(rest) = text.strip_prefix(HUB_PREFIX) {
            return parse_hub(rest)
                .map(ParsedModelRef::Hub)
                .map_err(|why| ModelRefError::BadHub {
                    reference: text.to_owned(),
                    why,
                });
        }
        if has_scheme(text) {
            return Err(ModelRefError::UnknownScheme(text.to_owned()));
        }
        Ok(ParsedModelRef::Local(PathBuf::from(text)))
    }
}

/// A model on the hub: a repository and, if named, one file of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubRef {
    org: String,
    repo: String,
    file: Option<String>,
}

impl HubRef {
    /// The organisation (or user) that owns the repository.
    pub fn org(&self) -> &str {
        &self.org
    }

    /// `org/repo`, the repository id on the hub.
    pub fn repo(&self) -> String {
        format!("{}/{}", self.org, self.repo)
    }

    /// The file the reference names, if it names one.
    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }

    /// The same repository with `file` chosen: the catalog id of a hub model. `file` must be
    /// a name [`is_hub_file`] accepts.
    pub fn with_file(&self, file: &str) -> HubRef {
        HubRef {
            org: self.org.clone(),
            repo: self.repo.clone(),
            file: Some(file.to_owned()),
        }
    }
}

impl fmt::Display for HubRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{HUB_PREFIX}{}/{}", self.org, self.repo)?;
        if let Some(file) = &self.file {
            write!(f, ":{file}")?;
        }
        Ok(())
    }
}

/// Why a reference was refused; the message is meant for the user who wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRefError {
    Empty,
    /// A `scheme:` prefix other than `hf:`.
    UnknownScheme(String),
    /// An `hf:` reference that breaks the hub's naming rules.
    BadHub {
        reference: String,
        why: String,
    },
}

impl fmt::Display for ModelRefError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRefError::Empty => f.write_str("the model reference is empty"),
            ModelRefError::UnknownScheme(text) => write!(
                f,
                "`{text}` is not a model reference: use hf:org/repo, hf:org/repo:file.gguf or a path on the hive"
            ),
            ModelRefError::BadHub { reference, why } => {
                write!(f, "`{reference}` is not a valid hub reference: {why}")
            }
        }
    }
}

impl std::error::Error for ModelRefError {}

/// Whether `name` is a file of a repository that a hub reference may name: components as the
/// hub allows, separated by `/`, ending in `.gguf`.
pub fn is_hub_file(name: &str) -> bool {
    check_file(name).is_ok()
}

/// `s3:…`, `https://…`: a word of letters followed by a colon, which no sensible local path
/// starts with.
fn has_scheme(text: &str) -> bool {
    match text.split_once(':') {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        }
        None => false,
    }
}

fn parse_hub(rest: &str) -> Result<HubRef, String> {
    let (repo, file) = match rest.split_once(':') {
        Some((repo, file)) => (repo, Some(file)),
        None => (rest, None),
    };
    let (org, name) = repo
        .split_once('/')
        .ok_or_else(|| "the repository must be written org/repo".to_owned())?;
    check_name("organisation", org)?;
    check_name("repository", name)?;
    let file = file.map(check_file).transpose()?;
    Ok(HubRef {
        org: org.to_owned(),
        repo: name.to_owned(),
        file,
    })
}

/// One org, repo or path component: letters, digits, `-`, `_`, `.`; not starting with `.` or
/// `-`, never `..`.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("the {what} name is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "the {what} name is longer than {MAX_NAME} characters"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
    {
        return Err(format!("the {what} name `{name}` contains `{bad}`"));
    }
    if name.starts_with(['.', '-']) || name.contains("..") {
        return Err(format!(
            "the {what} name `{name}` may not start with `.` or `-` or contain `..`"
        ));
    }
    Ok(())
}

/// A file of the repo: components as [`check_name`] allows, separated by `/`, ending in
/// `.gguf` (the one format a single file is a whole model in).
fn check_file(file: &str) -> Result<String, String> {
    if file.is_empty() {
        return Err("the file name after `:` is empty".into());
    }
    if file.starts_with('/') {
        return Err(format!("the file `{file}` is an absolute path"));
    }
    for component in file.split('/') {
        check_name("file", component)?;
    }
    if !file.to_ascii_lowercase().ends_with(".gguf") {
        return Err(format!(
            "the file `{file}` is not a .gguf file; name a GGUF file of the repository"
        ));
    }
    Ok(file.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ParsedModelRef, ModelRefError> {
        ParsedModelRef::parse(text)
    }

    fn hub(text: &str) -> HubRef {
        match parse(text) {
            Ok(ParsedModelRef::Hub(hub)) => hub,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn refused(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn hub_references_parse() {
        let repo = hub("hf:TheBloke/TinyLlama-1.1B-GGUF");
        assert_eq!(repo.org(), "TheBloke");
        assert_eq!(repo.repo(), "TheBloke/TinyLlama-1.1B-GGUF");
        assert_eq!(repo.file(), None);
        assert_eq!(repo.to_string(), "hf:TheBloke/TinyLlama-1.1B-GGUF");

        let file = hub(" hf:org/repo:sub/model.Q4_K_M.gguf ");
        assert_eq!(file.repo(), "org/repo");
        assert_eq!(file.file(), Some("sub/model.Q4_K_M.gguf"));
        assert_eq!(file.to_string(), "hf:org/repo:sub/model.Q4_K_M.gguf");
        assert_eq!(
            repo.with_file("a.gguf").to_string(),
            "hf:TheBloke/TinyLlama-1.1B-GGUF:a.gguf"
        );
    }

    #[test]
    fn local_paths_stay_paths() {
        for text in [
            "/models/m.gguf",
            "./m.gguf",
            "models/with:colon",
            "tinyllama",
        ] {
            assert_eq!(parse(text), Ok(ParsedModelRef::Local(PathBuf::from(text))));
        }
    }

    #[test]
    fn escapes_from_the_model_directory_are_refused() {
        for text in [
            "hf:../x",
            "hf:../b",
            "hf:a/..",
            "hf:../../etc",
            "hf:a/b:../../etc/passwd",
            "hf:a/b:/etc/passwd.gguf",
            "hf:a/b:dir/../../x.gguf",
            "hf:a/b:./x.gguf",
            "hf:/abs/repo",
            "hf:a/b/c",
            "hf:a\\b/c",
            "hf:a/b:x.gguf:y",
            "hf:a/b:.hidden.gguf",
            "hf:a/b:dir//x.gguf",
        ] {
            assert!(
                matches!(parse(text), Err(ModelRefError::BadHub { .. })),
                "{text} was accepted: {:?}",
                parse(text)
            );
        }
    }

    #[test]
    fn malformed_references_say_why() {
        assert!(refused("hf:repo").contains("org/repo"));
        assert!(refused("hf:org/").contains("repository name is empty"));
        assert!(refused("hf:org/repo:").contains("empty"));
        assert!(refused("hf:org/repo:model.safetensors").contains(".gguf"));
        assert!(refused("hf:org/re po").contains("contains ` `"));
        assert!(refused(&format!("hf:org/{}", "r".repeat(97))).contains("longer"));
        assert!(refused("hf:a/b:../../etc/passwd").starts_with("`hf:a/b:../../etc/passwd`"));
        assert_eq!(parse("  "), Err(ModelRefError::Empty));
        assert_eq!(refused(""), "the model reference is empty");
        assert!(matches!(
            parse("s3:bucket/m"),
            Err(ModelRefError::UnknownScheme(_))
        ));
        assert!(refused("https://huggingface.co/a/b").contains("hf:org/repo"));
    }

    #[test]
    fn hub_files_are_gguf_files_inside_the_repository() {
        assert!(is_hub_file("model.Q4_0.gguf"));
        assert!(is_hub_file("dir/model.GGUF"));
        assert!(!is_hub_file("../model.gguf"));
        assert!(!is_hub_file("/model.gguf"));
        assert!(!is_hub_file("model.safetensors"));
        assert!(!is_hub_file(""));
    }
}
