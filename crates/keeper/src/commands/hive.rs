//! `hive start|stop|status|list`. Start, stop and status concern the local hive the keeper
//! started; list asks the queen about every hive of the cluster.

use serde_json::json;

use crate::Outcome;
use crate::cli::HiveStartArgs;
use crate::commands::cluster::{self, registration_error};
use crate::commands::{Ctx, table};
use crate::error::KeeperError;
use crate::local::DaemonKind;
use crate::queen_api::HiveEntry;

pub(crate) async fn start(ctx: &mut Ctx<'_>, args: HiveStartArgs) -> Result<Outcome, KeeperError> {
    if let Some(hive) = ctx.state()?.running(DaemonKind::Hive) {
        if ctx.console.json() {
            ctx.console
                .out_json(&json!({"url": hive.url, "pid": hive.pid, "started": false}))?;
        } else {
            ctx.console.out_line(&format!(
                "a local hive is already running at {} (pid {})",
                hive.url, hive.pid
            ))?;
        }
        return Ok(Outcome::Done);
    }
    let (launched, hive_id) =
        cluster::start_hive(ctx, args.port, args.hive_id, &args.pass.extra).await?;
    let registered = match ctx.queen.health().await {
        Ok(()) => {
            cluster::wait_registered(ctx, Some(&hive_id))
                .await
                .map_err(|e| registration_error(e, &launched))?;
            true
        }
        Err(reason) => {
            ctx.console.note(&format!(
                "the queen at {} does not answer ({reason}); the hive registers when it does",
                ctx.queen.url()
            ));
            false
        }
    };
    if ctx.console.json() {
        ctx.console.out_json(&json!({
            "hive_id": hive_id, "url": launched.url, "pid": launched.pid, "started": true,
            "registered": registered, "log": launched.log,
        }))?;
    } else {
        ctx.console.out_line(&format!(
            "hive {hive_id} started at {} (pid {}, log {})",
            launched.url,
            launched.pid,
            launched.log.display()
        ))?;
    }
    Ok(Outcome::Done)
}

pub(crate) async fn stop(ctx: &mut Ctx<'_>) -> Result<Outcome, KeeperError> {
    let Some(hive) = ctx.state()?.running(DaemonKind::Hive) else {
        if ctx.console.json() {
            ctx.console.out_json(&json!({"stopped": false}))?;
        } else {
            ctx.console.out_line("no local hive is running")?;
        }
        return Ok(Outcome::Done);
    };
    cluster::stop_local_hive(ctx, &hive).await?;
    if ctx.console.json() {
        ctx.console
            .out_json(&json!({"url": hive.url, "pid": hive.pid, "stopped": true}))?;
    } else {
        ctx.console
            .out_line(&format!("hive at {} stopped", hive.url))?;
    }
    Ok(Outcome::Done)
}

pub(crate) async fn status(ctx: &mut Ctx<'_>) -> Result<Outcome, KeeperError> {
    let local = ctx.state()?.running(DaemonKind::Hive);
    // Registration is looked up by URL: the hive advertises the address it was started on.
    let registration: Result<Option<HiveEntry>, KeeperError> = match &local {
        Some(hive) => ctx
            .queen
            .hives()
            .await
            .map(|(_, hives)| hives.into_iter().find(|h| h.info.url == hive.url)),
        None => Ok(None),
    };
    if ctx.console.json() {
        let (registered, entry, queen_error) = match &registration {
            Ok(entry) => (entry.is_some(), entry.as_ref(), None),
            Err(err) => (false, None, Some(err.to_string())),
        };
        ctx.console.out_json(&json!({
            "running": local.is_some(),
            "pid": local.as_ref().map(|h| h.pid),
            "url": local.as_ref().map(|h| &h.url),
            "registered": registered,
            "hive_id": entry.map(|e| &e.info.hive_id),
            "status": entry.map(|e| &e.status),
            "queen_error": queen_error,
        }))?;
    } else {
        match &local {
            Some(hive) => {
                let at_queen = match &registration {
                    Ok(Some(entry)) => {
                        format!("registered as {} ({})", entry.info.hive_id, seen(entry))
                    }
                    Ok(None) => format!("not registered with the queen at {}", ctx.queen.url()),
                    Err(err) => format!("queen unknown: {err}"),
                };
                ctx.console.out_line(&format!(
                    "local hive running at {} (pid {}); {at_queen}",
                    hive.url, hive.pid
                ))?;
            }
            None => ctx.console.out_line("no local hive is running")?,
        }
    }
    Ok(if local.is_some() {
        Outcome::Done
    } else {
        Outcome::NotRunning
    })
}

pub(crate) async fn list(ctx: &mut Ctx<'_>) -> Result<Outcome, KeeperError> {
    let (raw, hives) = ctx.queen.hives().await?;
    if ctx.console.json() {
        ctx.console.out_json(&raw)?;
        return Ok(Outcome::Done);
    }
    if hives.is_empty() {
        ctx.console.out_line(&format!(
            "no hives are registered with the queen at {}",
            ctx.queen.url()
        ))?;
        return Ok(Outcome::Done);
    }
    let mut rows = vec![vec![
        "HIVE".to_owned(),
        "STATUS".into(),
        "URL".into(),
        "WORKERS".into(),
        "DEVICES".into(),
    ]];
    for hive in &hives {
        rows.push(vec![
            hive.info.hive_id.clone(),
            seen(hive),
            hive.info.url.clone(),
            hive.info.workers.len().to_string(),
            hive.info
                .devices
                .iter()
                .map(|d| d.id.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    ctx.console.out(&table(&rows))?;
    Ok(Outcome::Done)
}

fn seen(hive: &HiveEntry) -> String {
    match hive.last_seen_ms_ago {
        Some(ms) => format!("{}, seen {:.1}s ago", hive.status, ms as f64 / 1000.0),
        None => hive.status.clone(),
    }
}
