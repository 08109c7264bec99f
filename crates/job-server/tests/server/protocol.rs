//! The wire protocol: creation, streaming, buffering, resume and request validation.

use std::time::Duration;

use futures::StreamExt;
use job_client::ClientError;
use job_server::JobServerConfig;
use rbee_contract::{ErrorCode, FinishReason, JobCreated, JobEvent, Usage};

use crate::common::{
    TestServer, assert_api_error, assert_well_formed, infer, token_indices, within,
};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn create_then_stream_delivers_tokens_done_and_the_sentinel() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig::default()).await?;

    let response = t
        .http
        .post(t.url("/v1/jobs"))
        .json(&infer("tokens 3"))
        .send()
        .await?;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str()?.to_owned();
    let created: JobCreated = response.json().await?;
    assert_eq!(
        created.sse_url,
        format!("/v1/jobs/{}/stream", created.job_id)
    );
    assert_eq!(location, created.sse_url);

    let response = t.http.get(t.url(&created.sse_url)).send().await?;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()?
            .starts_with("text/event-stream")
    );
    let blocks = crate::common::parse_sse(&response.text().await?);
    let events = assert_well_formed(&blocks);
    assert_eq!(blocks[0].id.as_deref(), Some("1"));
    assert_eq!(
        events,
        vec![
            JobEvent::Token {
                text: "t0 ".into(),
                token_id: 0,
                index: 0,
                logprobs: None
            },
            JobEvent::Token {
                text: "t1 ".into(),
                token_id: 1,
                index: 1,
                logprobs: None
            },
            JobEvent::Token {
                text: "t2 ".into(),
                token_id: 2,
                index: 2,
                logprobs: None
            },
            JobEvent::Done {
                finish_reason: FinishReason::Length,
                usage: Some(Usage::new(3, 3))
            },
        ]
    );
    Ok(())
}

#[tokio::test]
async fn job_client_follows_a_job_to_its_end() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig::default()).await?;
    let mut seen = Vec::new();
    let terminal = within(
        t.client()
            .run_to_end(&infer("tokens 4 1"), |e| seen.push(e.clone())),
    )
    .await?;
    assert_eq!(token_indices(&seen), vec![0, 1, 2, 3]);
    assert_eq!(
        terminal,
        JobEvent::Done {
            finish_reason: FinishReason::Length,
            usage: Some(Usage::new(3, 4))
        }
    );
    Ok(())
}

#[tokio::test]
async fn a_job_starts_before_its_stream_is_opened_and_nothing_is_lost() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig {
        buffer_capacity: 16,
        ..JobServerConfig::default()
    })
    .await?;
    let id = t.create("tokens 10").await?;
    assert!(
        t.observed().wait_run_ended(&id, WAIT).await,
        "the job ran to its end with no reader"
    );
    assert_eq!(t.observed().emitted(), 10);

    let events = assert_well_formed(&t.read_stream(&id, None).await?);
    assert_eq!(token_indices(&events), (0..10).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn a_full_buffer_holds_the_job_back_instead_of_dropping_events() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig {
        buffer_capacity: 2,
        ..JobServerConfig::default()
    })
    .await?;
    let id = t.create("tokens 50").await?;

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        t.observed().emitted(),
        2,
        "emit waits while the buffer is full of unread events"
    );
    assert_eq!(t.jobs.stats().running, 1);

    let handle = t.client().handle(JobCreated {
        sse_url: format!("/v1/jobs/{id}/stream"),
        job_id: id,
    });
    let events: Vec<JobEvent> =
        within(handle.events().map(|e| e.expect("a job event")).collect()).await;
    assert_eq!(token_indices(&events), (0..50).collect::<Vec<_>>());
    assert!(matches!(events.last(), Some(JobEvent::Done { .. })));
    assert_eq!(t.observed().emitted(), 50);
    Ok(())
}

