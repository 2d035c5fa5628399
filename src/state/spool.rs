//! The write-ahead spool: ledger entries of requests no budget applies to.
//!
//! Such a request holds no reservation, so nothing forces its ledger entry
//! into the store before the answer; a store transaction per request would
//! cost more than the rest of the request path. Instead [`Spool::append`]
//! writes the entry as one JSON line with a single `write()` to a file opened
//! with `O_APPEND`: when it returns the entry is in the OS page cache, which
//! survives the process being killed (`kill -9`, a panic, an OOM kill), and a
//! background writer moves the entries into the store in batches
//! ([`Spool::commit`]). In the running process the writer takes them from
//! copies the appends keep in memory, not by reading the file back and
//! parsing it; the file is read only when that cannot be trusted (a commit
//! failed after taking the copies) and at replay.
//!
//! Layout of the spool directory ([`local_dir`]: in `/dev/shm`, named by a
//! hash of the database's path or the Redis url), one *slot* per live process:
//! - `<n>.lock`: held with `flock` by the process that owns slot `n`, for as
//!   long as it lives; the kernel drops the lock when the process dies, so a
//!   free lock means nobody appends to that slot any more;
//! - `<n>.spool`: where the owner appends. A commit records the copies of
//!   the entries appended since the last one in one store transaction; after
//!   a failed commit the file is read back whole (complete lines only: a line
//!   that straddles a page may be half visible while its `write()` runs);
//! - `<n>.committing`: a `<n>.spool` that grew past [`ROTATE_BYTES`], renamed
//!   by the writer so the file does not grow forever; deleted once the store
//!   committed the rest of it.
//!
//! INVARIANT: an appended line is deleted only after a store transaction
//! holding it committed. An append pushes its copy while it still holds the
//! file handle; rotation swaps the handle for a new file and then waits
//! until no append still holds the old one before recording the copies, so
//! the copy of every line of the old file is recorded before it is deleted,
//! and no append can land in a file the writer already finished; appends
//! never wait on the writer. A failed commit keeps the file and no
//! new rotation happens until it is committed. Replaying a line twice is
//! harmless: the ledger skips ids it already has, which is what makes a
//! replay of a whole file (after a crash) correct when part of it was
//! already committed.
//!
//! [`Spool::open`] takes the first free slot and replays every free slot's
//! leftovers (its own and those of dead processes) before returning;
//! [`recover`] does the same without taking a slot (`routeplane usage`).
//! Durability stops at the page cache: an OS crash or a power loss can lose
//! the last entries, as it can lose the SQLite store's last commits under
//! `synchronous = NORMAL`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::{BudgetStore, LedgerEntry, StateError};

/// An entry [`Spool::append`] could not write, handed back with the reason.
#[derive(Debug)]
pub struct NotAppended {
    pub entry: LedgerEntry,
    pub error: io::Error,
}

/// Where a store's spool lives: a directory named by a hash of `key` (the
/// database's absolute path, the Redis url: it may hold a password) in
/// `/dev/shm` where there is one, else in the temp directory.
///
/// Why a tmpfs: an append, on every request path, never waits for a file
/// system journal there and costs less than on ext4. What it
/// costs: the spool does not outlive a reboot, so a gateway killed and not
/// restarted before the machine reboots loses the entries its writer had not
/// moved into the store (at most about 20 ms of them); an OS crash or power
/// loss loses those on any file system (see the module docs).
pub fn local_dir(kind: &str, key: &str) -> PathBuf {
    use sha2::Digest;
    let hash: String = hex::encode(sha2::Sha256::digest(key.as_bytes()))
        .chars()
        .take(16)
        .collect();
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("routeplane-ledger-spool-{kind}-{hash}"))
}

/// Entries per store transaction when moving a spool file into the store.
const BATCH: usize = 512;
/// Size past which the writer starts a new append file. Bounds both the
/// memory a spool holds and what a restart replays a second time.
const ROTATE_BYTES: u64 = 1 << 20;
/// Slots looked at before giving up: far more processes than share one store.
const MAX_SLOTS: u32 = 1024;

/// This process's slot of a spool directory.
pub struct Spool {
    dir: PathBuf,
    slot: u32,
    /// The append handle; the writer swaps it when rotating. An append holds
    /// a reference for the length of its `write()` and of its push to
    /// `pending`, which the writer waits out.
    file: ArcSwap<File>,
    /// The entries appended since the writer last took them. The file is
    /// what survives a crash; in the running process the writer records
    /// these copies instead of reading the file back and parsing every line
    /// again (a third of the writer's work per entry).
    pending: Mutex<Vec<LedgerEntry>>,
    /// Set when an append could not keep its copy (`pending` is full: the
    /// writer is stuck); the next commit reads the file back instead.
    dropped: std::sync::atomic::AtomicBool,
    /// One commit at a time.
    commit: Mutex<CommitState>,
    /// [`ROTATE_BYTES`], smaller in tests.
    rotate_at: u64,
    /// Append files started so far.
    rotations: std::sync::atomic::AtomicU64,
    /// Holds the slot's `flock` while the spool lives.
    _lock: File,
}

