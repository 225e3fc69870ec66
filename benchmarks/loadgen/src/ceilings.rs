//! `storescp-loadgen ceilings`: what this machine allows, measured with the same primitives a
//! Storage SCP uses, so the server's figures can be read against them.
//!
//! - loopback TCP: one sender thread writing 1 MiB buffers, one receiver reading them;
//! - page-cache writes: 1 MiB `write`s to one new file, no sync;
//! - write + fdatasync: the same followed by one `fdatasync`, timed together;
//! - direct writes: 1 MiB `O_DIRECT` writes, two in flight, then one `fdatasync`;
//! - create + write + rename of 4 KB and 512 KB files, one directory, no sync;
//! - fsync latency: for a new 4 KB file, `fsync` of the file, then `rename` and `fsync` of
//!   its directory (the durable-store sequence), each timed, run one file at a time;
//! - the same durable-store sequence from 4 threads at once, for 4 KB and 512 KB files
//!   (what per-file durability allows with 4 associations);
//! - storescp's own filesystem work per tiny instance with fsync off (an anonymous file,
//!   its registry entry, its link), from 1 and 4 threads, and the same without the
//!   registry entry (what the duplicate registry costs);
//! - loopback exchanges of a 3 KB request and a 100-byte answer, one at a time, from 1
//!   pair of threads (the responder polling for the next request, as storescp's lone
//!   association does) and from 4 (nobody polling): the network's part of a tiny
//!   instance's round trip;
//! - the same exchanges with each request stored as storescp stores it before the answer:
//!   tiny ones with fsync off from 1 and 4 pairs, and 512 KB ones durably from 4 pairs
//!   (what the network and the store allow together, for tiny x1, tiny x4 and small x4).
//!
//! File creation is slow for a while after many files were deleted on an ext4 without a
//! journal (the allocator skips inodes deleted in the last 60 s, 360 s while their inode
//! table block is dirty: `recently_deleted()` in fs/ext4/ialloc.c), so `--no-cleanup` leaves
//! the small files in place for the caller to remove after the last measurement, and
//! measurements should start at least a minute after a mass deletion and a `sync`.
//!
//! One untimed page-cache write of the same size comes first (warm guest memory). Before
//! every disk measurement `sync` is run, untimed, so that earlier dirty pages are not
//! written back during it. Files are created under `--dir` (use the disk the server writes
//! to, never tmpfs) and removed afterwards.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use _core::direct_write::ALIGN;
use _core::store::{link_anonymous, WRITEBACK_CHUNK};

const MIB: usize = 1 << 20;

struct Options {
    dir: PathBuf,
    scale: f64,
    json: bool,
    cleanup: bool,
    /// Keys of the rows to measure; empty: all of them.
    only: Vec<String>,
}

fn parse(argv: &[String]) -> Result<Options, String> {
    let mut options = Options {
        dir: PathBuf::new(),
        scale: 1.0,
        json: false,
        cleanup: true,
        only: Vec::new(),
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--dir" => {
                options.dir = PathBuf::from(it.next().ok_or("--dir needs a value")?);
            }
            "--scale" => {
                let text = it.next().ok_or("--scale needs a value")?;
                options.scale = text
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| format!("--scale: not a positive number: {text}"))?;
            }
            "--json" => options.json = true,
            "--no-cleanup" => options.cleanup = false,
            "--only" => {
                let keys = it.next().ok_or("--only needs a value")?;
                options.only = keys
                    .split(',')
                    .filter(|k| !k.is_empty())
                    .map(String::from)
                    .collect();
            }
            other => return Err(format!("ceilings: unknown argument: {other}")),
        }
    }
    if options.dir.as_os_str().is_empty() {
        return Err("ceilings: --dir is required".to_owned());
    }
    Ok(options)
}

fn scaled(base: usize, scale: f64) -> usize {
    ((base as f64 * scale).round() as usize).max(1)
}

fn err(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", path.display())
}

fn sync_all_disks() {
    // Untimed; a failure only makes the next figure noisier.
    let _ = Command::new("sync").status();
}

