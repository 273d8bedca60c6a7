//! The disk tier of command output ([`crate::output`]): output that a lagging reader
//! still needs after the in-memory ring dropped it.
//!
//! # Files
//! A command's spill is a queue of segment files, each an unnamed file in the spill
//! directory: opened `O_TMPFILE` (it never has a name, so no other process can open it),
//! or, where the filesystem lacks that, created `0600` with `O_EXCL | O_NOFOLLOW` and
//! unlinked at once (owned by the agent, so a sandbox user can neither read it nor, in a
//! sticky `/tmp`, rename it in that instant). A segment's disk space is freed when it is
//! dropped (its descriptor closed): the oldest one when a cap is reached, every one no
//! reader needs, all of them when the command's record is forgotten. Nothing is left
//! behind even if the agent is killed.
//!
//! # Records
//! A segment holds records back to back: the chunk's output length (u32 LE), its
//! envelope's length (u32 LE), and the Connect envelope exactly as the ring held it, so
//! a reader sends what it reads without re-encoding. A sparse index (one entry per
//! 64 KiB) lets a reader find its record; after that it reads on.
//!
//! # Caps
//! Every segment's bytes are reserved in one agent-wide budget ([`Spill`]); a writer
//! that finds the budget full drops the agent's oldest finished segment, whichever
//! command it belongs to, and the per-command cap drops the command's own oldest.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::output::Output;

/// Bytes before a record's envelope: its output length and its envelope length.
pub(crate) const RECORD_HEADER: usize = 8;
/// Largest read a reader does at a time (its buffer while it reads from disk).
const READ_BATCH: usize = 128 << 10;
/// Largest write the spill writer does at a time.
const WRITE_BATCH: u64 = 1 << 20;
/// One index entry per this many bytes of a segment: a reader entering the spill reads
/// at most this much (plus one record) before its own record.
pub(crate) const INDEX_STEP: u64 = 64 << 10;
/// Segment size bounds (a cap is dropped from in segments: an eighth of it at a time).
const MIN_SEGMENT: u64 = 128 << 10;
const MAX_SEGMENT: u64 = 32 << 20;
/// Smallest non-zero cap: it must hold several segments of the largest records.
pub const MIN_CAP: u64 = 1 << 20;

/// The agent's spill settings and the budget all commands' spills share.
#[derive(Debug)]
pub struct Spill {
    dir: PathBuf,
    per_command: u64,
    total: u64,
    segment_bytes: u64,
    /// Bytes reserved by live segments (and by writes in flight).
    used: AtomicU64,
    /// Creation order of segments: the smallest live id is the oldest spilled data.
    next_id: AtomicU64,
    /// Outputs that have spilled, for the agent-wide cap (dead ones pruned on register).
    outputs: Mutex<Vec<Weak<Output>>>,
}

impl Spill {
    /// Spilling into `dir`, at most `per_command` bytes per command and `total` bytes for
    /// all of them; `None` (no spilling) when either cap is 0. Caps below [`MIN_CAP`] are
    /// raised to it.
    pub fn new(dir: PathBuf, per_command: u64, total: u64) -> Option<Arc<Self>> {
        if per_command == 0 || total == 0 {
            return None;
        }
        let (per_command, total) = (per_command.max(MIN_CAP), total.max(MIN_CAP));
        let segment_bytes = (per_command.min(total) / 8).clamp(MIN_SEGMENT, MAX_SEGMENT);
        Some(Arc::new(Self {
            dir,
            per_command,
            total,
            segment_bytes,
            used: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            outputs: Mutex::new(Vec::new()),
        }))
    }

    /// Bytes on disk now, all commands together.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Spill files opened so far, all commands together.
    pub fn files_opened(&self) -> u64 {
        self.next_id.load(Ordering::SeqCst)
    }

    /// The spill directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The per-command cap.
    pub(crate) fn per_command(&self) -> u64 {
        self.per_command
    }

    /// A segment is started anew once the current one holds this much.
    pub(crate) fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// The largest write at a time.
    pub(crate) fn write_batch(&self) -> u64 {
        WRITE_BATCH.min(self.segment_bytes)
    }