/// What the commits carry from one to the next.
#[derive(Default)]
struct CommitState {
    /// A commit failed after taking the pending copies: the append file is
    /// read back whole (the ledger skips what it already has) until a
    /// commit succeeds.
    read_back: bool,
}

/// Copies `pending` keeps at most: about 3 s of a busy gateway's requests.
/// Past it the file alone holds the entries, read back by the next commit.
const MAX_PENDING: usize = 100_000;

/// What opening or recovering found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Entries read from leftover files and handed to the store.
    pub entries: usize,
    /// Lines that were not an entry (a write torn by a full disk).
    pub skipped: usize,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> StateError {
    StateError::Backend(format!(
        "ledger spool: cannot {what} `{}`: {e}",
        path.display()
    ))
}

/// Appends go through this handle; the writer reads new lines with it too.
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
}

/// Take the slot's lock without waiting; `false` when another process (or
/// another handle in this one) holds it.
#[cfg(unix)]
fn try_lock(f: &File) -> io::Result<bool> {
    use rustix::fs::{flock, FlockOperation};
    match flock(f, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Without `flock` one process per spool directory is assumed.
#[cfg(not(unix))]
fn try_lock(_f: &File) -> io::Result<bool> {
    Ok(true)
}

fn slot_path(dir: &Path, slot: u32, ext: &str) -> PathBuf {
    dir.join(format!("{slot}.{ext}"))
}

/// Slot numbers that have any file in `dir`, ascending.
fn slots_in(dir: &Path) -> Result<Vec<u32>, StateError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("read", dir, e)),
    };
    for d in rd.flatten() {
        let name = d.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((n, ext)) = name.split_once('.') else {
            continue;
        };
        if !matches!(ext, "lock" | "spool" | "committing") {
            continue;
        }
        if let Ok(n) = n.parse::<u32>() {
            if n < MAX_SLOTS && !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The entries of a spool file's bytes. A line that does not parse (a write
/// torn by a full disk, with the next append glued to it) is searched for an
/// entry starting later in the line.
pub fn parse(bytes: &[u8]) -> (Vec<LedgerEntry>, usize) {
    const START: &[u8] = b"{\"id\":";
    let mut entries = Vec::new();
    let mut skipped = 0;
    for line in bytes.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Ok(e) = serde_json::from_slice::<LedgerEntry>(line) {
            entries.push(e);
            continue;
        }
        skipped += 1;
        let found = (1..line.len())
            .filter(|i| line.get(*i..).is_some_and(|rest| rest.starts_with(START)))
            .find_map(|i| {
                line.get(i..)
                    .and_then(|rest| serde_json::from_slice::<LedgerEntry>(rest).ok())
            });
        if let Some(e) = found {
            entries.push(e);
        }
    }
    (entries, skipped)
}

/// Move one spool file into the store and delete it. A missing file is
/// nothing to do; on a store error the file stays for the next try.
fn replay_file(path: &Path, store: &dyn BudgetStore) -> Result<Replayed, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Replayed::default()),
        Err(e) => return Err(io_err("read", path, e)),
    };
    let replayed = record_lines(&bytes, path, store)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", path, e)),
    }
    Ok(replayed)
}

/// Record the entries of spool `bytes` (read from `path`) in the store.
fn record_lines(
    bytes: &[u8],
    path: &Path,
    store: &dyn BudgetStore,
) -> Result<Replayed, StateError> {
    let (entries, skipped) = parse(bytes);
    if skipped > 0 {
        tracing::warn!(
            "ledger spool `{}`: {skipped} line(s) are not ledger entries",
            path.display()
        );
    }
    for chunk in entries.chunks(BATCH) {
        store.record(chunk)?;
    }
    Ok(Replayed {
        entries: entries.len(),
        skipped,
    })
}

/// Bytes `from..to` of `file`, without moving the offset the appends share.
#[cfg(unix)]
fn read_range(file: &File, from: u64, to: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = usize::try_from(to.saturating_sub(from)).map_err(io::Error::other)?;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, from)?;
    Ok(buf)
}

#[cfg(not(unix))]
fn read_range(file: &File, from: u64, to: u64) -> io::Result<Vec<u8>> {
    use std::os::windows::fs::FileExt;
    let len = usize::try_from(to.saturating_sub(from)).map_err(io::Error::other)?;
    let mut buf = vec![0; len];
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        match file.seek_read(rest, from + done as u64)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => done += n,
        }
    }
    Ok(buf)
}

