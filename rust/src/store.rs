//! The storage root: streaming writes to a temporary file, then the atomic duplicate
//! decision, fsync and rename into the final name (SPEC.md section 4; PS3.10 files).
//!
//! Layout of the private area `ROOT/.storescp/` (hidden, same filesystem as the files):
//! - `lock`: `flock`ed while a process registers its run and sweeps dead ones.
//! - `lock.d/<k>` (k = 0..15): shard k is held (a mutex for threads, `flock` for
//!   processes) around the commit of every SOP Instance UID that hashes to k, so the
//!   duplicate decision is atomic across threads *and* processes sharing the root, while
//!   instances of different shards commit in parallel.
//! - `sop/` and `folder/`: the registry of what is stored, whatever the naming scheme
//!   (see [`crate::registry`]).
//! - `run/<runid>.lock`: held (`flock`) by the process `runid` = "pid-nanos" while it runs.
//! - `tmp/<runid>/`: that process's temporary files; swept at start once the owner is gone.
//! - `journal/<runid>.log`: with an index, one line per instance written before the
//!   file gets its final name: `op \t sop_uid \t relpath \t replaced_relpath \n`, so the
//!   index may commit without its own fsync: reconciliation replays the journal after a
//!   crash or power loss.
//!   - With fsync on the line needs no flush of its own: the journal is preallocated
//!     (zero-filled and synced ahead of use, so a line only overwrites blocks already on
//!     disk, changing no metadata), the line reaches the device before the instance's
//!     own `fdatasync`, and the device cache flush that ends that `fdatasync` makes both
//!     durable at once.
//!   - The line is written, and its write to the device started, as soon as the sniffed
//!     attributes name the file ([`Store::journal_ahead`]), so that it overlaps the rest
//!     of the transfer; a line that turns out not to name what is stored (a replace
//!     elsewhere) is followed by one that does.
//!   - The event of a journaled instance is queued once the file has its final name, so
//!     that the index commits the row while the directory entries are made durable
//!     ([`Placed::make_durable`]). Commits finish in any order, so each event carries a
//!     watermark rather than its own line's end: every line before it is settled (its
//!     instance durable and its event queued ahead, or its commit abandoned), its own
//!     line never. The index may record that offset as replayed-up-to once the row is
//!     committed, and a row a power loss could leave without its directory entry is
//!     always past it, so replayed.
//!
//! The whole area removed under a running process is recreated with the next instance,
//! the files this run holds open included (its run lock, the shard lock files, its
//! journal, whose lines go on at their offsets after a hole).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::birthplace::{self, Birthplace};
use crate::direct_write::DirectWriter;
use crate::group_sync::DirectorySyncs;
use crate::naming::Naming;
use crate::registry::{stable_hash, Registry};
use crate::spare_folders::SpareFolders;

/// Folders of the private area, made at start and again if an operator removed them.
const PRIVATE_SUBDIRS: [&str; 6] = ["sop", "folder", "run", "tmp", "journal", "lock.d"];

/// Name of the private area under the storage root.
pub const PRIVATE_DIR: &str = ".storescp";

/// What to do with a SOP Instance UID that is already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicatePolicy {
    Reject,
    Replace,
    Ignore,
}

impl DuplicatePolicy {
    /// Parses "reject" | "replace" | "ignore".
    pub fn parse(s: &str) -> Option<DuplicatePolicy> {
        match s {
            "reject" => Some(DuplicatePolicy::Reject),
            "replace" => Some(DuplicatePolicy::Replace),
            "ignore" => Some(DuplicatePolicy::Ignore),
            _ => None,
        }
    }
}

/// Storage settings decided at start.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub root: PathBuf,
    pub naming: Naming,
    pub duplicate: DuplicatePolicy,
    pub fsync: bool,
    pub journal: bool,
}

/// How a commit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    /// The previous file's relative path (removed when it differs from the new one).
    Replaced(String),
    Duplicate(String),
    Ignored(String),
}

/// A line of this run's journal. It stays unsettled (the index's watermark stops
/// before it) until dropped: its instance is then durable, or its commit abandoned.
pub struct JournalLine<'a> {
    store: &'a Store,
    /// The journal file the line is in (kept open: the area may be recreated meanwhile).
    file: Arc<File>,
    start: u64,
    len: u64,
    /// The path it names, relative to the root.
    relpath: String,
    /// Its write to the device was started once it was written (with fsync on).
    submitted: bool,
}

impl JournalLine<'_> {
    /// Starts the write of the line to the device. Waiting first for a write-out of
    /// its pages already under way (one that may predate the line) makes the one
    /// started here include it; one started by another thread meanwhile includes it too.
    fn start_write(&self) -> io::Result<()> {
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE;
        sync_range(self.file.as_raw_fd(), self.start, self.len, flags)
    }
}

impl Drop for JournalLine<'_> {
    fn drop(&mut self) {
        self.store.settle_line(self.start);
    }
}

/// An instance decided on and (when stored) under its final name; its new directory
/// entries become durable with [`Placed::make_durable`]. Its journal line, if any,
/// stays unsettled until then.
pub struct Placed<'a> {
    store: &'a Store,
    pub outcome: Outcome,
    pub file_size: u64,
    /// The file's path relative to the root.
    pub relpath: String,
    /// Directories whose entries changed besides the file's own folder: the parents of
    /// folders made for it, and those of registry folder links made with it.
    created: Vec<PathBuf>,
    /// Some for a stored or replaced instance of a run with an index journal.
    journal_line: Option<JournalLine<'a>>,
}

impl Placed<'_> {
    /// What the C-STORE's answer and event report of it: outcome, file size, path.
    pub fn report(&self) -> (Outcome, u64, String) {
        (self.outcome.clone(), self.file_size, self.relpath.clone())
    }

    /// Whether the index must commit a row for this instance before success.
    pub fn is_journaled(&self) -> bool {
        self.journal_line.is_some()
    }

    /// Calls `publish` with the watermark to record once this instance's row is
    /// committed: below this instance's own line, since that line settles only once
    /// its directory entries are durable.
    pub fn publish<T>(&self, publish: impl FnOnce(u64) -> T) -> T {
        self.store.publish_watermark(publish)
    }

    /// With fsync on, makes the new directory entries durable (for a stored or
    /// replaced instance), those of several directories side by side; the journal line
    /// settles when this returns.
    pub fn make_durable(self) -> io::Result<()> {
        let store = self.store;
        if !store.config.fsync || !matches!(self.outcome, Outcome::Stored | Outcome::Replaced(_)) {
            return Ok(());
        }
        let final_path = store.config.root.join(&self.relpath);
        let folder = final_path.parent().unwrap_or(&store.config.root);
        store.dir_syncs.sync_all(folder, &self.created)
    }
}

/// The journal of this run: the file, where the lines end, how far it is
/// preallocated, and the lines not yet settled.
struct Journal {
    file: Arc<File>,
    end: u64,
    allocated: u64,
    unsettled: BTreeSet<u64>,
}

/// The journal is preallocated this many bytes at a time (~20,000 lines).
const JOURNAL_CHUNK: u64 = 4 << 20;

impl Journal {
    /// Zero-fills the next chunk and makes it durable, so that lines written there
    /// later are overwrites of blocks already allocated and on disk. Only with fsync
    /// on: without it nothing is flushed, and lines simply extend the file.
    fn preallocate(&mut self) -> io::Result<()> {
        let zeros = vec![0u8; 1 << 20];
        for k in 0..JOURNAL_CHUNK / zeros.len() as u64 {
            self.file
                .write_all_at(&zeros, self.allocated + k * zeros.len() as u64)?;
        }
        self.file.sync_data()?;
        self.allocated += JOURNAL_CHUNK;
        Ok(())
    }
}

/// An open storage root, shared by every association of this process.
pub struct Store {
    config: StoreConfig,
    private: PathBuf,
    tmp_dir: PathBuf,
    /// Where this run's new inodes are born: `tmp_dir`, or a folder in it once births
    /// there were slow ([`Store::open_temporary`]).
    births: RwLock<Births>,
    /// How long the inodes born in the births folder took lately.
    births_timing: Birthplace,
    /// Births folders made so far besides `tmp_dir`.
    births_moved: AtomicU64,
    run_id: String,
    /// Held (flock) for the life of the process: tells others this run is alive.
    run_lock: Mutex<File>,
    /// Per shard, the cross-process lock file, behind the in-process mutex.
    shards: Vec<Mutex<File>>,
    journal: Mutex<Option<Journal>>,
    next_tmp: AtomicU64,
    /// Group commit of the directories' fsyncs across associations.
    dir_syncs: DirectorySyncs,
    /// Cleared once the filesystem refuses O_TMPFILE.
    anonymous_ok: AtomicBool,
    /// The duplicate registry (`sop/`, `folder/`).
    registry: Registry,
    /// Folders made ahead for instances of a new study.
    spare_folders: SpareFolders,
    /// Where registry entries and folders are made (see [`crate::birthplace`]).
    birthplace: Birthplace,
}

/// Number of commit lock shards (see the module documentation).
const SHARDS: usize = 16;