    /// Reserves `n` bytes of the agent-wide budget, if they fit.
    pub(crate) fn reserve(self: &Arc<Self>, n: u64) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(n).filter(|t| *t <= self.total)
            })
            .ok()
            .map(|_| Reservation {
                spill: self.clone(),
                bytes: n,
            })
    }

    /// Notes an output that has spilled, so the agent-wide cap can drop its segments.
    pub(crate) fn register(&self, out: &Arc<Output>) {
        let mut outs = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
        outs.retain(|w| w.strong_count() > 0);
        outs.push(Arc::downgrade(out));
    }

    /// Drops the agent's oldest finished segment (the front of some command's spill that
    /// is not the one its writer appends to). False when there is none.
    pub(crate) fn drop_oldest(&self) -> bool {
        let outs: Vec<Arc<Output>> = self
            .outputs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let oldest = outs
            .iter()
            .filter_map(|o| o.oldest_sealed_segment().map(|id| (id, o)))
            .min_by_key(|(id, _)| *id);
        match oldest {
            Some((id, o)) => o.drop_segment(id),
            None => false,
        }
    }

    /// A new, empty segment file for records from `first_seq` (output offset
    /// `first_offset`) on. Blocking: call it off the runtime thread.
    pub(crate) fn open_segment(&self, first_seq: u64, first_offset: u64) -> io::Result<Segment> {
        let file = open_unnamed(&self.dir)?;
        Ok(Segment {
            id: self.next_id.fetch_add(1, Ordering::SeqCst),
            file: Arc::new(file),
            first_seq,
            first_offset,
            records: 0,
            len: 0,
            index: vec![(first_seq, 0)],
            reserved: None,
        })
    }
}

/// Bytes of the agent-wide budget held until dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    spill: Arc<Spill>,
    bytes: u64,
}

impl Reservation {
    /// Adds `other`'s bytes to this one.
    fn merge(&mut self, mut other: Reservation) {
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.spill.used.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Opens an unnamed file in `dir` for reading and writing (see the module docs).
fn open_unnamed(dir: &Path) -> io::Result<File> {
    let mode = Mode::RUSR | Mode::WUSR;
    match rustix::fs::open(dir, OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, mode) {
        Ok(fd) => Ok(File::from(fd)),
        // Filesystems without O_TMPFILE (and kernels that read it as O_DIRECTORY).
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => open_and_unlink(dir),
        Err(e) => Err(e.into()),
    }
}

/// Creates a file only its owner may open and unlinks it at once.
fn open_and_unlink(dir: &Path) -> io::Result<File> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    for _ in 0..16 {
        // Not guessable in advance, so no one can plant all the names we try.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = dir.join(format!(
            ".colima-e2b-spill-{}-{}-{nanos}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::SeqCst)
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32 | OFlags::CLOEXEC.bits() as i32)
            .open(&name)
        {
            Ok(f) => {
                std::fs::remove_file(&name)?;
                return Ok(f);
            }
            // Someone else's file (or a planted link) at that name: try the next one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free name for a spill file",
    ))
}

/// One spill file: records `first_seq ..first_seq + records`.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Creation order (agent-wide).
    pub id: u64,
    pub file: Arc<File>,
    pub first_seq: u64,
    /// Output offset of its first record.
    pub first_offset: u64,
    pub records: u64,
    /// Bytes written and committed.
    pub len: u64,
    /// (seq, file position) of a record every [`INDEX_STEP`] bytes or so, ascending
    /// (a 32 MiB segment has about 512).
    index: Vec<(u64, u64)>,
    reserved: Option<Reservation>,
}

impl Segment {
    /// Sequence number after its last record.
    pub fn end_seq(&self) -> u64 {
        self.first_seq + self.records
    }

    /// Notes a committed write of `records` records, `bytes` long; `marks` are (seq,
    /// position) of some of its records, candidates for the index.
    pub fn commit(
        &mut self,
        records: u64,
        bytes: u64,
        reserved: Reservation,
        marks: &[(u64, u64)],
    ) {
        let mut last = self.index.last().map_or(0, |e| e.1);
        for &(seq, pos) in marks {
            if pos >= last + INDEX_STEP {
                self.index.push((seq, pos));
                last = pos;
            }
        }
        self.records += records;
        self.len += bytes;
        match &mut self.reserved {
            Some(r) => r.merge(reserved),
            None => self.reserved = Some(reserved),
        }
    }

    /// Where to start reading for record `seq`: a record at or before it.
    pub fn seek(&self, seq: u64) -> (u64, u64) {
        let i = self.index.partition_point(|e| e.0 <= seq);
        self.index
            .get(i.saturating_sub(1))
            .copied()
            .unwrap_or((self.first_seq, 0))
    }
}

