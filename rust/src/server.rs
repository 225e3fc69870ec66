//! The listener: binds, admits up to `max_assoc` concurrent associations (one worker
//! thread each), answers the surplus with A-ASSOCIATE-RJ 2/3/2, contains worker
//! panics, and stops gracefully (SPEC.md sections 2 and 3).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::io::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::association::AcceptPolicy;
use crate::events::{Event, EventQueue, Stats};
use crate::pdu::abort;
use crate::service;
use crate::store::{Store, StoreConfig};
use crate::transport::POLL_INTERVAL;

/// Connections being answered with a busy rejection at once; beyond it they are
/// closed unanswered, so a flood cannot multiply threads.
const MAX_REJECTING: usize = 16;
/// A peer that stops reading our answers is dropped after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Network and association settings decided at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: String,
    pub port: u16,
    pub accept: AcceptPolicy,
    pub max_assoc: usize,
    pub idle_timeout: Option<Duration>,
    pub artim_timeout: Duration,
    /// Queue an event for every successful C-STORE (off when nobody logs or indexes
    /// them: failures are always reported).
    pub report_stored: bool,
}

/// The shutdown state every worker consults between reads.
#[derive(Default)]
pub struct Control {
    stopping: AtomicBool,
    hard_stop_at: Mutex<Option<Instant>>,
}

impl Control {
    /// True once shutdown began: no new associations, idle ones end.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// True once the drain time is over: every association ends now.
    pub fn is_hard_stopped(&self) -> bool {
        self.is_stopping()
            && self
                .hard_stop_at
                .lock()
                .map(|at| at.is_some_and(|t| Instant::now() >= t))
                .unwrap_or(true)
    }

    fn begin_stop(&self, drain: Duration) {
        if let Ok(mut at) = self.hard_stop_at.lock() {
            at.get_or_insert(Instant::now() + drain);
        }
        self.stopping.store(true, Ordering::Release);
    }
}

/// State shared by the listener and every association worker.
pub struct Shared {
    pub settings: Settings,
    pub store: Store,
    pub events: EventQueue,
    pub stats: Stats,
    pub control: Control,
    active: AtomicUsize,
    rejecting: AtomicUsize,
    next_assoc: AtomicU64,
    listener_done: AtomicBool,
}

impl Shared {
    /// Associations being served right now.
    pub fn active_associations(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Why a server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The storage root (path) could not be opened or prepared.
    Storage(std::path::PathBuf, io::Error),
    /// The address could not be resolved or bound.
    Bind(io::Error),
}

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    port: u16,
    listener: Mutex<Option<JoinHandle<()>>>,
}

impl Server {
    /// Opens the store, binds, and starts the listener thread.
    pub fn start(settings: Settings, store: StoreConfig) -> Result<Server, StartError> {
        let root = store.root.clone();
        let store = Store::open(store).map_err(|e| StartError::Storage(root, e))?;
        Self::listen_with(settings, store).map_err(StartError::Bind)
    }

    fn listen_with(settings: Settings, store: Store) -> io::Result<Server> {
        let addr = (settings.bind.as_str(), settings.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other(format!("cannot resolve {}", settings.bind)))?;
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            settings,
            store,
            events: EventQueue::default(),
            stats: Stats::default(),
            control: Control::default(),
            active: AtomicUsize::new(0),
            rejecting: AtomicUsize::new(0),
            next_assoc: AtomicU64::new(1),
            listener_done: AtomicBool::new(false),
        });
        let for_thread = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name("storescp-listener".into())
            .spawn(move || listen(&for_thread, &listener))?;
        Ok(Server {
            shared,
            port,
            listener: Mutex::new(Some(handle)),
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Up to `max` events, waiting up to `timeout`; None once stopped and drained.
    pub fn next_events(&self, timeout: Duration, max: usize) -> Option<Vec<Event>> {
        if self.shared.events.is_finished() {
            return None;
        }
        let batch = self.shared.events.drain(timeout, max);
        if batch.is_empty() && self.is_quiescent() {
            self.join_listener();
            self.shared.events.close();
            return if self.shared.events.is_finished() {
                None
            } else {
                Some(Vec::new())
            };
        }
        Some(batch)
    }

    fn is_quiescent(&self) -> bool {
        let s = &self.shared;
        s.control.is_stopping()
            && s.listener_done.load(Ordering::Acquire)
            && s.active.load(Ordering::Acquire) == 0
            && s.rejecting.load(Ordering::Acquire) == 0
    }

    fn join_listener(&self) {
        if let Some(handle) = self.listener.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
    }

    /// Acknowledges store events up to `upto` (see [`EventQueue::ack`]).
    pub fn ack(&self, upto: u64, ok: bool) {
        self.shared.events.ack(upto, ok);
    }

    /// Stops accepting; in-flight C-STOREs may finish within `drain`, then every
    /// association is aborted. Returns at once; `next_events` ends with None.
    pub fn shutdown(&self, drain: Duration) {
        self.shared.control.begin_stop(drain);
    }
}

/// Waits until the listener is readable or the poll interval passes.
fn wait_readable(listener: &TcpListener) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = POLL_INTERVAL.as_millis() as libc::c_int;
    // SAFETY: one valid pollfd, count 1; the listener outlives the call.
    unsafe { libc::poll(&mut fd, 1, timeout) };
}

fn listen(shared: &Arc<Shared>, listener: &TcpListener) {
    while !shared.control.is_stopping() {
        wait_readable(listener);
        if shared.control.is_stopping() {
            break;
        }
        match listener.accept() {
            Ok((stream, addr)) => admit(shared, stream, addr),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors and the like: report, back off, keep serving.
                let mut event = Event::new("error");
                event.reason = format!("accept failed: {e}");
                shared.events.push(event);
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    shared.listener_done.store(true, Ordering::Release);
}

/// Decrements a counter when the thread that owns it ends, even by panic.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn admit(shared: &Arc<Shared>, stream: TcpStream, addr: SocketAddr) {
    let prepared = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_read_timeout(Some(POLL_INTERVAL)))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if prepared.is_err() {
        return;
    }
    let assoc_id = shared.next_assoc.fetch_add(1, Ordering::Relaxed);
    let busy = shared.active.load(Ordering::Acquire) >= shared.settings.max_assoc;
    let counter = if busy {
        &shared.rejecting
    } else {
        &shared.active
    };
    if busy && shared.rejecting.load(Ordering::Acquire) >= MAX_REJECTING {
        Stats::add(&shared.stats.rejected_associations, 1);
        return;
    }
    counter.fetch_add(1, Ordering::AcqRel);
    let worker = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("storescp-assoc-{assoc_id}"))
        .spawn(move || {
            let counter = if busy {
                &worker.rejecting
            } else {
                &worker.active
            };
            let _slot = Slot(counter);
            if busy {
                service::reject_busy(&worker, stream, addr, assoc_id);
            } else {
                contain(&worker, stream, addr, assoc_id);
            }
        });
    if spawned.is_err() {
        counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs an association; a panic inside it becomes an A-ABORT and an event, never a
/// crash of the process.
fn contain(shared: &Shared, stream: TcpStream, addr: SocketAddr, assoc_id: u64) {
    let spare = stream.try_clone().ok();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        service::run(shared, stream, addr, assoc_id)
    }));
    if let Err(panic) = outcome {
        if let Some(s) = spare.as_ref() {
            service::send_abort(s, abort::REASON_NOT_SPECIFIED);
        }
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let mut event = Event::new("assoc_aborted");
        event.assoc_id = assoc_id;
        event.peer = addr.to_string();
        event.reason = format!("internal error: {what}");
        shared.events.push(event);
    }
}
