//! Facts the core reports to Python, the bounded queue that carries them, the
//! acknowledgement gate for index commits, and the running counters (SPEC.md section 2).
//!
//! Workers push plain structs; Python handles them in batches. A store event that needs
//! the index row committed before success is answered carries an `ack_token`; the worker
//! then waits on [`EventQueue::wait_ack`] until Python calls [`EventQueue::ack`].
//!
//! Batches are handled one at a time, in queue order, by one of two handlers: Python's
//! loop, which drains the queue ([`EventQueue::drain`]), or, once Python has installed a
//! [`Handler`], the worker waiting for an acknowledgement when no batch is out. That
//! worker runs the handler on its own thread: waking Python's loop for the batch and
//! being woken back would cost two context switches per instance.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Events queued before workers block (back-pressure when Python falls behind).
const QUEUE_CAPACITY: usize = 16 * 1024;
/// Events that need no answer wake Python only once this many are queued; otherwise
/// it finds them at its next look, at most [`LOOK_INTERVAL`] later. Waking it for each
/// one costs two context switches per instance on the hot path.
const WAKE_BATCH: usize = 256;
/// How often a waiting `drain` looks at the queue without being woken.
const LOOK_INTERVAL: Duration = Duration::from_millis(20);
/// Most events a worker hands to the handler at once.
const HANDLER_BATCH: usize = 4096;

/// One fact; `kind` says which fields are meaningful (see `_core.pyi`).
#[derive(Debug, Clone, Default)]
pub struct Event {
    /// "assoc_accepted", "assoc_rejected", "assoc_released", "assoc_aborted", "echo",
    /// "store" or "error".
    pub kind: &'static str,
    pub assoc_id: u64,
    pub peer: String,
    pub calling_ae: String,
    pub called_ae: String,
    pub reason: String,
    pub status: u16,
    /// For "store": "stored", "replaced", "duplicate", "ignored", "refused", "failed".
    pub outcome: &'static str,
    pub error_comment: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_id: String,
    pub patient_name: String,
    pub modality: String,
    pub study_date: String,
    pub study_description: String,
    pub transfer_syntax: String,
    pub path: String,
    pub replaced_path: String,
    pub file_size: u64,
    pub data_set_bytes: u64,
    pub journal: String,
    /// Watermark of `journal`: every line before it belongs to an event queued earlier.
    pub journal_offset: u64,
    pub ack_token: u64,
}

impl Event {
    /// An event of `kind` with every other field empty.
    pub fn new(kind: &'static str) -> Event {
        Event {
            kind,
            ..Event::default()
        }
    }
}

/// Counters kept while running; never a rescan of the storage tree.
#[derive(Debug, Default)]
pub struct Stats {
    pub associations: AtomicU64,
    pub rejected_associations: AtomicU64,
    pub messages: AtomicU64,
    pub images_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub instances_stored: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub duplicates: AtomicU64,
    pub failures: AtomicU64,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Name/value pairs, in the order the statistics block prints them.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("associations", get(&self.associations)),
            ("rejected_associations", get(&self.rejected_associations)),
            ("messages", get(&self.messages)),
            ("images_received", get(&self.images_received)),
            ("bytes_received", get(&self.bytes_received)),
            ("instances_stored", get(&self.instances_stored)),
            ("stored_bytes", get(&self.stored_bytes)),
            ("duplicates", get(&self.duplicates)),
            ("failures", get(&self.failures)),
        ]
    }
}

/// Python's handling of one batch (record in the index, acknowledge, log), called on a
/// worker's thread. Installed through the PyO3 boundary.
pub type Handler = Box<dyn Fn(Vec<Event>) + Send + Sync>;

/// Who has a batch out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Handling {
    #[default]
    Idle,
    /// Python's loop; it is done with the batch when it drains again.
    Loop,
    /// A worker running the [`Handler`].
    Worker,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Event>,
    next_token: u64,
    acked: u64,
    /// Token ranges (first, last) Python could not commit; answered with a failure.
    refused: Vec<(u64, u64)>,
    closed: bool,
    handling: Handling,
    /// Workers may no longer run the handler (Python's loop has ended).
    retired: bool,
}

