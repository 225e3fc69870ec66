//! Group commit of fsyncs: when several associations need the same directory on disk,
//! one fsync that starts after all their changes serves them all.
//!
//! A caller first makes its change (links its file into a directory), then asks for a
//! sync. A sync already running may have started before the
//! change, so it does not count; the next one to start does. Whoever finds no sync
//! running starts one for everybody waiting; the others sleep until it completes.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    /// Generations of syncs started and completed; a sync covers every change made
    /// before it started.
    started: u64,
    completed: u64,
    running: bool,
    /// Whether the last completed sync succeeded.
    last_ok: bool,
}

/// The syncs of one directory.
#[derive(Default)]
struct SyncGroup {
    state: Mutex<State>,
    done: Condvar,
}

impl SyncGroup {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once a sync that started after this call began has completed, running
    /// `sync` if nobody else is. An error of that sync is every waiter's error.
    fn sync(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut state = self.lock();
        let needed = state.started + 1;
        loop {
            if state.completed >= needed {
                return if state.last_ok {
                    Ok(())
                } else {
                    Err(io::Error::other("fsync failed (in a shared sync)"))
                };
            }
            if !state.running {
                state.running = true;
                state.started += 1;
                let generation = state.started;
                drop(state);
                let result = sync();
                let mut state = self.lock();
                state.running = false;
                state.completed = generation;
                state.last_ok = result.is_ok();
                drop(state);
                self.done.notify_all();
                return result;
            }
            state = self.done.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Group commit of directory fsyncs, one group per directory in use.
#[derive(Default)]
pub struct DirectorySyncs {
    groups: Mutex<HashMap<PathBuf, Arc<SyncGroup>>>,
}

impl DirectorySyncs {
    /// Makes the entries of `dir` changed before this call durable.
    pub fn sync(&self, dir: &Path) -> io::Result<()> {
        let group = {
            let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(groups.entry(dir.to_path_buf()).or_default())
        };
        let result = group.sync(|| std::fs::File::open(dir)?.sync_all());
        // Forget the group once nobody else holds it: the map only keeps directories
        // being synced right now.
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&group) == 2 {
            groups.remove(dir);
        }
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;
    use std::time::Duration;

    /// Callers arriving while a sync runs share the next one: 8 callers, a slow sync,
    /// far fewer than 8 syncs, and each caller returns only after a sync that started
    /// after it arrived.
    #[test]
    fn concurrent_callers_share_syncs() {
        let group = Arc::new(SyncGroup::default());
        let syncs = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (group, syncs) = (Arc::clone(&group), Arc::clone(&syncs));
                thread::spawn(move || {
                    group
                        .sync(|| {
                            syncs.fetch_add(1, Ordering::SeqCst);
                            thread::sleep(Duration::from_millis(50));
                            Ok(())
                        })
                        .unwrap()
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let n = syncs.load(Ordering::SeqCst);
        assert!((1..=3).contains(&n), "{n} syncs for 8 callers");
        // A later caller never rides on a completed sync.
        group.sync(|| Ok(())).unwrap();
        assert_eq!(group.lock().completed, n as u64 + 1);
    }

    #[test]
    fn a_failed_sync_fails_its_waiters_and_the_next_caller_retries() {
        let group = SyncGroup::default();
        assert!(group.sync(|| Err(io::Error::other("disk"))).is_err());
        assert!(group.sync(|| Ok(())).is_ok());
    }

    #[test]
    fn directory_groups_are_forgotten_when_idle() {
        let syncs = DirectorySyncs::default();
        let dir = std::env::temp_dir();
        syncs.sync(&dir).unwrap();
        assert!(syncs.groups.lock().unwrap().is_empty());
        assert!(syncs.sync(&dir.join("missing-dir-of-storescp")).is_err());
    }
}
