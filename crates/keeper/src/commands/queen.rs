//! `queen start|stop|status`.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::Outcome;
use crate::commands::Ctx;
use crate::commands::cluster::{self, STOP_TIMEOUT, hive_queen_url, started_here};
use crate::error::KeeperError;
use crate::local::{self, DaemonKind};

pub(crate) async fn start(ctx: &mut Ctx<'_>, extra: Vec<String>) -> Result<Outcome, KeeperError> {
    let url = ctx.queen.url().base();
    let launched = if ctx.queen.health().await.is_ok() {
        None
    } else {
        cluster::start_queen(ctx, &extra).await?
    };
    match (launched, ctx.console.json()) {
        (Some(queen), true) => ctx.console.out_json(&json!({
            "url": queen.url, "pid": queen.pid, "started": true, "log": queen.log,
        }))?,
        (Some(queen), false) => ctx.console.out_line(&format!(
            "queen started at {} (pid {}, log {})",
            queen.url,
            queen.pid,
            queen.log.display()
        ))?,
        (None, true) => {
            let pid = started_here(ctx)?.map(|r| r.pid);
            ctx.console
                .out_json(&json!({"url": url, "pid": pid, "started": false}))?;
        }
        (None, false) => ctx
            .console
            .out_line(&format!("a queen is already running at {url}"))?,
    }
    Ok(Outcome::Done)
}

/// `POST /v1/shutdown`, then waits until the queen is gone, and with it the local hive that
/// reports to it. The queen first lets its running jobs finish (up to the grace period it
/// announces), then stops its hives and waits for them, then exits, so the wait allows for
/// all of that; a local hive that outlives the queen is stopped directly.
pub(crate) async fn stop(ctx: &mut Ctx<'_>) -> Result<Outcome, KeeperError> {
    let url = ctx.queen.url().base();
    let state = ctx.state()?;
    let recorded_queen = started_here(ctx)?;
    let our_hive = state
        .running(DaemonKind::Hive)
        .filter(|h| hive_queen_url(h).as_deref() == Some(url.as_str()));

    let was_running = ctx.queen.health().await.is_ok();
    let mut hives_told = None;
    if was_running {
        let plan = ctx.queen.shutdown().await?;
        hives_told = plan.hives;
        if let Some(grace) = plan.grace() {
            ctx.console.note(&format!(
                "the queen lets running jobs finish (up to {grace:?}), then stops {} hive(s)",
                plan.hives.unwrap_or(0)
            ));
        }
        let limit = STOP_TIMEOUT + plan.grace().unwrap_or_default();
        wait_queen_gone(ctx, recorded_queen.as_ref().map(|r| r.pid), limit).await?;
    }
    state.forget(DaemonKind::Queen);

    let mut hive_stopped = false;
    if let Some(hive) = our_hive {
        let cascaded = was_running
            && local::wait_gone(hive.pid, DaemonKind::Hive.binary(), STOP_TIMEOUT).await;
        if !cascaded {
            cluster::stop_local_hive(ctx, &hive).await?;
        }
        state.forget(DaemonKind::Hive);
        hive_stopped = true;
    }

    if ctx.console.json() {
        ctx.console.out_json(&json!({
            "url": url, "stopped": was_running, "hive_stopped": hive_stopped,
            "hives_told": hives_told,
        }))?;
    } else {
        let queen = match (was_running, hives_told) {
            (true, Some(n)) => format!("queen at {url} stopped; it told {n} hive(s) to stop"),
            (true, None) => format!("queen at {url} stopped"),
            (false, _) => format!("no queen was running at {url}"),
        };
        let hive = if hive_stopped {
            "; local hive stopped"
        } else {
            ""
        };
        ctx.console.out_line(&format!("{queen}{hive}"))?;
    }
    Ok(Outcome::Done)
}

async fn wait_queen_gone(
    ctx: &Ctx<'_>,
    pid: Option<u32>,
    limit: Duration,
) -> Result<(), KeeperError> {
    let deadline = Instant::now() + limit;
    loop {
        let answering = ctx.queen.health().await.is_ok();
        let running =
            pid.is_some_and(|pid| local::process_running(pid, DaemonKind::Queen.binary()));
        if !answering && !running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(KeeperError::Timeout(format!(
                "the queen at {} still runs {limit:?} after /v1/shutdown",
                ctx.queen.url()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn status(ctx: &mut Ctx<'_>) -> Result<Outcome, KeeperError> {
    let url = ctx.queen.url().base();
    let pid = started_here(ctx)?.map(|r| r.pid);
    if let Err(reason) = ctx.queen.health().await {
        if ctx.console.json() {
            ctx.console
                .out_json(&json!({"url": url, "running": false, "reason": reason}))?;
        } else {
            ctx.console
                .out_line(&format!("no queen is running at {url} ({reason})"))?;
        }
        return Ok(Outcome::NotRunning);
    }
    let (_, hives) = ctx.queen.hives().await?;
    let (_, workers) = ctx.queen.workers().await?;
    let healthy = hives.iter().filter(|h| h.status == "healthy").count();
    if ctx.console.json() {
        ctx.console.out_json(&json!({
            "url": url, "running": true, "pid": pid,
            "hives": hives.len(), "healthy_hives": healthy, "workers": workers.len(),
        }))?;
    } else {
        let pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        ctx.console.out_line(&format!(
            "queen running at {url}{pid}: {} hive(s), {healthy} healthy; {} worker(s)",
            hives.len(),
            workers.len()
        ))?;
    }
    Ok(Outcome::Done)
}
