//! Where storescp's new inodes are born: in the run's temporary folder, whose parent
//! carries ext4's "top directory" flag (`FS_TOPDIR_FL`, `chattr +T`), and, while
//! creating them in place is slow, registry entries and folders too, renamed into place.
//!
//! ext4 allocates a new inode in the block group of the folder it is created in
//! (`find_group_other` in fs/ext4/ialloc.c; folders near their parent), and without a
//! journal it passes over every inode freed in the last minute or so (`recently_deleted`,
//! up to six minutes while the inode table block is still dirty), looking at each. After
//! thousands of files were deleted near the storage root (a study purged, a store
//! emptied), every create there walks past all of them: tiny instances fall from
//! ~20,000 to ~3,000 per second for minutes. The subfolders of a folder marked "top" are
//! spread instead (the Orlov allocator's rule for top-level folders: a group picked from
//! a hash of the name among those with the fewest folders and at least average free
//! space), so a run's temporary folder, named anew each run, usually lands in a group
//! nobody emptied. Every instance's file is born there (`O_TMPFILE`), and the folder
//! pairs made ahead; where those births are slow all the same (the hash picked an emptied
//! group: the fewest folders), the store moves them to a new folder in the run's, which
//! carries the flag too. A registry entry that needs an inode (a symlink) and a new
//! folder are made in place, which costs one rename less, unless those made in place
//! lately took long: then, for a while, they are made in the temporary folder and
//! renamed into place. [`Birthplace`] tells both from the processor time of the last
//! creations. Other filesystems have no such flag; for them this does nothing but the
//! timing.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Processor time past which an inode made in place was slow: a symlink with its
/// block takes ~15 us, a folder ~40 us, each of them 250-1,000 us among recently
/// deleted inodes. One such now and then is lock contention (a waiter spins), so
/// inodes are born in the temporary folder once [`SLOW_OF_LAST`] were slow.
const SLOW_CREATE: Duration = Duration::from_micros(200);

/// How many of the last four inodes made in place must have been slow.
const SLOW_OF_LAST: u32 = 3;

/// How long inodes are born in the temporary folder then; after it they are made in
/// place again, to see.
const STAGED_FOR: Duration = Duration::from_secs(2);

/// Whether new inodes are to be born elsewhere than where they were, from the processor
/// time the last ones took: [`SLOW_OF_LAST`] of the last four timed over [`SLOW_CREATE`].
pub struct Birthplace {
    epoch: Instant,
    /// One create in this many is timed: the clock of a thread's processor time is a
    /// system call, not worth making around every instance's file.
    timed_every: u64,
    creates: AtomicU64,
    /// Nanoseconds since `epoch` until which inodes are made in the temporary folder.
    staged_until: AtomicU64,
    /// One bit per inode made in place lately, the last one lowest: set if slow.
    slow: AtomicU8,
}

impl Default for Birthplace {
    fn default() -> Birthplace {
        Birthplace::sampling(1)
    }
}

impl Birthplace {
    /// Times one create in `every` (at least 1).
    pub fn sampling(every: u64) -> Birthplace {
        Birthplace {
            epoch: Instant::now(),
            timed_every: every.max(1),
            creates: AtomicU64::new(0),
            staged_until: AtomicU64::new(0),
            slow: AtomicU8::new(0),
        }
    }

    /// True while inodes are to be made in the temporary folder and renamed into place.
    pub fn staged(&self) -> bool {
        self.since_epoch() < self.staged_until.load(Ordering::Relaxed)
    }

    /// Runs `make`, which makes an inode in place, and notes whether it took long (one
    /// time in `every` of [`Birthplace::sampling`]). Processor time, not wall time: a
    /// thread preempted meanwhile is not slow.
    pub fn in_place<T>(&self, make: impl FnOnce() -> T) -> T {
        if !self
            .creates
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(self.timed_every)
        {
            return make();
        }
        let before = thread_cpu_time();
        let made = make();
        let slow = u8::from(thread_cpu_time().saturating_sub(before) > SLOW_CREATE);
        let last = self.slow.load(Ordering::Relaxed) << 1 | slow;
        if (last & 0x0f).count_ones() >= SLOW_OF_LAST {
            let until = self.since_epoch() + STAGED_FOR.as_nanos() as u64;
            self.staged_until.store(until, Ordering::Relaxed);
            self.slow.store(0, Ordering::Relaxed);
        } else {
            // Concurrent creates may lose a bit: it only delays the decision.
            self.slow.store(last, Ordering::Relaxed);
        }
        made
    }

