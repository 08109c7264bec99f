//! The queen's metrics, served at `GET /metrics` in the Prometheus text format (OpenMetrics
//! flavour, which Prometheus scrapes natively).
//!
//! Counters and histograms are updated where things happen: [`track`] is an axum middleware
//! that counts every HTTP request by its route template (never the raw URL, so ids and typos
//! do not make new series) and status, and `infer` records time to first token, durations
//! and tokens. Gauges (queue depth, workers and hives by state, jobs) are read from the
//! queen's state when the page is rendered. It holds no logic of its own and decides nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rbee_contract::WorkerState;
use tokio::time::Instant;

use crate::registry::{HiveView, WorkerView};
use crate::wire::Health;

/// The `Content-Type` of the metrics page.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Seconds: HTTP answers (up to the response head; a stream's body is not timed here).
const HTTP_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];
/// Seconds from an `infer` job's creation to its first token, queueing and cold start included.
const FIRST_TOKEN_BUCKETS: [f64; 12] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Seconds from an `infer` job's creation to its end.
const INFER_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Why a waiting job was refused.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// The model's line was full.
    QueueFull,
    /// The job waited as long as allowed.
    QueueTimeout,
}

/// What the gauges show, read from the queen's state at render time.
pub(crate) struct Snapshot<'a> {
    pub workers: &'a [WorkerView],
    pub hives: &'a [HiveView],
    pub queue_depths: &'a [(String, usize)],
    pub jobs_running: usize,
    pub jobs_finished: usize,
}

pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabels>,
    first_token: Histogram,
    infer_duration: HistogramFamily<OutcomeLabels>,
    tokens: Family<ModelLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    queue_depth: Family<ModelLabels, Gauge>,
    workers: Family<StateLabels, Gauge>,
    hives: Family<StateLabels, Gauge>,
    jobs: Family<StateLabels, Gauge>,
    /// Renders one at a time: gauges are cleared and refilled for each page.
    render: Mutex<()>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "rbee_http_requests",
            "HTTP requests answered, by route template, method and status",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(|| Histogram::new(HTTP_BUCKETS));
        registry.register(
            "rbee_http_request_duration_seconds",
            "Time to answer an HTTP request, up to the response head, by route template and method",
            request_duration.clone(),
        );
        let first_token = Histogram::new(FIRST_TOKEN_BUCKETS);
        registry.register(
            "rbee_time_to_first_token_seconds",
            "Time from an infer job's creation to its first token, queueing and cold starts included",
            first_token.clone(),
        );
        let infer_duration: HistogramFamily<OutcomeLabels> =
            Family::new_with_constructor(|| Histogram::new(INFER_BUCKETS));
        registry.register(
            "rbee_infer_duration_seconds",
            "Time from an infer job's creation to its end, by outcome (`done` or the error code)",
            infer_duration.clone(),
        );
        let tokens = Family::<ModelLabels, Counter>::default();
        registry.register(
            "rbee_tokens_generated",
            "Tokens relayed from workers to clients, by model",
            tokens.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rbee_queue_refused",
            "Infer jobs refused for want of a worker: `queue_full` or `queue_timeout`",
            refused.clone(),
        );
        let queue_depth = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "rbee_queue_depth",
            "Infer jobs waiting for a busy model, by model",
            queue_depth.clone(),
        );
        let workers = Family::<StateLabels, Gauge>::default();
        registry.register(
            "rbee_workers",
            "Workers known from heartbeats, by state",
            workers.clone(),
        );
        let hives = Family::<StateLabels, Gauge>::default();
        registry.register(
            "rbee_hives",
            "Hives known from heartbeats, by state",
            hives.clone(),
        );
        let jobs = Family::<StateLabels, Gauge>::default();
        registry.register(
            "rbee_jobs",
            "Jobs in the queen's registry: `running` or `finished` (retained for late readers)",
            jobs.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            first_token,
            infer_duration,
            tokens,
            refused,
            queue_depth,
            workers,
            hives,
            jobs,
            render: Mutex::new(()),
        }
    }

    fn request(&self, route: String, method: String, status: u16, elapsed: Duration) {
        self.request_duration
            .get_or_create(&RouteLabels {
                route: route.clone(),
                method: method.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
    }

    pub fn first_token(&self, after: Duration) {
        self.first_token.observe(after.as_secs_f64());
    }

    /// An infer job ended: `outcome` is `done` or its error code.
    pub fn infer_ended(&self, outcome: &str, after: Duration) {
        self.infer_duration
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .observe(after.as_secs_f64());
    }

    /// Tokens relayed for `model`. Only models a worker serves get here, so the label set
    /// stays as small as the cluster.
    pub fn tokens(&self, model: &str, count: u64) {
        if count > 0 {
            self.tokens
                .get_or_create(&ModelLabels {
                    model: model.to_owned(),
                })
                .inc_by(count);
        }
    }

    pub fn refused(&self, why: Refusal) {
        let reason = match why {
            Refusal::QueueFull => "queue_full",
            Refusal::QueueTimeout => "queue_timeout",
        };
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// The metrics page.
    pub fn render(&self, now: &Snapshot<'_>) -> String {
        let _one_at_a_time = self.render.lock().unwrap_or_else(|p| p.into_inner());
        self.queue_depth.clear();
        for (model, depth) in now.queue_depths {
            self.queue_depth
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .set(gauge_value(*depth));
        }
        self.workers.clear();
        for state in ["ready", "loading", "stopping", "failed", "stale"] {
            let count = now
                .workers
                .iter()
                .filter(|w| worker_state(w) == state)
                .count();
            self.workers
                .get_or_create(&StateLabels { state })
                .set(gauge_value(count));
        }
        self.hives.clear();
        for (state, health) in [("healthy", Health::Healthy), ("stale", Health::Stale)] {
            let count = now.hives.iter().filter(|h| h.health == health).count();
            self.hives
                .get_or_create(&StateLabels { state })
                .set(gauge_value(count));
        }
        for (state, count) in [
            ("running", now.jobs_running),
            ("finished", now.jobs_finished),
        ] {
            self.jobs
                .get_or_create(&StateLabels { state })
                .set(gauge_value(count));
        }
        let mut page = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut page, &self.registry);
        page
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn worker_state(view: &WorkerView) -> &'static str {
    if view.health == Health::Stale {
        return "stale";
    }
    match view.info.state {
        WorkerState::Ready => "ready",
        WorkerState::Loading => "loading",
        WorkerState::Stopping => "stopping",
        WorkerState::Failed => "failed",
        WorkerState::Stale => "stale",
    }
}

/// axum middleware counting and timing every request; apply it to the whole router so that
/// routes merged later are counted too.
pub(crate) async fn track(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    // Unmatched paths share one series: a scanner must not mint a series per URL.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "DELETE" | "PUT" | "PATCH" | "HEAD" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.request(route, method, response.status().as_u16(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::{hive, worker};

    #[test]
    fn the_page_has_every_family_with_current_gauges() {
        let metrics = Metrics::new();
        metrics.request(
            "/v1/jobs".into(),
            "POST".into(),
            201,
            Duration::from_millis(3),
        );
        metrics.first_token(Duration::from_millis(120));
        metrics.infer_ended("done", Duration::from_secs(2));
        metrics.tokens("m", 7);
        metrics.refused(Refusal::QueueFull);
        let workers = vec![
            WorkerView {
                info: worker("a", "m", WorkerState::Ready, 1),
                health: Health::Healthy,
                in_flight: 0,
                prefixes: Default::default(),
            },
            WorkerView {
                info: worker("b", "m", WorkerState::Ready, 1),
                health: Health::Stale,
                in_flight: 0,
                prefixes: Default::default(),
            },
        ];
        let hives = vec![HiveView {
            info: hive("h", Vec::new()),
            health: Health::Healthy,
            silent_for: Duration::ZERO,
        }];
        let depths = vec![("m".to_string(), 3)];
        let page = metrics.render(&Snapshot {
            workers: &workers,
            hives: &hives,
            queue_depths: &depths,
            jobs_running: 4,
            jobs_finished: 1,
        });
        for line in [
            r#"rbee_http_requests_total{route="/v1/jobs",method="POST",status="201"} 1"#,
            r#"rbee_http_request_duration_seconds_count{route="/v1/jobs",method="POST"} 1"#,
            "rbee_time_to_first_token_seconds_count 1",
            r#"rbee_infer_duration_seconds_count{outcome="done"} 1"#,
            r#"rbee_tokens_generated_total{model="m"} 7"#,
            r#"rbee_queue_refused_total{reason="queue_full"} 1"#,
            r#"rbee_queue_depth{model="m"} 3"#,
            r#"rbee_workers{state="ready"} 1"#,
            r#"rbee_workers{state="stale"} 1"#,
            r#"rbee_hives{state="healthy"} 1"#,
            r#"rbee_jobs{state="running"} 4"#,
        ] {
            assert!(page.lines().any(|l| l == line), "no `{line}` in\n{page}");
        }
        assert!(page.ends_with("# EOF\n"), "{page}");

        // A line that emptied leaves the page at the next render.
        let page = metrics.render(&Snapshot {
            workers: &[],
            hives: &[],
            queue_depths: &[],
            jobs_running: 0,
            jobs_finished: 0,
        });
        assert!(!page.contains("rbee_queue_depth{"), "{page}");
        assert!(page.contains(r#"rbee_workers{state="ready"} 0"#), "{page}");
    }
}
