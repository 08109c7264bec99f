//! A persistent pool of worker threads for the CPU forward pass.
//!
//! Work is a range of chunk indices claimed one at a time from an atomic counter by the caller
//! and every worker that joins, so a thread the OS deschedules (another process competing for the
//! cores) delays at most the one chunk it holds: the others take the rest. A worker that wakes
//! after the caller has closed the job does nothing and goes back to sleep; the caller never
//! waits for it. Idle workers spin for tens of microseconds (longer than the gaps between the
//! parallel sections of one step, also when the worker's HTTP threads take a core for a moment)
//! and then block on a condition variable, so an idle pool burns no CPU.
//!
//! This module erases the lifetime of the job closure to hand it to the workers ([`Pool::run`]
//! documents why that is sound), and hands disjoint parts of one buffer to the threads from a
//! raw pointer, in one place (`Pool::for_each_range_mut`) whose callers prove the parts
//! disjoint. That is the `unsafe` here.
#![allow(unsafe_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Spin iterations (a `pause` each) an idle thread waits before it blocks. With 2 000, a pool
/// thread blocked between sections often enough that the caller did a third more of the work
/// than it; 8 000 and 20 000 measured alike (`cargo xtask bench worker`).
const SPIN: u32 = 8_000;

type Job = dyn Fn() + Sync + 'static;

/// A pointer to the running job's closure, with its lifetime erased.
#[derive(Clone, Copy)]
struct JobPtr(*const Job);

// SAFETY: the pointee is `Sync`, and `Pool::run` keeps it alive while any worker may use it.
unsafe impl Send for JobPtr {}

struct Slot {
    job: Option<JobPtr>,
    epoch: u64,
    /// Workers inside the current job.
    running: usize,
    /// Workers blocked waiting for a job.
    sleepers: usize,
    caller_waiting: bool,
    panicked: bool,
    shutdown: bool,
}

struct Shared {
    slot: Mutex<Slot>,
    wake_workers: Condvar,
    wake_caller: Condvar,
    /// Mirrors of `Slot::epoch` and `Slot::running` for spinning without the lock.
    epoch: AtomicU64,
    running: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `threads - 1` workers plus the calling thread. One caller at a time, and no nesting: a job
/// must not call back into its own pool (the forward pass owns its pool through `&mut self`).
pub(crate) struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads())
    }
}