#[tokio::test]
async fn last_event_id_resumes_after_that_event() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig::default()).await?;
    let id = t.create("tokens 5").await?;
    assert!(t.observed().wait_run_ended(&id, WAIT).await);

    let blocks = t.read_stream(&id, Some("3")).await?;
    assert_eq!(blocks[0].id.as_deref(), Some("4"));
    let events = assert_well_formed(&blocks);
    assert_eq!(token_indices(&events), vec![3, 4]);

    let handle = t.client().handle(JobCreated {
        sse_url: format!("/v1/jobs/{id}/stream"),
        job_id: id,
    });
    let events: Vec<JobEvent> = within(
        handle
            .events_after(5)
            .map(|e| e.expect("a job event"))
            .collect(),
    )
    .await;
    assert!(
        matches!(events.as_slice(), [JobEvent::Done { .. }]),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test]
async fn resuming_from_an_evicted_or_unknown_id_is_a_clear_error() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig {
        buffer_capacity: 2,
        ..JobServerConfig::default()
    })
    .await?;
    let id = t.create("tokens 10").await?;
    let events = assert_well_formed(&t.read_stream(&id, None).await?);
    assert_eq!(token_indices(&events).len(), 10);

    let stream = t.url(&format!("/v1/jobs/{id}/stream"));
    let evicted = t
        .http
        .get(&stream)
        .header("Last-Event-ID", "1")
        .send()
        .await?;
    let message = assert_api_error(evicted, 410, ErrorCode::NotFound).await?;
    assert!(message.contains("no longer buffered"), "{message}");
    let from_start = t.http.get(&stream).send().await?;
    assert_api_error(from_start, 410, ErrorCode::NotFound).await?;

    let ahead = t
        .http
        .get(&stream)
        .header("Last-Event-ID", "99")
        .send()
        .await?;
    assert_api_error(ahead, 400, ErrorCode::BadRequest).await?;
    let garbage = t
        .http
        .get(&stream)
        .header("Last-Event-ID", "abc")
        .send()
        .await?;
    assert_api_error(garbage, 400, ErrorCode::BadRequest).await?;

    // Events still held are served after the evicted ones.
    let tail = assert_well_formed(&t.read_stream(&id, Some("9")).await?);
    assert_eq!(token_indices(&tail), vec![9]);
    Ok(())
}

