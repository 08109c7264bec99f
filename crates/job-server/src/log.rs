//! A job's event log: sequence numbers, the bounded buffer and the readers' positions.
//!
//! Sizes are counted in bytes of the events' JSON encoding (what the log holds besides small
//! fixed parts), so that a job of large events is bounded as well as one of many small ones.
//!
//! Pure bookkeeping without locks or waiting, so that the rules of eviction and
//! back-pressure can be read (and tested) in one place. Sequence numbers start at 1, so a
//! stream without `Last-Event-ID` and one with `Last-Event-ID: 0` both start at the beginning.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rbee_contract::JobEvent;

/// One event as stored: its sequence number, the typed event and its JSON encoding, made
/// once at emit time so that every reader sends the same bytes.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub seq: u64,
    pub event: Arc<JobEvent>,
    pub json: Arc<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// The events after the requested id were evicted; `oldest` is the first one still held.
    Gone { oldest: u64 },
    /// The requested id is past the newest event; `newest` is 0 when there is none.
    Ahead { newest: u64 },
}

pub(crate) type ReaderId = u64;

/// The bounds of one job's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogLimits {
    /// Events held while the job runs.
    pub capacity: usize,
    /// Bytes held while the job runs; an event is appended while the log holds fewer, so the
    /// log may pass this by one event (a single event larger than the whole budget still goes).
    pub bytes: usize,
    /// Bytes of non-terminal events kept once the job has ended, newest first; the terminal
    /// event is always kept on top of them.
    pub tail_bytes: usize,
}

#[derive(Debug)]
pub(crate) struct EventLog {
    entries: VecDeque<Entry>,
    limits: LogLimits,
    /// Bytes of the JSON of every entry held, the terminal one included.
    bytes: usize,
    /// Bytes of the terminal event, once there is one.
    terminal_bytes: usize,
    next_seq: u64,
    /// Every event below this sequence number was handed to at least one reader.
    delivered_below: u64,
    /// Attached readers and the sequence number each will read next.
    readers: HashMap<ReaderId, u64>,
    next_reader: ReaderId,
    ended: bool,
}

impl EventLog {
    pub fn new(limits: LogLimits) -> Self {
        EventLog {
            entries: VecDeque::new(),
            limits: LogLimits {
                capacity: limits.capacity.max(1),
                bytes: limits.bytes.max(1),
                tail_bytes: limits.tail_bytes,
            },
            bytes: 0,
            terminal_bytes: 0,
            next_seq: 1,
            delivered_below: 1,
            readers: HashMap::new(),
            next_reader: 0,
            ended: false,
        }
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    fn first_seq(&self) -> u64 {
        self.entries.front().map_or(self.next_seq, |e| e.seq)
    }

    /// Events below this sequence number may be evicted: some reader received them and no
    /// attached reader still needs them.
    fn evictable_below(&self) -> u64 {
        self.readers
            .values()
            .copied()
            .fold(self.delivered_below, u64::min)
    }

    fn is_full(&self) -> bool {
        self.entries.len() >= self.limits.capacity || self.bytes >= self.limits.bytes
    }

    fn pop_front(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= entry.json.len();
        }
    }

    fn evict_for_room(&mut self) {
        let below = self.evictable_below();
        while self.is_full() {
            match self.entries.front() {
                Some(front) if front.seq < below => self.pop_front(),
                _ => break,
            }
        }
    }

    /// Once the job has ended, drops its oldest events down to the retained tail. Only events
    /// that may be evicted while running are dropped: a stream in progress is never cut, and
    /// a job that ended before its stream was opened (a short job, a slow client) is read
    /// whole; those unread events are bounded by the running buffer.
    fn trim_tail(&mut self) {
        if !self.ended {
            return;
        }
        let below = self.evictable_below();
        // The terminal event is the last entry; `len > 1` keeps it.
        while self.entries.len() > 1 && self.bytes - self.terminal_bytes > self.limits.tail_bytes {
            match self.entries.front() {
                Some(front) if front.seq < below => self.pop_front(),
                _ => break,
            }
        }
    }

    /// Whether a non-terminal event would be appended now without waiting for a reader.
    pub fn has_room(&mut self) -> bool {
        self.evict_for_room();
        !self.is_full()
    }

    /// Appends a non-terminal event, or hands it back when the buffer holds only events no
    /// reader has received yet (the caller waits for room and tries again).
    pub fn try_push(
        &mut self,
        event: Arc<JobEvent>,
        json: Arc<str>,
    ) -> Result<u64, (Arc<JobEvent>, Arc<str>)> {
        debug_assert!(!self.ended);
        self.evict_for_room();
        if self.is_full() {
            return Err((event, json));
        }
        Ok(self.append(event, json))
    }