/// Loopback TCP throughput in MB/s (10^6 bytes).
fn tcp_loopback(total: usize) -> Result<f64, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let address = listener
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    let receiver = std::thread::spawn(move || -> Result<usize, String> {
        let (mut stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let mut buffer = vec![0u8; MIB];
        let mut received = 0usize;
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => return Ok(received),
                Ok(n) => received += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("recv: {e}")),
            }
        }
    });
    let buffer = vec![0x5Au8; MIB];
    let started = Instant::now();
    let mut stream = TcpStream::connect(address).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let mut sent = 0usize;
    while sent < total {
        stream
            .write_all(&buffer)
            .map_err(|e| format!("send: {e}"))?;
        sent += buffer.len();
    }
    drop(stream);
    let received = receiver
        .join()
        .map_err(|_| "receiver thread panicked".to_owned())??;
    let seconds = started.elapsed().as_secs_f64();
    if received != sent {
        return Err(format!("loopback: sent {sent} bytes, received {received}"));
    }
    Ok(sent as f64 / seconds / 1e6)
}

/// MB/s of 1 MiB writes to a new file, optionally followed by one fdatasync (timed).
fn sequential_write(dir: &Path, total: usize, datasync: bool) -> Result<f64, String> {
    sync_all_disks();
    let path = dir.join(if datasync {
        "ceiling-fdatasync.bin"
    } else {
        "ceiling-pagecache.bin"
    });
    let buffer = vec![0xA5u8; MIB];
    let started = Instant::now();
    let mut file = File::create(&path).map_err(|e| err("create", &path, e))?;
    let mut written = 0usize;
    while written < total {
        file.write_all(&buffer)
            .map_err(|e| err("write", &path, e))?;
        written += buffer.len();
    }
    if datasync {
        file.sync_data().map_err(|e| err("fdatasync", &path, e))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    fs::remove_file(&path).map_err(|e| err("remove", &path, e))?;
    Ok(written as f64 / seconds / 1e6)
}

/// `path` as a new, empty directory (whatever an earlier run left there is removed).
fn fresh_dir(path: &Path) -> Result<PathBuf, String> {
    if path.exists() {
        fs::remove_dir_all(path).map_err(|e| err("remove", path, e))?;
    }
    fs::create_dir_all(path).map_err(|e| err("mkdir", path, e))?;
    Ok(path.to_path_buf())
}

/// A new file at `path` (which must not exist) holding `bytes`, still open.
fn write_new(path: &Path, bytes: &[u8]) -> Result<File, String> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| err("create", path, e))?;
    file.write_all(bytes).map_err(|e| err("write", path, e))?;
    Ok(file)
}

/// Runs `work(k)` for every k in 0..threads, each on a thread of its own, all at once;
/// the first error, or a panic, is returned once every thread has ended.
fn on_threads<F>(threads: usize, work: F) -> Result<(), String>
where
    F: Fn(usize) -> Result<(), String> + Sync,
{
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = (0..threads).map(|k| scope.spawn(move || work(k))).collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
    })
}

/// `done` operations per second since `started`; then `sub` is removed if `cleanup`.
fn per_second_then_cleanup(
    done: usize,
    started: Instant,
    sub: &Path,
    cleanup: bool,
) -> Result<f64, String> {
    let per_second = done as f64 / started.elapsed().as_secs_f64();
    if cleanup {
        fs::remove_dir_all(sub).map_err(|e| err("remove", sub, e))?;
    }
    Ok(per_second)
}

/// MB/s of 1 MiB `O_DIRECT` writes to a new file, two in flight (a thread each, taking
/// alternate chunks), then one fdatasync, timed together: what the device takes with the
/// page cache out of the way, the path storescp uses for large instances with fsync on.
fn direct_write(dir: &Path, total: usize) -> Result<f64, String> {
    sync_all_disks();
    let path = dir.join("ceiling-direct.bin");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|e| err("create (O_DIRECT)", &path, e))?;
    let backing = vec![0x5Cu8; MIB + ALIGN];
    let start = backing.as_ptr().align_offset(ALIGN);
    let chunk = backing
        .get(start..start + MIB)
        .ok_or("cannot align a direct I/O buffer")?;
    let chunks = total / MIB;
    let started = Instant::now();
    on_threads(2, |first| {
        (first..chunks).step_by(2).try_for_each(|k| {
            file.write_all_at(chunk, (k * MIB) as u64)
                .map_err(|e| err("write (O_DIRECT)", &path, e))
        })
    })?;
    file.sync_data().map_err(|e| err("fdatasync", &path, e))?;
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    fs::remove_file(&path).map_err(|e| err("remove", &path, e))?;
    Ok((chunks * MIB) as f64 / seconds / 1e6)
}

