//! The registry of stored SOP Instance UIDs, whatever the naming scheme: the links
//! under `ROOT/.storescp/` that make the duplicate decision hold across layouts and
//! processes (SPEC.md section 4). Every target is relative to the root.
//!
//! - `sop/<xx>/<SOPInstanceUID>`: the entry of a stored instance. `xx` is the UID's hash
//!   modulo 256 in two hex digits, so that no one directory holds every UID of an
//!   archive (ext4 without `large_dir` refuses entries past about ten million in one
//!   directory) and concurrent associations seldom queue on one directory's lock. A
//!   dangling entry (a crash between linking and placing, or a file deleted since)
//!   counts as "not stored". It is a symlink, read with `readlink`, naming either
//!   - the file's folder, when the entry is another name (a hard link) of that folder's
//!     link below: the file is `<folder>/<SOPInstanceUID>.dcm` (every naming scheme
//!     names files so). Such an entry costs a directory entry and no inode of its own,
//!     where a symlink per instance was an inode each (a fifth of the server's time
//!     for tiny instances);
//!   - the file's path itself, whose last component is `<SOPInstanceUID>.dcm`: for the
//!     first instance a process stores in a folder (below), or when a folder's token is
//!     taken by another folder; or
//!   - the folder link, `.storescp/folder/<xx>/<token>`: entries of earlier versions,
//!     and the fallback when the folder link has as many hard links as the filesystem
//!     allows (65,000 on ext4).
//! - `folder/<xx>/<token>`: a symlink to a folder holding stored files (`.` for the root
//!   itself), made when a process stores a folder's second instance (the first one's
//!   entry holds its path: a folder of one instance, an SR's series say, would pay an
//!   inode for a link nobody else uses) and never changed; `token` is the folder's
//!   64-bit hash in hex, `xx` that hash modulo 256.
//!
//! The 256 folders of each are made at start ([`Registry::make_folders`]). Links of an
//! older, flat `sop/<SOPInstanceUID>` are moved into their folders then too.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::store::{make_staged, PRIVATE_DIR};

/// Folders of `sop/` and of `folder/`.
const FOLDERS: u64 = 256;

/// Folders seen are remembered up to this many (a series each with hierarchical
/// naming); past it the memory starts over.
const KNOWN_FOLDERS: usize = 4096;

/// FNV-1a: stable across processes and versions, unlike std's hasher, since every
/// process must map a UID to the same commit shard and registry entry, and a folder to
/// the same token.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The registry of one storage root.
pub struct Registry {
    root: PathBuf,
    /// `root/.storescp/sop`, where the entries are.
    sop: PathBuf,
    /// Token -> the folders this process stored into (see [`KNOWN_FOLDERS`]).
    known_folders: Mutex<HashMap<u64, KnownFolder>>,
}

/// A folder this process stored an instance into.
struct KnownFolder {
    folder: String,
    /// Whether its folder link is known to name it (made or read back).
    linked: bool,
}

impl Registry {
    pub fn new(root: &Path) -> Registry {
        Registry {
            root: root.to_path_buf(),
            sop: root.join(PRIVATE_DIR).join("sop"),
            known_folders: Mutex::new(HashMap::new()),
        }
    }

