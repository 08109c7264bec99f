//! Cancellation: DELETE, a client that goes away, jobs that keep running, panics.

use std::time::{Duration, Instant};

use futures::StreamExt;
use rbee_contract::{ErrorCode, JobEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    TestServer, assert_api_error, assert_well_formed, error_code, infer, token_indices, within,
};

const WAIT: Duration = Duration::from_secs(5);

/// How soon the job must see its token fire after the client went away. The server reacts
/// within milliseconds; the bound leaves room for a loaded test machine.
const PROMPT: Duration = Duration::from_secs(1);

fn server() -> job_server::JobServerConfig {
    job_server::JobServerConfig::default()
}

#[tokio::test]
async fn delete_cancels_with_exactly_one_cancelled_error() -> anyhow::Result<()> {
    let t = TestServer::start(server()).await?;
    let handle = t.client().submit(&infer("hang")).await?;
    let id = handle.job_id.clone();
    let mut events = handle.clone().events();
    assert_eq!(
        events.next().await.transpose()?,
        Some(JobEvent::Started { prompt_tokens: 3 })
    );

    handle.cancel().await?;
    let terminal = within(events.next())
        .await
        .transpose()?
        .expect("a terminal event");
    assert_eq!(
        error_code(&terminal),
        Some(ErrorCode::Cancelled),
        "{terminal:?}"
    );
    assert!(
        events.next().await.is_none(),
        "the stream ends after the terminal event"
    );
    assert!(
        t.observed().wait_cancelled(&id, WAIT).await,
        "the job's token fired"
    );
    assert!(
        t.observed().wait_run_ended(&id, WAIT).await,
        "the run future was dropped"
    );

    let blocks = t.read_stream(&id, None).await?;
    assert_eq!(assert_well_formed(&blocks).len(), 2);

    let again = t
        .http
        .delete(t.url(&format!("/v1/jobs/{id}")))
        .send()
        .await?;
    assert_eq!(
        again.status(),
        204,
        "cancelling an ended job changes nothing"
    );
    Ok(())
}

#[tokio::test]
async fn delete_answers_202_while_the_job_runs() -> anyhow::Result<()> {
    let t = TestServer::start(server()).await?;
    let id = t.create("hang").await?;
    let response = t
        .http
        .delete(t.url(&format!("/v1/jobs/{id}")))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let events = assert_well_formed(&t.read_stream(&id, None).await?);
    assert_eq!(
        error_code(events.last().unwrap()),
        Some(ErrorCode::Cancelled)
    );
    Ok(())
}