    /// Appends the terminal event. It never waits for room: the buffer may exceed its capacity
    /// by this one event, so that ending a job never depends on a reader showing up. From
    /// then on the log shrinks to the terminal event and the retained tail.
    pub fn push_terminal(&mut self, event: Arc<JobEvent>, json: Arc<str>) -> u64 {
        debug_assert!(!self.ended);
        self.evict_for_room();
        self.ended = true;
        self.terminal_bytes = json.len();
        let seq = self.append(event, json);
        self.trim_tail();
        seq
    }

    fn append(&mut self, event: Arc<JobEvent>, json: Arc<str>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += json.len();
        self.entries.push_back(Entry { seq, event, json });
        seq
    }

    /// Attaches a reader that starts after `last_event_id` (from the beginning when `None`).
    pub fn open_reader(&mut self, last_event_id: Option<u64>) -> Result<ReaderId, OpenError> {
        let start = last_event_id.map_or(1, |id| id.saturating_add(1));
        if start > self.next_seq {
            return Err(OpenError::Ahead {
                newest: self.next_seq - 1,
            });
        }
        if start < self.first_seq() {
            return Err(OpenError::Gone {
                oldest: self.first_seq(),
            });
        }
        let id = self.next_reader;
        self.next_reader += 1;
        self.readers.insert(id, start);
        Ok(id)
    }

    pub fn close_reader(&mut self, reader: ReaderId) {
        self.readers.remove(&reader);
        self.trim_tail();
    }

    /// The reader's next event, if it has been produced.
    pub fn read(&mut self, reader: ReaderId) -> Option<Entry> {
        let pos = *self.readers.get(&reader)?;
        // Eviction never passes an attached reader, so `pos >= first_seq` holds.
        let index = usize::try_from(pos.checked_sub(self.first_seq())?).ok()?;
        let entry = self.entries.get(index)?.clone();
        self.readers.insert(reader, pos + 1);
        self.delivered_below = self.delivered_below.max(pos + 1);
        self.trim_tail();
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: u32) -> (Arc<JobEvent>, Arc<str>) {
        let event = JobEvent::Token {
            text: i.to_string(),
            token_id: i,
            index: i,
            logprobs: None,
        };
        let json = serde_json::to_string(&event).unwrap();
        (Arc::new(event), json.into())
    }

    /// A log bounded by its count of events only.
    fn counted(capacity: usize) -> EventLog {
        EventLog::new(LogLimits {
            capacity,
            bytes: usize::MAX,
            tail_bytes: usize::MAX,
        })
    }

    fn size(i: u32) -> usize {
        ev(i).1.len()
    }

    fn push(log: &mut EventLog, i: u32) -> Option<u64> {
        let (e, j) = ev(i);
        log.try_push(e, j).ok()
    }

    #[test]
    fn full_of_undelivered_events_refuses_then_evicts_delivered_ones() {
        let mut log = counted(2);
        assert_eq!(push(&mut log, 0), Some(1));
        assert_eq!(push(&mut log, 1), Some(2));
        assert_eq!(
            push(&mut log, 2),
            None,
            "nothing delivered yet: back-pressure"
        );

        let r = log.open_reader(None).unwrap();
        assert_eq!(log.read(r).unwrap().seq, 1);
        assert_eq!(
            push(&mut log, 2),
            Some(3),
            "seq 1 was delivered and is evicted"
        );
        assert_eq!(push(&mut log, 3), None);
        assert_eq!(log.read(r).unwrap().seq, 2);
        assert_eq!(log.read(r).unwrap().seq, 3);
        assert!(log.read(r).is_none());
    }

    #[test]
    fn room_is_what_the_next_push_would_find() {
        let mut log = counted(2);
        assert!(log.has_room());
        push(&mut log, 0);
        assert!(log.has_room());
        push(&mut log, 1);
        assert!(!log.has_room(), "two undelivered events fill it");
        assert_eq!(push(&mut log, 2), None);
        let r = log.open_reader(None).unwrap();
        log.read(r).unwrap();
        assert!(log.has_room(), "a delivered event makes room");
        assert!(push(&mut log, 2).is_some());
    }

    #[test]
    fn a_slow_reader_holds_events_a_fast_reader_already_received() {
        let mut log = counted(2);
        let fast = log.open_reader(None).unwrap();
        let slow = log.open_reader(None).unwrap();
        push(&mut log, 0);
        push(&mut log, 1);
        log.read(fast);
        log.read(fast);
        assert_eq!(push(&mut log, 2), None, "the slow reader still needs seq 1");
        assert_eq!(log.read(slow).unwrap().seq, 1);
        assert_eq!(push(&mut log, 2), Some(3));
        assert_eq!(log.read(slow).unwrap().seq, 2);
    }