    /// Makes every folder of `sop/` and `folder/` that is missing, so that a new root's
    /// first instances do not each make one (a directory is an inode and a block,
    /// often in a block group of its own). Both folders must exist.
    pub fn make_folders(&self) -> io::Result<()> {
        let private = self.root.join(PRIVATE_DIR);
        for top in ["sop", "folder"] {
            for k in 0..FOLDERS {
                match fs::create_dir(private.join(top).join(format!("{k:02x}"))) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The entry of `sop_uid`: `sop/<xx>/<uid>`. Once per instance, so the path is
    /// allocated once at its full length.
    pub fn entry(&self, sop_uid: &str) -> PathBuf {
        let folder = format!("{:02x}", stable_hash(sop_uid) % FOLDERS);
        let mut path =
            PathBuf::with_capacity(self.sop.as_os_str().len() + folder.len() + sop_uid.len() + 2);
        path.push(&self.sop);
        path.push(folder);
        path.push(sop_uid);
        path
    }

    /// The target for an entry of the file `relpath` of `sop_uid`: its folder's link
    /// when it can have one and this process stored into the folder before, made now if
    /// missing (its directory, and `folder/` when `xx` is new, are pushed on `changed`:
    /// their entries changed), else `relpath`.
    pub fn target(&self, relpath: &str, sop_uid: &str, changed: &mut Vec<PathBuf>) -> String {
        let Some(folder) = folder_of(relpath, sop_uid) else {
            return relpath.to_string();
        };
        let token = stable_hash(folder);
        let mut known = self.known_folders.lock().unwrap_or_else(|e| e.into_inner());
        match known.get_mut(&token) {
            Some(k) if k.folder == folder && k.linked => folder_link_name(token),
            Some(k) if k.folder == folder => {
                let name = folder_link_name(token);
                match self.link_folder(&name, folder, changed) {
                    Ok(()) => {
                        k.linked = true;
                        name
                    }
                    // Another folder's link under this token, or no link to be had.
                    Err(_) => relpath.to_string(),
                }
            }
            _ => {
                if known.len() >= KNOWN_FOLDERS {
                    known.clear();
                }
                let first = KnownFolder {
                    folder: folder.to_string(),
                    linked: false,
                };
                known.insert(token, first);
                relpath.to_string()
            }
        }
    }

    /// Makes the folder link `name` -> `folder`, or checks that the one there names it.
    fn link_folder(&self, name: &str, folder: &str, changed: &mut Vec<PathBuf>) -> io::Result<()> {
        let link = self.root.join(name);
        let mut made_folder = false;
        if !make_symlink(folder, &link, &mut made_folder)? {
            return match fs::read_link(&link)? == Path::new(folder) {
                true => Ok(()),
                false => Err(io::Error::other("folder token taken by another folder")),
            };
        }
        let parent = link.parent().unwrap_or(&self.root);
        if made_folder {
            changed.push(parent.parent().unwrap_or(parent).to_path_buf());
        }
        changed.push(parent.to_path_buf());
        Ok(())
    }

    /// Creates the entry `entry` for `target` (from [`Registry::target`]), see
    /// [`Registry::link_entry`]; a symlink is made at `staged` first where given (a free
    /// name in the run's temporary folder, [`crate::birthplace`]), then renamed into
    /// place unless the entry exists. False when the entry exists already: the UID was
    /// seen before.
    pub fn claim(&self, entry: &Path, target: &str, staged: Option<&Path>) -> io::Result<bool> {
        make_in_folder(entry, &mut false, |at| self.link_entry(at, target, staged))
    }

    /// Whether the entry for `target` needs an inode of its own (a symlink), rather
    /// than being another name of a folder link.
    pub fn needs_inode(target: &str) -> bool {
        !target.starts_with(FOLDER_LINK_PREFIX)
    }

    /// Points an existing entry (dangling or naming another file) at `target`,
    /// atomically: the new entry is made at `staged` (a free name on the same
    /// filesystem) and renamed over it.
    pub fn repoint(&self, entry: &Path, target: &str, staged: &Path) -> io::Result<()> {
        let _ = fs::remove_file(staged);
        self.link_entry(staged, target, None)?;
        fs::rename(staged, entry)?;
        // rename(2) of a name onto another name of the same inode (an entry that is a
        // hard link of this folder link already) does nothing and leaves both.
        let _ = fs::remove_file(staged);
        Ok(())
    }

    /// Makes the entry `at` for `target`: a hard link of the folder link `target`
    /// names, else a symlink to `target`, made at `staged` and renamed to `at` where
    /// given. A symlink also when the hard link fails otherwise than with EEXIST: the
    /// folder link at the filesystem's most links (EMLINK on ext4), or hard links
    /// refused (EPERM under protected_hardlinks when another user made it).
    fn link_entry(&self, at: &Path, target: &str, staged: Option<&Path>) -> io::Result<()> {
        if target.starts_with(FOLDER_LINK_PREFIX) {
            match fs::hard_link(self.root.join(target), at) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {}
                linked => return linked,
            }
        }
        match staged {
            Some(staged) => {
                make_staged(staged, at, |to| symlink(target, to), |s| fs::remove_file(s))
            }
            None => symlink(target, at),
        }
    }

    /// The path, relative to the root, that the entry of `sop_uid` at `entry` names
    /// (the file may be gone since); None without a readable entry.
    pub fn stored_path(&self, entry: &Path, sop_uid: &str) -> Option<String> {
        let target = fs::read_link(entry).ok()?;
        let target = target.to_str()?;
        // A file's path ends with `.dcm`; a folder (UIDs, dates) never does.
        let folder = if target.starts_with(FOLDER_LINK_PREFIX) {
            fs::read_link(self.root.join(target)).ok()?
        } else if target.ends_with(".dcm") {
            return Some(target.to_string());
        } else {
            PathBuf::from(target)
        };
        Some(match folder.to_str()? {
            "." => format!("{sop_uid}.dcm"),
            folder => format!("{folder}/{sop_uid}.dcm"),
        })
    }

    /// Forgets the folder links seen: the private area was removed, and them with it.
    pub fn forget_folders(&self) {
        self.known_folders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Moves the entries of a flat registry (`sop/<uid>`, before the folders) into their
    /// folders. Call with the commit lock held, before this run stores anything.
    pub fn migrate_flat(&self) -> io::Result<()> {
        for found in fs::read_dir(&self.sop)? {
            let found = found?;
            if !found.file_type()?.is_symlink() {
                continue;
            }
            let Some(uid) = found.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let entry = self.entry(&uid);
            if let Some(folder) = entry.parent() {
                fs::create_dir_all(folder)?;
            }
            // A link (not its target: linkat without AT_SYMLINK_FOLLOW) that fails when
            // the folder has one already: that one was written since, by this version,
            // and wins.
            match fs::hard_link(found.path(), &entry) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            fs::remove_file(found.path())?;
        }
        Ok(())
    }
}

/// How every folder link's name starts (no stored path starts with a dot).
const FOLDER_LINK_PREFIX: &str = ".storescp/folder/";

/// Creates the symlink `link` -> `target`, making its folder first when that is
/// missing (an operator removed it; `made_folder` is then set). False when `link`
/// exists already.
fn make_symlink(target: &str, link: &Path, made_folder: &mut bool) -> io::Result<bool> {
    make_in_folder(link, made_folder, |at| symlink(target, at))
}

/// Makes the link `at` with `make`, as [`make_symlink`] does.
fn make_in_folder(
    at: &Path,
    made_folder: &mut bool,
    make: impl Fn(&Path) -> io::Result<()>,
) -> io::Result<bool> {
    let mut made = make(at);
    if matches!(&made, Err(e) if e.kind() == io::ErrorKind::NotFound) {
        match fs::create_dir(at.parent().unwrap_or(at)) {
            Ok(()) => *made_folder = true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        made = make(at);
    }
    match made {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// `folder/<xx>/<token>`, relative to the root, of the folder whose hash is `token`.
fn folder_link_name(token: u64) -> String {
    format!("{FOLDER_LINK_PREFIX}{:02x}/{token:016x}", token % FOLDERS)
}

/// The folder of `relpath` when it is `<folder>/<sop_uid>.dcm` (`.` for the root).
fn folder_of<'a>(relpath: &'a str, sop_uid: &str) -> Option<&'a str> {
    match relpath.strip_suffix(".dcm")?.strip_suffix(sop_uid)? {
        "" => Some("."),
        folder => folder.strip_suffix('/').filter(|f| !f.is_empty()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("storescp-registry-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["sop", "folder"] {
            fs::create_dir_all(dir.join(PRIVATE_DIR).join(sub)).unwrap();
        }
        dir
    }

    /// ext4 keeps a target shorter than 60 bytes inside the symlink's inode.
    #[test]
    fn folder_link_names_fit_in_an_inode() {
        assert_eq!(folder_link_name(stable_hash("1.2.3/1.2.3.4")).len(), 36);
        assert!(folder_link_name(u64::MAX).len() < 60);
    }

    #[test]
    fn only_files_named_by_their_uid_have_a_folder() {
        assert_eq!(folder_of("1.2/1.3/1.4.dcm", "1.4"), Some("1.2/1.3"));
        assert_eq!(folder_of("1.4.dcm", "1.4"), Some("."));
        assert_eq!(folder_of("1.2/11.4.dcm", "1.4"), None);
        assert_eq!(folder_of("/1.4.dcm", "1.4"), None);
        assert_eq!(folder_of("1.2/1.4.dcm", "1.5"), None);
    }

    /// A folder's first entry holds the file's path and the next ones name it through
    /// the folder's link, in the root too; an entry of an older version (the path
    /// itself) reads as before.
    #[test]
    fn entries_name_their_file_through_folder_links() {
        let root = tempdir("entries");
        let registry = Registry::new(&root);
        let mut changed = Vec::new();
        let stores = [
            ("1.2/1.3/1.4.dcm", "1.4"),
            ("1.2/1.3/1.5.dcm", "1.5"),
            ("1.6.dcm", "1.6"),
            ("1.7.dcm", "1.7"),
        ];
        // Where a symlink entry is made before it is renamed into place.
        let staged = root.join("staged");
        for (n, (relpath, uid)) in stores.into_iter().enumerate() {
            let target = registry.target(relpath, uid, &mut changed);
            let entry = registry.entry(uid);
            assert!(registry.claim(&entry, &target, Some(&staged)).unwrap());
            assert!(!registry.claim(&entry, &target, Some(&staged)).unwrap());
            assert!(
                fs::symlink_metadata(&staged).is_err(),
                "a staged entry is left"
            );
            match n % 2 {
                0 => assert_eq!(target, relpath),
                _ => {
                    // Another name of the folder link: its inode, naming the folder.
                    assert!(target.starts_with(FOLDER_LINK_PREFIX), "{target}");
                    assert_eq!(inode(&entry), inode(&root.join(&target)));
                    assert_eq!(
                        fs::read_link(&entry).unwrap(),
                        fs::read_link(root.join(&target)).unwrap()
                    );
                }
            }
            assert_eq!(registry.stored_path(&entry, uid).unwrap(), relpath);
        }
        // The first link made `folder/` and `folder/xx`; each link changed its `xx`.
        assert!(changed.contains(&root.join(PRIVATE_DIR).join("folder")));
        assert_eq!(changed.len(), 4, "{changed:?}");
        changed.clear();
        registry.target("1.2/1.3/1.8.dcm", "1.8", &mut changed);
        assert!(changed.is_empty());
        assert_eq!(registry.stored_path(&registry.entry("1.9"), "1.9"), None);
        fs::remove_dir_all(root).unwrap();
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::symlink_metadata(path).unwrap().ino()
    }

    /// Entries of earlier versions, through the folder link or the path, read as
    /// before; so does an entry repointed at another folder.
    #[test]
    fn entries_of_every_kind_name_their_file() {
        let root = tempdir("kinds");
        let registry = Registry::new(&root);
        registry.make_folders().unwrap();
        let mut changed = Vec::new();
        registry.target("1.2/1.3/1.4.dcm", "1.4", &mut changed);
        let through_link = registry.target("1.2/1.3/1.5.dcm", "1.5", &mut changed);
        let old = registry.entry("1.6");
        symlink(&through_link, &old).unwrap();
        assert_eq!(
            registry.stored_path(&old, "1.6").unwrap(),
            "1.2/1.3/1.6.dcm"
        );
        // A file stored in the root: its folder is `.`.
        let flat = registry.entry("1.7");
        symlink(".", &flat).unwrap();
        assert_eq!(registry.stored_path(&flat, "1.7").unwrap(), "1.7.dcm");
        let staged = root.join(PRIVATE_DIR).join("staged");
        registry.repoint(&flat, &through_link, &staged).unwrap();
        assert_eq!(
            registry.stored_path(&flat, "1.7").unwrap(),
            "1.2/1.3/1.7.dcm"
        );
        assert_eq!(inode(&flat), inode(&root.join(&through_link)));
        registry.repoint(&flat, &through_link, &staged).unwrap();
        assert!(
            fs::symlink_metadata(&staged).is_err(),
            "a staged link is left"
        );
        assert_eq!(
            registry.stored_path(&flat, "1.7").unwrap(),
            "1.2/1.3/1.7.dcm"
        );
        registry.repoint(&flat, "9/1.7.dcm", &staged).unwrap();
        assert_eq!(registry.stored_path(&flat, "1.7").unwrap(), "9/1.7.dcm");
        fs::remove_dir_all(root).unwrap();
    }

    /// A folder link that cannot take another hard link (here a directory in its
    /// place; on ext4, one with 65,000 links) gets a symlink entry naming it instead.
    #[test]
    fn an_entry_falls_back_to_a_symlink() {
        let root = tempdir("fallback");
        let registry = Registry::new(&root);
        let name = folder_link_name(stable_hash("1.2/1.3"));
        fs::create_dir_all(root.join(&name)).unwrap();
        let entry = registry.entry("1.4");
        // A staged name whose folder is missing: the symlink is made in place.
        let staged = root.join("no-such-folder").join("staged");
        assert!(registry.claim(&entry, &name, Some(&staged)).unwrap());
        assert_eq!(fs::read_link(&entry).unwrap(), Path::new(&name));
        assert!(!registry.claim(&entry, &name, Some(&staged)).unwrap());
        fs::remove_dir_all(root).unwrap();
    }

    /// Every folder of `sop/` and `folder/` is there before the first instance, and
    /// making them again changes nothing.
    #[test]
    fn folders_are_made_ahead() {
        let root = tempdir("ahead");
        let registry = Registry::new(&root);
        registry.make_folders().unwrap();
        registry.make_folders().unwrap();
        for top in ["sop", "folder"] {
            let made = fs::read_dir(root.join(PRIVATE_DIR).join(top))
                .unwrap()
                .count();
            assert_eq!(made, FOLDERS as usize, "{top}");
        }
        assert!(registry.entry("1.2").parent().unwrap().is_dir());
        let mut changed = Vec::new();
        registry.target("1.2/1.3.dcm", "1.3", &mut changed);
        let target = registry.target("1.2/1.4.dcm", "1.4", &mut changed);
        assert!(root.join(&target).is_symlink());
        // Only the folder link's own folder changed: its `xx` was there already.
        assert_eq!(changed.len(), 1, "{changed:?}");
        fs::remove_dir_all(root).unwrap();
    }

    /// A token already naming another folder is never reused: the entry holds the path.
    #[test]
    fn a_token_taken_by_another_folder_falls_back_to_the_path() {
        let root = tempdir("collision");
        let registry = Registry::new(&root);
        let link = root.join(folder_link_name(stable_hash("1.2/1.3")));
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        symlink("9.9/9.9", &link).unwrap();
        registry.target("1.2/1.3/1.4.dcm", "1.4", &mut Vec::new());
        let target = registry.target("1.2/1.3/1.5.dcm", "1.5", &mut Vec::new());
        assert_eq!(target, "1.2/1.3/1.5.dcm");
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("9.9/9.9"));
        fs::remove_dir_all(root).unwrap();
    }

    /// Folder links removed with the private area are made again, not trusted from memory.
    #[test]
    fn forgotten_folders_are_linked_again() {
        let root = tempdir("forgotten");
        let registry = Registry::new(&root);
        registry.target("1.2/1.4.dcm", "1.4", &mut Vec::new());
        let target = registry.target("1.2/1.5.dcm", "1.5", &mut Vec::new());
        fs::remove_dir_all(root.join(PRIVATE_DIR)).unwrap();
        fs::create_dir_all(root.join(PRIVATE_DIR).join("folder")).unwrap();
        registry.forget_folders();
        registry.target("1.2/1.6.dcm", "1.6", &mut Vec::new());
        assert_eq!(
            registry.target("1.2/1.7.dcm", "1.7", &mut Vec::new()),
            target
        );
        assert!(root.join(&target).is_symlink());
        fs::remove_dir_all(root).unwrap();
    }
}
