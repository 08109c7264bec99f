//! The queen's picture of the cluster, fed only by heartbeats.
//!
//! Nothing here is persisted: a restarted queen knows every hive and worker again one
//! heartbeat interval after it starts. A component that misses [`STALE_AFTER`] intervals is
//! stale (listed, never scheduled on); one silent for [`REMOVE_AFTER`] intervals is forgotten.
//! Two things make a worker stale sooner: a stream of it that stalled while the worker did not
//! answer a check ([`Registry::mark_unresponsive`]; its own next heartbeat makes it healthy
//! again), and its hive going stale (a worker shuts itself down when its hive is gone, so the
//! jobs sent to it in the meantime would be cut).
//!
//! Besides each worker's info it keeps the prefix keys ([`rbee_contract::prefix`]) of the
//! prompts the worker has cached, for the scheduler to send a conversation back to where its
//! history is: what the worker last reported, plus the keys of the jobs the queen sent it
//! since and it accepted (see [`Registry::enter`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rbee_contract::{HiveInfo, WorkerHeartbeat, WorkerInfo, WorkerState};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::wire::{Health, HiveList, HiveStatus, WorkerList};

/// Missed intervals after which a component is stale.
pub(crate) const STALE_AFTER: u32 = 3;
/// Missed intervals after which a component is forgotten.
pub(crate) const REMOVE_AFTER: u32 = 10;
/// Heartbeats for which the keys of a job that ended stay in its worker's set on top of what
/// the worker reports: a heartbeat built while the job was still running may arrive after it
/// ended and not yet list what the job left in the cache.
const DISPATCHED_KEYS_BEATS: u8 = 2;

pub(crate) struct Registry {
    interval: Duration,
    maps: Mutex<Maps>,
    /// Bumped on every change that could alter a scheduling decision (a heartbeat, a slot
    /// coming free), so that a job waiting for a worker wakes up to look again.
    version: watch::Sender<u64>,
}

#[derive(Default)]
struct Maps {
    workers: HashMap<String, WorkerEntry>,
    hives: HashMap<String, HiveEntry>,
}

struct WorkerEntry {
    info: WorkerInfo,
    last_seen: Instant,
    /// Jobs the queen itself has sent to this worker and not yet seen end.
    in_flight: u32,
    /// A hive listed this worker in a heartbeat; if that hive stops listing it, it is gone.
    hive_reported: bool,
    /// Whether the sweep has already logged this worker as stale.
    stale: bool,
    /// A stream of this worker stalled and the worker did not answer: stale until its own
    /// next heartbeat.
    unresponsive: bool,
    /// Prefix keys the worker holds: its last report and [`WorkerEntry::dispatched`].
    /// Shared with the views, and copied only when it changes.
    prefixes: Arc<HashSet<u64>>,
    /// The last report alone.
    reported: Vec<u64>,
    /// Keys of jobs the queen sent this worker, running or ended a moment ago; they count
    /// only once the worker accepted the job.
    dispatched: Vec<Dispatched>,
    next_dispatch: u64,
}

/// The prefix keys of one job the queen sent to a worker.
struct Dispatched {
    id: u64,
    keys: Vec<u64>,
    /// The worker took the job (a refused one leaves nothing in its cache).
    accepted: bool,
    /// `None` while the job runs; then how many more heartbeats keep its keys.
    beats_left: Option<u8>,
}

impl WorkerEntry {
    fn new(info: WorkerInfo, now: Instant) -> Self {
        WorkerEntry {
            info,
            last_seen: now,
            in_flight: 0,
            hive_reported: false,
            stale: false,
            unresponsive: false,
            prefixes: Arc::default(),
            reported: Vec::new(),
            dispatched: Vec::new(),
            next_dispatch: 0,
        }
    }