impl Queue {
    /// Takes up to `max` events for `by` to handle.
    fn take(&mut self, max: usize, by: Handling) -> Vec<Event> {
        let n = self.events.len().min(max);
        if n > 0 {
            self.handling = by;
        }
        self.events.drain(..n).collect()
    }

    /// Marks every token up to `upto` acknowledged, as refused unless `ok`.
    fn acknowledge(&mut self, upto: u64, ok: bool) {
        if upto > self.acked {
            if !ok {
                self.refused.push((self.acked + 1, upto));
            }
            self.acked = upto;
        }
    }
}

/// The bounded multi-producer queue Python drains, plus the ack gate.
#[derive(Default)]
pub struct EventQueue {
    queue: Mutex<Queue>,
    not_empty: Condvar,
    not_full: Condvar,
    /// Signalled when tokens are acknowledged and when a worker's batch is done.
    acked: Condvar,
    handler: OnceLock<Handler>,
}

/// Ends a worker's handling even if the handler unwinds, so that the queue never stays
/// claimed by a batch nobody is handling.
struct WorkerBatch<'q> {
    queue: &'q EventQueue,
    last_token: u64,
}

impl Drop for WorkerBatch<'_> {
    fn drop(&mut self) {
        let mut q = self.queue.lock();
        // A handler that failed before acknowledging leaves its batch refused.
        q.acknowledge(self.last_token, false);
        q.handling = Handling::Idle;
        drop(q);
        self.queue.acked.notify_all();
    }
}

impl EventQueue {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A worker that panicked while holding the lock leaves the queue consistent
        // (every mutation is a single push/pop), so poisoning is ignored.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an event, blocking while the queue is full (unless it is closed).
    pub fn push(&self, event: Event) {
        self.push_inner(event, false);
    }

    /// Queues a store event that must be acknowledged; returns its token.
    pub fn push_for_ack(&self, event: Event) -> u64 {
        self.push_inner(event, true)
    }

