//! Folders made ahead for instances of a new study (SPEC.md section 4's hierarchical
//! layout makes `<study>/<series>/` for each): a pair `tmp/<run>/<n>.folder/s`, made
//! between messages and renamed into place when an instance needs both levels. Two
//! renames on the instance's round trip cost less than two `mkdir`s, which allocate
//! and zero each folder's inode and block (~80 against ~35 us here).
//!
//! Only a lone association asks for them (the cores are then not all busy), and only
//! while instances keep needing new folders. A thread of their own makes them, started
//! with the first pair asked for: made by the association itself after its response,
//! the two `mkdir`s held it from its socket while the next request was already there.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;

use crate::store::rename_noreplace;

/// The inner folder of a pair, renamed to the series' name.
const INNER: &str = "s";

/// The pairs ready, and whether they are wanted and possible.
pub struct SpareFolders {
    ready: Arc<Mutex<Vec<PathBuf>>>,
    /// A pair is asked for and not made yet.
    making: Arc<AtomicBool>,
    /// An instance made both its folders since the last pair was made.
    wanted: AtomicBool,
    /// Cleared once the filesystem refuses a rename that must not replace.
    supported: AtomicBool,
    /// Where pairs are asked for: the thread that makes them, started with the first
    /// one; None when no thread could be started (the caller makes them then).
    maker: OnceLock<Option<Sender<PathBuf>>>,
}

impl Default for SpareFolders {
    fn default() -> SpareFolders {
        SpareFolders {
            ready: Arc::new(Mutex::new(Vec::new())),
            making: Arc::new(AtomicBool::new(false)),
            wanted: AtomicBool::new(false),
            supported: AtomicBool::new(true),
            maker: OnceLock::new(),
        }
    }
}