/// Files per second of create (temporary name) + write + close + rename into one directory.
fn create_rename(dir: &Path, size: usize, count: usize, cleanup: bool) -> Result<f64, String> {
    sync_all_disks();
    let sub = fresh_dir(&dir.join(format!("ceiling-create-{size}")))?;
    let buffer = vec![0x3Cu8; size];
    let started = Instant::now();
    for i in 0..count {
        let tmp = sub.join(format!(".tmp-{i}"));
        drop(write_new(&tmp, &buffer)?);
        let target = sub.join(format!("file-{i}.dcm"));
        fs::rename(&tmp, &target).map_err(|e| err("rename", &tmp, e))?;
    }
    per_second_then_cleanup(count, started, &sub, cleanup)
}

/// Median and 90th percentile of (file fsync, directory fsync, whole durable store) in
/// milliseconds, and durable 4 KB files per second one at a time.
fn fsync_latency(dir: &Path, count: usize, cleanup: bool) -> Result<([f64; 6], f64), String> {
    sync_all_disks();
    let sub = fresh_dir(&dir.join("ceiling-fsync"))?;
    let directory = File::open(&sub).map_err(|e| err("open", &sub, e))?;
    let buffer = vec![0x77u8; 4096];
    let mut file_ms = Vec::with_capacity(count);
    let mut dir_ms = Vec::with_capacity(count);
    let mut all_ms = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let t0 = Instant::now();
        let tmp = sub.join(format!(".tmp-{i}"));
        let file = write_new(&tmp, &buffer)?;
        let t1 = Instant::now();
        file.sync_all().map_err(|e| err("fsync", &tmp, e))?;
        let t2 = Instant::now();
        drop(file);
        let target = sub.join(format!("file-{i}.dcm"));
        fs::rename(&tmp, &target).map_err(|e| err("rename", &tmp, e))?;
        let t3 = Instant::now();
        directory.sync_all().map_err(|e| err("fsync", &sub, e))?;
        let t4 = Instant::now();
        file_ms.push((t2 - t1).as_secs_f64() * 1e3);
        dir_ms.push((t4 - t3).as_secs_f64() * 1e3);
        all_ms.push((t4 - t0).as_secs_f64() * 1e3);
    }
    let per_second = count as f64 / started.elapsed().as_secs_f64();
    drop(directory);
    if cleanup {
        fs::remove_dir_all(&sub).map_err(|e| err("remove", &sub, e))?;
    }
    let pick = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        let rank = ((v.len() - 1) as f64 * p).round() as usize;
        v.get(rank).copied().unwrap_or(0.0)
    };
    Ok((
        [
            pick(&mut file_ms, 0.5),
            pick(&mut file_ms, 0.9),
            pick(&mut dir_ms, 0.5),
            pick(&mut dir_ms, 0.9),
            pick(&mut all_ms, 0.5),
            pick(&mut all_ms, 0.9),
        ],
        per_second,
    ))
}

/// Files per second, all writers together, of `writers` threads each storing files of
/// `size` bytes durably one after the other in one shared directory: create, write,
/// fdatasync, rename, fsync of the directory. What per-file durability allows when
/// several associations store at once (the server groups directory fsyncs, so it may do
/// a little better).
fn durable_parallel(
    dir: &Path,
    size: usize,
    writers: usize,
    count: usize,
    cleanup: bool,
) -> Result<f64, String> {
    sync_all_disks();
    let sub = fresh_dir(&dir.join(format!("ceiling-durable-{size}x{writers}")))?;
    let per_writer = count.div_ceil(writers);
    let buffer = vec![0x5Au8; size];
    let store = |w: usize| -> Result<(), String> {
        let directory = File::open(&sub).map_err(|e| err("open", &sub, e))?;
        for i in 0..per_writer {
            let tmp = sub.join(format!(".tmp-{w}-{i}"));
            let file = write_new(&tmp, &buffer)?;
            file.sync_data().map_err(|e| err("fdatasync", &tmp, e))?;
            drop(file);
            let target = sub.join(format!("file-{w}-{i}.dcm"));
            fs::rename(&tmp, &target).map_err(|e| err("rename", &tmp, e))?;
            directory.sync_all().map_err(|e| err("fsync", &sub, e))?;
        }
        Ok(())
    };
    let started = Instant::now();
    on_threads(writers, store)?;
    per_second_then_cleanup(per_writer * writers, started, &sub, cleanup)
}