    fn push_inner(&self, mut event: Event, needs_ack: bool) -> u64 {
        let mut q = self.lock();
        while q.events.len() >= QUEUE_CAPACITY && !q.closed {
            q = self
                .not_full
                .wait_timeout(q, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        if needs_ack {
            q.next_token += 1;
            event.ack_token = q.next_token;
        }
        let token = event.ack_token;
        q.events.push_back(event);
        // With a handler installed, the worker waiting for this token handles it.
        let wake = (needs_ack && self.handler.get().is_none()) || q.events.len() >= WAKE_BATCH;
        drop(q);
        if wake {
            self.not_empty.notify_one();
        }
        token
    }

    /// Takes up to `max` events for Python's loop, waiting up to `timeout` for the first
    /// one (and for a worker's batch to be done). Calling it again means the loop is done
    /// with the previous batch.
    pub fn drain(&self, timeout: Duration, max: usize) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        if q.handling == Handling::Loop {
            q.handling = Handling::Idle;
            // Workers waiting for their tokens may now handle them.
            self.acked.notify_all();
        }
        while (q.events.is_empty() || q.handling != Handling::Idle) && !q.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q = self
                .not_empty
                .wait_timeout(q, (deadline - now).min(LOOK_INTERVAL))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        if q.handling != Handling::Idle {
            return Vec::new();
        }
        let batch = q.take(max, Handling::Loop);
        drop(q);
        self.not_full.notify_all();
        batch
    }

    /// True once closed, empty, and no worker is handling a batch: nothing more will ever
    /// be queued or handled.
    pub fn is_finished(&self) -> bool {
        let q = self.lock();
        q.closed && q.events.is_empty() && q.handling != Handling::Worker
    }

    /// Lets a worker waiting in [`EventQueue::wait_ack`] run `handler` on the queued
    /// events when no batch is out, instead of waking Python's loop. A second call is
    /// ignored.
    pub fn install_handler(&self, handler: Handler) {
        let _ = self.handler.set(handler);
    }

    /// Stops workers from running the handler; returns once none is. For Python's loop
    /// as it ends, which also gives up its own batch, if any.
    pub fn retire_handler(&self) {
        let mut q = self.lock();
        q.retired = true;
        if q.handling == Handling::Loop {
            q.handling = Handling::Idle;
        }
        while q.handling == Handling::Worker {
            q = self
                .acked
                .wait_timeout(q, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Marks the queue closed (all producers gone); wakes every waiter.
    pub fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
        self.acked.notify_all();
    }

    /// Acknowledges every token up to `upto`; `ok == false` means the index could not
    /// commit them and the workers answer with a failure status.
    pub fn ack(&self, upto: u64, ok: bool) {
        self.lock().acknowledge(upto, ok);
        self.acked.notify_all();
    }

    /// Waits until `token` is acknowledged: Some(true) committed, Some(false) refused,
    /// None when `give_up` says to stop waiting (hard shutdown) or the queue closed.
    /// With a handler installed and no batch out, handles the queued events meanwhile.
    pub fn wait_ack(&self, token: u64, give_up: &dyn Fn() -> bool) -> Option<bool> {
        let mut q = self.lock();
        loop {
            if q.acked >= token {
                let refused = q.refused.iter().any(|&(a, b)| (a..=b).contains(&token));
                // Ranges below every outstanding token are never consulted again.
                let acked = q.acked;
                if q.refused.len() > 64 {
                    q.refused.retain(|&(_, b)| b + 1024 > acked);
                }
                return Some(!refused);
            }
            if q.closed || give_up() {
                return None;
            }
            if q.handling == Handling::Idle && !q.retired && !q.events.is_empty() {
                if let Some(handler) = self.handler.get() {
                    let batch = q.take(HANDLER_BATCH, Handling::Worker);
                    drop(q);
                    self.handle_on_this_thread(handler, batch);
                    q = self.lock();
                    continue;
                }
            }
            q = self
                .acked
                .wait_timeout(q, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn handle_on_this_thread(&self, handler: &Handler, batch: Vec<Event>) {
        let _done = WorkerBatch {
            queue: self,
            last_token: batch.iter().map(|e| e.ack_token).max().unwrap_or(0),
        };
        self.not_full.notify_all();
        handler(batch);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc};
    use std::thread::{self, ThreadId};

    #[test]
    fn drain_returns_in_order_and_respects_max() {
        let q = EventQueue::default();
        for i in 0..5 {
            let mut e = Event::new("echo");
            e.assoc_id = i;
            q.push(e);
        }
        let first = q.drain(Duration::from_millis(1), 3);
        assert_eq!(
            first.iter().map(|e| e.assoc_id).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(q.drain(Duration::from_millis(1), 10).len(), 2);
        assert!(q.drain(Duration::from_millis(1), 10).is_empty());
        assert!(!q.is_finished());
        q.close();
        assert!(q.is_finished());
    }

    #[test]
    fn ack_releases_waiters_and_reports_refusals() {
        let q = Arc::new(EventQueue::default());
        let t1 = q.push_for_ack(Event::new("store"));
        let t2 = q.push_for_ack(Event::new("store"));
        assert_eq!((t1, t2), (1, 2));
        let q2 = Arc::clone(&q);
        let waiter = std::thread::spawn(move || q2.wait_ack(t2, &|| false));
        q.ack(1, true);
        q.ack(2, false);
        assert_eq!(waiter.join().unwrap(), Some(false));
        assert_eq!(q.wait_ack(t1, &|| false), Some(true));
    }

    #[test]
    fn wait_ack_gives_up_when_told() {
        let q = EventQueue::default();
        let t = q.push_for_ack(Event::new("store"));
        assert_eq!(q.wait_ack(t, &|| true), None);
    }

    /// A give_up for wait_ack that ends a test's wait after 10 s instead of hanging.
    fn give_up_later() -> impl Fn() -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        move || Instant::now() >= deadline
    }

    /// A queue whose handler acknowledges each batch as committed unless its first event
    /// has assoc_id 0 (then it returns without acknowledging) or 99 (then it panics), and
    /// reports the handling thread and the batch's assoc ids.
    fn queue_with_handler() -> (Arc<EventQueue>, mpsc::Receiver<(ThreadId, Vec<u64>)>) {
        let q = Arc::new(EventQueue::default());
        let weak = Arc::downgrade(&q);
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        q.install_handler(Box::new(move |batch: Vec<Event>| {
            let ids: Vec<u64> = batch.iter().map(|e| e.assoc_id).collect();
            let _ = tx
                .lock()
                .unwrap()
                .send((thread::current().id(), ids.clone()));
            match ids.first() {
                Some(99) => panic!("handler failed"),
                Some(0) => {}
                _ => {
                    let last = batch.iter().map(|e| e.ack_token).max().unwrap_or(0);
                    weak.upgrade().unwrap().ack(last, true);
                }
            }
        }));
        (q, rx)
    }

    fn store_event(assoc_id: u64) -> Event {
        let mut e = Event::new("store");
        e.assoc_id = assoc_id;
        e
    }

    #[test]
    fn the_waiting_worker_handles_the_queued_batch_itself() {
        let (q, handled) = queue_with_handler();
        q.push(store_event(7));
        let worker = {
            let q = Arc::clone(&q);
            thread::spawn(move || {
                let token = q.push_for_ack(store_event(8));
                (thread::current().id(), q.wait_ack(token, &give_up_later()))
            })
        };
        let (worker_id, answer) = worker.join().unwrap();
        assert_eq!(answer, Some(true));
        // One batch, on the worker's thread, holding what was queued before its event.
        assert_eq!(handled.try_recv().unwrap(), (worker_id, vec![7, 8]));
        assert!(handled.try_recv().is_err());
        assert!(q.drain(Duration::from_millis(1), 10).is_empty());
    }

    #[test]
    fn a_handler_that_does_not_acknowledge_refuses_its_batch() {
        let (q, handled) = queue_with_handler();
        let token = q.push_for_ack(store_event(0));
        assert_eq!(q.wait_ack(token, &give_up_later()), Some(false));
        assert_eq!(handled.try_recv().unwrap().1, vec![0]);
        // The queue is free again: the next batch is handled and committed.
        let next = q.push_for_ack(store_event(1));
        assert_eq!(q.wait_ack(next, &give_up_later()), Some(true));
    }

    #[test]
    fn a_panicking_handler_refuses_its_batch_and_frees_the_queue() {
        let (q, _handled) = queue_with_handler();
        let failed = {
            let q = Arc::clone(&q);
            thread::spawn(move || {
                let token = q.push_for_ack(store_event(99));
                let _ = q.wait_ack(token, &give_up_later());
            })
        };
        assert!(failed.join().is_err());
        assert_eq!(q.wait_ack(1, &give_up_later()), Some(false));
        let next = q.push_for_ack(store_event(1));
        assert_eq!(q.wait_ack(next, &give_up_later()), Some(true));
        assert!(!q.is_finished());
        q.close();
        assert!(q.is_finished());
    }

    #[test]
    fn the_loop_takes_no_batch_while_a_worker_handles_one() {
        let q = Arc::new(EventQueue::default());
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
        let weak = Arc::downgrade(&q);
        q.install_handler(Box::new(move |batch: Vec<Event>| {
            let _ = entered_tx.lock().unwrap().send(());
            let _ = release_rx.lock().unwrap().recv();
            let last = batch.iter().map(|e| e.ack_token).max().unwrap_or(0);
            weak.upgrade().unwrap().ack(last, true);
        }));
        let worker = {
            let q = Arc::clone(&q);
            thread::spawn(move || {
                let token = q.push_for_ack(store_event(1));
                q.wait_ack(token, &give_up_later())
            })
        };
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        q.push(store_event(2));
        assert!(q.drain(Duration::from_millis(30), 10).is_empty());
        release.send(()).unwrap();
        assert_eq!(worker.join().unwrap(), Some(true));
        let batch = q.drain(Duration::from_secs(10), 10);
        assert_eq!(batch.iter().map(|e| e.assoc_id).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn once_retired_workers_wait_for_the_loop() {
        let (q, handled) = queue_with_handler();
        q.retire_handler();
        let worker = {
            let q = Arc::clone(&q);
            thread::spawn(move || {
                let token = q.push_for_ack(store_event(5));
                q.wait_ack(token, &give_up_later())
            })
        };
        let batch = q.drain(Duration::from_secs(10), 10);
        assert_eq!(batch.len(), 1);
        q.ack(batch[0].ack_token, true);
        assert_eq!(worker.join().unwrap(), Some(true));
        assert!(handled.try_recv().is_err());
    }
}