    #[test]
    fn resume_points_are_checked() {
        let mut log = counted(1);
        let r = log.open_reader(None).unwrap();
        push(&mut log, 0);
        log.read(r);
        push(&mut log, 1);
        log.close_reader(r);
        assert_eq!(log.open_reader(Some(0)), Err(OpenError::Gone { oldest: 2 }));
        assert_eq!(
            log.open_reader(Some(5)),
            Err(OpenError::Ahead { newest: 2 })
        );
        let again = log.open_reader(Some(1)).unwrap();
        assert_eq!(log.read(again).unwrap().seq, 2);
        assert!(
            log.open_reader(Some(2)).is_ok(),
            "resuming after the newest event waits for more"
        );
    }

    #[test]
    fn the_terminal_event_never_waits_for_room() {
        let mut log = counted(1);
        push(&mut log, 0);
        let (e, j) = ev(9);
        assert_eq!(log.push_terminal(e, j), 2);
        assert!(log.ended());
        let r = log.open_reader(None).unwrap();
        assert_eq!(log.read(r).unwrap().seq, 1);
        assert_eq!(log.read(r).unwrap().seq, 2);
    }

    #[test]
    fn the_running_buffer_is_bounded_by_bytes_too() {
        // Room for two events of this size, not three; the count alone would allow 100.
        let mut log = EventLog::new(LogLimits {
            capacity: 100,
            bytes: 2 * size(10),
            tail_bytes: usize::MAX,
        });
        assert_eq!(push(&mut log, 10), Some(1));
        assert_eq!(push(&mut log, 11), Some(2));
        assert!(!log.has_room());
        assert_eq!(
            push(&mut log, 12),
            None,
            "the byte budget holds the job back"
        );
        let r = log.open_reader(None).unwrap();
        log.read(r).unwrap();
        assert_eq!(
            push(&mut log, 12),
            Some(3),
            "a delivered event frees its bytes"
        );

        // One event larger than the whole budget still goes into an empty buffer.
        let mut tiny = EventLog::new(LogLimits {
            capacity: 100,
            bytes: 1,
            tail_bytes: usize::MAX,
        });
        assert_eq!(push(&mut tiny, 0), Some(1));
        assert_eq!(push(&mut tiny, 1), None);
    }

    #[test]
    fn a_finished_log_keeps_its_terminal_event_and_a_tail_within_the_budget() {
        let tail_bytes = 3 * size(10) + size(10) / 2;
        let mut log = EventLog::new(LogLimits {
            capacity: 100,
            bytes: usize::MAX,
            tail_bytes,
        });
        let first = log.open_reader(None).unwrap();
        for i in 10..30 {
            push(&mut log, i);
            log.read(first).unwrap();
        }
        log.close_reader(first);
        let (e, j) = ev(99);
        assert_eq!(log.push_terminal(e, j), 21);
        assert_eq!(
            log.open_reader(Some(16)),
            Err(OpenError::Gone { oldest: 18 })
        );
        let r = log.open_reader(Some(17)).unwrap();
        let seqs: Vec<u64> = std::iter::from_fn(|| log.read(r)).map(|e| e.seq).collect();
        assert_eq!(seqs, vec![18, 19, 20, 21]);
        assert!(log.bytes - log.terminal_bytes <= tail_bytes);
    }

    #[test]
    fn a_job_that_ended_before_anyone_read_it_is_kept_whole() {
        let mut log = EventLog::new(LogLimits {
            capacity: 100,
            bytes: usize::MAX,
            tail_bytes: 0,
        });
        for i in 0..5 {
            push(&mut log, i);
        }
        let (e, j) = ev(99);
        log.push_terminal(e, j);
        let r = log.open_reader(None).unwrap();
        let seqs: Vec<u64> = std::iter::from_fn(|| log.read(r)).map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        log.close_reader(r);
        assert_eq!(
            log.entries.len(),
            1,
            "once read, only the terminal event is left"
        );
    }

    #[test]
    fn the_tail_is_cut_only_behind_attached_readers() {
        let mut log = EventLog::new(LogLimits {
            capacity: 100,
            bytes: usize::MAX,
            tail_bytes: 0,
        });
        let r = log.open_reader(None).unwrap();
        for i in 0..5 {
            push(&mut log, i);
        }
        log.read(r).unwrap();
        let (e, j) = ev(99);
        log.push_terminal(e, j);
        // The reader is at seq 2: the job ended, yet its stream goes on to the end.
        let seqs: Vec<u64> = std::iter::from_fn(|| log.read(r)).map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4, 5, 6]);
        log.close_reader(r);
        assert_eq!(log.entries.len(), 1, "only the terminal event is left");
        assert_eq!(log.open_reader(Some(5)).map(|_| ()), Ok(()));
        assert_eq!(log.open_reader(None), Err(OpenError::Gone { oldest: 6 }));
    }
}