/// One commit lock shard, held: a mutex for threads, `flock` for processes.
struct CommitGuard<'a> {
    file: MutexGuard<'a, File>,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor the guarded File keeps open meanwhile.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock only reads the descriptor number, which `file` keeps open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Opens (creating if needed) a lock file read-only: flock needs no write access, and
/// a file held open for writing would keep the storage filesystem from being remounted
/// read-only by an operator.
fn open_lock(path: &Path) -> io::Result<File> {
    match File::open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)?;
            File::open(path)
        }
        opened => opened,
    }
}

fn shard_path(private: &Path, k: usize) -> PathBuf {
    private.join("lock.d").join(k.to_string())
}

fn run_lock_path(private: &Path, run_id: &str) -> PathBuf {
    private.join("run").join(format!("{run_id}.lock"))
}

fn journal_path(private: &Path, run_id: &str) -> PathBuf {
    private.join("journal").join(format!("{run_id}.log"))
}

/// Opens and holds (flock) the lock file that tells other processes the run is alive.
fn hold_run_lock(private: &Path, run_id: &str) -> io::Result<File> {
    let file = open_lock(&run_lock_path(private, run_id))?;
    flock(&file, libc::LOCK_EX | libc::LOCK_NB)?;
    Ok(file)
}

/// A directory opened to be the base of `*at` calls and to be `fstat`ed.
fn open_directory(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
}

/// A new O_TMPFILE in the directory `dir`, for writing.
fn open_anonymous(dir: &File) -> io::Result<File> {
    let flags = libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path and a descriptor `dir` keeps open meanwhile.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c".".as_ptr(), flags, 0o644) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened, owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Makes the folders of the private area that are missing. The one holding each run's
/// temporary folder spreads its subfolders ([`crate::birthplace`]), so that the run's new
/// inodes are allocated away from files deleted lately.
fn make_private_subdirs(private: &Path) -> io::Result<()> {
    for sub in PRIVATE_SUBDIRS {
        fs::create_dir_all(private.join(sub))?;
    }
    birthplace::spread_subfolders(&private.join("tmp"));
    Ok(())
}

/// True for the errors by which a filesystem says it has no O_TMPFILE (open(2)).
fn tmpfile_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
    )
}

impl Store {
    /// Opens (creating if needed) the storage root and its private area, registers this
    /// run, and sweeps temporary files left by processes that are gone.
    pub fn open(config: StoreConfig) -> io::Result<Store> {
        fs::create_dir_all(&config.root)?;
        let private = config.root.join(PRIVATE_DIR);
        make_private_subdirs(&private)?;
        let commit_flock = open_lock(&private.join("lock"))?;
        let shards = (0..SHARDS)
            .map(|k| open_lock(&shard_path(&private, k)).map(Mutex::new))
            .collect::<io::Result<Vec<_>>>()?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let run_id = format!("{}-{nanos}", std::process::id());

        // Registering and sweeping under the commit lock: a sweeper never sees a run
        // whose lock file exists but is not yet held.
        flock(&commit_flock, libc::LOCK_EX)?;
        let registry = Registry::new(&config.root);
        let registered = (|| {
            let run_lock = hold_run_lock(&private, &run_id)?;
            sweep_dead_runs(&private)?;
            registry.migrate_flat()?;
            registry.make_folders()?;
            let tmp_dir = private.join("tmp").join(&run_id);
            fs::create_dir(&tmp_dir)?;
            Ok::<_, io::Error>((run_lock, tmp_dir))
        })();
        flock(&commit_flock, libc::LOCK_UN)?;
        let (run_lock, tmp_dir) = registered?;
        let births = RwLock::new(Births::at(tmp_dir.clone())?);
        let journal = if config.journal {
            // A new file per run: lines are written at known offsets (not O_APPEND).
            let file = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(journal_path(&private, &run_id))?;
            let mut journal = Journal {
                file: Arc::new(file),
                end: 0,
                allocated: 0,
                unsettled: BTreeSet::new(),
            };
            if config.fsync {
                journal.preallocate()?;
            }
            Some(journal)
        } else {
            None
        };

        Ok(Store {
            private,
            tmp_dir,
            births,
            births_timing: Birthplace::sampling(BIRTHS_TIMED_EVERY),
            births_moved: AtomicU64::new(0),
            run_id,
            run_lock: Mutex::new(run_lock),
            shards,
            journal: Mutex::new(journal),
            dir_syncs: DirectorySyncs::default(),
            next_tmp: AtomicU64::new(0),
            anonymous_ok: AtomicBool::new(true),
            registry,
            spare_folders: SpareFolders::default(),
            birthplace: Birthplace::sampling(CREATES_TIMED_EVERY),
            config,
        })
    }

    /// The storage settings.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The journal file name of this run (as reported in events).
    pub fn journal_name(&self) -> String {
        format!("{}.log", self.run_id)
    }

    /// Starts a new instance: a temporary file that will hold `header` (the Part 10
    /// preamble and file meta, written with the first data set bytes), gone again
    /// unless committed. The file is anonymous (O_TMPFILE)
    /// where the filesystem allows: it never has a name until it has its final one, and
    /// the kernel frees it if the process dies.
    pub fn begin(&self, header: &[u8]) -> io::Result<Incoming> {
        if self.tmp_dir_removed() {
            self.recreate_private()?;
        }
        self.open_incoming(header)
    }

