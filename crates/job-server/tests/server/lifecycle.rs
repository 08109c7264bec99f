//! Timeouts, retention and shutdown, in paused time through the in-process API.

use std::time::Duration;

use job_server::{JobOptions, JobServer, JobServerConfig, JobStats, JobSubscription};
use rbee_contract::{ErrorCode, JobEvent};

use crate::common::{ScriptExecutor, error_code, infer, within};

fn config() -> JobServerConfig {
    JobServerConfig {
        retention: Duration::from_secs(60),
        unclaimed_timeout: Duration::from_secs(10),
        detached_timeout: Duration::from_secs(20),
        ..JobServerConfig::default()
    }
}

async fn drain(mut subscription: JobSubscription) -> Vec<JobEvent> {
    within(async {
        let mut events = Vec::new();
        while let Some(item) = subscription.next().await {
            events.push((*item.event).clone());
        }
        events
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn finished_jobs_are_removed_after_the_retention_period() -> anyhow::Result<()> {
    let jobs = JobServer::new(ScriptExecutor::default(), config());
    let created = jobs.create(infer("tokens 2"), JobOptions::default())?;
    let events = drain(jobs.subscribe(&created.job_id, None)?).await;
    assert!(matches!(events.last(), Some(JobEvent::Done { .. })));
    assert_eq!(
        jobs.stats(),
        JobStats {
            running: 0,
            finished: 1
        }
    );

    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(
        drain(jobs.subscribe(&created.job_id, Some(2))?).await.len(),
        1,
        "still readable"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(jobs.stats(), JobStats::default());
    let gone = jobs.subscribe(&created.job_id, None).unwrap_err();
    assert_eq!(gone.code, ErrorCode::NotFound);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_job_nobody_claims_is_cancelled() -> anyhow::Result<()> {
    let jobs = JobServer::new(ScriptExecutor::default(), config());
    let created = jobs.create(infer("hang"), JobOptions::default())?;
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(jobs.stats().running, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(jobs.executor().observed.was_cancelled(&created.job_id));

    let events = drain(jobs.subscribe(&created.job_id, None)?).await;
    match events.as_slice() {
        [
            JobEvent::Started { .. },
            JobEvent::Error {
                code: ErrorCode::Cancelled,
                message,
            },
        ] => {
            assert!(message.contains("no client opened"), "{message}");
        }
        other => panic!("unexpected events {other:?}"),
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_detached_job_waits_for_a_resume_then_gives_up() -> anyhow::Result<()> {
    let jobs = JobServer::new(ScriptExecutor::default(), config());
    let options = JobOptions {
        cancel_on_disconnect: false,
    };
    let id = jobs.create(infer("hang"), options)?.job_id;

    let mut first = jobs.subscribe(&id, None)?;
    assert_eq!(first.next().await.map(|e| e.seq), Some(1));
    drop(first);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(!jobs.executor().observed.was_cancelled(&id));

    // A resume resets the clock.
    drop(jobs.subscribe(&id, Some(1))?);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(!jobs.executor().observed.was_cancelled(&id));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(jobs.executor().observed.was_cancelled(&id));

    let events = drain(jobs.subscribe(&id, Some(1))?).await;
    match events.as_slice() {
        [
            JobEvent::Error {
                code: ErrorCode::Cancelled,
                message,
            },
        ] => {
            assert!(message.contains("reconnected"), "{message}");
        }
        other => panic!("unexpected events {other:?}"),
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_running_jobs_finish_and_refuses_new_ones() -> anyhow::Result<()> {
    let jobs = JobServer::new(ScriptExecutor::default(), config());
    let a = jobs
        .create(infer("tokens 5 100"), JobOptions::default())?
        .job_id;
    let b = jobs
        .create(infer("tokens 3 200"), JobOptions::default())?
        .job_id;
    let (sub_a, sub_b) = (jobs.subscribe(&a, None)?, jobs.subscribe(&b, None)?);

    let draining = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.shutdown(Duration::from_secs(5)).await }
    });
    tokio::task::yield_now().await;
    assert!(jobs.is_shutting_down());
    let refused = jobs
        .create(infer("tokens 1"), JobOptions::default())
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::ShuttingDown);
    assert_eq!(refused.status, 503);

    for (events, tokens) in [(drain(sub_a).await, 5), (drain(sub_b).await, 3)] {
        assert!(
            matches!(events.last(), Some(JobEvent::Done { .. })),
            "{events:?}"
        );
        let count = events
            .iter()
            .filter(|e| matches!(e, JobEvent::Token { .. }))
            .count();
        assert_eq!(count, tokens, "every token arrived: {events:?}");
        assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
    }
    assert!(
        draining.await?,
        "every job finished within the grace period"
    );
    assert_eq!(
        jobs.stats(),
        JobStats::default(),
        "retention ends with the server"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_jobs_still_running_at_the_deadline_with_shutting_down() -> anyhow::Result<()>
{
    let jobs = JobServer::new(ScriptExecutor::default(), config());
    let a = jobs.create(infer("hang"), JobOptions::default())?.job_id;
    let b = jobs
        .create(infer("tokens 1000000 1000"), JobOptions::default())?
        .job_id;
    let quick = jobs
        .create(infer("tokens 2 100"), JobOptions::default())?
        .job_id;
    let subs = [
        jobs.subscribe(&a, None)?,
        jobs.subscribe(&b, None)?,
        jobs.subscribe(&quick, None)?,
    ];

    let started = tokio::time::Instant::now();
    assert!(
        !jobs.shutdown(Duration::from_secs(5)).await,
        "two jobs were still running at the deadline"
    );
    assert!(started.elapsed() >= Duration::from_secs(5), "it waited");
    assert!(jobs.executor().observed.was_cancelled(&a));
    assert!(
        jobs.executor()
            .observed
            .wait_run_ended(&b, Duration::from_secs(1))
            .await
    );
    let [sub_a, sub_b, sub_quick] = subs;
    for events in [drain(sub_a).await, drain(sub_b).await] {
        match events.last() {
            Some(JobEvent::Error {
                code: ErrorCode::ShuttingDown,
                message,
            }) => {
                assert!(message.contains("shut down"), "{message}");
            }
            other => panic!("unexpected terminal {other:?}"),
        }
        assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
    }
    let events = drain(sub_quick).await;
    assert!(
        matches!(events.last(), Some(JobEvent::Done { .. })),
        "{events:?}"
    );
    assert_eq!(jobs.stats(), JobStats::default());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn dropping_a_subscription_before_the_end_cancels_the_job() -> anyhow::Result<()> {
    let jobs = JobServer::new(ScriptExecutor::default(), config());
    let id = jobs.create(infer("hang"), JobOptions::default())?.job_id;
    let mut subscription = jobs.subscribe(&id, None)?;
    assert!(subscription.next().await.is_some());
    drop(subscription);
    assert!(
        jobs.executor()
            .observed
            .wait_cancelled(&id, Duration::from_secs(1))
            .await
    );
    let events = drain(jobs.subscribe(&id, Some(1))?).await;
    assert_eq!(
        events.iter().map(error_code).collect::<Vec<_>>(),
        vec![Some(ErrorCode::Cancelled)]
    );
    Ok(())
}