/// Instances per second, all writers together, of the filesystem work storescp does for
/// each instance with fsync off, `writers` threads at once ([`store_instance`], 4 KB each,
/// with or without the registry entry: what the duplicate registry costs); nothing
/// synced. With one writer, the filesystem's part of the tiny x1 round trip; with 4,
/// what the two cores allow for tiny x4 before any byte is received.
fn store_with_registry(
    dir: &Path,
    writers: usize,
    registry: bool,
    count: usize,
    cleanup: bool,
) -> Result<f64, String> {
    sync_all_disks();
    let sub = tiny_store_dirs(&dir.join(format!("ceiling-registry-{registry}-x{writers}")))?;
    let per_writer = count.div_ceil(writers);
    let buffer = vec![0x4Bu8; 4096];
    let store = |w: usize| -> Result<(), String> {
        let series = sub.join(format!("series-{w}"));
        fs::create_dir(&series).map_err(|e| err("mkdir", &series, e))?;
        for i in 0..per_writer {
            store_instance(&sub, &series, &buffer, w * per_writer + i, registry)?;
        }
        Ok(())
    };
    let started = Instant::now();
    on_threads(writers, store)?;
    per_second_then_cleanup(per_writer * writers, started, &sub, cleanup)
}

/// `sub` as a fresh directory with the 256 registry folders `sop/00`..`sop/ff` and the
/// folder of folder links, `folder`.
fn tiny_store_dirs(sub: &Path) -> Result<PathBuf, String> {
    let sub = fresh_dir(sub)?;
    for name in (0..256)
        .map(|k| format!("sop/{k:02x}"))
        .chain(["folder".to_string()])
    {
        let made = sub.join(name);
        fs::create_dir_all(&made).map_err(|e| err("mkdir", &made, e))?;
    }
    Ok(sub)
}

/// The registry entry `entry` of an instance in `series` as storescp makes it: a hard
/// link of the series folder's link (a symlink naming the folder, made by the folder's
/// first instance here, by its second in storescp), which costs no inode of its own.
fn link_registry_entry(sub: &Path, series: &Path, entry: &Path) -> io::Result<()> {
    let name = series.file_name().unwrap_or_default();
    let folder_link = sub.join("folder").join(name);
    match fs::hard_link(&folder_link, entry) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match std::os::unix::fs::symlink(name, &folder_link) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            fs::hard_link(&folder_link, entry)
        }
        linked => linked,
    }
}

/// An anonymous file (`O_TMPFILE`) in `sub`, as storescp opens one per instance.
fn open_instance(sub: &Path) -> Result<File, String> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(sub)
        .map_err(|e| err("open (O_TMPFILE)", sub, e))
}

/// Stores `bytes` as storescp stores instance number `k` ([`place_instance`]).
fn store_instance(
    sub: &Path,
    series: &Path,
    bytes: &[u8],
    k: usize,
    registry: bool,
) -> Result<(), String> {
    let mut file = open_instance(sub)?;
    file.write_all(bytes).map_err(|e| err("write", sub, e))?;
    place_instance(sub, series, &file, k, registry, false)
}

/// Places `file` (from [`open_instance`], written) as storescp places instance number
/// `k`: a registry entry (unless `registry` is false) in folder `k % 256` of
/// `sub/sop`, and a link of the file under its final name in `series`, which is created
/// when missing. With `durable`, as with fsync on: the file's data is synced before the
/// link, and the directories whose entries changed after it.
fn place_instance(
    sub: &Path,
    series: &Path,
    file: &File,
    k: usize,
    registry: bool,
    durable: bool,
) -> Result<(), String> {
    if durable {
        file.sync_data().map_err(|e| err("fdatasync", sub, e))?;
    }
    let uid = format!("1.2.826.0.1.3680043.8.498.{k:0>30}");
    if registry {
        let entry = sub.join(format!("sop/{:02x}/{uid}", k % 256));
        link_registry_entry(sub, series, &entry).map_err(|e| err("link", &entry, e))?;
    }
    let name = series.join(format!("{uid}.dcm"));
    let mut changed = vec![series];
    match link_anonymous(file, &name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match fs::create_dir(series) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(err("mkdir", series, e))
                }
                Err(_) => {}
                Ok(()) => changed.push(sub),
            }
            link_anonymous(file, &name)
        }
        linked => linked,
    }
    .map_err(|e| err("linkat", &name, e))?;
    if durable {
        for dir in changed {
            let synced = File::open(dir).and_then(|d| d.sync_all());
            synced.map_err(|e| err("fsync", dir, e))?;
        }
    }
    Ok(())
}

