//! Starting and stopping the local queen and hive, and making sure a cluster is there
//! before a job is submitted.

use std::time::{Duration, Instant};

use crate::commands::Ctx;
use crate::error::KeeperError;
use crate::local::{self, DaemonKind, Launched, Recorded};
use crate::queen_api::{HiveEntry, check, unreachable_error};

const QUEEN_START_TIMEOUT: Duration = Duration::from_secs(20);
const HIVE_START_TIMEOUT: Duration = Duration::from_secs(20);
/// A hive sends its first heartbeat at once; this covers a slow machine.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(15);
/// The queen drains jobs and waits for its hives, which give workers a grace period.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_HIVE_PORT: u16 = 7835;

/// Makes sure a queen answers and, for a local queen the keeper started, that a hive is
/// registered: starting both when a local queen does not answer. A remote queen that does
/// not answer is an error.
pub(crate) async fn ensure_cluster(ctx: &mut Ctx<'_>) -> Result<(), KeeperError> {
    let url = ctx.queen.url().clone();
    match ctx.queen.health().await {
        Ok(()) => {
            if url.is_local() && started_here(ctx)?.is_some() {
                ensure_local_hive(ctx).await?;
            }
            return Ok(());
        }
        Err(reason) if !url.is_local() => return Err(unreachable_error(&url, reason)),
        Err(_) => {}
    }
    let state = ctx.state()?;
    ctx.console.note(&format!(
        "no queen answers at {url}; starting a local queen and hive (logs in {})",
        state
            .log_path(DaemonKind::Queen)
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    ));
    match start_queen(ctx, &[]).await? {
        Some(queen) => {
            ctx.console
                .note(&format!("queen ready at {} (pid {})", queen.url, queen.pid));
            ensure_local_hive(ctx).await
        }
        // Another keeper started it at the same moment; its hive is that keeper's business.
        None => Ok(()),
    }
}

/// The queen the keeper started, if it is the one at the queen URL and still runs.
pub(crate) fn started_here(ctx: &Ctx<'_>) -> Result<Option<Recorded>, KeeperError> {
    let recorded = ctx.state()?.running(DaemonKind::Queen);
    Ok(recorded.filter(|r| r.url == ctx.queen.url().base()))
}

/// Starts the local hive unless one is registered (or the keeper's own is about to be).
async fn ensure_local_hive(ctx: &mut Ctx<'_>) -> Result<(), KeeperError> {
    let (_, hives) = ctx.queen.hives().await?;
    if hives.iter().any(|h| h.status == "healthy") {
        return Ok(());
    }
    if let Some(hive) = ctx.state()?.running(DaemonKind::Hive) {
        let queen = ctx.queen.url().base();
        if let Some(other) = hive_queen_url(&hive).filter(|q| *q != queen) {
            return Err(KeeperError::Usage(format!(
                "the local hive (pid {}) reports to the queen at {other}, not {queen}; stop it first with `rbee-keeper --queen-url {other} hive stop`",
                hive.pid
            )));
        }
        // Ours runs but has not (re-)registered yet, e.g. right after a queen restart.
        let entry = wait_registered(ctx, None).await.map_err(|err| {
            let KeeperError::Timeout(_) = err else {
                return err;
            };
            KeeperError::Timeout(format!(
                "the local hive at {} (pid {}) has not registered with the queen at {} within {REGISTRATION_TIMEOUT:?}; see {}",
                hive.url,
                hive.pid,
                ctx.queen.url(),
                ctx.state().map(|s| s.log_path(DaemonKind::Hive).display().to_string()).unwrap_or_default()
            ))
        })?;
        ctx.console
            .note(&format!("hive {} registered", entry.info.hive_id));
        return Ok(());
    }
    let (launched, hive_id) = start_hive(ctx, None, None, &[]).await?;
    let entry = wait_registered(ctx, Some(&hive_id))
        .await
        .map_err(|e| registration_error(e, &launched))?;
    ctx.console.note(&format!(
        "hive {} ready at {} (pid {})",
        entry.info.hive_id, launched.url, launched.pid
    ));
    Ok(())
}