    /// A new report replaces the last one; the keys of jobs sent since stay, those of jobs
    /// that ended count down.
    fn report(&mut self, keys: Vec<u64>) {
        self.reported = keys;
        self.dispatched.retain_mut(|d| match &mut d.beats_left {
            None => true,
            Some(0) => false,
            Some(left) => {
                *left -= 1;
                true
            }
        });
        let mut set: HashSet<u64> = self.reported.iter().copied().collect();
        set.extend(
            self.dispatched
                .iter()
                .filter(|d| d.accepted)
                .flat_map(|d| d.keys.iter().copied()),
        );
        self.prefixes = Arc::new(set);
    }
}

struct HiveEntry {
    info: HiveInfo,
    last_seen: Instant,
    stale: bool,
}

/// A worker as the scheduler sees it.
#[derive(Debug, Clone)]
pub(crate) struct WorkerView {
    pub info: WorkerInfo,
    pub health: Health,
    pub in_flight: u32,
    /// Prefix keys of the prompts the worker has cached.
    pub prefixes: Arc<HashSet<u64>>,
}

/// A hive as the scheduler sees it.
#[derive(Debug, Clone)]
pub(crate) struct HiveView {
    pub info: HiveInfo,
    pub health: Health,
    pub silent_for: Duration,
}