/// Receives a `len`-byte request into a new instance file as storescp receives a small
/// instance with fsync on: each [`WRITEBACK_CHUNK`] written as it arrives and its write
/// to the device started at once, so that the final `fdatasync` finds most of it done.
fn receive_durably(
    stream: &mut TcpStream,
    sub: &Path,
    chunk: &mut [u8],
    len: usize,
) -> Result<File, String> {
    let mut file = open_instance(sub)?;
    let mut received = 0;
    while received < len {
        let part = &mut chunk[..(len - received).min(WRITEBACK_CHUNK as usize)];
        stream.read_exact(part).map_err(|e| format!("recv: {e}"))?;
        file.write_all(part).map_err(|e| err("write", sub, e))?;
        let (fd, at, n) = (file.as_raw_fd(), received as i64, part.len() as i64);
        // A failure is only a lost hint, as in storescp.
        // SAFETY: sync_file_range only reads the descriptor number of the open `file`.
        unsafe { libc::sync_file_range(fd, at, n, libc::SYNC_FILE_RANGE_WRITE) };
        received += part.len();
    }
    Ok(file)
}

/// Instances per series in [`loopback_round_trips`], as in the benchmark corpora.
const INSTANCES_PER_SERIES: usize = 100;

/// Size of the request in [`loopback_round_trips`]: a tiny instance with its command.
const TINY_REQUEST: usize = 3072;
/// Size of the answer: a C-STORE-RSP in its P-DATA-TF.
const TINY_ANSWER: usize = 100;

/// How long storescp's lone association polls for the next request before it sleeps.
const SPIN_FOR_NEXT_REQUEST: Duration = Duration::from_micros(50);

/// Reads exactly `buf.len()` bytes, first polling without sleeping for up to `spin`.
fn read_polling(stream: &mut TcpStream, buf: &mut [u8], spin: Duration) -> Result<(), String> {
    let deadline = Instant::now() + spin;
    let mut got = 0;
    while got < buf.len() && Instant::now() < deadline {
        let free = &mut buf[got..];
        // SAFETY: recv writes at most `free.len()` bytes into `free`, borrowed mutably for
        // the call; the descriptor stays open (owned by `stream`).
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                free.as_mut_ptr().cast(),
                free.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => return Err("recv: connection closed".into()),
            n if n > 0 => got += n as usize,
            _ => std::hint::spin_loop(),
        }
    }
    stream
        .read_exact(&mut buf[got..])
        .map_err(|e| format!("recv: {e}"))
}

/// What each exchange of [`loopback_round_trips`] is made of.
#[derive(Clone, Copy)]
struct Exchange<'p> {
    /// Bytes of the request: a tiny instance with its command ([`TINY_REQUEST`]), or a
    /// small one.
    request: usize,
    /// The responder first stores the request as an instance below this folder
    /// ([`store_instance`]), as storescp does before it answers.
    store: Option<&'p Path>,
    /// Stored durably, as with fsync on, each part written as it arrives
    /// ([`receive_durably`]; the responder then reads without polling).
    durable: bool,
    /// Stored with its registry entry, as storescp stores it; without, to price the
    /// registry that SPEC.md's duplicate rule needs.
    registry: bool,
}

