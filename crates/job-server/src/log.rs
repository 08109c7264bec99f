//! A job's event log: sequence numbers, the bounded buffer and the readers' positions.
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

#[derive(Debug)]
pub(crate) struct EventLog {
    entries: VecDeque<Entry>,
    capacity: usize,
    next_seq: u64,
    /// Every event below this sequence number was handed to at least one reader.
    delivered_below: u64,
    /// Attached readers and the sequence number each will read next.
    readers: HashMap<ReaderId, u64>,
    next_reader: ReaderId,
    ended: bool,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        EventLog {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
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

    fn evict_for_room(&mut self) {
        let below = self.evictable_below();
        while self.entries.len() >= self.capacity {
            match self.entries.front() {
                Some(front) if front.seq < below => {
                    self.entries.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Whether a non-terminal event would be appended now without waiting for a reader.
    pub fn has_room(&mut self) -> bool {
        self.evict_for_room();
        self.entries.len() < self.capacity
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
        if self.entries.len() >= self.capacity {
            return Err((event, json));
        }
        Ok(self.append(event, json))
    }

    /// Appends the terminal event. It never waits for room: the buffer may exceed its capacity
    /// by this one event, so that ending a job never depends on a reader showing up.
    pub fn push_terminal(&mut self, event: Arc<JobEvent>, json: Arc<str>) -> u64 {
        debug_assert!(!self.ended);
        self.evict_for_room();
        self.ended = true;
        self.append(event, json)
    }

    fn append(&mut self, event: Arc<JobEvent>, json: Arc<str>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
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
    }

    /// The reader's next event, if it has been produced.
    pub fn read(&mut self, reader: ReaderId) -> Option<Entry> {
        let pos = *self.readers.get(&reader)?;
        // Eviction never passes an attached reader, so `pos >= first_seq` holds.
        let index = usize::try_from(pos.checked_sub(self.first_seq())?).ok()?;
        let entry = self.entries.get(index)?.clone();
        self.readers.insert(reader, pos + 1);
        self.delivered_below = self.delivered_below.max(pos + 1);
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
        };
        let json = serde_json::to_string(&event).unwrap();
        (Arc::new(event), json.into())
    }

    fn push(log: &mut EventLog, i: u32) -> Option<u64> {
        let (e, j) = ev(i);
        log.try_push(e, j).ok()
    }

    #[test]
    fn full_of_undelivered_events_refuses_then_evicts_delivered_ones() {
        let mut log = EventLog::new(2);
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
        let mut log = EventLog::new(2);
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
        let mut log = EventLog::new(2);
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
        let mut log = EventLog::new(1);
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
        let mut log = EventLog::new(1);
        push(&mut log, 0);
        let (e, j) = ev(9);
        assert_eq!(log.push_terminal(e, j), 2);
        assert!(log.ended());
        let r = log.open_reader(None).unwrap();
        assert_eq!(log.read(r).unwrap().seq, 1);
        assert_eq!(log.read(r).unwrap().seq, 2);
    }
}
