//! `worker spawn|list|stop`, through the queen (which forwards spawn and stop to the hive).

use rbee_contract::{Operation, WorkerInfo, WorkerSpawnRequest, WorkerTarget};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Outcome;
use crate::cli::{WorkerListArgs, WorkerSpawnArgs, WorkerStopArgs};
use crate::commands::cluster::ensure_cluster;
use crate::commands::{Ctx, Show, follow, resolve_model, table, until_interrupted};
use crate::error::KeeperError;

pub(crate) async fn spawn(ctx: &mut Ctx<'_>, args: WorkerSpawnArgs) -> Result<(), KeeperError> {
    let model = resolve_model(&args.model, ctx.queen.url().is_local())?;
    let interrupt = ctx.interrupt.clone();
    until_interrupted(&interrupt, ensure_cluster(ctx)).await?;
    let operation = Operation::WorkerSpawn(WorkerSpawnRequest {
        hive_id: args.hive,
        model,
        device: args.device,
    });
    let what = format!("the queen at {}", ctx.queen.url());
    let handle = ctx
        .queen
        .jobs()
        .submit(&operation)
        .await
        .map_err(|e| KeeperError::client(&what, e))?;
    let end = follow(ctx, handle, &what, Show::Nothing).await?;
    // The hive ends a spawn with `data {"worker": WorkerInfo}`.
    let Some((raw, worker)) = end.data.iter().find_map(|d| {
        let worker = WorkerInfo::deserialize(d.get("worker")?).ok()?;
        Some((d, worker))
    }) else {
        return Err(KeeperError::Client(
            "the spawn job ended without describing the worker".into(),
        ));
    };
    if ctx.console.json() {
        ctx.console.out_json(raw)?;
    } else {
        ctx.console.out_line(&format!(
            "worker {} ready at {} ({} on {}{})",
            worker.worker_id,
            worker.url,
            worker.model,
            worker.device,
            worker
                .hive_id
                .as_deref()
                .map(|h| format!(", hive {h}"))
                .unwrap_or_default()
        ))?;
    }
    Ok(())
}

pub(crate) async fn list(ctx: &mut Ctx<'_>, args: WorkerListArgs) -> Result<Outcome, KeeperError> {
    let (raw, workers) = ctx.queen.workers().await?;
    let keep = |hive_id: Option<&str>| args.hive.as_deref().is_none_or(|h| hive_id == Some(h));
    if ctx.console.json() {
        let filtered = match (&args.hive, raw.get("workers").and_then(Value::as_array)) {
            (Some(_), Some(list)) => {
                let list: Vec<&Value> = list
                    .iter()
                    .filter(|w| keep(w.get("hive_id").and_then(Value::as_str)))
                    .collect();
                json!({ "workers": list })
            }
            _ => raw,
        };
        ctx.console.out_json(&filtered)?;
        return Ok(Outcome::Done);
    }
    let workers: Vec<&WorkerInfo> = workers
        .iter()
        .filter(|w| keep(w.hive_id.as_deref()))
        .collect();
    if workers.is_empty() {
        ctx.console.out_line("no workers")?;
        return Ok(Outcome::Done);
    }
    let mut rows = vec![vec![
        "WORKER".to_owned(),
        "HIVE".into(),
        "STATE".into(),
        "SLOTS FREE".into(),
        "DEVICE".into(),
        "URL".into(),
        "MODEL".into(),
    ]];
    for w in workers {
        rows.push(vec![
            w.worker_id.clone(),
            w.hive_id.clone().unwrap_or_else(|| "-".into()),
            serde_json::to_value(w.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            format!("{}/{}", w.slots_free, w.slots_total),
            w.device.clone(),
            w.url.clone(),
            w.model.clone(),
        ]);
    }
    ctx.console.out(&table(&rows))?;
    Ok(Outcome::Done)
}

pub(crate) async fn stop(ctx: &mut Ctx<'_>, args: WorkerStopArgs) -> Result<(), KeeperError> {
    let interrupt = ctx.interrupt.clone();
    let hive_id = match args.hive {
        Some(hive) => Some(hive),
        // With several hives the queen needs to be told which; the worker list knows.
        None => until_interrupted(&interrupt, ctx.queen.workers())
            .await?
            .1
            .into_iter()
            .find(|w| w.worker_id == args.worker_id)
            .and_then(|w| w.hive_id),
    };
    let operation = Operation::WorkerDelete(WorkerTarget {
        hive_id,
        worker_id: args.worker_id.clone(),
    });
    let what = format!("the queen at {}", ctx.queen.url());
    let handle = ctx
        .queen
        .jobs()
        .submit(&operation)
        .await
        .map_err(|e| KeeperError::client(&what, e))?;
    follow(ctx, handle, &what, Show::Nothing).await?;
    if ctx.console.json() {
        ctx.console
            .out_json(&json!({"worker_id": args.worker_id, "stopped": true}))?;
    } else {
        ctx.console
            .out_line(&format!("worker {} stopped", args.worker_id))?;
    }
    Ok(())
}