impl<'p> Exchange<'p> {
    fn tiny(store: Option<&'p Path>) -> Exchange<'p> {
        Exchange {
            request: TINY_REQUEST,
            store,
            durable: false,
            registry: true,
        }
    }
}

/// Exchanges per second over loopback TCP, all pairs together: each of `pairs` senders
/// writes a request and waits for a 100-byte answer from its own responder thread,
/// `count` exchanges in all. The senders never poll; the responders poll for up to
/// `spin` before they sleep, as storescp's lone association does (zero: never). With one
/// pair and a tiny request, the network's part of the tiny x1 round trip. With a folder
/// to store into, both parts of the round trip, one after the other (that folder is
/// removed after if `cleanup`). The instances are dealt to the pairs in turn and go 100
/// to a series folder, as the harness's corpus goes to storescp's associations.
fn loopback_round_trips(
    pairs: usize,
    count: usize,
    spin: Duration,
    exchange: Exchange<'_>,
    cleanup: bool,
) -> Result<f64, String> {
    let per_pair = count.div_ceil(pairs);
    let sub = exchange.store.map(tiny_store_dirs).transpose()?;
    let (request_len, durable, registry) = (exchange.request, exchange.durable, exchange.registry);
    let pair_up = |pair: usize| -> Result<(), String> {
        let sub = sub.clone();
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let address = listener
            .local_addr()
            .map_err(|e| format!("local_addr: {e}"))?;
        let responder = std::thread::spawn(move || -> Result<(), String> {
            let (mut stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("nodelay: {e}"))?;
            let mut request = vec![0u8; request_len];
            let answer = [0x02u8; TINY_ANSWER];
            for i in 0..per_pair {
                // Dealt round-robin like the load generator's instances, so that the
                // pairs share the series folder of the moment as associations do.
                let n = i * pairs + pair;
                let series = |sub: &Path| sub.join(format!("series-{}", n / INSTANCES_PER_SERIES));
                match &sub {
                    Some(sub) if durable => {
                        let file = receive_durably(&mut stream, sub, &mut request, request_len)?;
                        place_instance(sub, &series(sub), &file, n, registry, true)?;
                    }
                    Some(sub) => {
                        read_polling(&mut stream, &mut request, spin)?;
                        store_instance(sub, &series(sub), &request, n, registry)?;
                    }
                    None => read_polling(&mut stream, &mut request, spin)?,
                }
                stream
                    .write_all(&answer)
                    .map_err(|e| format!("send: {e}"))?;
            }
            Ok(())
        });
        let mut stream = TcpStream::connect(address).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        let request = vec![0x04u8; request_len];
        let mut answer = [0u8; TINY_ANSWER];
        for _ in 0..per_pair {
            stream
                .write_all(&request)
                .map_err(|e| format!("send: {e}"))?;
            stream
                .read_exact(&mut answer)
                .map_err(|e| format!("recv: {e}"))?;
        }
        responder
            .join()
            .map_err(|_| "responder thread panicked".to_owned())?
    };
    let started = Instant::now();
    on_threads(pairs, pair_up)?;
    match &sub {
        Some(sub) => per_second_then_cleanup(per_pair * pairs, started, sub, cleanup),
        None => Ok((per_pair * pairs) as f64 / started.elapsed().as_secs_f64()),
    }
}

/// One measurement: the rows it yields (key and label of each) and how to take it. Several
/// rows come from one measurement where they are figures of the same timed sequence.
struct Ceiling<'a> {
    rows: Vec<(&'static str, &'static str)>,
    /// Needs warm guest memory first (the sequential writes).
    warm: bool,
    measure: Box<dyn Fn() -> Result<Vec<f64>, String> + 'a>,
}

impl<'a> Ceiling<'a> {
    fn one(
        key: &'static str,
        label: &'static str,
        measure: impl Fn() -> Result<f64, String> + 'a,
    ) -> Ceiling<'a> {
        Ceiling {
            rows: vec![(key, label)],
            warm: false,
            measure: Box::new(move || measure().map(|v| vec![v])),
        }
    }

    fn warm(mut self) -> Ceiling<'a> {
        self.warm = true;
        self
    }
}