/// Replay a slot whose lock this process holds: the file being committed
/// when its owner stopped first, then the one it appended to.
fn replay_slot(dir: &Path, slot: u32, store: &dyn BudgetStore) -> Result<Replayed, StateError> {
    let a = replay_file(&slot_path(dir, slot, "committing"), store)?;
    let b = replay_file(&slot_path(dir, slot, "spool"), store)?;
    Ok(Replayed {
        entries: a.entries + b.entries,
        skipped: a.skipped + b.skipped,
    })
}

/// Lock slot `n`; `None` when another process holds it.
///
/// A process that stops cleanly deletes its slot's files, the lock file
/// while still holding it (see [`Spool::retire`]). Whoever opened that lock
/// file just before it was deleted gets the lock once it is released, but on
/// a file no longer in the directory: the lock then proves nothing, so the
/// path is checked to still name the locked file, and opened again if not.
/// For the same reason the directory itself may vanish (the last process
/// removes it) and is created again.
fn lock_slot(dir: &Path, n: u32) -> Result<Option<File>, StateError> {
    let path = slot_path(dir, n, "lock");
    for _ in 0..8 {
        let opened = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path);
        let f = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
                continue;
            }
            Err(e) => return Err(io_err("open", &path, e)),
        };
        if !try_lock(&f).map_err(|e| io_err("lock", &path, e))? {
            return Ok(None);
        }
        if still_named(&f, &path) {
            return Ok(Some(f));
        }
    }
    Err(StateError::Backend(format!(
        "ledger spool: `{}` keeps being replaced while it is locked",
        path.display()
    )))
}

/// Whether `path` names the file `f` has open (it was not deleted or replaced).
#[cfg(unix)]
fn still_named(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn still_named(_f: &File, path: &Path) -> bool {
    path.exists()
}

/// Delete a slot's lock file; the caller holds the lock, so no live process
/// owns the slot (see [`lock_slot`] for whoever is opening it right now).
fn remove_lock(dir: &Path, n: u32) -> Result<(), StateError> {
    let path = slot_path(dir, n, "lock");
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", &path, e)),
    }
}

/// Remove the spool directory when no slot is left in it; a directory
/// that is not empty (a live process, files of a failed commit) stays.
fn remove_dir_if_empty(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}

/// Replay the leftovers of every slot no live process holds, into `store`.
/// `keep`: the first free slot is kept locked and returned (opening a spool).
fn sweep(
    dir: &Path,
    store: &dyn BudgetStore,
    keep: bool,
) -> Result<(Option<(u32, File)>, Replayed), StateError> {
    let mut total = Replayed::default();
    let mut own = None;
    let existing = slots_in(dir)?;
    let last = existing.last().copied().unwrap_or(0);
    for n in 0..MAX_SLOTS {
        if n > last && (own.is_some() || !keep) {
            break;
        }
        let looking = keep && own.is_none();
        if !looking && !existing.contains(&n) {
            continue;
        }
        let Some(lock) = lock_slot(dir, n)? else {
            continue; // a live process's slot
        };
        let r = replay_slot(dir, n, store)?;
        total.entries += r.entries;
        total.skipped += r.skipped;
        if keep && own.is_none() {
            own = Some((n, lock));
        } else {
            // Its leftovers are in the store: the slot is gone, and dropping
            // `lock` afterwards releases the deleted file.
            remove_lock(dir, n)?;
        }
    }
    if keep && own.is_none() {
        return Err(StateError::Backend(format!(
            "ledger spool: all {MAX_SLOTS} slots of `{}` are taken",
            dir.display()
        )));
    }
    Ok((own, total))
}

/// Replay what processes that no longer run left in `dir` (nothing when it
/// does not exist), without taking a slot.
pub fn recover(dir: &Path, store: &dyn BudgetStore) -> Result<Replayed, StateError> {
    if !dir.is_dir() {
        return Ok(Replayed::default());
    }
    let replayed = sweep(dir, store, false)?.1;
    remove_dir_if_empty(dir);
    Ok(replayed)
}

