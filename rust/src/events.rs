//! Facts the core reports to Python, the bounded queue that carries them, the
//! acknowledgement gate for index commits, and the running counters (SPEC.md section 2).
//!
//! Workers push plain structs; Python drains them in batches. A store event that needs
//! the index row committed before success is answered carries an `ack_token`; the worker
//! then waits on [`EventQueue::wait_ack`] until Python calls [`EventQueue::ack`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Events queued before workers block (back-pressure when Python falls behind).
const QUEUE_CAPACITY: usize = 16 * 1024;
/// Events that need no answer wake Python only once this many are queued; otherwise
/// it finds them at its next look, at most [`LOOK_INTERVAL`] later. Waking it for each
/// one costs two context switches per instance on the hot path.
const WAKE_BATCH: usize = 256;
/// How often a waiting `drain` looks at the queue without being woken.
const LOOK_INTERVAL: Duration = Duration::from_millis(20);

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

#[derive(Default)]
struct Queue {
    events: VecDeque<Event>,
    next_token: u64,
    acked: u64,
    /// Token ranges (first, last) Python could not commit; answered with a failure.
    refused: Vec<(u64, u64)>,
    closed: bool,
}

/// The bounded multi-producer queue Python drains, plus the ack gate.
#[derive(Default)]
pub struct EventQueue {
    queue: Mutex<Queue>,
    not_empty: Condvar,
    not_full: Condvar,
    acked: Condvar,
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
        let wake = needs_ack || q.events.len() >= WAKE_BATCH;
        drop(q);
        if wake {
            self.not_empty.notify_one();
        }
        token
    }

    /// Takes up to `max` events, waiting up to `timeout` for the first one.
    pub fn drain(&self, timeout: Duration, max: usize) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        while q.events.is_empty() && !q.closed {
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
        // Producers wait only on a full queue, so only then is there anyone to wake.
        let was_full = q.events.len() >= QUEUE_CAPACITY;
        let n = q.events.len().min(max);
        let batch: Vec<Event> = q.events.drain(..n).collect();
        drop(q);
        if was_full && n > 0 {
            self.not_full.notify_all();
        }
        batch
    }

    /// True once closed and empty: nothing more will ever be queued.
    pub fn is_finished(&self) -> bool {
        let q = self.lock();
        q.closed && q.events.is_empty()
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
        let mut q = self.lock();
        if upto > q.acked {
            if !ok {
                let first = q.acked + 1;
                q.refused.push((first, upto));
            }
            q.acked = upto;
        }
        drop(q);
        self.acked.notify_all();
    }

    /// Waits until `token` is acknowledged: Some(true) committed, Some(false) refused,
    /// None when `give_up` says to stop waiting (hard shutdown) or the queue closed.
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
            q = self
                .acked
                .wait_timeout(q, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

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

    /// A producer blocked on a full queue goes on once a drain makes room.
    #[test]
    fn a_drain_releases_a_producer_blocked_on_a_full_queue() {
        let q = Arc::new(EventQueue::default());
        for _ in 0..QUEUE_CAPACITY {
            q.push(Event::new("store"));
        }
        let q2 = Arc::clone(&q);
        let producer = std::thread::spawn(move || q2.push(Event::new("last")));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!producer.is_finished(), "the queue is full");
        assert_eq!(q.drain(Duration::from_millis(1), 1).len(), 1);
        producer.join().unwrap();
        assert_eq!(
            q.drain(Duration::from_millis(1), usize::MAX).len(),
            QUEUE_CAPACITY
        );
    }

    #[test]
    fn wait_ack_gives_up_when_told() {
        let q = EventQueue::default();
        let t = q.push_for_ack(Event::new("store"));
        assert_eq!(q.wait_ack(t, &|| true), None);
    }
}