/// Every ceiling, in the order they are measured and reported.
fn ceilings(options: &Options) -> Vec<Ceiling<'_>> {
    let (dir, s, cleanup) = (options.dir.as_path(), options.scale, options.cleanup);
    let (polled, exchanges, stored) = (SPIN_FOR_NEXT_REQUEST, scaled(20000, s), scaled(5000, s));
    let stored_in = |name: &str| dir.join(name);
    // Tiny requests from `pairs` pairs, each stored before its answer, in `folder`,
    // with or without the registry entry.
    let stored_tiny = move |pairs: usize, spin: Duration, folder: &'static str, registry| {
        move || {
            let into = stored_in(folder);
            let tiny = Exchange {
                registry,
                ..Exchange::tiny(Some(&into))
            };
            loopback_round_trips(pairs, stored, spin, tiny, cleanup)
        }
    };
    vec![
        Ceiling::one(
            "tcp_loopback_mb_s",
            "loopback TCP, 1 MiB writes, MB/s",
            move || tcp_loopback(scaled(4096, s) * MIB),
        )
        .warm(),
        Ceiling::one(
            "page_cache_write_mb_s",
            "page-cache write, MB/s",
            move || sequential_write(dir, scaled(1024, s) * MIB, false),
        )
        .warm(),
        Ceiling::one(
            "write_fdatasync_mb_s",
            "write + one fdatasync, MB/s",
            move || sequential_write(dir, scaled(1024, s) * MIB, true),
        )
        .warm(),
        Ceiling::one(
            "direct_write_mb_s",
            "O_DIRECT 1 MiB writes, 2 in flight, + fdatasync, MB/s",
            move || direct_write(dir, scaled(1024, s) * MIB),
        )
        .warm(),
        Ceiling::one(
            "create_write_rename_4k_per_s",
            "create+write+rename 4 KB files/s",
            move || create_rename(dir, 4096, scaled(20000, s), cleanup),
        ),
        Ceiling::one(
            "create_write_rename_512k_per_s",
            "create+write+rename 512 KB files/s",
            move || create_rename(dir, 512 * 1024, scaled(1000, s), cleanup),
        ),
        Ceiling {
            rows: vec![
                ("fsync_file_ms_p50", "fsync of a new 4 KB file, ms, median"),
                ("fsync_file_ms_p90", "fsync of a new 4 KB file, ms, p90"),
                (
                    "fsync_dir_ms_p50",
                    "fsync of its directory after rename, ms, median",
                ),
                (
                    "fsync_dir_ms_p90",
                    "fsync of its directory after rename, ms, p90",
                ),
                (
                    "durable_store_ms_p50",
                    "create+write+fsync+rename+dir fsync, ms, median",
                ),
                (
                    "durable_store_ms_p90",
                    "create+write+fsync+rename+dir fsync, ms, p90",
                ),
                ("durable_4k_per_s", "durable 4 KB files/s, one at a time"),
            ],
            warm: false,
            measure: Box::new(move || {
                let (latencies, per_second) = fsync_latency(dir, scaled(300, s), cleanup)?;
                Ok(latencies.into_iter().chain([per_second]).collect())
            }),
        },
        Ceiling::one(
            "durable_4k_x4_per_s",
            "durable 4 KB files/s, 4 writers",
            move || durable_parallel(dir, 4096, 4, scaled(1200, s), cleanup),
        ),
        Ceiling::one(
            "durable_512k_x4_per_s",
            "durable 512 KB files/s, 4 writers",
            move || durable_parallel(dir, 512 * 1024, 4, scaled(600, s), cleanup),
        ),
        Ceiling::one(
            "store_with_registry_x1_per_s",
            "4 KB O_TMPFILE + registry entry + link/s, 1 writer",
            move || store_with_registry(dir, 1, true, scaled(5000, s), cleanup),
        ),
        Ceiling::one(
            "store_with_registry_x4_per_s",
            "4 KB O_TMPFILE + registry entry + link/s, 4 writers",
            move || store_with_registry(dir, 4, true, scaled(5000, s), cleanup),
        ),
        Ceiling::one(
            "store_without_registry_x1_per_s",
            "4 KB O_TMPFILE + link (no registry entry)/s, 1 writer",
            move || store_with_registry(dir, 1, false, scaled(5000, s), cleanup),
        ),
        Ceiling::one(
            "store_without_registry_x4_per_s",
            "4 KB O_TMPFILE + link (no registry entry)/s, 4 writers",
            move || store_with_registry(dir, 4, false, scaled(5000, s), cleanup),
        ),
        Ceiling::one(
            "round_trips_x1_per_s",
            "loopback 3 KB request + 100 B answer/s, 1 pair, polled",
            move || loopback_round_trips(1, exchanges, polled, Exchange::tiny(None), cleanup),
        ),
        Ceiling::one(
            "round_trips_x4_per_s",
            "loopback 3 KB request + 100 B answer/s, 4 pairs",
            move || {
                let tiny = Exchange::tiny(None);
                loopback_round_trips(4, exchanges, Duration::ZERO, tiny, cleanup)
            },
        ),
        Ceiling::one(
            "stored_round_trips_x1_per_s",
            "loopback 3 KB request stored as a tiny instance + answer/s, 1 pair, polled",
            stored_tiny(1, polled, "ceiling-stored-x1", true),
        ),
        Ceiling::one(
            "stored_round_trips_x4_per_s",
            "loopback 3 KB request stored as a tiny instance + answer/s, 4 pairs",
            stored_tiny(4, Duration::ZERO, "ceiling-stored-x4", true),
        ),
        Ceiling::one(
            "stored_round_trips_no_registry_x4_per_s",
            "the same without the registry entry, 4 pairs",
            stored_tiny(4, Duration::ZERO, "ceiling-stored-no-registry-x4", false),
        ),
        Ceiling::one(
            "durable_stored_round_trips_512k_x4_per_s",
            "loopback 512 KB request stored durably as an instance + answer/s, 4 pairs",
            move || {
                let into = stored_in("ceiling-durable-stored-x4");
                let small = Exchange {
                    request: 512 * 1024,
                    store: Some(&into),
                    durable: true,
                    registry: true,
                };
                loopback_round_trips(4, scaled(600, s), Duration::ZERO, small, cleanup)
            },
        ),
    ]
}