impl Registry {
    pub fn new(interval: Duration) -> Self {
        Registry {
            interval,
            maps: Mutex::new(Maps::default()),
            version: watch::Sender::new(0),
        }
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        // Plain bookkeeping: a panic while it was held leaves nothing half-done that matters.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// What `elapsed` of silence makes of a component; `None` once it is to be forgotten.
    fn classify(&self, elapsed: Duration) -> Option<Health> {
        if elapsed > self.interval * REMOVE_AFTER {
            None
        } else if elapsed > self.interval * STALE_AFTER {
            Some(Health::Stale)
        } else {
            Some(Health::Healthy)
        }
    }

    /// Records a worker's heartbeat, and the prefix keys it holds; the first one registers it.
    pub fn worker_beat(&self, heartbeat: WorkerHeartbeat) {
        self.record_worker(heartbeat.worker, Some(heartbeat.cached_prefixes));
    }

    /// Records what is known of a worker from elsewhere than its heartbeat (a hive's spawn
    /// result, a forwarded answer); the first one registers it. The worker's prefix keys stay.
    pub fn worker_heartbeat(&self, info: WorkerInfo) {
        self.record_worker(info, None);
    }

    /// `prefixes` comes with the worker's own heartbeat, the only proof that it answers again
    /// after it was [unresponsive](Self::mark_unresponsive).
    fn record_worker(&self, info: WorkerInfo, prefixes: Option<Vec<u64>>) {
        let now = Instant::now();
        {
            let mut maps = self.maps();
            match maps.workers.get_mut(&info.worker_id) {
                Some(entry) => {
                    if entry.stale {
                        tracing::info!(worker_id = %info.worker_id, "worker heartbeats again");
                    }
                    if entry.unresponsive && prefixes.is_some() {
                        tracing::info!(worker_id = %info.worker_id, "unresponsive worker heartbeats again; scheduling on it");
                        entry.unresponsive = false;
                    }
                    if entry.info.state != info.state {
                        tracing::info!(worker_id = %info.worker_id, state = ?info.state, "worker state changed");
                    }
                    entry.info = info;
                    entry.last_seen = now;
                    entry.stale = false;
                    if let Some(prefixes) = prefixes {
                        entry.report(prefixes);
                    }
                }
                None => {
                    tracing::info!(worker_id = %info.worker_id, url = %info.url, model = %info.model,
                        state = ?info.state, "worker registered");
                    let mut entry = WorkerEntry::new(info, now);
                    if let Some(prefixes) = prefixes {
                        entry.report(prefixes);
                    }
                    maps.workers.insert(entry.info.worker_id.clone(), entry);
                }
            }
        }
        self.changed();
    }

    /// Records a hive's heartbeat; the first one registers it. A worker this hive used to
    /// report and no longer does has died (the hive supervises its children), so it is
    /// forgotten at once rather than after going stale.
    pub fn hive_heartbeat(&self, info: HiveInfo) {
        let now = Instant::now();
        {
            let mut maps = self.maps();
            let hive_id = info.hive_id.clone();
            for worker in maps.workers.values_mut() {
                if worker.info.hive_id.as_deref() == Some(hive_id.as_str())
                    && info
                        .workers
                        .iter()
                        .any(|w| w.worker_id == worker.info.worker_id)
                {
                    worker.hive_reported = true;
                }
            }
            maps.workers.retain(|id, worker| {
                let gone = worker.hive_reported
                    && worker.info.hive_id.as_deref() == Some(hive_id.as_str())
                    && !info.workers.iter().any(|w| &w.worker_id == id);
                if gone {
                    tracing::info!(worker_id = %id, %hive_id, "worker no longer reported by its hive; forgotten");
                }
                !gone
            });
            match maps.hives.get_mut(&hive_id) {
                Some(entry) => {
                    if entry.stale {
                        tracing::info!(%hive_id, "hive heartbeats again");
                    }
                    entry.info = info;
                    entry.last_seen = now;
                    entry.stale = false;
                }
                None => {
                    tracing::info!(%hive_id, url = %info.url, "hive registered");
                    maps.hives.insert(
                        hive_id,
                        HiveEntry {
                            info,
                            last_seen: now,
                            stale: false,
                        },
                    );
                }
            }
        }
        self.changed();
    }

    /// Forgets a worker the queen could not reach; its next heartbeat, if any, brings it back.
    pub fn forget_worker(&self, worker_id: &str) {
        if self.maps().workers.remove(worker_id).is_some() {
            tracing::info!(
                worker_id,
                "worker unreachable; forgotten until its next heartbeat"
            );
            self.changed();
        }
    }

    /// Marks a worker whose stream stalled and which did not answer a check: it is stale
    /// (listed so, never scheduled on) until its own next heartbeat, which a hung process
    /// does not send.
    pub fn mark_unresponsive(&self, worker_id: &str) {
        let marked = match self.maps().workers.get_mut(worker_id) {
            Some(entry) if !entry.unresponsive => {
                entry.unresponsive = true;
                true
            }
            _ => false,
        };
        if marked {
            tracing::warn!(
                worker_id,
                "worker unresponsive; not scheduled on until it heartbeats again"
            );
            self.changed();
        }
    }

    pub fn worker_views(&self) -> Vec<WorkerView> {
        let now = Instant::now();
        let maps = self.maps();
        let hive_stale = |hive_id: Option<&str>| {
            hive_id
                .and_then(|id| maps.hives.get(id))
                .is_some_and(|hive| self.classify(now - hive.last_seen) != Some(Health::Healthy))
        };
        let mut views: Vec<WorkerView> = maps
            .workers
            .values()
            .filter_map(|entry| {
                let mut health = self.classify(now - entry.last_seen)?;
                if entry.unresponsive || hive_stale(entry.info.hive_id.as_deref()) {
                    health = Health::Stale;
                }
                Some(WorkerView {
                    info: entry.info.clone(),
                    health,
                    in_flight: entry.in_flight,
                    prefixes: Arc::clone(&entry.prefixes),
                })
            })
            .collect();
        views.sort_by(|a, b| a.info.worker_id.cmp(&b.info.worker_id));
        views
    }

    pub fn hive_views(&self) -> Vec<HiveView> {
        let now = Instant::now();
        let maps = self.maps();
        let mut views: Vec<HiveView> = maps
            .hives
            .values()
            .filter_map(|entry| {
                let silent_for = now - entry.last_seen;
                Some(HiveView {
                    health: self.classify(silent_for)?,
                    info: entry.info.clone(),
                    silent_for,
                })
            })
            .collect();
        views.sort_by(|a, b| a.info.hive_id.cmp(&b.info.hive_id));
        views
    }

    pub fn worker_list(&self) -> WorkerList {
        let workers = self
            .worker_views()
            .into_iter()
            .map(|view| {
                let mut info = view.info;
                if view.health == Health::Stale {
                    info.state = WorkerState::Stale;
                }
                info
            })
            .collect();
        WorkerList { workers }
    }

    pub fn hive_list(&self) -> HiveList {
        let hives = self
            .hive_views()
            .into_iter()
            .map(|view| HiveStatus {
                hive: view.info,
                status: view.health,
                last_seen_ms_ago: u64::try_from(view.silent_for.as_millis()).unwrap_or(u64::MAX),
            })
            .collect();
        HiveList { hives }
    }

    /// Logs components that went stale and forgets those silent for too long.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut changed = false;
        {
            let mut maps = self.maps();
            maps.workers.retain(|id, entry| {
                let silent = now - entry.last_seen;
                match self.classify(silent) {
                    None => {
                        tracing::info!(worker_id = %id, ?silent, "worker forgotten: no heartbeat");
                        changed = true;
                        false
                    }
                    Some(Health::Stale) if !entry.stale => {
                        tracing::warn!(worker_id = %id, ?silent, "worker is stale: heartbeats stopped");
                        entry.stale = true;
                        changed = true;
                        true
                    }
                    Some(_) => true,
                }
            });
            maps.hives.retain(|id, entry| {
                let silent = now - entry.last_seen;
                match self.classify(silent) {
                    None => {
                        tracing::info!(hive_id = %id, ?silent, "hive forgotten: no heartbeat");
                        changed = true;
                        false
                    }
                    Some(Health::Stale) if !entry.stale => {
                        tracing::warn!(hive_id = %id, ?silent, "hive is stale: heartbeats stopped");
                        entry.stale = true;
                        changed = true;
                        true
                    }
                    Some(_) => true,
                }
            });
        }
        if changed {
            self.changed();
        }
    }

