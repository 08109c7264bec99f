//! The hive's model catalog: one SQLite file in the model directory, mirrored in memory.
//!
//! Every write goes to the database first (off the async runtime) and then to the mirror, so
//! reads (listing, heartbeats, admission checks) never touch the disk. Opening the catalog
//! repairs what a crash left behind: a `downloading` row becomes `failed` (its partial file
//! stays for the next download to resume), and a `ready` row whose file is gone becomes
//! `failed` too, so a `ready` entry always points at a complete, verified file.
//!
//! It does not download anything and does not know about the hub; see `download`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rbee_contract::{ModelDetails, ModelEntry, ModelState};
use rusqlite::{Connection, params};

/// One model of the catalog.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CatalogRow {
    /// `hf:org/repo:file`.
    pub id: String,
    /// The reference it was first asked for by, e.g. `hf:org/repo`.
    pub source: String,
    /// `org/repo` on the hub.
    pub repo: String,
    /// The file of the repo.
    pub file: String,
    /// The complete file on this hive; `None` unless `ready`.
    pub path: Option<PathBuf>,
    pub size_bytes: u64,
    /// Expected while downloading, verified once `ready`.
    pub sha256: Option<String>,
    pub state: ModelState,
    /// Why it is `failed`.
    pub error: Option<String>,
    /// Unix seconds.
    pub added_at: u64,
    pub last_used_at: Option<u64>,
}

impl CatalogRow {
    pub fn entry(&self) -> ModelEntry {
        ModelEntry {
            id: self.id.clone(),
            source: self.source.clone(),
            state: self.state,
            size_bytes: self.size_bytes,
        }
    }

    pub fn details(&self) -> ModelDetails {
        ModelDetails {
            entry: self.entry(),
            file: Some(self.file.clone()),
            sha256: self.sha256.clone(),
            added_at: Some(self.added_at),
            last_used_at: self.last_used_at,
            error: self.error.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CatalogError {
    #[error("model catalog database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("model catalog database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("model catalog task failed: {0}")]
    Task(String),
}

pub(crate) struct Catalog {
    db: Arc<Mutex<Connection>>,
    rows: Mutex<BTreeMap<String, CatalogRow>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS models (
    id           TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    repo         TEXT NOT NULL,
    file         TEXT NOT NULL,
    path         TEXT,
    size_bytes   INTEGER NOT NULL,
    sha256       TEXT,
    state        TEXT NOT NULL CHECK (state IN ('downloading', 'ready', 'failed')),
    error        TEXT,
    added_at     INTEGER NOT NULL,
    last_used_at INTEGER
);
";

impl Catalog {
    /// Opens (or creates) the database at `path` and repairs what a crash left. Blocking.
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        let open_err = |source| CatalogError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        let interrupted = conn.execute(
            "UPDATE models SET state = 'failed', path = NULL,
                 error = 'the download was interrupted (the hive stopped); download it again to resume'
             WHERE state = 'downloading'",
            [],
        )?;
        if interrupted > 0 {
            tracing::warn!(
                interrupted,
                "downloads interrupted by a restart are marked failed"
            );
        }
        let rows = load(&conn)?;
        let catalog = Catalog {
            db: Arc::new(Mutex::new(conn)),
            rows: Mutex::new(BTreeMap::new()),
        };
        for mut row in rows {
            let missing =
                row.state == ModelState::Ready && !row.path.as_deref().is_some_and(Path::is_file);
            if missing {
                tracing::warn!(id = %row.id, "a ready model's file is gone; marking it failed");
                row.state = ModelState::Failed;
                row.path = None;
                row.error = Some("its file is missing from the model directory".into());
                write(&catalog.conn(), &row)?;
            }
            catalog.mirror().insert(row.id.clone(), row);
        }
        Ok(catalog)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mirror(&self) -> MutexGuard<'_, BTreeMap<String, CatalogRow>> {
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<CatalogRow> {
        self.mirror().get(id).cloned()
    }

    pub fn list(&self) -> Vec<CatalogRow> {
        self.mirror().values().cloned().collect()
    }

    /// Rows of one hub repository.
    pub fn of_repo(&self, repo: &str) -> Vec<CatalogRow> {
        self.mirror()
            .values()
            .filter(|row| row.repo == repo)
            .cloned()
            .collect()
    }

    /// Writes `row` (insert or replace) to the database, then to the mirror.
    pub async fn put(&self, row: CatalogRow) -> Result<(), CatalogError> {
        let db = Arc::clone(&self.db);
        let stored = row.clone();
        blocking(move || write(&db.lock().unwrap_or_else(|p| p.into_inner()), &stored)).await?;
        self.mirror().insert(row.id.clone(), row);
        Ok(())
    }

    /// Changes a row through `update`; nothing happens when it is not there.
    pub async fn update(
        &self,
        id: &str,
        update: impl FnOnce(&mut CatalogRow),
    ) -> Result<(), CatalogError> {
        let Some(mut row) = self.get(id) else {
            return Ok(());
        };
        update(&mut row);
        self.put(row).await
    }

    pub async fn remove(&self, id: &str) -> Result<(), CatalogError> {
        let db = Arc::clone(&self.db);
        let key = id.to_owned();
        blocking(move || {
            db.lock()
                .unwrap_or_else(|p| p.into_inner())
                .execute("DELETE FROM models WHERE id = ?1", params![key])
                .map(drop)
        })
        .await?;
        self.mirror().remove(id);
        Ok(())
    }

    /// Marks a model used now.
    pub async fn touch(&self, id: &str) -> Result<(), CatalogError> {
        self.update(id, |row| row.last_used_at = Some(now())).await
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, CatalogError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| CatalogError::Task(err.to_string()))?
        .map_err(CatalogError::from)
}

fn write(conn: &Connection, row: &CatalogRow) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO models
             (id, source, repo, file, path, size_bytes, sha256, state, error, added_at, last_used_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            row.id,
            row.source,
            row.repo,
            row.file,
            row.path.as_deref().map(|p| p.to_string_lossy().into_owned()),
            i64::try_from(row.size_bytes).unwrap_or(i64::MAX),
            row.sha256,
            state_name(row.state),
            row.error,
            i64::try_from(row.added_at).unwrap_or(i64::MAX),
            row.last_used_at.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
        ],
    )
    .map(drop)
}

fn load(conn: &Connection) -> rusqlite::Result<Vec<CatalogRow>> {
    let mut statement = conn.prepare(
        "SELECT id, source, repo, file, path, size_bytes, sha256, state, error, added_at, last_used_at
         FROM models ORDER BY id",
    )?;
    let rows = statement.query_map([], |r| {
        let state: String = r.get(7)?;
        Ok(CatalogRow {
            id: r.get(0)?,
            source: r.get(1)?,
            repo: r.get(2)?,
            file: r.get(3)?,
            path: r.get::<_, Option<String>>(4)?.map(PathBuf::from),
            size_bytes: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
            sha256: r.get(6)?,
            state: parse_state(&state),
            error: r.get(8)?,
            added_at: u64::try_from(r.get::<_, i64>(9)?).unwrap_or(0),
            last_used_at: r
                .get::<_, Option<i64>>(10)?
                .map(|t| u64::try_from(t).unwrap_or(0)),
        })
    })?;
    rows.collect()
}

/// Whether the row exists in the database itself, not only in the mirror (tests).
#[cfg(test)]
fn stored_state(conn: &Connection, id: &str) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row("SELECT state FROM models WHERE id = ?1", params![id], |r| {
        r.get(0)
    })
    .optional()
}

fn state_name(state: ModelState) -> &'static str {
    match state {
        ModelState::Downloading => "downloading",
        ModelState::Ready => "ready",
        ModelState::Failed => "failed",
    }
}