/// Appends one record to `buf`.
pub(crate) fn encode_record(buf: &mut Vec<u8>, out_len: usize, envelope: &[u8]) {
    // Chunks are at most a pipe read and envelopes far below 4 GiB.
    buf.extend_from_slice(&u32::try_from(out_len).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(
        &u32::try_from(envelope.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    buf.extend_from_slice(envelope);
}

/// Frames read back from a segment.
#[derive(Debug)]
pub(crate) struct ReadBatch {
    /// (envelope, output length), from the record asked for on.
    pub frames: VecDeque<(Bytes, u64)>,
    /// File position after the last frame.
    pub next_pos: u64,
}

/// A read of a segment's records from `target` on, starting at record `seq` at `pos`
/// (`seq <= target`), never past `limit` (the committed length). Blocking.
#[derive(Debug)]
pub(crate) struct ReadJob {
    pub file: Arc<File>,
    pub pos: u64,
    pub seq: u64,
    pub target: u64,
    pub limit: u64,
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("spill file: {what}"))
}

fn read_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(len);
    file.read_exact_at(&mut buf, pos)?;
    Ok(buf.freeze())
}

impl ReadJob {
    /// Reads at most about [`READ_BATCH`] bytes of frames (at least one record).
    pub fn run(self) -> io::Result<ReadBatch> {
        let ReadJob {
            file,
            mut pos,
            mut seq,
            target,
            limit,
        } = self;
        loop {
            let left = limit.saturating_sub(pos);
            if left < RECORD_HEADER as u64 {
                return Err(corrupt("record past the committed end"));
            }
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(READ_BATCH);
            let mut buf = read_at(&file, pos, want)?;
            let (mut at, mut frames) = (0usize, VecDeque::new());
            while let Some(head) = buf.get(at..at + RECORD_HEADER) {
                let out_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                let env_len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
                let rec = RECORD_HEADER + env_len;
                if rec as u64 > limit.saturating_sub(pos + at as u64) {
                    return Err(corrupt("record longer than the file"));
                }
                if at + rec > buf.len() {
                    if at > 0 {
                        break;
                    }
                    // One record larger than a batch: read it whole (it was that large
                    // in memory too).
                    buf = read_at(&file, pos, rec)?;
                }
                if seq >= target {
                    frames.push_back((buf.slice(at + RECORD_HEADER..at + rec), u64::from(out_len)));
                }
                at += rec;
                seq += 1;
            }
            pos += at as u64;
            if !frames.is_empty() {
                return Ok(ReadBatch {
                    frames,
                    next_pos: pos,
                });
            }
            if at == 0 {
                return Err(corrupt("truncated record"));
            }
        }
    }
}

/// Closes segment files off the runtime thread (freeing a large file's blocks can take
/// a while).
pub(crate) fn release(segs: Vec<Segment>) {
    if segs.is_empty() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(move || drop(segs));
        }
        Err(_) => drop(segs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(what: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("spill-test-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    #[test]
    fn spill_files_have_no_name_and_only_their_owner_may_open_them() {
        for (what, open) in [
            ("tmpfile", open_unnamed as fn(&Path) -> io::Result<File>),
            ("unlinked", open_and_unlink),
        ] {
            let d = dir(what);
            let f = open(&d).expect("open");
            f.write_all_at(b"record", 0).expect("write");
            let mut back = [0u8; 6];
            f.read_exact_at(&mut back, 0).expect("read");
            assert_eq!(&back, b"record");
            assert_eq!(
                f.metadata().expect("stat").permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(std::fs::read_dir(&d).expect("list").count(), 0, "{what}");
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    #[test]
    fn records_read_back_from_any_indexed_place() {
        let d = dir("records");
        let sp = Spill::new(d.clone(), 8 << 20, 8 << 20).expect("spill");
        let mut seg = sp.open_segment(10, 0).expect("segment");
        // Records of growing size, in two writes, each indexed.
        let (mut buf, mut marks) = (Vec::new(), Vec::new());
        let envelope = |i: u64| vec![i as u8; 1000 * (i as usize - 9)];
        for i in 10..60 {
            marks.push((i, buf.len() as u64));
            encode_record(&mut buf, i as usize, &envelope(i));
        }
        seg.file.write_all_at(&buf, 0).expect("write");
        let n = buf.len() as u64;
        seg.commit(50, n, sp.reserve(n).expect("room"), &marks);
        assert_eq!((seg.end_seq(), seg.len), (60, n));
        assert!(seg.index.len() > 5, "{:?}", seg.index);
        for target in [10, 11, 33, 59] {
            let (seq, pos) = seg.seek(target);
            assert!(seq <= target && target - seq < 70);
            let batch = ReadJob {
                file: seg.file.clone(),
                pos,
                seq,
                target,
                limit: seg.len,
            }
            .run()
            .expect("read");
            let (first, len) = batch.frames.front().expect("a frame").clone();
            assert_eq!((first.to_vec(), len), (envelope(target), target));
        }
        assert_eq!(sp.used(), n);
        drop(seg);
        assert_eq!(sp.used(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }
}