/// Whether the row `key` is asked for: every row when `only` is empty.
fn wanted(only: &[String], key: &str) -> bool {
    only.is_empty() || only.iter().any(|k| k == key)
}

/// The ceilings that yield at least one of the rows in `only` (all when it is empty), in
/// their order; an unknown key is an error that lists the known ones.
fn select<'c, 'a>(all: &'c [Ceiling<'a>], only: &[String]) -> Result<Vec<&'c Ceiling<'a>>, String> {
    let keys = || all.iter().flat_map(|c| c.rows.iter().map(|r| r.0));
    if let Some(unknown) = only.iter().find(|key| !keys().any(|k| k == key.as_str())) {
        let known: Vec<&str> = keys().collect();
        return Err(format!(
            "ceilings --only: unknown {unknown}; known: {}",
            known.join(", ")
        ));
    }
    Ok(all
        .iter()
        .filter(|c| c.rows.iter().any(|(key, _)| wanted(only, key)))
        .collect())
}

/// Runs the measurements asked for and prints them; returns Ok(true) when all ran.
pub fn main(argv: &[String]) -> Result<bool, String> {
    let options = parse(argv)?;
    fs::create_dir_all(&options.dir).map_err(|e| err("mkdir", &options.dir, e))?;
    let all = ceilings(&options);
    let chosen = select(&all, &options.only)?;
    if chosen.iter().any(|c| c.warm) {
        // Untimed: the first write into never-touched guest memory is much slower than
        // steady state on a virtual machine (pages faulted in from the host); every
        // benchmark run after the first sees warm memory, so the ceilings should too.
        sequential_write(&options.dir, scaled(1024, options.scale) * MIB, false)?;
    }
    let mut rows: Vec<(&str, f64, &str)> = Vec::new();
    for ceiling in chosen {
        let values = (ceiling.measure)()?;
        for (&(key, label), value) in ceiling.rows.iter().zip(values) {
            if wanted(&options.only, key) {
                rows.push((key, value, label));
            }
        }
    }
    sync_all_disks();
    if options.json {
        let fields: Vec<String> = rows
            .iter()
            .map(|(key, value, _)| format!("\"{key}\": {value:.3}"))
            .chain(std::iter::once(format!("\"scale\": {}", options.scale)))
            .collect();
        // The labels go along so that reports need no copy of their own.
        let labels: Vec<String> = rows
            .iter()
            .map(|(key, _, label)| format!("\"{key}\": \"{label}\""))
            .collect();
        println!(
            "{{{}, \"labels\": {{{}}}}}",
            fields.join(", "),
            labels.join(", ")
        );
    } else {
        for (_, value, label) in rows {
            println!("{label:<52} {value:>12.2}");
        }
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn options(only: &[&str]) -> Options {
        let mut argv = vec!["--dir".to_owned(), "/nonexistent".to_owned()];
        if !only.is_empty() {
            argv.extend(["--only".to_owned(), only.join(",")]);
        }
        parse(&argv).expect("valid arguments")
    }

    fn first_keys(chosen: &[&Ceiling<'_>]) -> Vec<&'static str> {
        chosen.iter().map(|c| c.rows[0].0).collect()
    }

    #[test]
    fn only_selects_the_measurements_of_its_rows() {
        let o = options(&["durable_4k_per_s", "direct_write_mb_s"]);
        let all = ceilings(&o);
        let chosen = select(&all, &o.only).expect("known keys");
        // The fsync latencies and durable_4k_per_s are one timed sequence.
        assert_eq!(
            first_keys(&chosen),
            ["direct_write_mb_s", "fsync_file_ms_p50"]
        );
        assert!(wanted(&o.only, "durable_4k_per_s"));
        assert!(!wanted(&o.only, "fsync_file_ms_p50"));
    }

    #[test]
    fn no_only_selects_everything() {
        let o = options(&[]);
        let all = ceilings(&o);
        assert_eq!(select(&all, &o.only).expect("all").len(), all.len());
    }

    #[test]
    fn unknown_key_lists_the_known_ones() {
        let o = options(&["durable_4k_per_s", "disk_speed"]);
        let all = ceilings(&o);
        let why = select(&all, &o.only).err().expect("refused");
        assert!(why.contains("unknown disk_speed"), "{why}");
        assert!(why.contains("stored_round_trips_x4_per_s"), "{why}");
    }
}
