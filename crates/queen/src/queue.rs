//! The queen's waiting lines: one bounded first-in, first-out line per model for `infer` jobs
//! that find every worker serving their model busy.
//!
//! A job that cannot be served at once takes a [`Ticket`] at the back of its model's line
//! (or is refused at once when the line is full); dropping the ticket, because the job was
//! served, timed out or was cancelled, leaves the line, and everyone behind moves up. Whose
//! turn it is and the taking of a worker's slot happen in one step under the lines' lock
//! ([`Queues::on_turn`]), so a newcomer never slips past a waiter and two jobs never take the
//! same free slot.
//!
//! It knows nothing about workers: what "a free slot" means is the scheduler's business, and
//! the waiting itself (with its maximum) is the caller's.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

pub(crate) struct Queues {
    /// Waiters a model's line holds at most.
    capacity: usize,
    /// How long a job may wait in a line.
    pub max_wait: Duration,
    lines: Mutex<Lines>,
    /// Bumped whenever a line changes, so waiters look at their position again.
    version: watch::Sender<u64>,
}

#[derive(Default)]
struct Lines {
    by_model: HashMap<String, VecDeque<u64>>,
    next_ticket: u64,
}

/// A line was full; the job is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LineFull {
    pub waiting: usize,
}

/// A place in a model's line, held until dropped.
pub(crate) struct Ticket<'a> {
    queues: &'a Queues,
    model: String,
    id: u64,
}

impl Queues {
    pub fn new(capacity: usize, max_wait: Duration) -> Self {
        Queues {
            capacity,
            max_wait,
            lines: Mutex::new(Lines::default()),
            version: watch::Sender::new(0),
        }
    }

    fn lines(&self) -> MutexGuard<'_, Lines> {
        // Plain bookkeeping: a panic while it was held leaves nothing half-done that matters.
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Fires after any change to any line.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Takes a place at the back of `model`'s line.
    pub fn join(&self, model: &str) -> Result<Ticket<'_>, LineFull> {
        let id = {
            let mut lines = self.lines();
            let waiting = lines.by_model.get(model).map_or(0, VecDeque::len);
            if waiting >= self.capacity {
                return Err(LineFull { waiting });
            }
            let id = lines.next_ticket;
            lines.next_ticket += 1;
            lines
                .by_model
                .entry(model.to_owned())
                .or_default()
                .push_back(id);
            id
        };
        self.changed();
        Ok(Ticket {
            queues: self,
            model: model.to_owned(),
            id,
        })
    }

    /// Runs `take` if it is this job's turn for `model`: it holds the first ticket of the
    /// line, or holds none and nobody waits. `None` when it is someone else's turn.
    ///
    /// `take` runs under the lines' lock, so deciding and taking (e.g. a worker's slot) are
    /// one step for every job of every model; it must not block or take this lock again.
    pub fn on_turn<T>(
        &self,
        model: &str,
        ticket: Option<&Ticket<'_>>,
        take: impl FnOnce() -> T,
    ) -> Option<T> {
        let lines = self.lines();
        let first = lines.by_model.get(model).and_then(|line| line.front());
        let my_turn = match (ticket, first) {
            (Some(ticket), Some(first)) => ticket.id == *first,
            (Some(_), None) => false,
            (None, first) => first.is_none(),
        };
        my_turn.then(take)
    }

    /// How many jobs wait for each model that has a line.
    pub fn depths(&self) -> Vec<(String, usize)> {
        let mut depths: Vec<(String, usize)> = self
            .lines()
            .by_model
            .iter()
            .map(|(model, line)| (model.clone(), line.len()))
            .collect();
        depths.sort();
        depths
    }
}

impl Ticket<'_> {
    /// The place in line: 1 is next.
    pub fn position(&self) -> u32 {
        let lines = self.queues.lines();
        let index = lines
            .by_model
            .get(&self.model)
            .and_then(|line| line.iter().position(|id| *id == self.id))
            .unwrap_or(0);
        u32::try_from(index + 1).unwrap_or(u32::MAX)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        {
            let mut lines = self.queues.lines();
            if let Some(line) = lines.by_model.get_mut(&self.model) {
                line.retain(|id| *id != self.id);
                if line.is_empty() {
                    lines.by_model.remove(&self.model);
                }
            }
        }
        self.queues.changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_in_first_out_with_a_bound() {
        let queues = Queues::new(2, Duration::from_secs(1));
        // Nobody waits: a job without a ticket may go.
        assert_eq!(queues.on_turn("m", None, || 1), Some(1));
        let a = queues.join("m").unwrap();
        let b = queues.join("m").unwrap();
        assert_eq!(queues.join("m").err(), Some(LineFull { waiting: 2 }));
        // Another model's line is its own.
        let other = queues.join("x").unwrap();
        assert_eq!((a.position(), b.position(), other.position()), (1, 2, 1));
        assert_eq!(queues.depths(), vec![("m".into(), 2), ("x".into(), 1)]);

        // Only the first waiter's turn: not the second, not a newcomer.
        assert_eq!(queues.on_turn("m", Some(&a), || ()), Some(()));
        assert_eq!(queues.on_turn("m", Some(&b), || ()), None);
        assert_eq!(queues.on_turn("m", None, || ()), None);

        drop(a);
        assert_eq!(b.position(), 1);
        assert_eq!(queues.on_turn("m", Some(&b), || ()), Some(()));
        let c = queues.join("m").unwrap();
        assert_eq!(c.position(), 2);
        drop(b);
        drop(c);
        drop(other);
        assert!(queues.depths().is_empty());
        assert_eq!(queues.on_turn("m", None, || ()), Some(()));
    }

    #[test]
    fn a_waiter_leaving_from_the_middle_moves_those_behind_up() {
        let queues = Queues::new(8, Duration::from_secs(1));
        let mut changes = queues.changes();
        let tickets: Vec<Ticket<'_>> = (0..4).map(|_| queues.join("m").unwrap()).collect();
        changes.borrow_and_update();
        let mut tickets = tickets.into_iter();
        let first = tickets.next().unwrap();
        let second = tickets.next().unwrap();
        let rest: Vec<Ticket<'_>> = tickets.collect();
        drop(second);
        assert!(
            changes.has_changed().unwrap(),
            "waiters are told to look again"
        );
        assert_eq!(first.position(), 1);
        assert_eq!(
            rest.iter().map(Ticket::position).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }

    #[test]
    fn a_zero_capacity_line_refuses_everyone() {
        let queues = Queues::new(0, Duration::from_secs(1));
        assert_eq!(queues.join("m").err(), Some(LineFull { waiting: 0 }));
    }
}