    /// Fires after any change to the registry.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Counts a job the queen sends to `worker_id` until the guard is dropped, and keeps the
    /// job's prefix `keys` to count as held by the worker once it accepted the job
    /// ([`Acceptance::accepted`]): the worker caches the prompt as it runs it, and the
    /// conversation's next turn, which may come before the next heartbeat, should find it
    /// there. A job the worker refuses (`busy`) leaves nothing behind. The keys stay while the
    /// job runs and for [`DISPATCHED_KEYS_BEATS`] heartbeats after; from then on the worker's
    /// report alone says whether it still holds them.
    pub fn enter(self: &Arc<Self>, worker_id: &str, keys: &[u64]) -> InFlight {
        // A request of many tiny messages has as many keys; a worker reports at most this many,
        // the leading ones (the longest prefixes a next turn can match start there).
        let keys = &keys[..keys.len().min(rbee_contract::prefix::MAX_REPORTED_PREFIXES)];
        let mut dispatch = None;
        if let Some(entry) = self.maps().workers.get_mut(worker_id) {
            entry.in_flight += 1;
            if !keys.is_empty() {
                let id = entry.next_dispatch;
                entry.next_dispatch += 1;
                entry.dispatched.push(Dispatched {
                    id,
                    keys: keys.to_vec(),
                    accepted: false,
                    beats_left: None,
                });
                dispatch = Some(id);
            }
        }
        InFlight {
            registry: Arc::clone(self),
            worker_id: worker_id.to_owned(),
            dispatch,
        }
    }
}

/// One job the queen has sent to a worker; dropping it ends the count.
pub(crate) struct InFlight {
    registry: Arc<Registry>,
    worker_id: String,
    /// Its entry in the worker's [`WorkerEntry::dispatched`].
    dispatch: Option<u64>,
}