impl Spool {
    /// Create `dir` if needed, take a free slot and replay every free slot's
    /// leftovers into `store` before returning.
    pub fn open(dir: &Path, store: &dyn BudgetStore) -> Result<(Spool, Replayed), StateError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        let (own, replayed) = sweep(dir, store, true)?;
        let Some((slot, lock)) = own else {
            return Err(StateError::Backend("ledger spool: no slot".into()));
        };
        let path = slot_path(dir, slot, "spool");
        let file = open_append(&path).map_err(|e| io_err("open", &path, e))?;
        Ok((
            Spool {
                dir: dir.to_path_buf(),
                slot,
                file: ArcSwap::from_pointee(file),
                pending: Mutex::new(Vec::new()),
                dropped: std::sync::atomic::AtomicBool::new(false),
                commit: Mutex::new(CommitState::default()),
                rotate_at: ROTATE_BYTES,
                rotations: std::sync::atomic::AtomicU64::new(0),
                _lock: lock,
            },
            replayed,
        ))
    }

    /// The file this process appends to.
    pub fn path(&self) -> PathBuf {
        slot_path(&self.dir, self.slot, "spool")
    }

    /// Append `e` with one `write()`. When this returns `Ok` the entry
    /// survives the process dying, and the spool keeps it for the writer. On
    /// `Err` the entry comes back and the caller must record it some other
    /// way (a torn line is skipped at replay).
    pub fn append(&self, e: LedgerEntry) -> Result<(), Box<NotAppended>> {
        // Sized for a typical entry, so the line is not regrown as it is written.
        let mut line = Vec::with_capacity(256);
        if let Err(error) = serde_json::to_writer(&mut line, &e) {
            return Err(Box::new(NotAppended {
                entry: e,
                error: error.into(),
            }));
        }
        line.push(b'\n');
        let f = self.file.load();
        // One write on an O_APPEND file: the kernel places it at the end
        // atomically, concurrent appends never interleave.
        let error = match (&**f).write(&line) {
            Ok(n) if n == line.len() => None,
            Ok(n) => Some(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "short write to the ledger spool: {n} of {} bytes",
                    line.len()
                ),
            )),
            Err(error) => Some(error),
        };
        if let Some(error) = error {
            return Err(Box::new(NotAppended { entry: e, error }));
        }
        // Still holding `f`: a rotation that waited this append out finds
        // its copy here.
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.len() < MAX_PENDING {
            pending.push(e);
        } else {
            self.dropped
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        drop(pending);
        drop(f);
        Ok(())
    }

    /// Point the appends at `f` (a test makes them fail with `/dev/full`).
    #[cfg(test)]
    pub(crate) fn append_to(&self, f: File) {
        self.file.store(Arc::new(f));
    }

    /// The copies appended since the last call.
    fn take_pending(&self) -> Vec<LedgerEntry> {
        std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Move what was appended since the last commit into the store, and
    /// start a new append file when this one passed [`ROTATE_BYTES`]. A file
    /// left by a failed rotation goes first, and no rotation happens until
    /// it is in.
    ///
    /// Normally the entries come from the copies appends keep in memory;
    /// after a failed commit (or copies dropped) the append file is read back
    /// whole instead, until a commit succeeds. Either way every line of the
    /// file is in the store before the file is deleted: a rotation first
    /// waits out the appends still writing to the old file, and their copies
    /// are then all in `pending`.
    pub fn commit(&self, store: &dyn BudgetStore) -> Result<usize, StateError> {
        let mut state = self
            .commit
            .lock()
            .map_err(|_| StateError::Backend("ledger spool writer poisoned".into()))?;
        let committing = slot_path(&self.dir, self.slot, "committing");
        let mut n = replay_file(&committing, store)?.entries;
        let path = self.path();
        let copies = self.take_pending();
        if self
            .dropped
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            state.read_back = true;
        }
        if state.read_back {
            // Taken before reading: a copy pushed since is in the file too,
            // and recorded a second time at worst, which the ledger skips.
            drop(copies);
            n += self.read_back(store)?;
            state.read_back = false;
        } else {
            n += record_copies(&copies, store, &mut state)?;
        }
        let len = self
            .file
            .load()
            .metadata()
            .map_err(|e| io_err("stat", &path, e))?
            .len();
        if len < self.rotate_at {
            return Ok(n);
        }
        // Appends that still go through the old handle after the rename land
        // in `committing`, which is finished only once they are all done.
        std::fs::rename(&path, &committing).map_err(|e| io_err("rotate", &path, e))?;
        let old = match open_append(&path) {
            Ok(new) => self.file.swap(Arc::new(new)),
            Err(e) => {
                // Keep appending to the old file under its old name.
                let _ = std::fs::rename(&committing, &path);
                return Err(io_err("open", &path, e));
            }
        };
        self.rotations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // `swap` turned every reader's borrow of the old handle into a
        // counted reference; each is one `write()` and one push long.
        while Arc::strong_count(&old) > 1 {
            std::thread::yield_now();
        }
        drop(old);
        if self
            .dropped
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            // Appends kept no copy while this commit ran (the store was slow
            // and `pending` filled up): some lines of the old file are only
            // in the file, so it is read back whole, and so is the new one
            // at the next commit.
            state.read_back = true;
            n += replay_file(&committing, store)?.entries;
            return Ok(n);
        }
        // The copies of the old file's last lines (and maybe of the new
        // file's first ones). On failure `committing` stays for the next
        // commit to replay, and the new file is read back.
        n += record_copies(&self.take_pending(), store, &mut state)?;
        std::fs::remove_file(&committing).map_err(|e| io_err("remove", &committing, e))?;
        Ok(n)
    }

    /// Record every whole line of the append file. The last line may still
    /// be being written; its copy comes with the next commit.
    fn read_back(&self, store: &dyn BudgetStore) -> Result<usize, StateError> {
        let path = self.path();
        let file = self.file.load_full();
        let len = file.metadata().map_err(|e| io_err("stat", &path, e))?.len();
        let bytes = read_range(&file, 0, len).map_err(|e| io_err("read", &path, e))?;
        let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        Ok(record_lines(bytes.get(..whole).unwrap_or_default(), &path, store)?.entries)
    }

    /// A clean stop: commit what is left and delete this slot's files (the
    /// lock file while still holding it), and the directory when no other
    /// process uses it, so a tmpfs does not keep a spool per database ever
    /// opened. Taking `self` means no append can come after. When the store
    /// refuses the last entries the files stay for the next start to replay.
    pub fn retire(self, store: &dyn BudgetStore) -> Result<usize, StateError> {
        let n = self.commit(store)?;
        let path = self.path();
        let file = self.file.load_full();
        let len = file.metadata().map_err(|e| io_err("stat", &path, e))?.len();
        let last = match len {
            0 => b'\n',
            _ => read_range(&file, len - 1, len)
                .map_err(|e| io_err("read", &path, e))?
                .first()
                .copied()
                .unwrap_or(b'\n'),
        };
        if last != b'\n' {
            // A line without its newline (a torn write): the replay at the
            // next start reports it.
            return Ok(n);
        }
        drop(file);
        std::fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
        remove_lock(&self.dir, self.slot)?;
        let dir = self.dir.clone();
        drop(self);
        remove_dir_if_empty(&dir);
        Ok(n)
    }
}