#[tokio::test]
async fn a_finished_job_keeps_its_terminal_event_and_a_tail_within_the_byte_budget()
-> anyhow::Result<()> {
    let budget = 2000;
    let t = TestServer::start(JobServerConfig {
        retained_tail_bytes: budget,
        ..JobServerConfig::default()
    })
    .await?;
    let id = t.create("tokens 300").await?;
    let full = t.read_stream(&id, None).await?;
    let events = assert_well_formed(&full);
    assert_eq!(token_indices(&events), (0..300).collect::<Vec<_>>());

    // The tail the budget allows: the newest events whose JSON fits in it, counted on the wire.
    let (terminal, tokens) = full[..full.len() - 1].split_last().unwrap();
    let mut kept_bytes = 0;
    let kept = tokens
        .iter()
        .rev()
        .take_while(|b| {
            kept_bytes += b.data.len();
            kept_bytes <= budget
        })
        .count();
    assert!(
        kept > 0 && kept < tokens.len(),
        "the job outgrew the budget"
    );
    let oldest: u64 = tokens[tokens.len() - kept].id.as_deref().unwrap().parse()?;

    let resumed = t.read_stream(&id, Some(&(oldest - 1).to_string())).await?;
    assert_well_formed(&resumed);
    assert_eq!(
        resumed,
        full[full.len() - kept - 2..],
        "a resume within the tail gets exactly the events after its id"
    );
    let tail_bytes: usize = resumed[..resumed.len() - 2]
        .iter()
        .map(|b| b.data.len())
        .sum();
    assert!(tail_bytes <= budget, "{tail_bytes} bytes kept");

    let last = t
        .read_stream(&id, Some(&(oldest + kept as u64 - 1).to_string()))
        .await?;
    assert_eq!(last, full[full.len() - 2..], "the terminal event is kept");
    assert_eq!(
        terminal.id.as_deref(),
        Some((oldest + kept as u64).to_string().as_str())
    );

    let stream = t.url(&format!("/v1/jobs/{id}/stream"));
    for before in [None, Some(oldest - 2)] {
        let mut request = t.http.get(&stream);
        if let Some(id) = before {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let message = assert_api_error(request.send().await?, 410, ErrorCode::NotFound).await?;
        assert!(
            message.contains(&format!("before id {oldest}")),
            "{message}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_running_job_is_held_back_by_the_byte_budget_of_its_buffer() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig {
        buffer_bytes: 200,
        ..JobServerConfig::default()
    })
    .await?;
    let id = t.create("tokens 50").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = t.observed().emitted();
    // A token event here is about 60 bytes: the buffer takes events while under 200 bytes.
    assert!(
        (2..=5).contains(&held),
        "{held} events emitted with no reader"
    );

    let events = assert_well_formed(&t.read_stream(&id, None).await?);
    assert_eq!(token_indices(&events), (0..50).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn bad_requests_are_json_errors_and_create_no_job() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig {
        body_limit: 1024,
        ..JobServerConfig::default()
    })
    .await?;
    let post = |body: String| {
        t.http
            .post(t.url("/v1/jobs"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    assert_api_error(post("{not json".into()).await?, 400, ErrorCode::BadRequest).await?;
    assert_api_error(
        post(r#"{"operation":"infer","model":5}"#.into()).await?,
        400,
        ErrorCode::BadRequest,
    )
    .await?;
    assert_api_error(
        post(r#"{"model":"m","prompt":"x"}"#.into()).await?,
        400,
        ErrorCode::BadRequest,
    )
    .await?;
    let unknown = post(r#"{"operation":"dance"}"#.into()).await?;
    let message = assert_api_error(unknown, 400, ErrorCode::UnsupportedOperation).await?;
    assert!(message.contains("dance"), "{message}");
    // Known to the protocol, refused by this daemon's admission.
    assert_api_error(
        post(r#"{"operation":"model_list"}"#.into()).await?,
        400,
        ErrorCode::UnsupportedOperation,
    )
    .await?;
    assert_api_error(
        post(r#"{"operation":"infer","model":"m","prompt":"juggle"}"#.into()).await?,
        400,
        ErrorCode::BadRequest,
    )
    .await?;
    let huge = format!(
        r#"{{"operation":"infer","model":"m","prompt":"{}"}}"#,
        "x".repeat(4096)
    );
    assert_api_error(post(huge).await?, 413, ErrorCode::BadRequest).await?;
    let bad_option = t
        .http
        .post(t.url("/v1/jobs?cancel_on_disconnect=maybe"))
        .json(&infer("tokens 1"))
        .send()
        .await?;
    assert_api_error(bad_option, 400, ErrorCode::BadRequest).await?;

    let refused = t
        .client()
        .submit(&rbee_contract::Operation::ModelList(Default::default()))
        .await;
    match refused {
        Err(ClientError::Rejected {
            status: 400,
            code: ErrorCode::UnsupportedOperation,
            ..
        }) => {}
        other => panic!("expected a rejection, got {other:?}"),
    }

    assert_eq!(
        t.jobs.stats(),
        job_server::JobStats {
            running: 0,
            finished: 0
        }
    );
    Ok(())
}

#[tokio::test]
async fn unknown_jobs_are_404() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig::default()).await?;
    let stream = t
        .http
        .get(t.url("/v1/jobs/no-such-job/stream"))
        .send()
        .await?;
    assert_api_error(stream, 404, ErrorCode::NotFound).await?;
    let cancel = t.http.delete(t.url("/v1/jobs/no-such-job")).send().await?;
    assert_api_error(cancel, 404, ErrorCode::NotFound).await?;
    Ok(())
}

#[tokio::test]
async fn create_route_serves_the_same_protocol_under_another_path() -> anyhow::Result<()> {
    let jobs = job_server::JobServer::new(
        crate::common::ScriptExecutor::default(),
        JobServerConfig::default(),
    );
    let app: axum::Router = axum::Router::new()
        .route("/v1/inference", jobs.create_route())
        .merge(jobs.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = job_client::JobClient::new(&base);
    let handle = client
        .submit_to("/v1/inference", &infer("tokens 2"))
        .await?;
    let events: Vec<JobEvent> =
        within(handle.events().map(|e| e.expect("a job event")).collect()).await;
    assert_eq!(token_indices(&events), vec![0, 1]);
    assert!(matches!(events.last(), Some(JobEvent::Done { .. })));
    Ok(())
}

#[tokio::test]
async fn a_terminal_event_cannot_be_emitted_so_there_is_exactly_one() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig::default()).await?;
    let id = t.create("emit_terminal").await?;
    let events = assert_well_formed(&t.read_stream(&id, None).await?);
    assert_eq!(
        events,
        vec![
            JobEvent::narration("terminal event refused"),
            JobEvent::Done {
                finish_reason: FinishReason::Complete,
                usage: None
            },
        ]
    );
    Ok(())
}

#[tokio::test]
async fn a_failing_job_ends_with_its_error_code() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig::default()).await?;
    let id = t.create("fail").await?;
    let events = assert_well_formed(&t.read_stream(&id, None).await?);
    assert_eq!(
        events,
        vec![JobEvent::error(ErrorCode::ModelNotFound, "no such model")]
    );
    Ok(())
}

#[tokio::test]
async fn two_readers_see_the_same_events() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig {
        buffer_capacity: 2,
        ..JobServerConfig::default()
    })
    .await?;
    let id = t.create("tokens 30").await?;
    // Both attach before reading, so neither can miss events the other already received.
    let read_all = |mut subscription: job_server::JobSubscription| async move {
        let mut events = Vec::new();
        while let Some(item) = subscription.next().await {
            events.push((item.seq, (*item.event).clone()));
            tokio::task::yield_now().await;
        }
        events
    };
    let a = t.jobs.subscribe(&id, None)?;
    let b = t.jobs.subscribe(&id, None)?;
    let (a, b) = within(async { tokio::join!(read_all(a), tokio::spawn(read_all(b))) }).await;
    let b = b?;
    assert_eq!(a.len(), 31);
    assert_eq!(a, b);
    assert_eq!(
        a.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        (1..=31).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test]
async fn a_creation_may_answer_with_the_jobs_stream() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig::default()).await?;
    let response = within(
        t.http
            .post(t.url("/v1/jobs?stream=true"))
            .json(&infer("tokens 2"))
            .send(),
    )
    .await?;
    assert_eq!(response.status(), 201);
    assert!(
        response.headers()["content-type"]
            .to_str()?
            .starts_with("text/event-stream")
    );
    let job_id = response.headers()[job_server::JOB_ID_HEADER]
        .to_str()?
        .to_owned();
    assert_eq!(
        response.headers()["location"].to_str()?,
        format!("/v1/jobs/{job_id}/stream")
    );
    let blocks = crate::common::parse_sse(&within(response.text()).await?);
    let events = assert_well_formed(&blocks);
    assert_eq!(token_indices(&events), vec![0, 1]);
    assert!(matches!(events.last(), Some(JobEvent::Done { .. })));

    // The same job, read again by its id, from the start.
    let again = assert_well_formed(&t.read_stream(&job_id, None).await?);
    assert_eq!(again, events);
    Ok(())
}

#[tokio::test]
async fn job_client_submits_and_follows_in_one_request() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig::default()).await?;
    let (handle, events) = within(
        t.client()
            .submit_and_follow("/v1/jobs?cancel_on_disconnect=false", &infer("tokens 3")),
    )
    .await?;
    assert_eq!(handle.sse_url, format!("/v1/jobs/{}/stream", handle.job_id));
    let events: Vec<JobEvent> = within(events.map(|e| e.expect("a job event")).collect()).await;
    assert_eq!(token_indices(&events), vec![0, 1, 2]);
    assert!(matches!(events.last(), Some(JobEvent::Done { .. })));
    Ok(())
}

#[tokio::test]
async fn closing_a_stream_that_came_with_the_creation_cancels_the_job() -> anyhow::Result<()> {
    let t = TestServer::start(JobServerConfig::default()).await?;
    let (handle, mut events) = within(
        t.client()
            .submit_and_follow("/v1/jobs", &infer("tokens 1000 20")),
    )
    .await?;
    let first = within(events.next()).await.expect("an event")?;
    assert!(
        matches!(first, JobEvent::Token { index: 0, .. }),
        "{first:?}"
    );
    drop(events);
    assert!(
        t.observed().wait_cancelled(&handle.job_id, WAIT).await,
        "the job was cancelled when its stream closed"
    );
    Ok(())
}
