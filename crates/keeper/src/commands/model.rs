//! `model download|list|get|rm`: a hive's model catalog, through the queen (which forwards
//! each operation to the hive named, or the only one).

use rbee_contract::{HiveTarget, ModelDetails, ModelTarget, Operation};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cli::{ModelArgs, ModelListArgs};
use crate::commands::cluster::ensure_cluster;
use crate::commands::{Ctx, JobEnd, Show, follow, table, until_interrupted};
use crate::error::KeeperError;

pub(crate) async fn download(ctx: &mut Ctx<'_>, args: ModelArgs) -> Result<(), KeeperError> {
    let model = hub_model(&args.model)?;
    let interrupt = ctx.interrupt.clone();
    until_interrupted(&interrupt, ensure_cluster(ctx)).await?;
    let end = run(
        ctx,
        Operation::ModelDownload(ModelTarget {
            hive_id: args.hive,
            model,
        }),
    )
    .await?;
    let (raw, details) = one_model(&end)?;
    if ctx.console.json() {
        return ctx.console.out_json(raw);
    }
    ctx.console.out_line(&format!(
        "{} ready ({}, sha256 {})",
        details.entry.id,
        size(details.entry.size_bytes),
        details.sha256.as_deref().unwrap_or("-")
    ))
}

pub(crate) async fn list(ctx: &mut Ctx<'_>, args: ModelListArgs) -> Result<(), KeeperError> {
    let end = run(ctx, Operation::ModelList(HiveTarget { hive_id: args.hive })).await?;
    let Some((raw, models)) = end.data.iter().find_map(|d| {
        let models = Vec::<ModelDetails>::deserialize(d.get("models")?).ok()?;
        Some((d, models))
    }) else {
        return Err(KeeperError::Client(
            "the model list job ended without a list".into(),
        ));
    };
    if ctx.console.json() {
        return ctx.console.out_json(raw);
    }
    if models.is_empty() {
        return ctx.console.out_line("no models");
    }
    let mut rows = vec![vec![
        "MODEL".to_owned(),
        "STATE".into(),
        "SIZE".into(),
        "SOURCE".into(),
    ]];
    for m in &models {
        rows.push(vec![
            m.entry.id.clone(),
            state_name(&m.entry.state),
            size(m.entry.size_bytes),
            m.entry.source.clone(),
        ]);
    }
    ctx.console.out(&table(&rows))
}

pub(crate) async fn get(ctx: &mut Ctx<'_>, args: ModelArgs) -> Result<(), KeeperError> {
    let model = hub_model(&args.model)?;
    let end = run(
        ctx,
        Operation::ModelGet(ModelTarget {
            hive_id: args.hive,
            model,
        }),
    )
    .await?;
    let (raw, m) = one_model(&end)?;
    if ctx.console.json() {
        return ctx.console.out_json(raw);
    }
    let mut rows = vec![
        vec!["id".to_owned(), m.entry.id.clone()],
        vec!["source".into(), m.entry.source.clone()],
        vec!["state".into(), state_name(&m.entry.state)],
        vec!["size".into(), size(m.entry.size_bytes)],
    ];
    let optional = [
        ("file", m.file.clone()),
        ("sha256", m.sha256.clone()),
        ("added", m.added_at.map(|t| format!("{t} (unix seconds)"))),
        (
            "last used",
            m.last_used_at.map(|t| format!("{t} (unix seconds)")),
        ),
        ("error", m.error.clone()),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            rows.push(vec![key.to_owned(), value]);
        }
    }
    ctx.console.out(&table(&rows))
}

pub(crate) async fn remove(ctx: &mut Ctx<'_>, args: ModelArgs) -> Result<(), KeeperError> {
    let model = hub_model(&args.model)?;
    run(
        ctx,
        Operation::ModelDelete(ModelTarget {
            hive_id: args.hive,
            model: model.clone(),
        }),
    )
    .await?;
    if ctx.console.json() {
        ctx.console
            .out_json(&json!({"model": model, "deleted": true}))
    } else {
        ctx.console.out_line(&format!("{model} deleted"))
    }
}

/// Submits `operation` to the queen and follows it; progress goes to stderr.
async fn run(ctx: &mut Ctx<'_>, operation: Operation) -> Result<JobEnd, KeeperError> {
    let what = format!("the queen at {}", ctx.queen.url());
    let handle = ctx
        .queen
        .jobs()
        .submit(&operation)
        .await
        .map_err(|e| KeeperError::client(&what, e))?;
    follow(ctx, handle, &what, Show::Nothing).await
}

/// Catalog commands take hub references; the hive says what is wrong with a malformed one.
fn hub_model(model: &str) -> Result<String, KeeperError> {
    let model = model.trim();
    if !model.starts_with("hf:") {
        return Err(KeeperError::Usage(format!(
            "`{model}` is not a hub model: write hf:org/repo or hf:org/repo:file.gguf \
             (local files need no download)"
        )));
    }
    Ok(model.to_owned())
}

fn one_model(end: &JobEnd) -> Result<(&Value, ModelDetails), KeeperError> {
    end.data
        .iter()
        .find_map(|d| {
            let model = ModelDetails::deserialize(d.get("model")?).ok()?;
            Some((d, model))
        })
        .ok_or_else(|| KeeperError::Client("the job ended without describing the model".into()))
}

fn state_name(state: &rbee_contract::ModelState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hub_models_are_catalog_commands() {
        assert_eq!(hub_model(" hf:a/b ").unwrap(), "hf:a/b");
        let err = hub_model("/models/m.gguf").unwrap_err();
        assert!(matches!(err, KeeperError::Usage(_)));
        assert!(err.to_string().contains("hf:org/repo"));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(98_362_432), "93.8 MiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
    }
}
