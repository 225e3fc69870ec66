//! Folders made ahead for instances of a new study (SPEC.md section 4's hierarchical
//! layout makes `<study>/<series>/` for each): a pair `tmp/<run>/<n>.folder/s`, made
//! between messages and renamed into place when an instance needs both levels. Two
//! renames on the instance's round trip cost less than two `mkdir`s, which allocate
//! and zero each folder's inode and block (~80 against ~35 us here).
//!
//! Only a lone association makes them (it has a core to itself between messages), and
//! only while instances keep needing new folders.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::store::os_result;

/// The inner folder of a pair, renamed to the series' name.
const INNER: &str = "s";

/// The pairs ready, and whether they are wanted and possible.
pub struct SpareFolders {
    ready: Mutex<Vec<PathBuf>>,
    /// An instance made both its folders since the last pair was made.
    wanted: AtomicBool,
    /// Cleared once the filesystem refuses a rename that must not replace.
    supported: AtomicBool,
}

impl Default for SpareFolders {
    fn default() -> SpareFolders {
        SpareFolders {
            ready: Mutex::new(Vec::new()),
            wanted: AtomicBool::new(false),
            supported: AtomicBool::new(true),
        }
    }
}

impl SpareFolders {
    /// Makes a pair at `pair` (a free name in the run's temporary folder) when the last
    /// instances needed one and none is ready.
    pub fn prepare(&self, pair: impl FnOnce() -> PathBuf) -> io::Result<()> {
        // Read before written: this runs after every response of a lone association.
        let wanted = self.wanted.load(Ordering::Relaxed);
        if !wanted || !self.supported.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.wanted.store(false, Ordering::Relaxed);
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        if !ready.is_empty() {
            return Ok(());
        }
        let pair = pair();
        fs::create_dir(&pair)?;
        fs::create_dir(pair.join(INNER))?;
        ready.push(pair);
        Ok(())
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

    /// Forgets the pairs: the private area was removed, and them with it.
    pub fn forget(&self) {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// `renameat2(RENAME_NOREPLACE)`: fails with EEXIST rather than replace `to`, even an
/// empty folder that another association has just made.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    os_result(rc)
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
        assert!(root.join("tmp/1.folder/s").is_dir());
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
        fs::remove_dir_all(root.join("tmp")).unwrap();
        assert!(!spares.place(&root, "1.2", "1.3").unwrap());
        assert!(spares.ready.lock().unwrap().is_empty());
        fs::remove_dir_all(root).unwrap();
    }
}