/// Record the in-memory copies; on failure the append file is read back at
/// the next commit (the copies are gone, the lines are not).
fn record_copies(
    copies: &[LedgerEntry],
    store: &dyn BudgetStore,
    state: &mut CommitState,
) -> Result<usize, StateError> {
    for chunk in copies.chunks(BATCH) {
        if let Err(e) = store.record(chunk) {
            state.read_back = true;
            return Err(e);
        }
    }
    Ok(copies.len())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::sqlite::SqliteStore;

    fn entry(id: &str) -> LedgerEntry {
        LedgerEntry {
            id: id.to_string(),
            ts_ms: 1_000,
            tenant: "free".into(),
            feature: None,
            model: "m".into(),
            input_tokens: 3,
            output_tokens: 4,
            estimated: 10,
            actual: 7,
        }
    }

    fn ids(store: &dyn BudgetStore) -> Vec<String> {
        let mut v: Vec<String> = store
            .ledger(None)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_spool_left_next_to_the_database_is_replayed_when_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        {
            let store = SqliteStore::open(&db).unwrap();
            let (spool, _) = Spool::open(&dir.path().join("s.db.ledger-spool"), &store).unwrap();
            spool.append(entry("old/0")).unwrap();
        }
        let store = SqliteStore::open(&db).unwrap();
        assert_eq!(ids(&store), vec!["old/0".to_string()]);
        let here = crate::state::sqlite::spool_dir_of(&db);
        assert!(here.starts_with("/dev/shm") || here.starts_with(std::env::temp_dir()));
        assert_ne!(
            here,
            crate::state::sqlite::spool_dir_of(&dir.path().join("t.db"))
        );
    }

    #[test]
    fn appended_entries_survive_a_crash_before_the_writer_ran() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let spool_dir = dir.path().join("spool");
        {
            let store = SqliteStore::open(&db).unwrap();
            let (spool, replayed) = Spool::open(&spool_dir, &store).unwrap();
            assert_eq!(replayed, Replayed::default());
            for i in 0..5 {
                spool.append(entry(&format!("a/{i}"))).unwrap();
            }
            // The "crash": the process goes away without a commit.
            assert!(ids(&store).is_empty());
        }
        let store = SqliteStore::open(&db).unwrap();
        let (spool, replayed) = Spool::open(&spool_dir, &store).unwrap();
        assert_eq!(replayed.entries, 5);
        assert_eq!(ids(&store), ["a/0", "a/1", "a/2", "a/3", "a/4"]);
        assert_eq!(std::fs::metadata(spool.path()).unwrap().len(), 0);
        drop(spool);
        // Opening again finds nothing more, and nothing is counted twice.
        let (_spool, replayed) = Spool::open(&spool_dir, &store).unwrap();
        assert_eq!(replayed.entries, 0);
        assert_eq!(ids(&store).len(), 5);
    }

    #[test]
    fn a_crash_in_the_middle_of_a_commit_replays_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let spool_dir = dir.path().join("spool");
        {
            let store = SqliteStore::open(&db).unwrap();
            let (spool, _) = Spool::open(&spool_dir, &store).unwrap();
            spool.append(entry("x/0")).unwrap();
            spool.append(entry("x/1")).unwrap();
            spool.commit(&store).unwrap();
            // A rotated file whose commit was cut short: its first entry is
            // already in the store, the file was not deleted yet.
            spool.append(entry("x/2")).unwrap();
            spool.append(entry("x/3")).unwrap();
            std::fs::rename(spool.path(), spool_dir.join("0.committing")).unwrap();
            store.record(&[entry("x/2")]).unwrap();
            // And a newer append file.
            std::fs::write(spool.path(), b"").unwrap();
            let mut f = open_append(&spool.path()).unwrap();
            f.write_all(&serde_json::to_vec(&entry("x/4")).unwrap())
                .unwrap();
            f.write_all(b"\n").unwrap();
        }
        let store = SqliteStore::open(&db).unwrap();
        let (_spool, replayed) = Spool::open(&spool_dir, &store).unwrap();
        // x/0 and x/1 are read again (a commit leaves its lines in the file
        // until it rotates) and skipped by the ledger.
        assert_eq!(replayed.entries, 5);
        assert_eq!(ids(&store), ["x/0", "x/1", "x/2", "x/3", "x/4"]);
        assert!(!spool_dir.join("0.committing").exists());
    }

    #[test]
    fn a_commit_records_the_copies_without_reading_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let (spool, _) = Spool::open(&dir.path().join("spool"), &store).unwrap();
        spool.append(entry("a")).unwrap();
        spool.append(entry("b")).unwrap();
        // Whatever else is in the file is not read while the copies serve.
        let mut f = open_append(&spool.path()).unwrap();
        f.write_all(b"not a ledger line\n").unwrap();
        assert_eq!(spool.commit(&store).unwrap(), 2);
        assert_eq!(ids(&store), ["a", "b"]);
        assert_eq!(spool.commit(&store).unwrap(), 0);
    }

    #[test]
    fn reading_back_skips_a_line_still_being_written_until_it_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let (spool, _) = Spool::open(&dir.path().join("spool"), &store).unwrap();
        spool.append(entry("a")).unwrap();
        let mut line = serde_json::to_vec(&entry("b")).unwrap();
        line.push(b'\n');
        let (head, tail) = line.split_at(line.len() / 2);
        let mut f = open_append(&spool.path()).unwrap();
        f.write_all(head).unwrap();
        // Copies were dropped (a full `pending`): the file is read back.
        spool
            .dropped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(spool.commit(&store).unwrap(), 1);
        assert_eq!(ids(&store), ["a"]);
        f.write_all(tail).unwrap();
        spool
            .dropped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(spool.commit(&store).unwrap(), 2, "a again, then b");
        assert_eq!(ids(&store), ["a", "b"]);
        assert_eq!(spool.commit(&store).unwrap(), 0);
    }

    /// A SQLite store that runs `before_record` first on every `record`: to
    /// make the store fail, or to act while a commit is under way.
    struct HookedStore<'a> {
        inner: &'a SqliteStore,
        before_record: Box<dyn Fn() -> Result<(), StateError> + Send + Sync + 'a>,
    }

    impl BudgetStore for HookedStore<'_> {
        fn reserve(
            &self,
            id: &str,
            c: &[crate::state::Charge],
            a: crate::ir::Micros,
            n: i64,
            t: i64,
        ) -> Result<crate::state::Reservation, StateError> {
            self.inner.reserve(id, c, a, n, t)
        }
        fn settle(
            &self,
            r: &crate::state::Reservation,
            e: &LedgerEntry,
        ) -> Result<bool, StateError> {
            self.inner.settle(r, e)
        }
        fn record(&self, entries: &[LedgerEntry]) -> Result<(), StateError> {
            (self.before_record)()?;
            self.inner.record(entries)
        }
        fn release(&self, r: &crate::state::Reservation) -> Result<(), StateError> {
            self.inner.release(r)
        }
        fn balance(
            &self,
            c: &crate::state::Counter,
            n: i64,
        ) -> Result<crate::state::Balance, StateError> {
            self.inner.balance(c, n)
        }
        fn ledger(&self, s: Option<i64>) -> Result<Vec<LedgerEntry>, StateError> {
            self.inner.ledger(s)
        }
        fn trim_ledger(&self, before: i64, batch: usize) -> Result<usize, StateError> {
            self.inner.trim_ledger(before, batch)
        }
        fn open_reservations(&self, n: i64) -> Result<usize, StateError> {
            self.inner.open_reservations(n)
        }
    }

    #[test]
    fn a_copy_dropped_during_a_rotating_commit_is_read_back_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let spool_dir = dir.path().join("spool");
        let (mut spool, _) = Spool::open(&spool_dir, &store).unwrap();
        spool.rotate_at = 1;
        spool.append(entry("a")).unwrap();
        // During the first `record`, requests fill `pending` and append once
        // more: that append keeps no copy.
        let stalled = std::sync::atomic::AtomicBool::new(false);
        let slow = HookedStore {
            inner: &store,
            before_record: Box::new(|| {
                if !stalled.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    spool
                        .pending
                        .lock()
                        .unwrap()
                        .resize(MAX_PENDING, entry("filler"));
                    spool.append(entry("no-copy")).unwrap();
                }
                Ok(())
            }),
        };
        // Records `a`, meanwhile `no-copy` is appended without a copy, then
        // the file rotates: `no-copy` must reach the store before the old
        // file is deleted.
        spool.commit(&slow).unwrap();
        spool.commit(&store).unwrap();
        assert!(
            ids(&store).contains(&"no-copy".to_string()),
            "{:?}",
            ids(&store)
        );
        assert!(!spool_dir.join("0.committing").exists());
    }

    #[test]
    fn a_full_pending_list_falls_back_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let (spool, _) = Spool::open(&dir.path().join("spool"), &store).unwrap();
        spool
            .pending
            .lock()
            .unwrap()
            .resize(MAX_PENDING, entry("filler"));
        spool.append(entry("over")).unwrap();
        assert_eq!(spool.pending.lock().unwrap().len(), MAX_PENDING);
        // The commit drops the copies and reads the file: `over` is in it.
        assert_eq!(spool.commit(&store).unwrap(), 1);
        assert_eq!(ids(&store), ["over"]);
    }

    #[test]
    fn rotation_under_concurrent_appends_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let (mut spool, _) = Spool::open(&dir.path().join("spool"), &*store).unwrap();
        // Every commit rotates.
        spool.rotate_at = 1;
        let spool = Arc::new(spool);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (spool, store, done) = (spool.clone(), store.clone(), done.clone());
            std::thread::spawn(move || {
                let mut commits = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if spool.commit(&*store).unwrap() > 0 {
                        commits += 1;
                    }
                }
                commits
            })
        };
        let appenders: Vec<_> = (0..4)
            .map(|t| {
                let spool = spool.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        spool.append(entry(&format!("{t}/{i}"))).unwrap();
                        if i % 10 == 0 {
                            // Let the writer rotate between bursts.
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                    }
                })
            })
            .collect();
        for a in appenders {
            a.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let commits = writer.join().unwrap();
        spool.commit(&*store).unwrap();
        assert!(commits > 1, "the writer never committed under load");
        assert!(
            spool.rotations.load(std::sync::atomic::Ordering::Relaxed) > 5,
            "the writer rotated {} times",
            spool.rotations.load(std::sync::atomic::Ordering::Relaxed)
        );
        let got = ids(&*store);
        assert_eq!(got.len(), 2_000);
        let unique: std::collections::HashSet<_> = got.iter().collect();
        assert_eq!(unique.len(), 2_000);
    }

    /// A lock is released when its last descriptor closes; a child process
    /// that another test forks at that moment holds a copy until it execs.
    fn wait_free(dir: &Path, slot: u32) {
        for _ in 0..500 {
            if lock_slot(dir, slot).unwrap().is_some() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("slot {slot} stays locked");
    }

    #[test]
    fn two_processes_get_two_slots_and_a_dead_ones_leftovers_are_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let spool_dir = dir.path().join("spool");
        let (a, _) = Spool::open(&spool_dir, &store).unwrap();
        let (b, _) = Spool::open(&spool_dir, &store).unwrap();
        assert_ne!(a.path(), b.path(), "two live spools share a slot");
        a.append(entry("a/0")).unwrap();
        b.append(entry("b/0")).unwrap();
        // `a` is alive: recovering leaves its slot alone.
        assert_eq!(recover(&spool_dir, &store).unwrap().entries, 0);
        // `b` dies; a third process takes slot 1 again and replays it, while
        // `a`'s entry waits for `a`'s own writer.
        drop(b);
        wait_free(&spool_dir, 1);
        let (c, replayed) = Spool::open(&spool_dir, &store).unwrap();
        assert_eq!(replayed.entries, 1);
        assert_eq!(ids(&store), ["b/0"]);
        drop(a);
        wait_free(&spool_dir, 0);
        // `usage` recovers the dead `a` without taking a slot.
        assert_eq!(recover(&spool_dir, &store).unwrap().entries, 1);
        assert_eq!(ids(&store), ["a/0", "b/0"]);
        drop(c);
    }

    #[test]
    fn a_clean_stop_leaves_no_spool_behind_once_the_last_process_retires() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let spool_dir = dir.path().join("spool");
        let (a, _) = Spool::open(&spool_dir, &store).unwrap();
        let (b, _) = Spool::open(&spool_dir, &store).unwrap();
        a.append(entry("a/0")).unwrap();
        b.append(entry("b/0")).unwrap();
        assert_eq!(a.retire(&store).unwrap(), 1);
        assert!(spool_dir.is_dir(), "a live process's slot is still in use");
        assert_eq!(slots_in(&spool_dir).unwrap(), [1]);
        assert_eq!(b.retire(&store).unwrap(), 1);
        assert!(
            !spool_dir.exists(),
            "the spool directory outlives the last process"
        );
        assert_eq!(ids(&store), ["a/0", "b/0"]);
        // The next process starts from nothing.
        let (c, replayed) = Spool::open(&spool_dir, &store).unwrap();
        assert_eq!(replayed, Replayed::default());
        c.retire(&store).unwrap();
    }

    #[test]
    fn a_torn_last_line_keeps_the_spool_for_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let spool_dir = dir.path().join("spool");
        let (a, _) = Spool::open(&spool_dir, &store).unwrap();
        a.append(entry("a/0")).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(a.path())
            .unwrap()
            .write_all(b"{\"id\":\"half")
            .unwrap();
        let path = a.path();
        a.retire(&store).unwrap();
        assert!(
            path.exists(),
            "an unfinished line was deleted with its file"
        );
        assert_eq!(ids(&store), ["a/0"]);
    }

    #[cfg(unix)]
    #[test]
    fn a_lock_file_deleted_while_someone_opened_it_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let spool_dir = dir.path().join("spool");
        let (a, _) = Spool::open(&spool_dir, &store).unwrap();
        // Another process opens slot 0's lock file just before `a` deletes it...
        let racer = File::open(slot_path(&spool_dir, 0, "lock")).unwrap();
        a.retire(&store).unwrap();
        // ...and gets the lock once `a` is gone, on a file nobody else can find.
        assert!(try_lock(&racer).unwrap());
        assert!(!still_named(&racer, &slot_path(&spool_dir, 0, "lock")));
        // Opening the slot properly gives a lock on the file in the directory,
        // recreating the directory `a` removed.
        let lock = lock_slot(&spool_dir, 0).unwrap().expect("slot 0 is free");
        assert!(still_named(&lock, &slot_path(&spool_dir, 0, "lock")));
    }

    #[test]
    fn torn_lines_are_skipped_and_the_entry_glued_to_them_is_kept() {
        let good = serde_json::to_string(&entry("g/1")).unwrap();
        let glued = serde_json::to_string(&entry("g/2")).unwrap();
        let torn = good.get(..good.len() / 2).unwrap();
        let text = format!("{good}\n{torn}{glued}\n\n{torn}\n  \n");
        let (entries, skipped) = parse(text.as_bytes());
        let got: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(got, ["g/1", "g/2"]);
        assert_eq!(skipped, 2);
        let (entries, skipped) = parse(b"\xff\xfe garbage\n{\"id\":");
        assert!(entries.is_empty());
        assert_eq!(skipped, 2);
    }

    #[test]
    fn a_failing_store_keeps_the_file_until_it_commits() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let down = std::sync::atomic::AtomicBool::new(true);
        let store = HookedStore {
            inner: &sqlite,
            before_record: Box::new(|| {
                if down.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(StateError::Backend("down".into()));
                }
                Ok(())
            }),
        };
        let (spool, _) = Spool::open(&dir.path().join("spool"), &store).unwrap();
        spool.append(entry("f/0")).unwrap();
        assert!(spool.commit(&store).is_err());
        spool.append(entry("f/1")).unwrap();
        assert!(spool.commit(&store).is_err());
        assert!(ids(&store).is_empty());
        down.store(false, std::sync::atomic::Ordering::Relaxed);
        // The stuck file first, then what was appended meanwhile.
        assert_eq!(spool.commit(&store).unwrap(), 2);
        assert_eq!(spool.commit(&store).unwrap(), 0);
        assert_eq!(ids(&store), ["f/0", "f/1"]);
    }
}
