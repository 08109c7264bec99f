//! Settings: the command line over the environment over the config file over defaults.
//!
//! The config file is `$XDG_CONFIG_HOME/rbee/config.toml` (else `~/.config/rbee/config.toml`),
//! optional, with the keys `queen_url` and `api_key`. `RBEE_QUEEN_URL` and `--queen-url` beat
//! `queen_url`; `RBEE_API_KEY` beats `api_key`. `RBEE_HIVE_ID` names the local hive. The state directory (logs and pid files of
//! daemons the keeper starts) is `$XDG_STATE_HOME/rbee`, else `~/.local/state/rbee`.

use std::path::{Path, PathBuf};

use reqwest::Url;
use serde::Deserialize;

use crate::cli::DEFAULT_QUEEN_URL;
use crate::error::KeeperError;

/// The keys of `config.toml`. Unknown keys are an error: a typo should not be ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    queen_url: Option<String>,
    api_key: Option<String>,
}

/// Everything a command needs to know about where things are.
#[derive(Debug, Clone)]
pub struct Settings {
    pub queen: QueenUrl,
    /// Sent as `Authorization: Bearer` to the queen.
    pub api_key: Option<String>,
    /// Sent to a local hive when the keeper stops it directly (`RBEE_CLUSTER_TOKEN`).
    pub cluster_token: Option<String>,
    /// The id of a local hive the keeper starts (`RBEE_HIVE_ID`, the hive's own variable;
    /// else the host name, the hive's own default).
    pub hive_id: Option<String>,
    state_dir: Option<PathBuf>,
}

impl Settings {
    /// Resolves the settings from `--queen-url` (clap already folded `RBEE_QUEEN_URL` into
    /// it), the environment as seen through `env`, and the config file.
    pub fn load(
        queen_url_flag: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, KeeperError> {
        let non_empty = |key: &str| env(key).filter(|v| !v.trim().is_empty());
        let home = non_empty("HOME").map(PathBuf::from);
        let xdg = |key: &str, fallback: &[&str]| {
            non_empty(key)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .or_else(|| {
                    home.as_ref()
                        .map(|h| fallback.iter().fold(h.clone(), |p, part| p.join(part)))
                })
                .map(|dir| dir.join("rbee"))
        };
        let config_path = xdg("XDG_CONFIG_HOME", &[".config"]).map(|d| d.join("config.toml"));
        let file = match &config_path {
            Some(path) => read_config(path)?,
            None => ConfigFile::default(),
        };
        let queen_text = queen_url_flag
            .filter(|url| !url.trim().is_empty())
            .map(str::to_owned)
            .or(file.queen_url)
            .unwrap_or_else(|| DEFAULT_QUEEN_URL.to_owned());
        let queen = QueenUrl::parse(&queen_text)?;
        Ok(Settings {
            queen,
            api_key: non_empty("RBEE_API_KEY").or(file.api_key),
            cluster_token: non_empty("RBEE_CLUSTER_TOKEN"),
            hive_id: non_empty("RBEE_HIVE_ID"),
            state_dir: xdg("XDG_STATE_HOME", &[".local", "state"]),
        })
    }

    /// Where logs and pid files of local daemons go.
    pub fn state_dir(&self) -> Result<&Path, KeeperError> {
        self.state_dir.as_deref().ok_or_else(|| {
            KeeperError::Usage(
                "cannot tell where to keep daemon logs: set HOME or XDG_STATE_HOME".into(),
            )
        })
    }
}

fn read_config(path: &Path) -> Result<ConfigFile, KeeperError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ConfigFile::default());
        }
        Err(err) => {
            return Err(KeeperError::Config {
                path: path.to_owned(),
                reason: err.to_string(),
            });
        }
    };
    toml::from_str(&text).map_err(|err| KeeperError::Config {
        path: path.to_owned(),
        // toml's message spans lines (it quotes the source); its first line says it all.
        reason: err
            .message()
            .lines()
            .next()
            .unwrap_or("parse error")
            .to_owned(),
    })
}

/// The queen's base URL, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueenUrl {
    url: Url,
}

