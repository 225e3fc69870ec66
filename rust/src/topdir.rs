//! The "top directory" flag of ext4 (`FS_TOPDIR_FL`, `chattr +T`), set on the folder
//! that holds each run's temporary folder, so that the inodes of new instances are
//! allocated away from inodes freed a moment ago.
//!
//! ext4 allocates a new file's inode in the block group of the folder it is created in
//! (`find_group_other` in fs/ext4/ialloc.c), and without a journal it passes over every
//! inode freed in the last minute or so (`recently_deleted`, up to six minutes while the
//! inode table block is still dirty), looking at each. After thousands of files were
//! deleted near the storage root (a study purged, a store emptied), every create in
//! that group walks past all of them: tiny instances fall from ~20,000 to ~3,000 per
//! second for minutes. The subfolders of a folder marked "top" are spread instead (the
//! Orlov allocator's rule for top-level folders: a group picked from a hash of the name
//! among those with the fewest folders and at least average free space), so a run's
//! temporary folder, named anew each run, usually lands in a group nobody emptied.
//! Every instance's inode is born there (`O_TMPFILE`, and the folder pairs made ahead).
//! Other filesystems have no such flag; for them this does nothing.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

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
    fn a_missing_folder_is_not_marked() {
        assert!(!spread_subfolders(Path::new(
            "/nonexistent/storescp-topdir"
        )));
        assert_eq!(is_spread(Path::new("/nonexistent/storescp-topdir")), None);
    }
}