    /// [`Store::begin`] without looking for a removed area first: for a spare, which
    /// [`Store::begin_in`] checks when it is used.
    fn open_incoming(&self, header: &[u8]) -> io::Result<Incoming> {
        let (file, temp) = match self.open_temporary() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The private area was removed under us (an operator cleaning up):
                // recreate it, but never the storage root itself.
                self.recreate_private()?;
                self.open_temporary()?
            }
            opened => opened?,
        };
        let incoming = Incoming {
            file,
            temp,
            header: header.to_vec(),
            size: 0,
            placed: false,
            durable: self.config.fsync,
            written_back: 0,
            direct: None,
        };
        Ok(incoming)
    }

    /// An anonymous temporary file opened ahead of the instance that will use it, or
    /// None where the filesystem makes only named ones (those are opened when needed).
    pub fn spare(&self) -> io::Result<Option<Spare>> {
        if !self.anonymous_ok.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let incoming = self.open_incoming(&[])?;
        Ok(matches!(incoming.temp, TempName::Anonymous).then_some(Spare(incoming)))
    }

    /// Starts a new instance in `spare`, as [`Store::begin`] does, unless the private
    /// area was removed since the spare was opened: `begin` then recreates it.
    pub fn begin_in(&self, spare: Spare, header: &[u8]) -> io::Result<Incoming> {
        if self.tmp_dir_removed() {
            return self.begin(header);
        }
        let mut incoming = spare.0;
        incoming.header = header.to_vec();
        Ok(incoming)
    }

    /// An O_TMPFILE in our temporary directory or, once the filesystem said it cannot
    /// make one, a named file there.
    fn open_temporary(&self) -> io::Result<(File, TempName)> {
        if self.anonymous_ok.load(Ordering::Relaxed) {
            let opened = self.in_births(|| {
                open_anonymous(&self.births.read().unwrap_or_else(|e| e.into_inner()).dir)
            });
            match opened {
                Ok(file) => return Ok((file, TempName::Anonymous)),
                Err(e) if !tmpfile_unsupported(&e) => return Err(e),
                Err(_) => self.anonymous_ok.store(false, Ordering::Relaxed),
            }
        }
        let path = self.temp_name("part");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)?;
        Ok((file, TempName::Named(path)))
    }

    /// Recreates the private area below an existing storage root.
    fn recreate_private(&self) -> io::Result<()> {
        if !self.config.root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "storage directory {} is missing",
                    self.config.root.display()
                ),
            ));
        }
        make_private_subdirs(&self.private)?;
        self.registry.forget_folders();
        self.registry.make_folders()?;
        self.spare_folders.forget();
        // The files this run keeps open went with the area: open them anew, so that other
        // processes see this run alive and lock the same shard files, and the index finds
        // this run's next journal lines. Each is replaced under its mutex, so nobody holds
        // the old one meanwhile. As at start, the run lock is held before its temporary
        // folder exists, under the registration lock, so no sweeper takes the run for dead.
        let registration = open_lock(&self.private.join("lock"))?;
        flock(&registration, libc::LOCK_EX)?;
        let run_lock_path = run_lock_path(&self.private, &self.run_id);
        if !run_lock_path.exists() {
            *self.run_lock.lock().unwrap_or_else(|e| e.into_inner()) =
                hold_run_lock(&self.private, &self.run_id)?;
        }
        fs::create_dir_all(&self.tmp_dir)?;
        *self.births.write().unwrap_or_else(|e| e.into_inner()) = Births::at(self.tmp_dir.clone())?;
        drop(registration);
        for (k, shard) in self.shards.iter().enumerate() {
            let path = shard_path(&self.private, k);
            let mut file = shard.lock().unwrap_or_else(|e| e.into_inner());
            if !path.exists() {
                *file = open_lock(&path)?;
            }
        }
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let path = journal_path(&self.private, &self.run_id);
        if let (Some(j), false) = (journal.as_mut(), path.exists()) {
            // Lines go on at the same offsets (the new file starts with a hole where the
            // old ones were), so the watermark and the index's progress stay meaningful.
            j.file = Arc::new(OpenOptions::new().create_new(true).write(true).open(path)?);
            j.allocated = j.end;
            if self.config.fsync {
                j.preallocate()?;
            }
        }
        Ok(())
    }

    /// Whether this run's temporary folder was removed (with the private area, by an
    /// operator): a removed directory has no links left.
    fn tmp_dir_removed(&self) -> bool {
        let births = self.births.read().unwrap_or_else(|e| e.into_inner());
        births.dir.metadata().map_or(true, |m| m.nlink() == 0)
    }

    /// A free name in this run's births folder, ending in `kind` (`part` for a file,
    /// `link` for a registry entry, `folder` for a folder).
    fn temp_name(&self, kind: &str) -> PathBuf {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let births = self.births.read().unwrap_or_else(|e| e.into_inner());
        births.path.join(format!("{n}.{kind}"))
    }

    /// Moves the births folder to a new folder in the run's temporary folder, whose
    /// subfolders ext4 spreads ([`crate::birthplace`]): creating inodes in the current
    /// one is slow, most likely because ext4 put it where many inodes were freed
    /// lately; a folder with another name most likely lands elsewhere. At most
    /// [`BIRTHS_MOVES`] times a run; a failure leaves the births where they are.
    fn move_births(&self) {
        self.births_timing.unstage();
        if self.births_moved.fetch_add(1, Ordering::Relaxed) >= BIRTHS_MOVES {
            return;
        }
        birthplace::spread_subfolders(&self.tmp_dir);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = self.tmp_dir.join(format!("{nanos}.births"));
        if let Ok(births) = fs::create_dir(&path).and_then(|()| Births::at(path)) {
            *self.births.write().unwrap_or_else(|e| e.into_inner()) = births;
        }
    }

    /// Holds the commit shard of `sop_uid`. The shard must not depend on anything but
    /// the UID: every process maps a UID to the same lock file.
    fn lock(&self, sop_uid: &str) -> io::Result<CommitGuard<'_>> {
        let shard = &self.shards[(stable_hash(sop_uid) % SHARDS as u64) as usize];
        let file = shard.lock().unwrap_or_else(|e| e.into_inner());
        flock(&file, libc::LOCK_EX)?;
        Ok(CommitGuard { file })
    }

    /// Gives `incoming` its final name `relpath` (relative, validated by `naming`),
    /// deciding duplicates by SOP Instance UID atomically across processes. The
    /// directory entries are made durable by [`Placed::make_durable`], so that the index
    /// may commit the row meanwhile. `ahead` is the line [`Store::journal_ahead`] wrote
    /// for this instance, used when it names what is stored.
    ///
    /// Guarantees: on `Ok` with outcome `Stored | Replaced` the complete file is under
    /// its final name and (with fsync on) its data is on disk; on any other outcome or
    /// error no temporary file remains and no stored file was changed.
    pub fn commit<'a>(
        &'a self,
        mut incoming: Incoming,
        relpath: &str,
        sop_uid: &str,
        ahead: Option<JournalLine<'a>>,
    ) -> io::Result<Placed<'a>> {
        incoming.finish()?;
        let mut journal_line = None;
        let decided =
            self.decide_and_place(&mut incoming, relpath, sop_uid, ahead, &mut journal_line);
        let stored = matches!(decided, Ok((Outcome::Stored | Outcome::Replaced(_), _)));
        let (outcome, created) = decided?;
        Ok(Placed {
            store: self,
            outcome,
            file_size: incoming.size,
            relpath: relpath.to_string(),
            created,
            journal_line: journal_line.filter(|_| stored),
        })
    }

    /// The duplicate decision and the placement, under the UID's commit shard. Sets
    /// `journal_line` to the line of what is stored as soon as it is known.
    fn decide_and_place<'a>(
        &'a self,
        incoming: &mut Incoming,
        relpath: &str,
        sop_uid: &str,
        ahead: Option<JournalLine<'a>>,
        journal_line: &mut Option<JournalLine<'a>>,
    ) -> io::Result<(Outcome, Vec<PathBuf>)> {
        let link = self.registry.entry(sop_uid);
        // Folder links made now are durable with the instance's own directory entries.
        let mut linked = Vec::new();
        let target = self.registry.target(relpath, sop_uid, &mut linked);
        let _guard = self.lock(sop_uid)?;
        // Claiming the registry entry is also the check: it exists only for a UID seen
        // before (a crash may leave one dangling, which counts as not stored).
        let claimed = self.claim(&link, &target)?;
        let existing = (!claimed)
            .then(|| self.registry.stored_path(&link, sop_uid))
            .flatten()
            .filter(|old| self.config.root.join(old).is_file());
        let (outcome, mut created) = match (existing, self.config.duplicate) {
            (Some(old), DuplicatePolicy::Reject) => {
                return Ok((Outcome::Duplicate(old), Vec::new()))
            }
            (Some(old), DuplicatePolicy::Ignore) => return Ok((Outcome::Ignored(old), Vec::new())),
            (Some(old), DuplicatePolicy::Replace) => {
                let outcome = Outcome::Replaced(old.clone());
                *journal_line = self.line_for(&outcome, sop_uid, relpath, ahead)?;
                self.sync_before_placing(incoming, journal_line.as_ref())?;
                if old != relpath {
                    self.point_registry(&link, &target)?;
                }
                let created = self.place(incoming, relpath, true)?;
                if old != relpath {
                    // The new file is in place; a failure here leaves a stale copy, not a loss.
                    let _ = fs::remove_file(self.config.root.join(&old));
                }
                (outcome, created)
            }
            (None, policy) => {
                *journal_line = self.line_for(&Outcome::Stored, sop_uid, relpath, ahead)?;
                self.sync_before_placing(incoming, journal_line.as_ref())?;
                if !claimed {
                    self.point_registry(&link, &target)?;
                }
                match self.place(incoming, relpath, false) {
                    Ok(created) => (Outcome::Stored, created),
                    // A file already there under that name (stored before the registry
                    // existed, or placed by hand): it is the stored copy.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match policy {
                        DuplicatePolicy::Reject => {
                            return Ok((Outcome::Duplicate(relpath.to_string()), Vec::new()))
                        }
                        DuplicatePolicy::Ignore => {
                            return Ok((Outcome::Ignored(relpath.to_string()), Vec::new()))
                        }
                        DuplicatePolicy::Replace => (
                            Outcome::Replaced(relpath.to_string()),
                            self.place(incoming, relpath, true)?,
                        ),
                    },
                    Err(e) => return Err(e),
                }
            }
        };
        created.append(&mut linked);
        Ok((outcome, created))
    }

    /// The journal line for what `outcome` stores at `relpath`: the one written ahead
    /// when it says the same (the file at its path is the truth, whatever the
    /// operation), else a new one.
    fn line_for<'a>(
        &'a self,
        outcome: &Outcome,
        sop_uid: &str,
        relpath: &str,
        ahead: Option<JournalLine<'a>>,
    ) -> io::Result<Option<JournalLine<'a>>> {
        let moved = matches!(outcome, Outcome::Replaced(old) if old != relpath);
        match ahead {
            Some(line) if line.relpath == relpath && !moved => Ok(Some(line)),
            _ => self.append_journal(outcome, sop_uid, relpath),
        }
    }

    /// With fsync on, makes the instance's data and its journal line durable before the
    /// file gets a name: once the line has reached the device, the cache flush ending
    /// the file's `fdatasync` covers both (see the module documentation). A line
    /// written ahead is usually there already; a line written now goes first, its
    /// write overlapping the data's.
    fn sync_before_placing(
        &self,
        incoming: &Incoming,
        line: Option<&JournalLine<'_>>,
    ) -> io::Result<()> {
        use libc::{
            SYNC_FILE_RANGE_WAIT_AFTER, SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE,
        };
        if !self.config.fsync {
            return Ok(());
        }
        if let Some(line) = line {
            if !line.submitted {
                line.start_write()?;
                let all = SYNC_FILE_RANGE_WAIT_BEFORE
                    | SYNC_FILE_RANGE_WRITE
                    | SYNC_FILE_RANGE_WAIT_AFTER;
                sync_range(incoming.file.as_raw_fd(), 0, 0, all)?;
            }
            // Every write-out of the line's pages started since it was written
            // includes it: waiting for those in flight is enough.
            sync_range(
                line.file.as_raw_fd(),
                line.start,
                line.len,
                SYNC_FILE_RANGE_WAIT_BEFORE,
            )?;
        }
        incoming.file.sync_data()
    }

    /// The journal's watermark, with `publish` called under the journal lock: every
    /// line before it is settled, and so its event was queued before `publish` runs.
    fn publish_watermark<T>(&self, publish: impl FnOnce(u64) -> T) -> T {
        let journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let watermark = journal
            .as_ref()
            .map_or(0, |j| j.unsettled.first().copied().unwrap_or(j.end));
        publish(watermark)
    }

    /// Settles the journal line starting at `start`: its instance is durable (its
    /// event queued before), or its commit was abandoned.
    fn settle_line(&self, start: u64) {
        if let Some(j) = self
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            j.unsettled.remove(&start);
        }
    }

    /// Points an existing registry entry (dangling or pointing elsewhere) at `target`,
    /// staged under a free name in this run's temporary folder.
    fn point_registry(&self, link: &Path, target: &str) -> io::Result<()> {
        self.registry.repoint(link, target, &self.temp_name("link"))
    }

    /// Gives `incoming` its final name; `overwrite` replaces an existing file atomically,
    /// otherwise an existing file is an `AlreadyExists` error. Missing directories are
    /// created on demand; returns the parents whose entries changed (to fsync).
    fn place(
        &self,
        incoming: &mut Incoming,
        relpath: &str,
        overwrite: bool,
    ) -> io::Result<Vec<PathBuf>> {
        let final_path = self.config.root.join(relpath);
        match self.try_place(incoming, &final_path, overwrite) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let created = self.create_parents(relpath)?;
                self.try_place(incoming, &final_path, overwrite)?;
                Ok(created)
            }
            placed => placed.map(|()| Vec::new()),
        }
    }

    fn try_place(
        &self,
        incoming: &mut Incoming,
        final_path: &Path,
        overwrite: bool,
    ) -> io::Result<()> {
        if matches!(incoming.temp, TempName::Anonymous) {
            if !overwrite {
                link_anonymous(&incoming.file, final_path)?;
                incoming.placed = true;
                return Ok(());
            }
            // rename(2) is the atomic overwrite, and it needs a name to move.
            let named = self.temp_name("part");
            link_anonymous(&incoming.file, &named)?;
            incoming.temp = TempName::Named(named);
        }
        let TempName::Named(temp) = &incoming.temp else {
            return Err(io::Error::other("temporary file has no name"));
        };
        if overwrite {
            fs::rename(temp, final_path)?;
        } else {
            fs::hard_link(temp, final_path)?;
            let _ = fs::remove_file(temp);
        }
        incoming.placed = true;
        Ok(())
    }

    /// Appends the journal line of a placement about to happen; its start offset, or
    /// None without a journal.
    fn append_journal(
        &self,
        outcome: &Outcome,
        sop_uid: &str,
        relpath: &str,
    ) -> io::Result<Option<JournalLine<'_>>> {
        if !self.config.journal {
            return Ok(None);
        }
        let (op, replaced) = match outcome {
            Outcome::Replaced(old) => ("replaced", old.as_str()),
            _ => ("stored", ""),
        };
        let line = format!("{op}\t{sop_uid}\t{relpath}\t{replaced}\n");
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let Some(j) = journal.as_mut() else {
            return Err(io::Error::other("journal not open"));
        };
        if self.config.fsync && j.end + line.len() as u64 > j.allocated {
            j.preallocate()?;
        }
        // A partial write leaves `end` where it was: the next line overwrites it.
        j.file.write_all_at(line.as_bytes(), j.end)?;
        let start = j.end;
        j.end += line.len() as u64;
        j.unsettled.insert(start);
        Ok(Some(JournalLine {
            store: self,
            file: Arc::clone(&j.file),
            start,
            len: line.len() as u64,
            relpath: relpath.to_string(),
            submitted: false,
        }))
    }

    /// Writes the journal line of an instance whose final name is known while its data
    /// still arrives, and (with fsync on) starts its write to the device, so that the
    /// commit usually finds it there. None without a journal, or when that failed (the
    /// commit then writes a line of its own).
    pub fn journal_ahead(&self, sop_uid: &str, relpath: &str) -> Option<JournalLine<'_>> {
        let mut line = self
            .append_journal(&Outcome::Stored, sop_uid, relpath)
            .ok()??;
        line.submitted = self.config.fsync && line.start_write().is_ok();
        Some(line)
    }

    /// Asks for a pair of folders made ahead for the next instance of a new study, if
    /// the last ones needed them (see [`crate::spare_folders`]). For a lone association,
    /// after its response; a failure only leaves the next instance to make its folders
    /// itself.
    pub fn prepare_folders(&self) -> io::Result<()> {
        self.spare_folders.prepare(|| self.temp_name("folder"))
    }

    /// Creates the directories of `relpath` below the root; returns the parents whose
    /// entries changed (they need an fsync for the new directory to be durable).
    fn create_parents(&self, relpath: &str) -> io::Result<Vec<PathBuf>> {
        let mut parts: Vec<&str> = relpath.split('/').collect();
        parts.pop();
        // A new study's two folders (a new day's and study's with `date` naming) from
        // a pair made ahead, when there is one.
        if let [outer @ .., first, second] = &parts[..] {
            let parent = outer
                .iter()
                .fold(self.config.root.clone(), |p, c| p.join(c));
            if self.spare_folders.place(&parent, first, second)? {
                let study = parent.join(first);
                return Ok(vec![parent, study]);
            }
        }
        let mut changed = Vec::new();
        let mut dir = self.config.root.clone();
        let levels = parts.len();
        for part in parts {
            let parent = dir.clone();
            dir.push(part);
            match self.make_folder(&dir) {
                Ok(()) => changed.push(parent),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        if levels >= 2 && changed.len() >= 2 {
            self.spare_folders.want();
        }
        Ok(changed)
    }

    /// Claims the registry entry `link` for `target`. An entry that needs an inode of
    /// its own (a symlink) is made where [`Birthplace`] says.
    fn claim(&self, link: &Path, target: &str) -> io::Result<bool> {
        if !Registry::needs_inode(target) {
            return self.registry.claim(link, target, None);
        }
        if self.birthplace.staged() {
            let staged = self.temp_name("link");
            return self.in_births(|| self.registry.claim(link, target, Some(&staged)));
        }
        self.birthplace
            .in_place(|| self.registry.claim(link, target, None))
    }

    /// Makes the folder `dir` (AlreadyExists when it is there) where [`Birthplace`]
    /// says: in place, or in the run's temporary folder and renamed into place.
    fn make_folder(&self, dir: &Path) -> io::Result<()> {
        if !self.birthplace.staged() {
            return self.birthplace.in_place(|| fs::create_dir(dir));
        }
        if dir.is_dir() {
            // An existing level (the study of a new series): no folder to make and drop.
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let staged = self.temp_name("folder");
        self.in_births(|| {
            make_staged(
                &staged,
                dir,
                |at| fs::create_dir(at),
                |at| fs::remove_dir(at),
            )
        })
    }

    /// Runs `make`, which makes an inode in the births folder, noting how long it took;
    /// moves the births once they have been slow ([`Store::move_births`]).
    fn in_births<T>(&self, make: impl FnOnce() -> T) -> T {
        let made = self.births_timing.in_place(make);
        if self.births_timing.staged() {
            self.move_births();
        }
        made
    }
}

/// Births folders a run makes at the most after its first ([`Store::move_births`]).
const BIRTHS_MOVES: u64 = 8;

/// One inode born in the births folder in this many is timed for [`Store::move_births`]
/// (the clock is a system call, and there is a temporary file per instance).
const BIRTHS_TIMED_EVERY: u64 = 16;

/// One registry symlink or folder made in place in this many is timed ([`Birthplace`]).
const CREATES_TIMED_EVERY: u64 = 4;

/// The folder where a run's new inodes are born, and open: O_TMPFILEs are made
/// relative to it, and its link count says whether it was removed, without a walk of
/// the whole path per instance.
struct Births {
    path: PathBuf,
    dir: File,
}

impl Births {
    fn at(path: PathBuf) -> io::Result<Births> {
        let dir = open_directory(&path)?;
        Ok(Births { path, dir })
    }
}

/// Where an incoming instance's bytes live until it is placed.
enum TempName {
    /// An O_TMPFILE inode: no name at all until linked into place.
    Anonymous,
    /// A named file in this run's temporary directory.
    Named(PathBuf),
}

/// With fsync on, writeback of the cached bytes of an instance is started every this
/// many bytes while it still arrives, so the final fdatasync finds little left to
/// write. Smaller chunks keep the device busier while the network delivers the rest:
/// large, 1 assoc, 6 interleaved runs: 9.95 img/s at 1 MB, 9.3 at 2 MB, 8.65 at 8 MB;
/// small (~444 KB), 4 assoc, 256 KB against 1 MB: pairwise medians 1.08 in 14 and in 7
/// interleaved pairs; large instances (only their first 4 MB cached) unchanged.
pub const WRITEBACK_CHUNK: u64 = 256 << 10;

/// With fsync on, the bytes of an instance past this offset bypass the page cache
/// ([`DirectWriter`]); smaller instances, and the start of larger ones, go through it.
/// A multiple of the direct I/O alignment.
const DIRECT_FROM: u64 = 4 << 20;

/// Most data set fragments one write takes: those of a 256 KB receive buffer full of
/// 16 KB P-DATA-TF PDUs fit. Larger writes cost the page cache less per byte.
pub const FRAGMENTS_PER_WRITE: usize = 32;

/// An anonymous temporary file opened between messages, while the peer prepares its
/// next request, so that opening it is not part of that request's round trip.
pub struct Spare(Incoming);

/// An instance being received: its temporary file, gone on drop unless placed.
pub struct Incoming {
    file: File,
    temp: TempName,
    /// The header not yet written (it goes out with the first data set bytes).
    header: Vec<u8>,
    size: u64,
    placed: bool,
    /// With fsync on, the bytes go to the device while the instance arrives: writeback
    /// is started every [`WRITEBACK_CHUNK`], and past [`DIRECT_FROM`] they are written
    /// directly.
    durable: bool,
    /// Offset up to which writeback was started (with fsync on).
    written_back: u64,
    /// The direct writes past [`DIRECT_FROM`], once the instance got there.
    direct: Option<Box<DirectWriter>>,
}

impl Incoming {
    /// Appends data set fragments exactly as received, in order: through the page
    /// cache, in one write for up to [`FRAGMENTS_PER_WRITE`] of them (with the header
    /// in the same call the first time); with fsync on, the bytes past [`DIRECT_FROM`]
    /// into the direct writer's staging buffers.
    pub fn write(&mut self, fragments: &[&[u8]]) -> io::Result<()> {
        let len = fragments.iter().map(|f| f.len()).sum();
        if self.direct.is_none() && self.through_cache(len) == len {
            return fragments
                .chunks(FRAGMENTS_PER_WRITE)
                .try_for_each(|chunk| self.write_cached(chunk));
        }
        fragments.iter().try_for_each(|f| self.write_fragment(f))
    }

    /// Appends one fragment, switching to direct writes where it crosses [`DIRECT_FROM`].
    fn write_fragment(&mut self, bytes: &[u8]) -> io::Result<()> {
        let (cached, rest) = bytes.split_at(self.through_cache(bytes.len()));
        if self.direct.is_none() {
            self.write_cached(&[cached])?;
            if rest.is_empty() {
                return Ok(());
            }
            self.start_direct()?;
        }
        match &mut self.direct {
            Some(direct) => {
                direct.write(rest)?;
                self.size += rest.len() as u64;
                Ok(())
            }
            None => self.write_cached(&[rest]),
        }
    }

    /// How many of the next `len` bytes go through the page cache: all of them, but
    /// with fsync on none past [`DIRECT_FROM`].
    fn through_cache(&self, len: usize) -> usize {
        let reached = self.size + self.header.len() as u64;
        match (&self.direct, self.durable) {
            (Some(_), _) => 0,
            (None, true) if reached <= DIRECT_FROM && reached + len as u64 > DIRECT_FROM => {
                (DIRECT_FROM - reached) as usize
            }
            _ => len,
        }
    }

    /// Writes the header still held back, then up to [`FRAGMENTS_PER_WRITE`]
    /// fragments, in one call where the kernel takes them all.
    fn write_cached(&mut self, fragments: &[&[u8]]) -> io::Result<()> {
        let header = std::mem::take(&mut self.header);
        let mut slices = [io::IoSlice::new(&[]); FRAGMENTS_PER_WRITE + 1];
        slices[0] = io::IoSlice::new(&header);
        for (slice, fragment) in slices[1..].iter_mut().zip(fragments) {
            *slice = io::IoSlice::new(fragment);
        }
        let count = 1 + fragments.len().min(FRAGMENTS_PER_WRITE);
        write_all_vectored(&mut self.file, &mut slices[..count])?;
        self.size += slices[..count].iter().map(|s| s.len() as u64).sum::<u64>();
        if self.durable && self.size - self.written_back >= WRITEBACK_CHUNK {
            self.start_writeback();
        }
        Ok(())
    }

    /// Starts the write to the device of the cached bytes not yet started.
    fn start_writeback(&mut self) {
        // Only a hint that starts disk writes early, while the network delivers the
        // rest or the commit runs; durability still comes from the fdatasync at
        // commit, so a failure is ignored.
        let (fd, start) = (self.file.as_raw_fd(), self.written_back);
        let _ = sync_range(fd, start, self.size - start, libc::SYNC_FILE_RANGE_WRITE);
        self.written_back = self.size;
    }

    /// Switches to direct writes at [`DIRECT_FROM`], where the filesystem allows.
    fn start_direct(&mut self) -> io::Result<()> {
        if self.durable {
            self.start_writeback();
        }
        self.direct = DirectWriter::start(&self.file, self.size)?;
        Ok(())
    }

    /// Writes what is still held back: the header of an empty data set, the direct
    /// writes' last bytes (those short of a block through the page cache). With fsync
    /// on, starts the write of the bytes not yet started, so that it runs while the
    /// commit takes its lock and claims the registry entry rather than inside the
    /// `fdatasync` (a durable 4 KB file with 15-30 us of work between: 5-18% less time
    /// to durable in alternating pairs).
    fn finish(&mut self) -> io::Result<()> {
        if !self.header.is_empty() {
            self.write_cached(&[])?;
        }
        if let Some(direct) = self.direct.take() {
            let (tail, offset) = (*direct).finish()?;
            self.file.write_all_at(&tail, offset)?;
        }
        if self.durable && self.size > self.written_back {
            self.start_writeback();
        }
        Ok(())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // An anonymous file vanishes with its descriptor; a named one must be removed.
        if let (false, TempName::Named(path)) = (self.placed, &self.temp) {
            let _ = fs::remove_file(path);
        }
    }
}

/// Writes every slice, in order, with as few calls as the kernel allows (one, usually).
fn write_all_vectored(file: &mut File, mut slices: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether this process may link a descriptor itself (`linkat` with `AT_EMPTY_PATH`:
/// with CAP_DAC_READ_SEARCH, or since Linux 6.10 for a file it opened): not known yet,
/// known to work, or refused.
static EMPTY_PATH_LINKS: AtomicU8 = AtomicU8::new(EMPTY_PATH_UNKNOWN);
const EMPTY_PATH_UNKNOWN: u8 = 0;
const EMPTY_PATH_WORKS: u8 = 1;
const EMPTY_PATH_REFUSED: u8 = 2;

/// Links an O_TMPFILE into the directory tree under `target` (fails if it exists):
/// from its descriptor where allowed, else through /proc/self/fd, which needs no
/// privilege but costs a walk of /proc (linkat(2)).
pub fn link_anonymous(file: &File, target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes())?;
    let allowed = EMPTY_PATH_LINKS.load(Ordering::Relaxed);
    if allowed == EMPTY_PATH_REFUSED {
        return link_through_proc(file, &target);
    }
    // SAFETY: NUL-terminated strings that outlive the call; `file` keeps its fd open.
    let rc = unsafe {
        libc::linkat(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if rc == 0 {
        if allowed == EMPTY_PATH_UNKNOWN {
            EMPTY_PATH_LINKS.store(EMPTY_PATH_WORKS, Ordering::Relaxed);
        }
        return Ok(());
    }
    let refused = io::Error::last_os_error();
    if refused.raw_os_error() != Some(libc::ENOENT) || allowed == EMPTY_PATH_WORKS {
        return Err(refused);
    }
    // ENOENT is both "no such folder" and "flag not allowed" until a link has worked:
    // /proc tells which.
    let linked = link_through_proc(file, &target);
    if linked.is_ok() {
        EMPTY_PATH_LINKS.store(EMPTY_PATH_REFUSED, Ordering::Relaxed);
    }
    linked
}

fn link_through_proc(file: &File, target: &CString) -> io::Result<()> {
    let source = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    // SAFETY: both pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            source.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    os_result(rc)
}

/// A system call's 0-or-minus-1 result as an `io::Result` (errno on failure).
pub fn os_result(rc: libc::c_int) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Makes something with `make` at `staged` (a free name in the run's temporary folder),
/// then renames it to `at` unless something is there (EEXIST); `remove` takes it away
/// again when the rename fails. Made at `at` directly where nothing can be made at
/// `staged` or the filesystem has no RENAME_NOREPLACE.
pub fn make_staged(
    staged: &Path,
    at: &Path,
    make: impl Fn(&Path) -> io::Result<()>,
    remove: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    if make(staged).is_err() {
        return make(at);
    }
    let renamed = rename_noreplace(staged, at);
    if renamed.is_err() {
        let _ = remove(staged);
    }
    match renamed {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => make(at),
        renamed => renamed,
    }
}

/// `renameat2(RENAME_NOREPLACE)`: fails with EEXIST rather than replace `to`, be it an
/// empty folder or a registry entry that another association has just made.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
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

/// `sync_file_range(2)` of `len` bytes from `start` (0: to the end of the file): starts
/// and/or waits for their write to the device, with no cache flush; durable only for
/// blocks already allocated (see the module documentation).
fn sync_range(fd: libc::c_int, start: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: sync_file_range only reads the descriptor number; the caller's file
    // outlives the call.
    let rc =
        unsafe { libc::sync_file_range(fd, start as libc::off64_t, len as libc::off64_t, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes the temporary directories (and run locks) of runs that no longer hold their
/// lock. Call with the commit lock held. Journals stay for the index to replay.
fn sweep_dead_runs(private: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(private.join("tmp"))? {
        let entry = entry?;
        let run_id = entry.file_name();
        let lock_path = private
            .join("run")
            .join(format!("{}.lock", run_id.to_string_lossy()));
        if run_is_alive(&lock_path) {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            removed += fs::read_dir(&path)?.count();
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
            removed += 1;
        }
        let _ = fs::remove_file(&lock_path);
    }
    Ok(removed)
}

fn run_is_alive(lock_path: &Path) -> bool {
    let Ok(file) = File::open(lock_path) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; a successful probe lock is released on close.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    rc != 0
}

/// Removes temporary files of dead runs under `root` (for tools and tests); returns
/// how many files were removed.
pub fn sweep_temporaries(root: &Path) -> io::Result<usize> {
    let private = root.join(PRIVATE_DIR);
    if !private.join("tmp").is_dir() {
        return Ok(0);
    }
    let lock = open_lock(&private.join("lock"))?;
    flock(&lock, libc::LOCK_EX)?;
    let result = sweep_dead_runs(&private);
    flock(&lock, libc::LOCK_UN)?;
    result
}

/// Today's local date as YYYYMMDD (the reception date of the `date` layout).
pub fn local_date_today() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r writes only into the zeroed `tm` we pass; both pointers are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if !ok {
        return "19700101".to_string();
    }
    format!(
        "{:04}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "storescp-store-{name}-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn store(root: &Path, duplicate: DuplicatePolicy, naming: Naming) -> Store {
        Store::open(StoreConfig {
            root: root.to_path_buf(),
            naming,
            duplicate,
            fsync: false,
            journal: true,
        })
        .unwrap()
    }

    /// A store with fsync on, flat naming, duplicates rejected.
    fn durable_store(root: &Path, journal: bool) -> Store {
        Store::open(StoreConfig {
            root: root.to_path_buf(),
            naming: Naming::Flat,
            duplicate: DuplicatePolicy::Reject,
            fsync: true,
            journal,
        })
        .unwrap()
    }

    fn put(s: &Store, relpath: &str, uid: &str, body: &[u8]) -> Outcome {
        let mut inc = s.begin(b"HDR").unwrap();
        inc.write(&[body]).unwrap();
        let placed = s.commit(inc, relpath, uid, None).unwrap();
        let outcome = placed.outcome.clone();
        placed.make_durable().unwrap();
        outcome
    }

    fn tmp_files(root: &Path) -> usize {
        fs::read_dir(root.join(".storescp/tmp"))
            .unwrap()
            .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum()
    }

    /// A line settles only once its instance is durable (or its commit abandoned), and
    /// the watermark never passes an unsettled line, its own included; a duplicate writes
    /// no line.
    #[test]
    fn journal_watermark_waits_for_unsettled_lines() {
        let root = tempdir("watermark");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        let commit =
            |uid: &str| s.commit(s.begin(b"HDR").unwrap(), &format!("{uid}.dcm"), uid, None);
        let (a, b) = (commit("1.1").unwrap(), commit("1.22").unwrap());
        assert!(a.is_journaled() && b.is_journaled());
        assert_eq!(a.publish(|w| w), 0, "the first line is still open");
        let first = "stored\t1.1\t1.1.dcm\t\n".len() as u64;
        let end = "stored\t1.22\t1.22.dcm\t\n".len() as u64 + first;
        b.make_durable().unwrap();
        assert_eq!(
            a.publish(|w| w),
            0,
            "a later line settling does not pass an open one"
        );
        a.make_durable().unwrap();
        assert_eq!(s.publish_watermark(|w| w), end);
        let duplicate = commit("1.1").unwrap();
        assert_eq!(duplicate.outcome, Outcome::Duplicate("1.1.dcm".into()));
        assert!(!duplicate.is_journaled(), "a duplicate has no line");
        drop(duplicate);
        let abandoned = commit("1.333").unwrap();
        drop(abandoned);
        assert_eq!(
            s.publish_watermark(|w| w),
            end + "stored\t1.333\t1.333.dcm\t\n".len() as u64,
            "a line whose instance was dropped unfinished settles too"
        );
        fs::remove_dir_all(root).unwrap();
    }

    /// With fsync on the journal is preallocated (zeros after the lines), so that a
    /// line overwrites blocks already on disk; a line written ahead is already on its
    /// way to the device when the commit waits for it.
    #[test]
    fn durable_journal_is_preallocated() {
        let root = tempdir("prealloc");
        let s = durable_store(&root, true);
        let path = root.join(".storescp/journal").join(s.journal_name());
        assert_eq!(fs::metadata(&path).unwrap().len(), JOURNAL_CHUNK);
        let ahead = s.journal_ahead("1.1", "1.1.dcm").unwrap();
        assert!(ahead.submitted);
        let placed = s
            .commit(s.begin(b"HDR").unwrap(), "1.1.dcm", "1.1", Some(ahead))
            .unwrap();
        placed.make_durable().unwrap();
        let journal = fs::read(&path).unwrap();
        assert_eq!(journal.len() as u64, JOURNAL_CHUNK);
        let line = b"stored\t1.1\t1.1.dcm\t\n";
        assert_eq!(&journal[..line.len()], line);
        assert!(journal[line.len()..].iter().all(|&b| b == 0));
        fs::remove_dir_all(root).unwrap();
    }

    /// A line written ahead holds the watermark back while its data set arrives, is the
    /// instance's line when it names the stored file, and is replaced by a new one when
    /// it does not (the commit's path or a replace elsewhere), settling either way.
    #[test]
    fn journal_line_written_ahead() {
        let root = tempdir("ahead");
        let s = store(&root, DuplicatePolicy::Replace, Naming::Flat);
        let journal = || {
            fs::read_to_string(root.join(".storescp/journal").join(s.journal_name()))
                .unwrap()
                .trim_end_matches('\0')
                .to_string()
        };
        let ahead = s.journal_ahead("1.1", "1.1.dcm").unwrap();
        assert_eq!(
            s.publish_watermark(|w| w),
            0,
            "open while the data set arrives"
        );
        let placed = s
            .commit(s.begin(b"HDR").unwrap(), "1.1.dcm", "1.1", Some(ahead))
            .unwrap();
        assert!(placed.is_journaled());
        placed.make_durable().unwrap();
        let one = "stored\t1.1\t1.1.dcm\t\n";
        assert_eq!(journal(), one, "the line written ahead is the instance's");
        assert_eq!(s.publish_watermark(|w| w), one.len() as u64);

        let stale = s.journal_ahead("1.1", "elsewhere/1.1.dcm").unwrap();
        let placed = s
            .commit(s.begin(b"HDR").unwrap(), "1.1.dcm", "1.1", Some(stale))
            .unwrap();
        assert_eq!(placed.outcome, Outcome::Replaced("1.1.dcm".into()));
        drop(placed);
        let two = "stored\t1.1\telsewhere/1.1.dcm\t\nreplaced\t1.1\t1.1.dcm\t1.1.dcm\n";
        assert_eq!(
            journal(),
            format!("{one}{two}"),
            "a line naming another path"
        );
        assert_eq!(s.publish_watermark(|w| w), (one.len() + two.len()) as u64);
        fs::remove_dir_all(root).unwrap();
    }

    /// With fsync on, an instance larger than DIRECT_FROM, arriving in groups of
    /// fragments that straddle the switch to direct writes, is stored byte for byte.
    #[test]
    fn large_instance_with_fsync_is_stored_whole() {
        let root = tempdir("direct");
        let s = durable_store(&root, false);
        let body: Vec<u8> = (0..DIRECT_FROM as usize * 2 + 4_099)
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let mut inc = s.begin(b"HDR").unwrap();
        let pieces: Vec<&[u8]> = body.chunks(65_521).collect();
        for group in pieces.chunks(5) {
            inc.write(group).unwrap();
        }
        assert!(inc.direct.is_some(), "direct writes past DIRECT_FROM");
        let placed = s.commit(inc, "1.1.dcm", "1.1", None).unwrap();
        assert_eq!(placed.file_size, body.len() as u64 + 3);
        placed.make_durable().unwrap();
        let read = fs::read(root.join("1.1.dcm")).unwrap();
        assert_eq!(&read[..3], b"HDR");
        assert!(read[3..] == body[..], "stored bytes differ");
        assert_eq!(tmp_files(&root), 0);
        fs::remove_dir_all(root).unwrap();
    }

    /// A spare opened ahead holds the next instance like a file begun then; an unused
    /// one leaves nothing behind.
    #[test]
    fn spare_holds_the_next_instance() {
        let root = tempdir("spare");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        // O_TMPFILE works on the filesystem of the tests.
        let spare = s.spare().unwrap().unwrap();
        drop(s.spare().unwrap());
        let mut inc = s.begin_in(spare, b"HDR").unwrap();
        inc.write(&[b"body"]).unwrap();
        let placed = s.commit(inc, "1.1.dcm", "1.1", None).unwrap();
        assert_eq!(placed.outcome, Outcome::Stored);
        placed.make_durable().unwrap();
        assert_eq!(fs::read(root.join("1.1.dcm")).unwrap(), b"HDRbody");
        assert_eq!(tmp_files(&root), 0);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn private_area_removed_under_a_spare_is_recreated() {
        let root = tempdir("spare-removed");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        let spare = s.spare().unwrap().unwrap();
        fs::remove_dir_all(root.join(PRIVATE_DIR)).unwrap();
        let mut inc = s.begin_in(spare, b"HDR").unwrap();
        assert!(s.tmp_dir.is_dir());
        assert!(root.join(PRIVATE_DIR).join("folder/ff").is_dir());
        inc.write(&[b"body"]).unwrap();
        let placed = s.commit(inc, "1.2.dcm", "1.2", None).unwrap();
        assert_eq!(placed.outcome, Outcome::Stored);
        assert!(s.registry.entry("1.2").is_symlink());
        // The held temporary folder is the new one: the next spare is opened there.
        assert!(!s.tmp_dir_removed());
        drop(s.spare().unwrap());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_folder_of_temporary_folders_spreads_them_where_the_filesystem_can() {
        let root = tempdir("spread-tmp");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        let tmp = root.join(PRIVATE_DIR).join("tmp");
        // None on a filesystem without inode flags (tmpfs); marked wherever they exist.
        let marked = birthplace::is_spread(&tmp);
        assert_ne!(marked, Some(false));
        // Recreated by an instance after an operator removed the area: marked again.
        fs::remove_dir_all(root.join(PRIVATE_DIR)).unwrap();
        let inc = s.begin(b"HDR").unwrap();
        assert_eq!(birthplace::is_spread(&tmp), marked);
        drop(inc);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn anonymous_files_are_linked_either_way() {
        let root = tempdir("link-anonymous");
        let dir = open_directory(&root).unwrap();
        for (k, through_proc) in [(0, false), (1, true)] {
            let mut file = open_anonymous(&dir).unwrap();
            file.write_all(b"body").unwrap();
            let target = root.join(format!("{k}.dcm"));
            let missing = root.join("no-such-folder").join(format!("{k}.dcm"));
            let link = |to: &Path| match through_proc {
                true => link_through_proc(&file, &CString::new(to.as_os_str().as_bytes()).unwrap()),
                false => link_anonymous(&file, to),
            };
            assert_eq!(link(&missing).unwrap_err().kind(), io::ErrorKind::NotFound);
            link(&target).unwrap();
            assert_eq!(
                link(&target).unwrap_err().kind(),
                io::ErrorKind::AlreadyExists
            );
            assert_eq!(fs::read(&target).unwrap(), b"body");
        }
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn durable_instance_starts_its_last_write_at_the_end_of_the_data_set() {
        let root = tempdir("finish-writeback");
        let s = durable_store(&root, false);
        let mut inc = s.begin(b"HDR").unwrap();
        inc.write(&[b"a tiny data set"]).unwrap();
        assert_eq!(
            inc.written_back, 0,
            "below WRITEBACK_CHUNK nothing is started yet"
        );
        inc.finish().unwrap();
        assert_eq!(inc.written_back, inc.size);
        drop(inc);
        fs::remove_dir_all(root).unwrap();
    }

    /// Fragments handed over together, more than one write takes, land in order.
    #[test]
    fn fragments_written_together_keep_their_order() {
        let root = tempdir("fragments");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        let pieces: Vec<Vec<u8>> = (0..FRAGMENTS_PER_WRITE * 2 + 3)
            .map(|i| vec![i as u8; i % 7 + 1])
            .collect();
        let fragments: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        let mut inc = s.begin(b"HDR").unwrap();
        inc.write(&fragments).unwrap();
        inc.write(&[]).unwrap();
        inc.write(&fragments[..1]).unwrap();
        let placed = s.commit(inc, "1.1.dcm", "1.1", None).unwrap();
        placed.make_durable().unwrap();
        let mut expected = b"HDR".to_vec();
        expected.extend(pieces.concat());
        expected.extend(&pieces[0]);
        assert_eq!(fs::read(root.join("1.1.dcm")).unwrap(), expected);
        fs::remove_dir_all(root).unwrap();
    }

    /// The header goes out with the first data set bytes, or at commit without any.
    #[test]
    fn header_is_written_with_the_first_bytes_or_at_commit() {
        let root = tempdir("header");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        let mut inc = s.begin(b"HDR").unwrap();
        inc.write(&[b"one"]).unwrap();
        inc.write(&[b"two"]).unwrap();
        let placed = s.commit(inc, "1.1.dcm", "1.1", None).unwrap();
        assert_eq!(placed.file_size, 9);
        placed.make_durable().unwrap();
        let bare = s
            .commit(s.begin(b"HDR").unwrap(), "1.2.dcm", "1.2", None)
            .unwrap();
        assert_eq!(bare.file_size, 3);
        bare.make_durable().unwrap();
        assert_eq!(fs::read(root.join("1.1.dcm")).unwrap(), b"HDRonetwo");
        assert_eq!(fs::read(root.join("1.2.dcm")).unwrap(), b"HDR");
        fs::remove_dir_all(root).unwrap();
    }

    /// The registry link is in its folder under `sop/`; a flat link left by an older
    /// version is moved there at start and still decides duplicates.
    #[test]
    fn registry_links_live_in_folders_and_flat_ones_move_there() {
        let root = tempdir("registry");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        assert_eq!(put(&s, "1.1.dcm", "1.1", b"one"), Outcome::Stored);
        let private = root.join(PRIVATE_DIR);
        let link = s.registry.entry("1.1");
        assert_eq!(s.registry.stored_path(&link, "1.1").unwrap(), "1.1.dcm");
        assert_eq!(
            link.parent().unwrap().parent().unwrap(),
            private.join("sop")
        );
        assert!(fs::symlink_metadata(private.join("sop/1.1")).is_err());
        drop(s);

        fs::write(root.join("old.dcm"), b"old").unwrap();
        std::os::unix::fs::symlink("old.dcm", private.join("sop/2.2")).unwrap();
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        assert!(fs::symlink_metadata(private.join("sop/2.2")).is_err());
        let moved = s.registry.entry("2.2");
        assert_eq!(fs::read_link(moved).unwrap(), Path::new("old.dcm"));
        assert_eq!(
            put(&s, "2.2.dcm", "2.2", b"new"),
            Outcome::Duplicate("old.dcm".into())
        );
        assert!(!root.join("2.2.dcm").exists());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn store_reject_replace_ignore() {
        let root = tempdir("policies");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        assert_eq!(put(&s, "1.2.dcm", "1.2", b"one"), Outcome::Stored);
        assert_eq!(fs::read(root.join("1.2.dcm")).unwrap(), b"HDRone");
        assert_eq!(
            put(&s, "1.2.dcm", "1.2", b"two"),
            Outcome::Duplicate("1.2.dcm".into())
        );
        assert_eq!(fs::read(root.join("1.2.dcm")).unwrap(), b"HDRone");
        drop(s);

        let s = store(&root, DuplicatePolicy::Ignore, Naming::Flat);
        assert_eq!(
            put(&s, "1.2.dcm", "1.2", b"three"),
            Outcome::Ignored("1.2.dcm".into())
        );
        drop(s);

        // Replace into another folder (as the date layout does): one file per UID.
        let s = store(&root, DuplicatePolicy::Replace, Naming::Date);
        assert_eq!(
            put(&s, "2024/01/02/9/1.2.dcm", "1.2", b"four"),
            Outcome::Replaced("1.2.dcm".into())
        );
        assert!(!root.join("1.2.dcm").exists());
        assert_eq!(
            fs::read(root.join("2024/01/02/9/1.2.dcm")).unwrap(),
            b"HDRfour"
        );
        let entry = s.registry.entry("1.2");
        assert_eq!(
            s.registry.stored_path(&entry, "1.2").unwrap(),
            "2024/01/02/9/1.2.dcm"
        );
        assert_eq!(tmp_files(&root), 0);
        let journal =
            fs::read_to_string(root.join(".storescp/journal").join(s.journal_name())).unwrap();
        // Without fsync nothing is preallocated: the lines alone.
        assert_eq!(journal, "replaced\t1.2\t2024/01/02/9/1.2.dcm\t1.2.dcm\n");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn dropped_incoming_leaves_nothing() {
        let root = tempdir("drop");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        let mut inc = s.begin(b"HDR").unwrap();
        inc.write(&[b"partial"]).unwrap();
        drop(inc);
        assert_eq!(tmp_files(&root), 0);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn concurrent_same_uid_stores_once() {
        let root = tempdir("race");
        let stores: Vec<Store> = (0..2)
            .map(|_| store(&root, DuplicatePolicy::Reject, Naming::Hierarchical))
            .collect();
        let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let s = &stores[i % 2];
                    scope.spawn(move || put(s, &format!("{i}/1/7.7.dcm"), "7.7", b"x"))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let stored = outcomes.iter().filter(|o| **o == Outcome::Stored).count();
        assert_eq!(stored, 1);
        fs::remove_dir_all(root).unwrap();
    }

    /// With fsync on, an instance that made folders syncs every directory whose entries
    /// changed, side by side, and any one failing is the instance's failure.
    #[test]
    fn every_changed_directory_is_synced() {
        let root = tempdir("changed-dirs");
        let s = durable_store(&root, false);
        let mut inc = s.begin(b"HDR").unwrap();
        inc.write(&[b"a"]).unwrap();
        let placed = s.commit(inc, "1.2/1.3/1.4.dcm", "1.4", None).unwrap();
        assert_eq!(placed.outcome, Outcome::Stored);
        assert_eq!(placed.created, [root.clone(), root.join("1.2")]);
        placed.make_durable().unwrap();
        let with_missing = |created: Vec<PathBuf>| Placed {
            store: &s,
            outcome: Outcome::Stored,
            file_size: 1,
            relpath: "1.2/1.3/1.4.dcm".into(),
            created,
            journal_line: None,
        };
        let missing = root.join("9.9");
        assert!(with_missing(vec![root.clone(), missing.clone()])
            .make_durable()
            .is_err());
        assert!(with_missing(vec![missing, root.join("1.2")])
            .make_durable()
            .is_err());
        fs::remove_dir_all(root).unwrap();
    }

    /// Once an instance made a new study's folders, the next new study's come from a
    /// pair made ahead (and, with fsync on, the same directories are synced).
    #[test]
    fn a_new_study_takes_folders_made_ahead() {
        let root = tempdir("spare-folders");
        let s = durable_store(&root, false);
        let pairs = |s: &Store| {
            fs::read_dir(&s.tmp_dir)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().is_dir())
                .count()
        };
        s.prepare_folders().unwrap();
        assert_eq!(pairs(&s), 0, "no new study seen yet");
        let commit = |relpath: &str, uid: &str| {
            let mut inc = s.begin(b"HDR").unwrap();
            inc.write(&[b"a"]).unwrap();
            s.commit(inc, relpath, uid, None).unwrap()
        };
        commit("1.2/1.3/1.4.dcm", "1.4").make_durable().unwrap();
        s.prepare_folders().unwrap();
        s.spare_folders.settle();
        assert_eq!(pairs(&s), 1);
        // A new series of a study that exists leaves the pair for a new study.
        commit("1.2/1.5/1.6.dcm", "1.6").make_durable().unwrap();
        assert_eq!(pairs(&s), 1);
        let placed = commit("2.2/2.3/2.4.dcm", "2.4");
        assert_eq!(placed.created, [root.clone(), root.join("2.2")]);
        placed.make_durable().unwrap();
        assert_eq!(pairs(&s), 0);
        assert_eq!(fs::read(root.join("2.2/2.3/2.4.dcm")).unwrap(), b"HDRa");
        assert_eq!(
            fs::read_dir(root.join("2.2")).unwrap().count(),
            1,
            "no pair's inner name left"
        );
        fs::remove_dir_all(root).unwrap();
    }

    /// Slow births of temporary files move the births to a new folder in the run's
    /// temporary folder, a few times a run at the most; instances go on as before.
    #[test]
    fn slow_births_move_to_a_new_folder() {
        let root = tempdir("births");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Hierarchical);
        let births = || s.births.read().unwrap().path.clone();
        assert_eq!(births(), s.tmp_dir);
        s.births_timing.stage();
        drop(s.begin(b"HDR").unwrap());
        let moved = births();
        assert_eq!(moved.parent(), Some(s.tmp_dir.as_path()));
        assert!(moved.is_dir());
        assert!(!s.births_timing.staged(), "the move starts the count anew");
        assert_eq!(put(&s, "1.2/1.3/1.4.dcm", "1.4", b"a"), Outcome::Stored);
        assert!(s.temp_name("part").starts_with(&moved));
        for _ in 0..BIRTHS_MOVES + 2 {
            s.births_timing.stage();
            drop(s.begin(b"HDR").unwrap());
        }
        let folders = fs::read_dir(&s.tmp_dir).unwrap().count() as u64;
        assert_eq!(folders, BIRTHS_MOVES, "moves past the limit");
        // Removed with the private area, the births start again in the run's folder.
        fs::remove_dir_all(root.join(PRIVATE_DIR)).unwrap();
        drop(s.begin(b"HDR").unwrap());
        assert_eq!(births(), s.tmp_dir);
        fs::remove_dir_all(root).unwrap();
    }

    /// A folder made in the births folder is a birth as well: slow ones move it too.
    #[test]
    fn slow_staged_folders_move_the_births() {
        let root = tempdir("staged-births");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Hierarchical);
        s.birthplace.stage();
        s.births_timing.stage();
        s.make_folder(&root.join("9.9")).unwrap();
        assert!(root.join("9.9").is_dir());
        let births = s.births.read().unwrap().path.clone();
        assert_eq!(births.parent(), Some(s.tmp_dir.as_path()));
        fs::remove_dir_all(root).unwrap();
    }

    /// While inodes made in place are slow, a new study's folders and a symlink entry
    /// are made in the run's temporary folder and renamed into place: the same files,
    /// folders and entries, duplicates found as before, nothing left in the folder.
    #[test]
    fn folders_and_entries_staged_while_creating_in_place_is_slow() {
        let root = tempdir("staged");
        let s = store(&root, DuplicatePolicy::Reject, Naming::Hierarchical);
        s.birthplace.stage();
        let names = || s.next_tmp.load(Ordering::Relaxed);
        let before = names();
        assert_eq!(put(&s, "1.2/1.3/1.4.dcm", "1.4", b"a"), Outcome::Stored);
        assert!(root.join("1.2/1.3").is_dir());
        // Three inodes born under names of the temporary folder: two folders, an entry.
        assert_eq!(names() - before, 3);
        assert_eq!(
            fs::read_link(s.registry.entry("1.4")).unwrap(),
            Path::new("1.2/1.3/1.4.dcm")
        );
        // A duplicate in another study: its folders are made, its entry is not.
        assert_eq!(
            put(&s, "1.8/1.9/1.4.dcm", "1.4", b"b"),
            Outcome::Duplicate("1.2/1.3/1.4.dcm".into())
        );
        // A folder another association made meanwhile is used as it is.
        fs::create_dir_all(root.join("2.2/2.3")).unwrap();
        assert_eq!(put(&s, "2.2/2.3/2.4.dcm", "2.4", b"c"), Outcome::Stored);
        assert!(fs::read(root.join("2.2/2.3/2.4.dcm"))
            .unwrap()
            .ends_with(b"c"));
        assert_eq!(
            fs::read_dir(&s.tmp_dir).unwrap().count(),
            0,
            "a staged folder or entry is left"
        );
        fs::remove_dir_all(root).unwrap();
    }

    /// Two stores on one root (two processes) share a folder's link: the second finds
    /// the first's and uses it, and each sees the other's instances as duplicates.
    #[test]
    fn stores_on_one_root_share_folder_links() {
        let root = tempdir("shared-folder");
        let (a, b) = (
            store(&root, DuplicatePolicy::Reject, Naming::Hierarchical),
            store(&root, DuplicatePolicy::Reject, Naming::Hierarchical),
        );
        // Each store's second instance in the folder is the one named through its link.
        for (s, uids) in [(&a, ["1.4", "1.6"]), (&b, ["1.5", "1.7"])] {
            for uid in uids {
                let relpath = format!("1.2/1.3/{uid}.dcm");
                assert_eq!(put(s, &relpath, uid, b"a"), Outcome::Stored);
            }
        }
        let (one, two) = (a.registry.entry("1.6"), b.registry.entry("1.7"));
        assert_eq!(fs::read_link(&one).unwrap(), fs::read_link(&two).unwrap());
        assert_eq!(
            put(&b, "9.9/9.9/1.4.dcm", "1.4", b"again"),
            Outcome::Duplicate("1.2/1.3/1.4.dcm".into())
        );
        assert_eq!(
            put(&a, "1.2/1.3/1.5.dcm", "1.5", b"again"),
            Outcome::Duplicate("1.2/1.3/1.5.dcm".into())
        );
        // An entry made as a hard link of the folder link names the folder.
        assert_eq!(
            put(&b, "9.9/9.9/1.6.dcm", "1.6", b"again"),
            Outcome::Duplicate("1.2/1.3/1.6.dcm".into())
        );
        let c = store(&root, DuplicatePolicy::Replace, Naming::Hierarchical);
        assert_eq!(
            put(&c, "9.9/9.9/1.7.dcm", "1.7", b"moved"),
            Outcome::Replaced("1.2/1.3/1.7.dcm".into())
        );
        assert!(!root.join("1.2/1.3/1.7.dcm").exists());
        assert!(fs::read(root.join("9.9/9.9/1.7.dcm"))
            .unwrap()
            .ends_with(b"moved"));
        assert_eq!(
            c.registry.stored_path(&two, "1.7").unwrap(),
            "9.9/9.9/1.7.dcm"
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn dead_runs_are_swept() {
        let root = tempdir("sweep");
        let dead = root.join(".storescp/tmp/1-1");
        fs::create_dir_all(&dead).unwrap();
        fs::write(dead.join("0.part"), b"left by a killed process").unwrap();
        let s = store(&root, DuplicatePolicy::Reject, Naming::Flat);
        assert!(!dead.exists());
        // A live run's directory survives a sweep by another opener.
        let live = s.tmp_dir.clone();
        assert_eq!(sweep_temporaries(&root).unwrap(), 0);
        assert!(live.exists());
        fs::remove_dir_all(root).unwrap();
    }
}
