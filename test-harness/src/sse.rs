use futures::StreamExt;
use rbee_contract::{DONE_SENTINEL, JobEvent};

/// A job stream as it came over the wire, frame by frame.
#[derive(Debug, Default)]
pub struct RawStream {
    /// `(id, event)` for every JSON event frame.
    pub events: Vec<(Option<String>, JobEvent)>,
    /// How many `data: [DONE]` frames arrived, and whether anything came after the first.
    pub done_frames: usize,
    pub frames_after_done: usize,
}

impl RawStream {
    pub fn terminal_count(&self) -> usize {
        self.events.iter().filter(|(_, e)| e.is_terminal()).count()
    }

    pub fn text(&self) -> String {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                JobEvent::Token { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The payload of the first `data` event (an operation's result, e.g. a spawned worker's
    /// `WorkerInfo`); panics, listing the events, when there is none.
    pub fn data(&self) -> serde_json::Value {
        self.events
            .iter()
            .find_map(|(_, e)| match e {
                JobEvent::Data { data } => Some(data.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("a data event: {:?}", self.events))
    }

    /// The `WorkerInfo` in the first `data` event (a `worker_spawn` or `worker_get` result).
    pub fn worker(&self) -> rbee_contract::WorkerInfo {
        serde_json::from_value(self.data()["worker"].clone())
            .unwrap_or_else(|e| panic!("a WorkerInfo in the data event: {e}: {:?}", self.events))
    }

    /// Event ids that only go up, as a resuming client relies on.
    pub fn assert_ids_increase(&self) {
        let ids: Vec<u64> = self
            .events
            .iter()
            .map(|(id, _)| {
                id.as_deref()
                    .and_then(|i| i.parse().ok())
                    .unwrap_or_else(|| panic!("an event without a numeric id: {:?}", self.events))
            })
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }

    /// The `token_id` of every token event, in order.
    pub fn token_ids(&self) -> Vec<u32> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                JobEvent::Token { token_id, .. } => Some(*token_id),
                _ => None,
            })
            .collect()
    }

    /// Whether the job waited in line: a `queued` event came before its tokens.
    pub fn queued(&self) -> bool {
        self.events
            .iter()
            .any(|(_, e)| matches!(e, JobEvent::Queued { .. }))
    }

    pub fn terminal(&self) -> Option<&JobEvent> {
        self.events.iter().map(|(_, e)| e).find(|e| e.is_terminal())
    }

    /// The protocol's promise for how a stream ends: exactly one terminal event, as the last
    /// event, then exactly one `[DONE]` with nothing after it. `hop` names the stream in
    /// failure messages.
    pub fn assert_one_terminal_then_done(&self, hop: &str) {
        assert_eq!(self.terminal_count(), 1, "{hop}: {:?}", self.events);
        assert!(
            matches!(self.events.last(), Some((_, e)) if e.is_terminal()),
            "{hop}: the terminal event is the last event: {:?}",
            self.events
        );
        assert_eq!(
            (self.done_frames, self.frames_after_done),
            (1, 0),
            "{hop}: exactly one [DONE], nothing after it"
        );
    }

    /// [`assert_one_terminal_then_done`](Self::assert_one_terminal_then_done), the terminal
    /// event being `done`: the job succeeded.
    pub fn assert_done(&self, hop: &str) {
        self.assert_one_terminal_then_done(hop);
        assert!(
            matches!(self.terminal(), Some(JobEvent::Done { .. })),
            "{hop}: {:?}",
            self.events
        );
    }
}

/// Reads an SSE response to its end, parsing frames by hand so the test sees exactly what a
/// client would, independent of rbee's own client.
pub async fn read_raw_stream(response: reqwest::Response) -> anyhow::Result<RawStream> {
    read_stream(response, None).await
}

/// [`read_raw_stream`], sending on `first_token` once the first `token` event has arrived, so a
/// test can act (stop a daemon, say) while the stream is in flight.
pub async fn read_raw_stream_signalling(
    response: reqwest::Response,
    first_token: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<RawStream> {
    read_stream(response, Some(first_token)).await
}

async fn read_stream(
    response: reqwest::Response,
    mut first_token: Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<RawStream> {
    anyhow::ensure!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "not an event stream: {:?}",
        response.headers().get("content-type")
    );
    let mut body = String::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        body.push_str(std::str::from_utf8(&chunk?)?);
        if first_token.is_some()
            && body.contains(r#""event":"token""#)
            && let Some(signal) = first_token.take()
        {
            let _ = signal.send(());
        }
    }
    let mut stream = RawStream::default();
    for frame in body.split("\n\n") {
        let mut id = None;
        let mut data = Vec::new();
        for line in frame.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if data.is_empty() {
            continue;
        }
        let data = data.join("\n");
        if stream.done_frames > 0 {
            stream.frames_after_done += 1;
        }
        if data == DONE_SENTINEL {
            stream.done_frames += 1;
        } else {
            stream.events.push((id, serde_json::from_str(&data)?));
        }
    }
    Ok(stream)
}