impl InFlight {
    /// What tells the registry that the worker took the job; taken before the guard is handed
    /// to whatever holds it while the job runs.
    pub fn acceptance(&self) -> Acceptance {
        Acceptance {
            registry: Arc::clone(&self.registry),
            worker_id: self.worker_id.clone(),
            dispatch: self.dispatch,
        }
    }
}

/// See [`InFlight::acceptance`].
pub(crate) struct Acceptance {
    registry: Arc<Registry>,
    worker_id: String,
    dispatch: Option<u64>,
}

impl Acceptance {
    /// The worker accepted the job: its keys count as held from now on.
    pub fn accepted(self) {
        let Some(id) = self.dispatch else {
            return;
        };
        if let Some(entry) = self.registry.maps().workers.get_mut(&self.worker_id)
            && let Some(d) = entry.dispatched.iter_mut().find(|d| d.id == id)
        {
            d.accepted = true;
            if !d.keys.iter().all(|k| entry.prefixes.contains(k)) {
                Arc::make_mut(&mut entry.prefixes).extend(d.keys.iter().copied());
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(entry) = self.registry.maps().workers.get_mut(&self.worker_id) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if let Some(at) = entry
                .dispatched
                .iter()
                .position(|d| Some(d.id) == self.dispatch)
            {
                if entry.dispatched[at].accepted {
                    entry.dispatched[at].beats_left = Some(DISPATCHED_KEYS_BEATS);
                } else {
                    entry.dispatched.remove(at);
                }
            }
        }
        // A slot came free: the job first in line for this worker's model looks again.
        self.registry.changed();
    }
}

/// Runs [`Registry::sweep`] every interval until `stop` fires.
pub(crate) async fn sweep_every(
    registry: Arc<Registry>,
    stop: tokio_util::sync::CancellationToken,
) {
    // A zero period would make `interval` panic; a library user may configure one.
    let period = registry.interval.max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => registry.sweep(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn worker(id: &str, model: &str, state: WorkerState, slots_free: u32) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            url: format!("http://127.0.0.1:1/{id}"),
            model: model.into(),
            device: "cpu".into(),
            state,
            slots_total: 1,
            slots_free,
            hive_id: None,
            context_length: None,
        }
    }

    pub(crate) fn hive(id: &str, workers: Vec<WorkerInfo>) -> HiveInfo {
        HiveInfo {
            hive_id: id.into(),
            url: format!("http://127.0.0.1:1/{id}"),
            devices: Vec::new(),
            workers,
            models: Vec::new(),
            model_dirs: Vec::new(),
        }
    }

    const TICK: Duration = Duration::from_millis(100);