impl SpareFolders {
    /// Asks for a pair at `pair` (a free name in the run's temporary folder) when the
    /// last instances needed one and none is ready or being made; it is made on the
    /// maker thread, or here when there is none. An error is that of making it here.
    pub fn prepare(&self, pair: impl FnOnce() -> PathBuf) -> io::Result<()> {
        // Read before written: this runs after every response of a lone association.
        let wanted = self.wanted.load(Ordering::Relaxed);
        if !wanted || !self.supported.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.wanted.store(false, Ordering::Relaxed);
        if !self
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
            || self.making.swap(true, Ordering::AcqRel)
        {
            return Ok(());
        }
        let pair = pair();
        let Some(maker) = self.maker() else {
            let made = make_pair(&pair, &self.ready);
            self.making.store(false, Ordering::Release);
            return made;
        };
        if maker.send(pair).is_err() {
            self.making.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// The maker thread's queue, the thread started on the first call.
    fn maker(&self) -> Option<&Sender<PathBuf>> {
        self.maker
            .get_or_init(|| spawn_maker(Arc::clone(&self.ready), Arc::clone(&self.making)))
            .as_ref()
    }

    /// Makes `parent/first/second` from a ready pair when `first` is missing and
    /// `parent` exists; false (nothing changed) otherwise, and the caller makes them.
    pub fn place(&self, parent: &Path, first: &str, second: &str) -> io::Result<bool> {
        let study = parent.join(first);
        let taken = self.ready.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let Some(pair) = taken else {
            return Ok(false);
        };
        if let Err(e) = rename_noreplace(&pair, &study) {
            match e.raw_os_error() {
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    self.supported.store(false, Ordering::Relaxed);
                    let _ = fs::remove_dir_all(&pair);
                }
                // `first` exists, or `parent` does not: the pair waits for another
                // instance, unless it went with a removed private area.
                _ if pair.is_dir() => self
                    .ready
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(pair),
                _ => {}
            }
            return Ok(false);
        }
        if let Err(e) = rename_noreplace(&study.join(INNER), &study.join(second)) {
            // Leave no half-made study behind (the instance fails with this error).
            let _ = fs::remove_dir(study.join(INNER));
            let _ = fs::remove_dir(&study);
            return Err(e);
        }
        self.wanted.store(true, Ordering::Relaxed);
        Ok(true)
    }

    /// Notes that an instance made both its folders itself.
    pub fn want(&self) {
        self.wanted.store(true, Ordering::Relaxed);
    }

    /// Waits, 5 s at the most, until no pair is being made.
    #[cfg(test)]
    pub fn settle(&self) {
        use std::time::{Duration, Instant};
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.making.load(Ordering::Acquire) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Forgets the pairs: the private area was removed, and them with it.
    pub fn forget(&self) {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Starts the thread that makes the pairs asked for on the returned queue, each put
/// among the `ready` ones; it ends when the queue is dropped with the store. None when
/// no thread can be started.
fn spawn_maker(
    ready: Arc<Mutex<Vec<PathBuf>>>,
    making: Arc<AtomicBool>,
) -> Option<Sender<PathBuf>> {
    let (asks, pairs) = mpsc::channel::<PathBuf>();
    let maker = move || {
        for pair in pairs {
            // A pair that cannot be made leaves the next new study to make its own.
            let _ = make_pair(&pair, &ready);
            making.store(false, Ordering::Release);
        }
    };
    let spawned = thread::Builder::new()
        .name("storescp-mkdir".into())
        .spawn(maker);
    spawned.ok().map(|_| asks)
}

/// Makes the pair `pair` and its inner folder, and puts it among the `ready` ones.
fn make_pair(pair: &Path, ready: &Mutex<Vec<PathBuf>>) -> io::Result<()> {
    fs::create_dir(pair)?;
    fs::create_dir(pair.join(INNER))?;
    ready
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(pair.to_path_buf());
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("storescp-spares-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("tmp")).unwrap();
        dir
    }

    /// A pair is made only once wanted, fills a new study's two levels, and is kept
    /// for another instance when the study exists already.
    #[test]
    fn a_pair_becomes_a_new_study_and_its_series() {
        let root = tempdir("pair");
        let spares = SpareFolders::default();
        spares.prepare(|| root.join("tmp/0.folder")).unwrap();
        assert!(!root.join("tmp/0.folder").exists(), "not wanted yet");
        assert!(!spares.place(&root, "1.2", "1.3").unwrap());

        spares.want();
        spares.prepare(|| root.join("tmp/1.folder")).unwrap();
        spares.settle();
        assert!(root.join("tmp/1.folder/s").is_dir());
        // Made by a thread of its own, not the caller.
        let threads = fs::read_dir("/proc/self/task").unwrap();
        let names = threads.map(|t| fs::read_to_string(t.unwrap().path().join("comm")));
        assert!(names.flatten().any(|name| name.trim() == "storescp-mkdir"));
        fs::create_dir(root.join("9.9")).unwrap();
        assert!(
            !spares.place(&root, "9.9", "9.8").unwrap(),
            "the study exists"
        );
        assert!(root.join("tmp/1.folder/s").is_dir(), "the pair waits");
        assert!(spares.place(&root, "1.2", "1.3").unwrap());
        assert!(root.join("1.2/1.3").is_dir());
        assert!(!root.join("1.2/s").exists() && !root.join("tmp/1.folder").exists());
        assert!(!spares.place(&root, "2.2", "2.3").unwrap(), "none ready");
        // Used, so wanted again.
        spares.prepare(|| root.join("tmp/2.folder")).unwrap();
        spares.settle();
        assert!(root.join("tmp/2.folder/s").is_dir());
        fs::remove_dir_all(root).unwrap();
    }

    /// A pair removed with the private area is forgotten, not reused.
    #[test]
    fn a_removed_pair_is_dropped() {
        let root = tempdir("removed");
        let spares = SpareFolders::default();
        spares.want();
        spares.prepare(|| root.join("tmp/0.folder")).unwrap();
        spares.settle();
        fs::remove_dir_all(root.join("tmp")).unwrap();
        assert!(!spares.place(&root, "1.2", "1.3").unwrap());
        assert!(spares.ready.lock().unwrap().is_empty());
        fs::remove_dir_all(root).unwrap();
    }
}