/// Starts `queen-rbee` on the queen URL's port. `None` when a queen that someone else was
/// starting at the same moment answered there instead.
pub(crate) async fn start_queen(
    ctx: &mut Ctx<'_>,
    extra: &[String],
) -> Result<Option<Launched>, KeeperError> {
    let url = ctx.queen.url().clone();
    if !url.is_local() {
        return Err(KeeperError::Usage(format!(
            "cannot start a queen at {url}: rbee-keeper starts queens only at http://127.0.0.1 or http://localhost; run `rbee-keeper queen start` on that machine"
        )));
    }
    let port = url.port();
    if !local::port_is_free(port) {
        // Maybe a queen that is still starting; anything else never answers /health.
        let deadline = Instant::now() + QUEEN_START_TIMEOUT;
        while Instant::now() < deadline {
            if ctx.queen.health().await.is_ok() {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        return Err(KeeperError::DaemonStart {
            name: DaemonKind::Queen.binary(),
            reason: format!("port {port} is taken by a program that is not an rbee queen"),
            tail: String::new(),
        });
    }
    let mut args = vec!["--port".to_owned(), port.to_string()];
    args.extend_from_slice(extra);
    let state = ctx.state()?;
    local::launch(
        &state,
        DaemonKind::Queen,
        &args,
        &url.base(),
        QUEEN_START_TIMEOUT,
    )
    .await
    .map(Some)
}

/// Starts `rbee-hive` registering with the queen URL; returns it and its hive id.
pub(crate) async fn start_hive(
    ctx: &mut Ctx<'_>,
    port: Option<u16>,
    hive_id: Option<String>,
    extra: &[String],
) -> Result<(Launched, String), KeeperError> {
    let port = match port {
        Some(port) => port,
        None if ctx.queen.url().is_default_port() && local::port_is_free(DEFAULT_HIVE_PORT) => {
            DEFAULT_HIVE_PORT
        }
        None => local::free_port()?,
    };
    let hive_id = hive_id
        .or_else(|| ctx.settings.hive_id.clone())
        .unwrap_or_else(local::host_name);
    let mut args = vec![
        "--port".to_owned(),
        port.to_string(),
        "--queen-url".to_owned(),
        ctx.queen.url().base(),
        "--hive-id".to_owned(),
        hive_id.clone(),
    ];
    args.extend_from_slice(extra);
    let url = format!("http://127.0.0.1:{port}");
    let state = ctx.state()?;
    let launched = local::launch(&state, DaemonKind::Hive, &args, &url, HIVE_START_TIMEOUT).await?;
    Ok((launched, hive_id))
}

/// Waits until the queen lists a healthy hive (`hive_id`, or any).
pub(crate) async fn wait_registered(
    ctx: &Ctx<'_>,
    hive_id: Option<&str>,
) -> Result<HiveEntry, KeeperError> {
    let deadline = Instant::now() + REGISTRATION_TIMEOUT;
    loop {
        let (_, hives) = ctx.queen.hives().await?;
        if let Some(entry) = hives
            .into_iter()
            .find(|h| h.status == "healthy" && hive_id.is_none_or(|id| h.info.hive_id == id))
        {
            return Ok(entry);
        }
        if Instant::now() >= deadline {
            return Err(KeeperError::Timeout(format!(
                "no hive{} registered with the queen at {} within {REGISTRATION_TIMEOUT:?}",
                hive_id.map(|id| format!(" {id}")).unwrap_or_default(),
                ctx.queen.url()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn registration_error(err: KeeperError, hive: &Launched) -> KeeperError {
    match err {
        KeeperError::Timeout(message) => KeeperError::Timeout(format!(
            "{message}; the hive runs (pid {}), see {}",
            hive.pid,
            hive.log.display()
        )),
        other => other,
    }
}

/// Asks the local hive to shut down (it stops its workers first) and waits until it is gone.
pub(crate) async fn stop_local_hive(ctx: &Ctx<'_>, hive: &Recorded) -> Result<(), KeeperError> {
    let url = format!("{}/v1/shutdown", hive.url);
    let mut request = reqwest::Client::new()
        .post(&url)
        .timeout(Duration::from_secs(10));
    if let Some(token) = &ctx.settings.cluster_token {
        request = request.bearer_auth(token);
    }
    // A hive that is already on its way out may not answer; its exit is what counts.
    if let Ok(response) = request.send().await {
        check(response, &format!("the hive at {}", hive.url)).await?;
    }
    if !local::wait_gone(hive.pid, DaemonKind::Hive.binary(), STOP_TIMEOUT).await {
        return Err(KeeperError::Timeout(format!(
            "the hive at {} (pid {}) still runs {STOP_TIMEOUT:?} after it was asked to stop",
            hive.url, hive.pid
        )));
    }
    ctx.state()?.forget(DaemonKind::Hive);
    Ok(())
}

/// The queen URL the recorded hive was started with (from its command line).
pub(crate) fn hive_queen_url(hive: &Recorded) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", hive.pid)).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.windows(2)
        .find(|pair| pair[0] == "--queen-url")
        .map(|pair| pair[1].clone())
}