    #[tokio::test(start_paused = true)]
    async fn silence_makes_stale_then_forgotten() {
        let registry = Registry::new(TICK);
        registry.worker_heartbeat(worker("w1", "m", WorkerState::Ready, 1));
        registry.hive_heartbeat(hive("h1", Vec::new()));
        assert_eq!(registry.worker_views()[0].health, Health::Healthy);

        tokio::time::advance(TICK * 3 + Duration::from_millis(1)).await;
        registry.sweep();
        let list = registry.worker_list();
        assert_eq!(list.workers[0].state, WorkerState::Stale);
        assert_eq!(registry.hive_list().hives[0].status, Health::Stale);

        // A heartbeat brings a stale worker back.
        registry.worker_heartbeat(worker("w1", "m", WorkerState::Ready, 1));
        assert_eq!(registry.worker_list().workers[0].state, WorkerState::Ready);

        tokio::time::advance(TICK * 10 + Duration::from_millis(1)).await;
        registry.sweep();
        assert!(registry.worker_list().workers.is_empty());
        assert!(registry.hive_list().hives.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn listing_hides_expired_entries_before_the_sweep() {
        let registry = Registry::new(TICK);
        registry.worker_heartbeat(worker("w1", "m", WorkerState::Ready, 1));
        tokio::time::advance(TICK * 11).await;
        assert!(registry.worker_list().workers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_its_hive_stops_reporting_is_forgotten() {
        let registry = Registry::new(TICK);
        let mut w = worker("w1", "m", WorkerState::Ready, 1);
        w.hive_id = Some("h1".into());
        let mut other = worker("w2", "m", WorkerState::Loading, 1);
        other.hive_id = Some("h1".into());
        registry.worker_heartbeat(w.clone());
        registry.worker_heartbeat(other);
        // The hive has not listed w2 yet (it may still be starting): w2 stays.
        registry.hive_heartbeat(hive("h1", vec![w.clone()]));
        assert_eq!(registry.worker_views().len(), 2);
        registry.hive_heartbeat(hive("h1", Vec::new()));
        let ids: Vec<String> = registry
            .worker_views()
            .into_iter()
            .map(|v| v.info.worker_id)
            .collect();
        assert_eq!(ids, vec!["w2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_counts_follow_the_guards() {
        let registry = Arc::new(Registry::new(TICK));
        registry.worker_heartbeat(worker("w1", "m", WorkerState::Ready, 1));
        let a = registry.enter("w1", &[]);
        let b = registry.enter("w1", &[]);
        assert_eq!(registry.worker_views()[0].in_flight, 2);
        let mut changes = registry.changes();
        changes.borrow_and_update();
        drop(a);
        assert_eq!(registry.worker_views()[0].in_flight, 1);
        assert!(
            changes.has_changed().unwrap(),
            "a freed slot wakes jobs waiting for one"
        );
        registry.forget_worker("w1");
        drop(b);
        assert!(registry.worker_views().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unresponsive_worker_is_stale_until_its_own_next_heartbeat() {
        let registry = Registry::new(TICK);
        registry.worker_beat(beat("w1", &[]));
        registry.worker_beat(beat("w2", &[]));
        let mut changes = registry.changes();
        changes.borrow_and_update();
        registry.mark_unresponsive("w1");
        assert!(changes.has_changed().unwrap(), "waiting jobs look again");
        let health: Vec<Health> = registry.worker_views().iter().map(|v| v.health).collect();
        assert_eq!(health, [Health::Stale, Health::Healthy]);
        assert_eq!(registry.worker_list().workers[0].state, WorkerState::Stale);
        // What others say of the worker (a hive's spawn result, a forward) is no proof.
        registry.worker_heartbeat(worker("w1", "m", WorkerState::Ready, 1));
        assert_eq!(registry.worker_views()[0].health, Health::Stale);
        registry.worker_beat(beat("w1", &[]));
        assert_eq!(registry.worker_views()[0].health, Health::Healthy);
        assert_eq!(registry.worker_list().workers[0].state, WorkerState::Ready);
        registry.mark_unresponsive("gone");
        assert_eq!(registry.worker_views().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_workers_of_a_stale_hive_are_stale() {
        let registry = Registry::new(TICK);
        let on = |id: &str, hive: Option<&str>| {
            let mut info = worker(id, "m", WorkerState::Ready, 1);
            info.hive_id = hive.map(String::from);
            WorkerHeartbeat {
                worker: info,
                cached_prefixes: Vec::new(),
            }
        };
        registry.hive_heartbeat(hive("h1", Vec::new()));
        registry.hive_heartbeat(hive("h2", Vec::new()));
        let all_beat = |registry: &Registry| {
            registry.worker_beat(on("a", Some("h1")));
            registry.worker_beat(on("b", Some("h2")));
            registry.worker_beat(on("c", None));
            // A hive the queen has not heard of (it restarted a moment ago) is no reason.
            registry.worker_beat(on("d", Some("h-unknown")));
        };
        all_beat(&registry);
        // h1 goes silent while its worker and everything else go on heartbeating.
        for _ in 0..4 {
            tokio::time::advance(TICK).await;
            registry.hive_heartbeat(hive("h2", Vec::new()));
            all_beat(&registry);
        }
        let health: Vec<(String, Health)> = registry
            .worker_views()
            .into_iter()
            .map(|v| (v.info.worker_id, v.health))
            .collect();
        let expected = [
            ("a", Health::Stale),
            ("b", Health::Healthy),
            ("c", Health::Healthy),
            ("d", Health::Healthy),
        ]
        .map(|(id, health)| (id.to_string(), health));
        assert_eq!(health, expected);
        // The hive heartbeats again: so are its workers.
        registry.hive_heartbeat(hive("h1", Vec::new()));
        assert_eq!(registry.worker_views()[0].health, Health::Healthy);
    }

    fn beat(id: &str, prefixes: &[u64]) -> WorkerHeartbeat {
        WorkerHeartbeat {
            worker: worker(id, "m", WorkerState::Ready, 1),
            cached_prefixes: prefixes.to_vec(),
        }
    }

    fn held(registry: &Registry) -> Vec<u64> {
        let mut keys: Vec<u64> = registry.worker_views()[0]
            .prefixes
            .iter()
            .copied()
            .collect();
        keys.sort();
        keys
    }

    #[tokio::test(start_paused = true)]
    async fn prefix_keys_follow_reports_and_dispatches() {
        let registry = Arc::new(Registry::new(TICK));
        registry.worker_beat(beat("w1", &[1, 2]));
        assert_eq!(held(&registry), [1, 2]);
        // Another report replaces the set; what a spawn result or a forward tells of the
        // worker leaves it alone.
        registry.worker_beat(beat("w1", &[3]));
        assert_eq!(held(&registry), [3]);
        registry.worker_heartbeat(worker("w1", "m", WorkerState::Ready, 1));
        assert_eq!(held(&registry), [3]);

        // A job's keys count once the worker accepted it, through the heartbeats while it runs.
        let job = registry.enter("w1", &[10, 11]);
        assert_eq!(held(&registry), [3]);
        job.acceptance().accepted();
        assert_eq!(held(&registry), [3, 10, 11]);
        registry.worker_beat(beat("w1", &[]));
        registry.worker_beat(beat("w1", &[]));
        registry.worker_beat(beat("w1", &[]));
        assert_eq!(held(&registry), [10, 11]);
        // Once it ended, for two more heartbeats: one built before the end may arrive after.
        drop(job);
        registry.worker_beat(beat("w1", &[]));
        registry.worker_beat(beat("w1", &[10]));
        assert_eq!(held(&registry), [10, 11]);
        // Then the worker's report alone says what it holds.
        registry.worker_beat(beat("w1", &[10]));
        assert_eq!(held(&registry), [10]);
    }

    /// A job the worker refused (`busy`) never held anything: its keys do not count, during or
    /// after, and the next turn of its conversation is not drawn to that worker.
    #[tokio::test(start_paused = true)]
    async fn a_refused_job_leaves_no_keys() {
        let registry = Arc::new(Registry::new(TICK));
        registry.worker_beat(beat("w1", &[1]));
        let refused = registry.enter("w1", &[10, 11]);
        assert_eq!(held(&registry), [1]);
        drop(refused);
        assert_eq!(held(&registry), [1]);
        registry.worker_beat(beat("w1", &[1]));
        assert_eq!(held(&registry), [1]);
        assert_eq!(registry.worker_views()[0].in_flight, 0);
    }

    /// A request of thousands of tiny messages adds only the leading keys a worker could
    /// report, not one per message.
    #[tokio::test(start_paused = true)]
    async fn a_jobs_keys_are_capped_at_what_a_worker_reports() {
        let registry = Arc::new(Registry::new(TICK));
        registry.worker_beat(beat("w1", &[]));
        let keys: Vec<u64> = (0..5000).collect();
        let job = registry.enter("w1", &keys);
        job.acceptance().accepted();
        let held = held(&registry);
        assert_eq!(held.len(), rbee_contract::prefix::MAX_REPORTED_PREFIXES);
        assert_eq!(held.first(), Some(&0));
    }
}
