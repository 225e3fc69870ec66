//! Group commit of fsyncs: when several associations need the same directory on disk,
//! one fsync that starts after all their changes serves them all.
//!
//! A caller first makes its change (links its file into a directory), then asks for a
//! sync. A sync already running may have started before the
//! change, so it does not count; the next one to start does. Whoever finds no sync
//! running starts one for everybody waiting; the others sleep until it completes.
//!
//! A caller that changed several directories (an instance of a new study: the root, the
//! study, the series) has them synced side by side, by helper threads, so that it waits
//! for the device once rather than once per directory.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;

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

/// The sync groups of the directories being synced right now.
type Groups = Mutex<HashMap<PathBuf, Arc<SyncGroup>>>;

/// Helper threads for the syncs a caller does not run itself; they end once the
/// [`DirectorySyncs`] that feeds them is gone.
const HELPERS: usize = 4;

/// A directory for a helper to sync, and where its result goes.
struct Job {
    dir: PathBuf,
    done: Sender<io::Result<()>>,
}

/// Group commit of directory fsyncs, one group per directory in use.
#[derive(Default)]
pub struct DirectorySyncs {
    groups: Arc<Groups>,
    /// Started with the first caller that has more than one directory to sync; None
    /// when no helper thread could be started.
    helpers: OnceLock<Option<Sender<Job>>>,
}

impl DirectorySyncs {
    /// Makes the entries of `first` and of every directory of `others` changed before
    /// this call durable, `first` on this thread and the others on helper threads
    /// meanwhile. An error of any is the call's error.
    pub fn sync_all(&self, first: &Path, others: &[PathBuf]) -> io::Result<()> {
        if others.is_empty() {
            return sync_in(&self.groups, first);
        }
        let (done, results) = mpsc::channel();
        let mut inline = Vec::new();
        let mut submitted = 0;
        for dir in others {
            let job = Job {
                dir: dir.clone(),
                done: done.clone(),
            };
            match self.submit(job) {
                Ok(()) => submitted += 1,
                Err(mpsc::SendError(job)) => inline.push(job.dir),
            }
        }
        drop(done);
        let mut result = sync_in(&self.groups, first);
        for dir in inline {
            result = result.and(sync_in(&self.groups, &dir));
        }
        // A job's sender goes with its answer, or unanswered if its helper died.
        let answers: Vec<_> = results.iter().take(submitted).collect();
        if answers.len() < submitted {
            return Err(io::Error::other("directory sync abandoned by its helper"));
        }
        answers.into_iter().fold(result, io::Result::and)
    }

    /// Hands `job` to the helpers, starting them first if need be; the job comes back
    /// when there are none.
    fn submit(&self, job: Job) -> Result<(), mpsc::SendError<Job>> {
        let helpers = self.helpers.get_or_init(|| start_helpers(&self.groups));
        match helpers {
            Some(queue) => queue.send(job),
            None => Err(mpsc::SendError(job)),
        }
    }
}

/// Starts the helper threads on one queue; None if not even one would start.
fn start_helpers(groups: &Arc<Groups>) -> Option<Sender<Job>> {
    let (queue, jobs) = mpsc::channel::<Job>();
    let jobs = Arc::new(Mutex::new(jobs));
    let started = (0..HELPERS)
        .filter(|k| {
            let (groups, jobs) = (Arc::clone(groups), Arc::clone(&jobs));
            thread::Builder::new()
                .name(format!("storescp-dirsync-{k}"))
                .spawn(move || help(&groups, &jobs))
                .is_ok()
        })
        .count();
    (started > 0).then_some(queue)
}

/// A helper's life: sync each directory handed over until the queue is gone.
fn help(groups: &Groups, jobs: &Mutex<Receiver<Job>>) {
    loop {
        let next = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(job) = next else { return };
        // The caller waits for every answer, so a send only fails if it is gone.
        let _ = job.done.send(sync_in(groups, &job.dir));
    }
}

/// Makes the entries of `dir` changed before this call durable, sharing a sync with
/// other callers for the same directory.
fn sync_in(groups: &Groups, dir: &Path) -> io::Result<()> {
    let group = {
        let mut groups = groups.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(groups.entry(dir.to_path_buf()).or_default())
    };
    let result = group.sync(|| std::fs::File::open(dir)?.sync_all());
    // Forget the group once nobody else holds it: the map only keeps directories
    // being synced right now.
    let mut groups = groups.lock().unwrap_or_else(|e| e.into_inner());
    if Arc::strong_count(&group) == 2 {
        groups.remove(dir);
    }
    result
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
        syncs.sync_all(&dir, &[]).unwrap();
        assert!(syncs.groups.lock().unwrap().is_empty());
        assert!(syncs
            .sync_all(&dir.join("missing-dir-of-storescp"), &[])
            .is_err());
        assert!(
            syncs.helpers.get().is_none(),
            "one directory needs no helper"
        );
    }

    /// Several directories are synced by the caller and the helpers together; a failure
    /// of any of them, the caller's own or a helper's, is the caller's.
    #[test]
    fn several_directories_are_synced_side_by_side() {
        let syncs = DirectorySyncs::default();
        let base = std::env::temp_dir().join(format!("storescp-dirsyncs-{}", std::process::id()));
        let dirs: Vec<PathBuf> = (0..5).map(|k| base.join(k.to_string())).collect();
        for dir in &dirs {
            std::fs::create_dir_all(dir).unwrap();
        }
        syncs.sync_all(&dirs[0], &dirs[1..]).unwrap();
        assert!(matches!(syncs.helpers.get(), Some(Some(_))));
        let missing = base.join("missing");
        let others = [missing.clone(), dirs[1].clone()];
        assert!(syncs.sync_all(&dirs[0], &others).is_err());
        assert!(syncs.sync_all(&missing, &dirs[..1]).is_err());
        assert!(syncs.groups.lock().unwrap().is_empty());
        std::fs::remove_dir_all(base).unwrap();
    }
}