fn parse_state(text: &str) -> ModelState {
    match text {
        "ready" => ModelState::Ready,
        "downloading" => ModelState::Downloading,
        _ => ModelState::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, state: ModelState, path: Option<PathBuf>) -> CatalogRow {
        CatalogRow {
            id: id.into(),
            source: "hf:org/repo".into(),
            repo: "org/repo".into(),
            file: "m.gguf".into(),
            path,
            size_bytes: 3,
            sha256: Some("ab".repeat(32)),
            state,
            error: None,
            added_at: 1,
            last_used_at: None,
        }
    }

    #[tokio::test]
    async fn rows_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("catalog.sqlite");
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"abc").unwrap();
        {
            let catalog = Catalog::open(&db).unwrap();
            catalog
                .put(row(
                    "hf:org/repo:m.gguf",
                    ModelState::Ready,
                    Some(file.clone()),
                ))
                .await
                .unwrap();
            catalog.touch("hf:org/repo:m.gguf").await.unwrap();
            catalog
                .put(row("hf:org/repo:gone.gguf", ModelState::Ready, None))
                .await
                .unwrap();
            catalog.remove("hf:org/repo:gone.gguf").await.unwrap();
        }
        let catalog = Catalog::open(&db).unwrap();
        let rows = catalog.list();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state, ModelState::Ready);
        assert_eq!(rows[0].path.as_deref(), Some(file.as_path()));
        assert!(rows[0].last_used_at.is_some());
        assert_eq!(catalog.of_repo("org/repo").len(), 1);
        assert!(catalog.of_repo("org/other").is_empty());
    }

    #[tokio::test]
    async fn a_crash_never_leaves_a_ready_row_on_a_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("catalog.sqlite");
        {
            let catalog = Catalog::open(&db).unwrap();
            catalog
                .put(row("hf:org/repo:a.gguf", ModelState::Downloading, None))
                .await
                .unwrap();
            let vanished = dir.path().join("vanished.gguf");
            catalog
                .put(row("hf:org/repo:b.gguf", ModelState::Ready, Some(vanished)))
                .await
                .unwrap();
        }
        let catalog = Catalog::open(&db).unwrap();
        for id in ["hf:org/repo:a.gguf", "hf:org/repo:b.gguf"] {
            let row = catalog.get(id).unwrap();
            assert_eq!(row.state, ModelState::Failed, "{id}");
            assert!(row.path.is_none());
            assert!(row.error.is_some());
            assert_eq!(
                stored_state(&catalog.conn(), id).unwrap().as_deref(),
                Some("failed")
            );
        }
    }
}