#[tokio::test]
async fn closing_the_stream_cancels_the_job_at_once() -> anyhow::Result<()> {
    let t = TestServer::start(server()).await?;
    let id = t.create("hang").await?;
    let mut response = t
        .http
        .get(t.url(&format!("/v1/jobs/{id}/stream")))
        .send()
        .await?;
    let first = response.chunk().await?.expect("the first event");
    assert!(String::from_utf8_lossy(&first).contains("started"));
    assert!(!t.observed().was_cancelled(&id));

    let closed = Instant::now();
    drop(response);
    assert!(
        t.observed().wait_cancelled(&id, PROMPT).await,
        "the job's token fired"
    );
    eprintln!(
        "cancelled {:?} after the client closed the stream",
        closed.elapsed()
    );

    let events = assert_well_formed(&t.read_stream(&id, Some("1")).await?);
    match events.as_slice() {
        [
            JobEvent::Error {
                code: ErrorCode::Cancelled,
                message,
            },
        ] => {
            assert!(message.contains("closed the job's stream"), "{message}");
        }
        other => panic!("expected one cancelled error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_raw_tcp_client_going_away_cancels_the_job() -> anyhow::Result<()> {
    let t = TestServer::start(server()).await?;
    let id = t.create("hang").await?;
    let mut socket = tokio::net::TcpStream::connect(t.base.trim_start_matches("http://")).await?;
    let request = format!(
        "GET /v1/jobs/{id}/stream HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await?;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("\"started\"") {
        let n = tokio::time::timeout(WAIT, socket.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "the server closed the connection");
        received.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&received);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("id: 1\n"), "{head}");

    drop(socket);
    assert!(
        t.observed().wait_cancelled(&id, PROMPT).await,
        "the job's token fired"
    );
    Ok(())
}

#[tokio::test]
async fn dropping_the_client_stream_cancels_the_job() -> anyhow::Result<()> {
    let t = TestServer::start(server()).await?;
    let handle = t.client().submit(&infer("hang")).await?;
    let id = handle.job_id.clone();
    let mut events = handle.events();
    assert_eq!(
        events.next().await.transpose()?,
        Some(JobEvent::Started { prompt_tokens: 3 })
    );
    drop(events);
    assert!(
        t.observed().wait_cancelled(&id, PROMPT).await,
        "the job's token fired"
    );
    Ok(())
}

#[tokio::test]
async fn cancel_on_disconnect_false_keeps_the_job_running_for_a_resume() -> anyhow::Result<()> {
    let t = TestServer::start(server()).await?;
    let id = t
        .create_at("/v1/jobs?cancel_on_disconnect=false", "tokens 10 30")
        .await?;

    let mut response = t
        .http
        .get(t.url(&format!("/v1/jobs/{id}/stream")))
        .send()
        .await?;
    let first = response.chunk().await?.expect("the first event");
    assert!(String::from_utf8_lossy(&first).starts_with("id: 1\n"));
    drop(response);

    assert!(
        t.observed().wait_run_ended(&id, WAIT).await,
        "the job ran to its end"
    );
    assert!(!t.observed().was_cancelled(&id));
    let events = assert_well_formed(&t.read_stream(&id, Some("1")).await?);
    assert_eq!(token_indices(&events), (1..10).collect::<Vec<_>>());
    assert!(matches!(events.last(), Some(JobEvent::Done { .. })));
    Ok(())
}

#[tokio::test]
async fn a_panic_in_the_job_becomes_an_internal_error_event() -> anyhow::Result<()> {
    let t = TestServer::start(server()).await?;
    let id = t.create("panic").await?;
    let events = assert_well_formed(&t.read_stream(&id, None).await?);
    assert_eq!(events[0], JobEvent::Started { prompt_tokens: 3 });
    match &events[1] {
        JobEvent::Error {
            code: ErrorCode::Internal,
            message,
        } => {
            assert!(
                !message.contains("scripted job panics"),
                "panic details stay in the log: {message}"
            );
        }
        other => panic!("expected an internal error, got {other:?}"),
    }

    // The server is still healthy afterwards.
    let terminal = within(t.client().run_to_end(&infer("tokens 1"), |_| {})).await?;
    assert!(matches!(terminal, JobEvent::Done { .. }));
    Ok(())
}

#[tokio::test]
async fn busy_when_max_jobs_are_running_until_one_ends() -> anyhow::Result<()> {
    let t = TestServer::start(job_server::JobServerConfig {
        max_jobs: Some(1),
        ..server()
    })
    .await?;
    let first = t.client().submit(&infer("hang")).await?;
    let refused = t
        .http
        .post(t.url("/v1/jobs"))
        .json(&infer("hang"))
        .send()
        .await?;
    assert_api_error(refused, 503, ErrorCode::Busy).await?;

    let mut events = first.clone().events();
    first.cancel().await?;
    within(async {
        while let Some(event) = events.next().await {
            event.expect("a job event");
        }
    })
    .await;
    // The finished job is retained, but makes room for a new one.
    assert_eq!(
        t.jobs.stats(),
        job_server::JobStats {
            running: 0,
            finished: 1
        }
    );
    let second = t.create("tokens 1").await?;
    assert_eq!(
        token_indices(&assert_well_formed(&t.read_stream(&second, None).await?)),
        vec![0]
    );
    let gone = t
        .http
        .get(t.url(&format!("/v1/jobs/{}/stream", first.job_id)))
        .send()
        .await?;
    assert_api_error(gone, 404, ErrorCode::NotFound).await?;
    Ok(())
}

#[tokio::test]
async fn a_full_registry_drops_the_job_that_finished_first() -> anyhow::Result<()> {
    let t = TestServer::start(job_server::JobServerConfig {
        max_jobs: Some(3),
        ..server()
    })
    .await?;
    let mut finished = Vec::new();
    for _ in 0..3 {
        let id = t.create("tokens 1").await?;
        assert_well_formed(&t.read_stream(&id, None).await?);
        finished.push(id);
    }
    for round in 0..3 {
        let newest = t.create("tokens 1").await?;
        assert_well_formed(&t.read_stream(&newest, None).await?);
        let oldest = finished.remove(0);
        let gone = t
            .http
            .get(t.url(&format!("/v1/jobs/{oldest}/stream")))
            .send()
            .await?;
        assert_api_error(gone, 404, ErrorCode::NotFound).await?;
        for kept in &finished {
            assert_eq!(
                token_indices(&assert_well_formed(&t.read_stream(kept, None).await?)),
                vec![0],
                "round {round}: a job that finished later is still readable"
            );
        }
        finished.push(newest);
    }
    Ok(())
}