impl QueenUrl {
    pub fn parse(text: &str) -> Result<QueenUrl, KeeperError> {
        let bad = |why: &str| KeeperError::Usage(format!("invalid queen URL `{text}`: {why}"));
        let url = Url::parse(text.trim()).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("use http:// or https://"));
        }
        if url.host_str().is_none() {
            return Err(bad("it has no host"));
        }
        if url.path() != "/" || url.query().is_some() {
            return Err(bad("give only scheme, host and port"));
        }
        Ok(QueenUrl { url })
    }

    /// `http://host:port`, without a trailing slash.
    pub fn base(&self) -> String {
        self.url.as_str().trim_end_matches('/').to_owned()
    }

    pub fn join(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    pub fn port(&self) -> u16 {
        self.url.port_or_known_default().unwrap_or(80)
    }

    /// Whether a queen started by this keeper would answer at this URL: plain http on
    /// 127.0.0.1 or localhost, where local daemons bind. Only then does the keeper start one.
    pub fn is_local(&self) -> bool {
        self.url.scheme() == "http"
            && matches!(self.url.host_str(), Some("127.0.0.1" | "localhost"))
    }

    /// Whether this is the default port, next to which the default hive port is used.
    pub fn is_default_port(&self) -> bool {
        self.port() == 7833
    }
}

impl std::fmt::Display for QueenUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| map.get(key).cloned()
    }

    fn write_config(dir: &Path, text: &str) {
        std::fs::create_dir_all(dir.join("rbee")).unwrap();
        std::fs::write(dir.join("rbee/config.toml"), text).unwrap();
    }

    #[test]
    fn defaults_without_any_config() {
        let home = tempfile::tempdir().unwrap();
        let home_str = home.path().to_str().unwrap();
        let settings = Settings::load(None, env_of(&[("HOME", home_str)])).unwrap();
        assert_eq!(settings.queen.base(), "http://127.0.0.1:7833");
        assert!(settings.queen.is_local() && settings.queen.is_default_port());
        assert_eq!(settings.api_key, None);
        assert_eq!(
            settings.state_dir().unwrap(),
            home.path().join(".local/state/rbee")
        );
    }

    #[test]
    fn file_then_env_then_flag() {
        let config = tempfile::tempdir().unwrap();
        write_config(
            config.path(),
            "queen_url = \"http://queen.lan:9000\"\napi_key = \"from-file\"\n",
        );
        let cfg = config.path().to_str().unwrap();
        let settings = Settings::load(None, env_of(&[("XDG_CONFIG_HOME", cfg)])).unwrap();
        assert_eq!(settings.queen.base(), "http://queen.lan:9000");
        assert!(!settings.queen.is_local());
        assert_eq!(settings.api_key.as_deref(), Some("from-file"));

        let settings = Settings::load(
            Some("http://localhost:7900/"),
            env_of(&[("XDG_CONFIG_HOME", cfg), ("RBEE_API_KEY", "from-env")]),
        )
        .unwrap();
        assert_eq!(settings.queen.base(), "http://localhost:7900");
        assert_eq!(settings.queen.port(), 7900);
        assert!(settings.queen.is_local() && !settings.queen.is_default_port());
        assert_eq!(settings.api_key.as_deref(), Some("from-env"));
    }

    #[test]
    fn a_bad_config_file_is_an_error_naming_it() {
        let config = tempfile::tempdir().unwrap();
        write_config(config.path(), "queen_ur = \"typo\"\n");
        let cfg = config.path().to_str().unwrap();
        let err = Settings::load(None, env_of(&[("XDG_CONFIG_HOME", cfg)])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("config.toml"), "{text}");
        assert!(text.contains("queen_ur"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn queen_urls_are_checked() {
        assert!(QueenUrl::parse("127.0.0.1:7833").is_err());
        assert!(QueenUrl::parse("ftp://127.0.0.1").is_err());
        assert!(QueenUrl::parse("http://127.0.0.1:7833/v1").is_err());
        assert!(!QueenUrl::parse("http://127.0.0.2:7833").unwrap().is_local());
        assert!(!QueenUrl::parse("https://127.0.0.1").unwrap().is_local());
        assert_eq!(QueenUrl::parse("https://q.example").unwrap().port(), 443);
    }
}