    /// Forgets that inodes were slow: made in place again from now on.
    pub fn unstage(&self) {
        self.staged_until.store(0, Ordering::Relaxed);
    }

    /// Makes the next inodes in the temporary folder, as after slow ones in place.
    #[cfg(test)]
    pub fn stage(&self) {
        self.staged_until.store(u64::MAX, Ordering::Relaxed);
    }

    fn since_epoch(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Processor time of the calling thread (zero if the clock cannot be read).
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, which outlives the call.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    match read {
        0 => Duration::new(now.tv_sec as u64, now.tv_nsec as u32),
        _ => Duration::ZERO,
    }
}

/// `FS_TOPDIR_FL` of linux/fs.h: "top of directory hierarchies".
const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;

/// Marks `dir` so that ext4 spreads its new subfolders over the filesystem. Best
/// effort: false where the filesystem keeps no such flag or refuses to change it.
pub fn spread_subfolders(dir: &Path) -> bool {
    let Ok(folder) = File::open(dir) else {
        return false;
    };
    match flags(&folder) {
        Some(f) if f & FS_TOPDIR_FL != 0 => true,
        Some(f) => {
            let wanted = f | FS_TOPDIR_FL;
            // SAFETY: FS_IOC_SETFLAGS reads one int from `wanted`, which outlives the
            // call; the descriptor is open (owned by `folder`).
            unsafe { libc::ioctl(folder.as_raw_fd(), libc::FS_IOC_SETFLAGS, &wanted) == 0 }
        }
        None => false,
    }
}

/// The inode flags of an open file, or None where the filesystem has none.
fn flags(file: &File) -> Option<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int into `flags`, which outlives the call; the
    // descriptor is open (owned by `file`).
    let done = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    (done == 0).then_some(flags)
}

/// Whether `dir` carries the flag; None where its filesystem keeps no inode flags.
#[cfg(test)]
pub(crate) fn is_spread(dir: &Path) -> Option<bool> {
    let folder = File::open(dir).ok()?;
    flags(&folder).map(|f| f & FS_TOPDIR_FL != 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn marks_a_folder_where_the_filesystem_keeps_flags() {
        let dir = std::env::temp_dir().join(format!("topdir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let before = is_spread(&dir);
        let marked = spread_subfolders(&dir);
        // A filesystem with inode flags (ext4) takes it; one without (tmpfs) says no.
        assert_eq!(is_spread(&dir), before.map(|_| marked));
        if before == Some(false) && marked {
            // Set once, it stays: a second call finds it and changes nothing.
            assert!(spread_subfolders(&dir));
            assert_eq!(is_spread(&dir), Some(true));
        }
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn slow_creates_in_place_stage_the_next_ones() {
        // Processor time, as the kernel spends it scanning past deleted inodes.
        let busy = || {
            let start = thread_cpu_time();
            while thread_cpu_time() - start < SLOW_CREATE * 2 {
                std::hint::black_box(start);
            }
        };
        let birthplace = Birthplace::default();
        assert!(!birthplace.staged());
        assert_eq!(birthplace.in_place(|| 7), 7);
        birthplace.in_place(busy);
        birthplace.in_place(|| ());
        birthplace.in_place(busy);
        assert!(!birthplace.staged(), "two slow of the last four");
        birthplace.in_place(busy);
        assert!(birthplace.staged(), "three slow of the last four");
        // A sleep is not processor time.
        let waited = Birthplace::default();
        for _ in 0..4 {
            waited.in_place(|| std::thread::sleep(SLOW_CREATE * 2));
        }
        assert!(!waited.staged());
        // Sampling one in two: the slow creates between the timed ones go unseen.
        let sampled = Birthplace::sampling(2);
        for k in 0..8 {
            match k % 2 {
                0 => sampled.in_place(|| ()),
                _ => sampled.in_place(busy),
            }
        }
        assert!(!sampled.staged());
        for _ in 0..6 {
            sampled.in_place(busy);
        }
        assert!(sampled.staged());
    }

    #[test]
    fn a_missing_folder_is_not_marked() {
        assert!(!spread_subfolders(Path::new(
            "/nonexistent/storescp-topdir"
        )));
        assert_eq!(is_spread(Path::new("/nonexistent/storescp-topdir")), None);
    }
}