impl Pool {
    pub(crate) fn new(threads: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                job: None,
                epoch: 0,
                running: 0,
                sleepers: 0,
                caller_waiting: false,
                panicked: false,
                shutdown: false,
            }),
            wake_workers: Condvar::new(),
            wake_caller: Condvar::new(),
            epoch: AtomicU64::new(0),
            running: AtomicUsize::new(0),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let shared = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("rbee-cpu-{i}"))
                    .spawn(move || worker(&shared))?,
            );
        }
        Ok(Pool { shared, workers })
    }

    pub(crate) fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` once for every `i` in `0..n`, spread over the pool; returns when all are done.
    pub(crate) fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n <= 1 || self.workers.is_empty() {
            (0..n).for_each(f);
            return;
        }
        let next = AtomicUsize::new(0);
        self.run(&|| {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                f(i);
            }
        });
    }

    /// Splits `out` into chunks of `chunk` elements (the last may be shorter) and runs
    /// `f(index, chunk)` for each, spread over the pool.
    pub(crate) fn for_each_chunk_mut<T: Send>(
        &self,
        out: &mut [T],
        chunk: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let chunk = chunk.max(1);
        let len = out.len();
        // SAFETY: consecutive chunks of `chunk` elements, the last cut at `len`, are disjoint
        // and inside `out`.
        unsafe {
            self.for_each_range_mut(
                out,
                len.div_ceil(chunk),
                &|i| i * chunk..len.min((i + 1) * chunk),
                f,
            )
        };
    }

    /// Splits `out` into the parts that end at each of `ends` (ascending, the last at most
    /// `out.len()`; the first starts at 0) and runs `f(index, part)` for each, spread over the
    /// pool.
    pub(crate) fn for_each_part_mut<T: Send>(
        &self,
        out: &mut [T],
        ends: &[usize],
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        assert!(
            ends.is_sorted() && ends.last().is_none_or(|&end| end <= out.len()),
            "parts out of order or beyond the buffer"
        );
        // SAFETY: the ends ascend within `out` (asserted above), so the parts are disjoint and
        // inside it.
        unsafe {
            self.for_each_range_mut(
                out,
                ends.len(),
                &|i| (if i == 0 { 0 } else { ends[i - 1] })..ends[i],
                f,
            )
        };
    }

    /// Runs `f(i, &mut out[range(i)])` for every `i` in `0..parts`, spread over the pool.
    ///
    /// # Safety
    /// The ranges `range(i)` must be disjoint and inside `out`.
    unsafe fn for_each_range_mut<T: Send>(
        &self,
        out: &mut [T],
        parts: usize,
        range: &(dyn Fn(usize) -> std::ops::Range<usize> + Sync),
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let base = SendPtr(out.as_mut_ptr());
        self.for_each(parts, &|i| {
            let r = range(i);
            // SAFETY: `for_each` calls each `i` exactly once and the ranges are disjoint and
            // inside `out` (the caller's guarantee), which stays mutably borrowed until
            // `for_each` returns.
            let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(r.start), r.len()) };
            f(i, part);
        });
    }

    /// Runs `job` on the calling thread and on every worker that wakes while it is open.
    fn run<'a>(&self, job: &'a (dyn Fn() + Sync + 'a)) {
        // SAFETY: only the lifetime is erased. The pointer is published in `slot.job` and a
        // worker dereferences it only after registering in `slot.running` while `slot.job` is
        // still set. `Close` (also on unwinding) clears `slot.job` and then waits until
        // `running` is zero, so no worker touches the closure after this function returns.
        let erased: *const Job =
            unsafe { std::mem::transmute::<&'a (dyn Fn() + Sync + 'a), &'static Job>(job) };
        {
            let mut slot = self.shared.lock();
            // A panic of an earlier job that also unwound its caller is that job's, not this one's.
            slot.panicked = false;
            slot.job = Some(JobPtr(erased));
            slot.epoch += 1;
            self.shared.epoch.store(slot.epoch, Ordering::Release);
            if slot.sleepers > 0 {
                self.shared.wake_workers.notify_all();
            }
        }
        let close = Close(&self.shared);
        job();
        drop(close);
        let mut slot = self.shared.lock();
        if std::mem::take(&mut slot.panicked) {
            drop(slot);
            panic!("a CPU worker thread panicked");
        }
    }
}

/// Closes the open job and waits for the workers inside it, also when the caller unwinds.
struct Close<'a>(&'a Shared);

impl Drop for Close<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        for _ in 0..SPIN {
            if shared.running.load(Ordering::Acquire) == 0 {
                break;
            }
            std::hint::spin_loop();
        }
        let mut slot = shared.lock();
        slot.job = None;
        while slot.running > 0 {
            slot.caller_waiting = true;
            slot = shared
                .wake_caller
                .wait(slot)
                .unwrap_or_else(|e| e.into_inner());
        }
        slot.caller_waiting = false;
    }
}

struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: used only to hand disjoint sub-slices of one `&mut [T]` to other threads, and `T: Send`
// is required where it is built.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        for _ in 0..SPIN {
            if shared.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            std::hint::spin_loop();
        }
        let mut slot = shared.lock();
        while slot.epoch == seen && !slot.shutdown {
            slot.sleepers += 1;
            slot = shared
                .wake_workers
                .wait(slot)
                .unwrap_or_else(|e| e.into_inner());
            slot.sleepers -= 1;
        }
        if slot.shutdown {
            return;
        }
        seen = slot.epoch;
        let Some(job) = slot.job else {
            continue;
        };
        slot.running += 1;
        shared.running.store(slot.running, Ordering::Release);
        drop(slot);

        // SAFETY: registered in `running` while the job was open; see `Pool::run`.
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)() }));

        let mut slot = shared.lock();
        slot.running -= 1;
        shared.running.store(slot.running, Ordering::Release);
        if result.is_err() {
            slot.panicked = true;
        }
        if slot.running == 0 && slot.caller_waiting {
            shared.wake_caller.notify_one();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake_workers.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_exactly_once() {
        for threads in [1, 2, 4] {
            let pool = Pool::new(threads).unwrap();
            for n in [0, 1, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.for_each(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        let pool = Pool::new(3).unwrap();
        let mut out = vec![0usize; 1001];
        for _ in 0..50 {
            pool.for_each_chunk_mut(&mut out, 10, &|i, part| {
                for (k, v) in part.iter_mut().enumerate() {
                    *v += i * 10 + k;
                }
            });
        }
        assert!(out.iter().enumerate().all(|(k, v)| *v == 50 * k));
    }

    #[test]
    fn a_panicking_job_panics_the_caller_and_the_pool_still_works() {
        let pool = Pool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.for_each(64, &|i| assert!(i != 40, "boom"));
        }));
        assert!(r.is_err());
        let sum = AtomicUsize::new(0);
        pool.for_each(10, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
    }

    #[test]
    fn a_job_that_panics_everywhere_does_not_fail_the_next_one() {
        let pool = Pool::new(2).unwrap();
        for _ in 0..50 {
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.for_each(64, &|_| panic!("every index"));
            }));
            assert!(r.is_err());
            let sum = AtomicUsize::new(0);
            pool.for_each(10, &|i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 45);
        }
    }
}
