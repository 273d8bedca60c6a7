//! A command's output: one bounded ring shared by all its readers, each reader a cursor,
//! and behind the ring a bounded spill on disk for readers that lag.
//!
//! The agent drains a command's pipes into the ring as fast as the command writes and
//! never waits for a reader or for the disk, so no client can block a command (threat
//! B9). Each chunk is stored once, already framed as the Connect envelope every reader
//! sends (`Bytes`, so readers and the HTTP layer share it instead of copying it), and the
//! ring keeps at most its byte budget: memory per command does not grow with the number
//! of readers.
//!
//! # Spill
//! A chunk the ring drops while some reader has not read it yet is kept instead: first
//! in memory (at most [`PENDING_MAX`] bytes) for the spill writer, a task on a blocking
//! thread, which appends it to the command's spill files (see [`crate::spill`]); a
//! lagging reader reads it back from there in bounded batches, off the runtime thread,
//! and rejoins the ring when it has caught up. Output that every reader has read, or
//! that has no reader at all, never touches the disk. Spilled data lives only while a
//! reader needs it: it is freed a segment at a time as the slowest reader passes it, and
//! all of it once no reader is left (they finished, disconnected or were dropped for
//! stalling) or the output is discarded; the files have no name, so nothing outlives the
//! agent either. The spill is capped
//! per command and for the whole agent (`--spill-bytes`, `--spill-total-bytes`, counted
//! in bytes on disk: envelopes, about 4/3 of the output bytes); at a cap the oldest
//! spilled data is dropped. When the writer cannot keep up (its memory queue is full)
//! the chunk is dropped, and when the disk fails (full disk or quota: ENOSPC, EDQUOT)
//! spilling stops for the command and what it held is freed, so the agent never holds
//! the sandbox's last disk space.
//!
//! # Gaps
//! A reader that falls behind everything that is kept is not given a silent gap: the
//! next read tells how many bytes it missed ([`Next::Behind`]) and the stream ends with a
//! `data_loss` error saying so (envd's protocol has no way to mark a gap inside a
//! stream; a new Connect replays what the ring still holds, with the count of what it no
//! longer holds in `x-output-dropped-bytes`). A reader that stops reading altogether is
//! dropped after the stall timeout by its stream (see `server::StreamSender`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Display;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

use envd_proto::codec;
use envd_proto::messages::{DataEvent, EndEvent, ProcessEvent, ProcessEventMessage};

use crate::spill::{self, ReadJob, Reservation, Segment, Spill};

/// Output kept for an ended command once no reader needs more.
pub const ENDED_RING: usize = 64 << 10;
/// Envelope bytes dropped by the ring that may wait in memory for the spill writer;
/// beyond that the writer cannot keep up and further output is not spilled.
pub const PENDING_MAX: usize = 4 << 20;

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout pipe.
    Stdout,
    /// stderr pipe.
    Stderr,
    /// pty master.
    Pty,
}

/// The Connect envelope of one output chunk.
pub fn data_envelope(stream: Stream, data: &[u8]) -> Bytes {
    let d = match stream {
        Stream::Stdout => DataEvent::Stdout(data.to_vec()),
        Stream::Stderr => DataEvent::Stderr(data.to_vec()),
        Stream::Pty => DataEvent::Pty(data.to_vec()),
    };
    codec::message_envelope(&ProcessEventMessage {
        event: ProcessEvent::Data(d),
    })
}

#[derive(Debug)]
struct Chunk {
    envelope: Bytes,
    len: usize,
}

/// Where the readers are: how many need each sequence number next.
#[derive(Debug, Default)]
struct Positions {
    at: BTreeMap<u64, usize>,
    count: usize,
}

impl Positions {
    fn add(&mut self, seq: u64) {
        *self.at.entry(seq).or_default() += 1;
        self.count += 1;
    }

    fn remove(&mut self, seq: u64) {
        if let Some(n) = self.at.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.at.remove(&seq);
            }
            self.count -= 1;
        }
    }

    fn moved(&mut self, from: u64, to: u64) {
        self.remove(from);
        self.add(to);
    }

    /// The oldest chunk some reader still needs.
    fn min(&self) -> Option<u64> {
        self.at.keys().next().copied()
    }
}

/// What the ring dropped that a lagging reader still needs: records `first_seq..` on
/// disk up to `disk_end_seq`, then chunks in memory waiting for the writer, up to
/// [`Back::end_seq`]. It adjoins the ring unless a chunk could not be kept (a gap).
#[derive(Debug, Default)]
struct Back {
    first_seq: u64,
    first_offset: u64,
    disk: VecDeque<Segment>,
    disk_bytes: u64,
    disk_end_seq: u64,
    disk_end_offset: u64,
    pending: VecDeque<Chunk>,
    pending_bytes: usize,
    /// Bumped whenever the back is emptied, so that a write in flight is not committed.
    generation: u64,
    /// A writer task runs (or is about to).
    writing: bool,
    /// Registered with the agent-wide budget.
    registered: bool,
    /// Why spilling stopped for good, once it did.
    stopped: Option<Arc<str>>,
}

impl Back {
    fn end_seq(&self) -> u64 {
        self.disk_end_seq + self.pending.len() as u64
    }

    fn is_empty(&self) -> bool {
        self.first_seq == self.end_seq()
    }

    /// Empties it; returns the segments to close.
    fn clear(&mut self) -> Vec<Segment> {
        self.pending.clear();
        self.pending_bytes = 0;
        self.disk_bytes = 0;
        self.generation += 1;
        self.first_seq = self.disk_end_seq;
        self.first_offset = self.disk_end_offset;
        std::mem::take(&mut self.disk).into()
    }

    /// Drops its oldest segment.
    fn pop_front(&mut self) -> Option<Segment> {
        let s = self.disk.pop_front()?;
        self.disk_bytes -= s.len;
        (self.first_seq, self.first_offset) = match self.disk.front() {
            Some(n) => (n.first_seq, n.first_offset),
            None => (self.disk_end_seq, self.disk_end_offset),
        };
        Some(s)
    }
}

impl Drop for Back {
    fn drop(&mut self) {
        spill::release(std::mem::take(&mut self.disk).into());
    }
}

#[derive(Debug, Default)]
struct State {
    chunks: VecDeque<Chunk>,
    /// Sequence number of `chunks[0]`.
    first_seq: u64,
    /// Output bytes before `chunks[0]`: what the ring no longer holds.
    dropped: u64,
    /// Output bytes in the ring.
    bytes: usize,
    cap: usize,
    end: Option<EndEvent>,
    readers: Positions,
    back: Back,
}

/// Where a reader's next chunk is.
enum Loc {
    /// In memory: its envelope and output length.
    Chunk(Bytes, usize),
    /// In this segment of the spill.
    Disk(usize),
    End(EndEvent),
    Wait,
    /// Gone: this many output bytes up to the next one kept.
    Behind(u64),
}

/// One write of the spill writer, planned under the lock.
struct WritePlan {
    generation: u64,
    /// Sequence number and output offset of its first record.
    seq: u64,
    offset: u64,
    records: u64,
    out_bytes: u64,
    /// Its chunks: (envelope, output length).
    chunks: Vec<(Bytes, usize)>,
    target: Target,
    /// Segments the per-command cap dropped, to close outside the lock.
    evicted: Vec<Segment>,
}

enum Target {
    Append {
        id: u64,
        file: Arc<std::fs::File>,
        pos: u64,
    },
    New,
}

impl State {
    fn locate(&self, seq: u64, offset: u64) -> Loc {
        if seq >= self.first_seq {
            let idx = usize::try_from(seq - self.first_seq).unwrap_or(usize::MAX);
            if let Some(c) = self.chunks.get(idx) {
                return Loc::Chunk(c.envelope.clone(), c.len);
            }
            return match &self.end {
                Some(e) => Loc::End(e.clone()),
                None => Loc::Wait,
            };
        }
        let b = &self.back;
        if seq >= b.first_seq && seq < b.end_seq() {
            if seq >= b.disk_end_seq {
                let idx = usize::try_from(seq - b.disk_end_seq).unwrap_or(usize::MAX);
                if let Some(c) = b.pending.get(idx) {
                    return Loc::Chunk(c.envelope.clone(), c.len);
                }
            }
            let i = b.disk.partition_point(|s| s.end_seq() <= seq);
            if i < b.disk.len() && seq < b.disk_end_seq {
                return Loc::Disk(i);
            }
        }
        let next = if !b.is_empty() && seq < b.first_seq {
            b.first_offset
        } else {
            self.dropped
        };
        Loc::Behind(next.saturating_sub(offset))
    }

    /// Drops the ring's oldest chunks down to `cap`, keeping those a reader still needs
    /// in the back (when `spilling`). True when a writer must be started.
    fn trim_ring(&mut self, cap: usize, spilling: bool) -> bool {
        let mut start = false;
        while self.bytes > cap {
            let Some(c) = self.chunks.pop_front() else {
                break;
            };
            let (seq, offset) = (self.first_seq, self.dropped);
            self.bytes -= c.len;
            self.dropped += c.len as u64;
            self.first_seq += 1;
            if spilling {
                start |= self.keep(c, seq, offset);
            } else {
                self.trim_back();
            }
        }
        start
    }

    /// Keeps chunk `seq` (at output `offset`), just dropped by the ring, in the back if a
    /// reader still needs it and it fits. True when a writer must be started.
    fn keep(&mut self, c: Chunk, seq: u64, offset: u64) -> bool {
        if self.readers.min().is_none_or(|m| m > seq) {
            // No reader needs it, nor anything older.
            self.clear_back();
            return false;
        }
        let b = &mut self.back;
        if b.stopped.is_some() {
            return false;
        }
        if b.is_empty() {
            (b.first_seq, b.first_offset) = (seq, offset);
            (b.disk_end_seq, b.disk_end_offset) = (seq, offset);
        } else if b.end_seq() != seq {
            // Past a gap: the back only serves the readers still inside it.
            return false;
        }
        if b.pending_bytes + c.envelope.len() > PENDING_MAX {
            // The writer cannot keep up: this chunk is lost (a gap from here on).
            return false;
        }
        b.pending_bytes += c.envelope.len();
        b.pending.push_back(c);
        !std::mem::replace(&mut b.writing, true)
    }

    fn clear_back(&mut self) {
        if self.back.is_empty() && self.back.disk.is_empty() {
            return;
        }
        let segs = self.back.clear();
        spill::release(segs);
    }

    /// Frees what no reader needs any more from the back.
    fn trim_back(&mut self) {
        if self.back.is_empty() {
            return;
        }
        match self.readers.min() {
            Some(m) if m < self.back.end_seq() => {
                let mut freed = Vec::new();
                while self.back.disk.front().is_some_and(|s| s.end_seq() <= m) {
                    freed.extend(self.back.pop_front());
                }
                spill::release(freed);
            }
            _ => self.clear_back(),
        }
    }

    /// Drops the ring down to `cap` without keeping anything (no reader needs it).
    fn shrink_ring(&mut self, cap: usize) {
        while self.bytes > cap {
            let Some(c) = self.chunks.pop_front() else {
                break;
            };
            self.bytes -= c.len;
            self.dropped += c.len as u64;
            self.first_seq += 1;
        }
        self.chunks.shrink_to_fit();
    }

    fn settle_if_idle(&mut self) {
        if self.end.is_some() && self.readers.count == 0 {
            self.clear_back();
            if self.cap > ENDED_RING {
                self.cap = ENDED_RING;
                self.shrink_ring(ENDED_RING);
            }
        }
    }

    /// The next write of the spill writer, or None when there is nothing (more) to
    /// write.
    fn plan_write(&mut self, spill: &Spill) -> Option<WritePlan> {
        // Never write what no reader needs any more.
        let min = self.readers.min();
        if self.back.stopped.is_some() || min.is_none_or(|m| m >= self.back.end_seq()) {
            self.clear_back();
            return None;
        }
        let b = &mut self.back;
        let mut evicted = Vec::new();
        if let Some(m) = min.filter(|m| *m > b.disk_end_seq) {
            while let Some(s) = b.pop_front() {
                evicted.push(s);
            }
            while b.disk_end_seq < m {
                let Some(c) = b.pending.pop_front() else {
                    break;
                };
                b.pending_bytes -= c.envelope.len();
                b.disk_end_seq += 1;
                b.disk_end_offset += c.len as u64;
            }
            (b.first_seq, b.first_offset) = (b.disk_end_seq, b.disk_end_offset);
        }
        // References only: the copy into the write buffer happens outside the lock.
        let (mut chunks, mut n, mut out_bytes) = (Vec::new(), 0u64, 0u64);
        for c in &b.pending {
            let rec = (spill::RECORD_HEADER + c.envelope.len()) as u64;
            if !chunks.is_empty() && n + rec > spill.write_batch() {
                break;
            }
            chunks.push((c.envelope.clone(), c.len));
            n += rec;
            out_bytes += c.len as u64;
        }
        if chunks.is_empty() {
            return None;
        }
        if n > spill.per_command() {
            b.stopped = Some("a chunk is larger than the spill cap".into());
            self.clear_back();
            return None;
        }
        while b.disk_bytes + n > spill.per_command() {
            let Some(s) = b.pop_front() else { break };
            evicted.push(s);
        }
        let target = match b.disk.back() {
            Some(s) if s.len < spill.segment_bytes() => Target::Append {
                id: s.id,
                file: s.file.clone(),
                pos: s.len,
            },
            _ => Target::New,
        };
        Some(WritePlan {
            generation: b.generation,
            seq: b.disk_end_seq,
            offset: b.disk_end_offset,
            records: chunks.len() as u64,
            out_bytes,
            chunks,
            target,
            evicted,
        })
    }

    /// Records a finished write; false when the back changed meanwhile (the write is
    /// void and is planned again).
    fn commit_write(
        &mut self,
        plan: &WritePlan,
        new: Option<Segment>,
        bytes: u64,
        reserved: Reservation,
        marks: &[(u64, u64)],
    ) -> bool {
        let b = &mut self.back;
        if b.generation != plan.generation || b.disk_end_seq != plan.seq {
            return false;
        }
        match (&plan.target, new) {
            (Target::Append { id, pos, .. }, _) => match b.disk.back_mut() {
                Some(s) if s.id == *id && s.len == *pos => {
                    s.commit(plan.records, bytes, reserved, marks)
                }
                _ => return false,
            },
            (Target::New, Some(mut s)) => {
                s.commit(plan.records, bytes, reserved, marks);
                b.disk.push_back(s);
            }
            (Target::New, None) => return false,
        }
        b.disk_bytes += bytes;
        for _ in 0..plan.records {
            if let Some(c) = b.pending.pop_front() {
                b.pending_bytes -= c.envelope.len();
            }
        }
        b.disk_end_seq += plan.records;
        b.disk_end_offset += plan.out_bytes;
        true
    }
}

/// The shared output of one command.
#[derive(Debug)]
pub struct Output {
    state: Mutex<State>,
    /// Bumped on every change; readers wait on it.
    changed: watch::Sender<u64>,
    spill: Option<Arc<Spill>>,
}

/// What a reader gets next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// One data envelope.
    Frame(Bytes),
    /// The command ended (everything before it was read).
    End(EndEvent),
    /// Output this reader had not read yet is gone (neither in the ring nor spilled).
    Behind {
        /// Output bytes it missed.
        missed: u64,
        /// Why spilling stopped for this command, if it did.
        spill_error: Option<Arc<str>>,
    },
}

impl Output {
    /// An empty output keeping up to `cap` bytes in memory, nothing on disk.
    pub fn new(cap: usize) -> Arc<Self> {
        Self::with_spill(cap, None)
    }

    /// An empty output keeping up to `cap` bytes in memory and, for lagging readers,
    /// more in `spill`.
    pub fn with_spill(cap: usize, spill: Option<Arc<Spill>>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                cap,
                ..State::default()
            }),
            changed: watch::Sender::new(0),
            spill,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Appends a chunk; never waits.
    pub fn push(self: &Arc<Self>, stream: Stream, data: &[u8]) {
        let envelope = data_envelope(stream, data);
        let start_writer = {
            let mut st = self.lock();
            st.bytes += data.len();
            st.chunks.push_back(Chunk {
                envelope,
                len: data.len(),
            });
            let cap = st.cap;
            st.trim_ring(cap, self.spill.is_some())
        };
        if start_writer {
            self.start_writer();
        }
        self.bump();
    }

    fn start_writer(self: &Arc<Self>) {
        let (Some(spill), Ok(rt)) = (self.spill.clone(), tokio::runtime::Handle::try_current())
        else {
            self.lock().back.writing = false;
            return;
        };
        let out = self.clone();
        rt.spawn_blocking(move || write_spill(&out, &spill));
    }

    /// Records the end; readers get it after everything still buffered.
    pub fn finish(&self, end: EndEvent) {
        {
            let mut st = self.lock();
            st.end = Some(end);
            st.settle_if_idle();
        }
        self.bump();
    }

    /// Forgets the buffered output, spilled or not (a long-ended command kept only for
    /// its end event).
    pub fn discard(&self) {
        let mut st = self.lock();
        st.shrink_ring(0);
        st.clear_back();
    }

    /// The end event, once the command ended.
    pub fn end_event(&self) -> Option<EndEvent> {
        self.lock().end.clone()
    }

    /// Output bytes the ring no longer holds (a new reader starts after them).
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Bytes this command has on disk now.
    pub fn spilled(&self) -> u64 {
        self.lock().back.disk_bytes
    }

    /// A reader from the oldest byte the ring still holds (`replay`), or from the very
    /// first byte (a Start stream, created before any output).
    pub fn reader(self: &Arc<Self>, replay: bool) -> Reader {
        let mut st = self.lock();
        let (seq, offset) = if replay {
            (st.first_seq, st.dropped)
        } else {
            (0, 0)
        };
        st.readers.add(seq);
        drop(st);
        Reader {
            out: self.clone(),
            seq,
            offset,
            ahead: VecDeque::new(),
            cursor: None,
            rx: self.changed.subscribe(),
        }
    }

    /// Stops spilling for good and frees what was spilled (a disk error).
    fn stop_spill(&self, why: impl Display) {
        let mut st = self.lock();
        if st.back.stopped.is_none() {
            let dir = self.spill.as_ref().map(|s| s.dir().display().to_string());
            let message = format!(
                "spilling a command's output to {} stopped: {why}",
                dir.unwrap_or_default()
            );
            eprintln!("sandbox-agent: {message}");
            crate::events::record("warn", &message, &[]);
            st.back.stopped = Some(why.to_string().into());
        }
        st.clear_back();
    }

    /// Id of its oldest segment, when that is not the one its writer appends to.
    pub(crate) fn oldest_sealed_segment(&self) -> Option<u64> {
        let st = self.lock();
        (st.back.disk.len() > 1)
            .then(|| st.back.disk.front().map(|s| s.id))
            .flatten()
    }

    /// Drops its oldest segment if it is still `id` and sealed (the agent-wide cap).
    pub(crate) fn drop_segment(&self, id: u64) -> bool {
        let seg = {
            let mut st = self.lock();
            if st.back.disk.len() < 2 || st.back.disk.front().map(|s| s.id) != Some(id) {
                return false;
            }
            st.back.pop_front()
        };
        // Closed here: the caller is the writer, on a blocking thread.
        drop(seg);
        true
    }
}

/// The spill writer: appends the chunks waiting in memory to the spill files until none
/// are left. Runs on a blocking thread; takes the lock only to plan and to commit.
fn write_spill(out: &Arc<Output>, spill: &Arc<Spill>) {
    let (mut buf, mut marks) = (Vec::new(), Vec::new());
    loop {
        let mut plan = {
            let mut st = out.lock();
            match st.plan_write(spill) {
                Some(p) => p,
                None => {
                    st.back.writing = false;
                    return;
                }
            }
        };
        drop(std::mem::take(&mut plan.evicted));
        // The records, and where some of them start (for the segment's index).
        let base = match &plan.target {
            Target::Append { pos, .. } => *pos,
            Target::New => 0,
        };
        buf.clear();
        marks.clear();
        for (seq, (envelope, len)) in (plan.seq..).zip(std::mem::take(&mut plan.chunks)) {
            let at = base + buf.len() as u64;
            if marks
                .last()
                .is_none_or(|m: &(u64, u64)| at >= m.1 + spill::INDEX_STEP)
            {
                marks.push((seq, at));
            }
            spill::encode_record(&mut buf, len, &envelope);
        }
        let n = buf.len() as u64;
        // The agent-wide cap: make room by dropping the agent's oldest spilled data.
        let reserved = loop {
            if let Some(r) = spill.reserve(n) {
                break Some(r);
            }
            if !spill.drop_oldest() {
                break None;
            }
        };
        let Some(reserved) = reserved else {
            // Full, with nothing older to drop: tried again when more output is kept.
            out.lock().back.writing = false;
            return;
        };
        let (file, pos, new) = match &plan.target {
            Target::Append { file, pos, .. } => (file.clone(), *pos, None),
            Target::New => match spill.open_segment(plan.seq, plan.offset) {
                Ok(s) => (s.file.clone(), 0, Some(s)),
                Err(e) => {
                    out.stop_spill(format!("creating a spill file: {e}"));
                    continue;
                }
            },
        };
        if let Err(e) = file.write_all_at(&buf, pos) {
            out.stop_spill(format!("writing: {e}"));
            continue;
        }
        let register = {
            let mut st = out.lock();
            // A void write (the back changed meanwhile) is simply planned again.
            st.commit_write(&plan, new, n, reserved, &marks)
                && !std::mem::replace(&mut st.back.registered, true)
        };
        if register {
            spill.register(out);
        }
    }
}

/// One reader's position in an [`Output`].
#[derive(Debug)]
pub struct Reader {
    out: Arc<Output>,
    seq: u64,
    offset: u64,
    /// Frames read from disk and not yet returned (its position among the readers is
    /// past them).
    ahead: VecDeque<(Bytes, u64)>,
    /// Where its next disk read goes on: (segment id, sequence number, file position).
    cursor: Option<(u64, u64, u64)>,
    rx: watch::Receiver<u64>,
}

/// What a reader does next, decided under the lock.
enum Step {
    Done(Next),
    Read(u64, ReadJob),
    Wait,
}

impl Reader {
    /// The next envelope, the end, or how much this reader fell behind. Cancel-safe: a
    /// read from disk that is cancelled is done again.
    pub async fn next(&mut self) -> Next {
        loop {
            if let Some((envelope, len)) = self.ahead.pop_front() {
                self.seq += 1;
                self.offset += len;
                return Next::Frame(envelope);
            }
            self.rx.borrow_and_update();
            match self.step() {
                Step::Done(next) => return next,
                Step::Read(segment, job) => self.read_spill(segment, job).await,
                Step::Wait => {
                    if self.rx.changed().await.is_err() {
                        // The output itself is gone: nothing more will come.
                        return Next::End(self.out.end_event().unwrap_or_default());
                    }
                }
            }
        }
    }

    fn step(&mut self) -> Step {
        let mut st = self.out.lock();
        let (envelope, len) = match st.locate(self.seq, self.offset) {
            Loc::Chunk(envelope, len) => (envelope, len),
            Loc::Disk(i) => {
                let Some(s) = st.back.disk.get(i) else {
                    return Step::Wait;
                };
                let (seq, pos) = match self.cursor {
                    Some((id, seq, pos)) if id == s.id && seq == self.seq => (seq, pos),
                    _ => s.seek(self.seq),
                };
                let job = ReadJob {
                    file: s.file.clone(),
                    pos,
                    seq,
                    target: self.seq,
                    limit: s.len,
                };
                return Step::Read(s.id, job);
            }
            Loc::End(e) => return Step::Done(Next::End(e)),
            Loc::Behind(missed) => {
                return Step::Done(Next::Behind {
                    missed,
                    spill_error: st.back.stopped.clone(),
                })
            }
            Loc::Wait => return Step::Wait,
        };
        st.readers.moved(self.seq, self.seq + 1);
        st.trim_back();
        self.seq += 1;
        self.offset += len as u64;
        Step::Done(Next::Frame(envelope))
    }

    /// Reads the next batch of its records from disk, off the runtime thread.
    async fn read_spill(&mut self, segment: u64, job: ReadJob) {
        match tokio::task::spawn_blocking(move || job.run()).await {
            Ok(Ok(batch)) => {
                let n = batch.frames.len() as u64;
                {
                    let mut st = self.out.lock();
                    st.readers.moved(self.seq, self.seq + n);
                    st.trim_back();
                }
                self.cursor = Some((segment, self.seq + n, batch.next_pos));
                self.ahead = batch.frames;
            }
            Ok(Err(e)) => self.out.stop_spill(format!("reading: {e}")),
            Err(e) => self.out.stop_spill(format!("reading: {e}")),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut st = self.out.lock();
        st.readers.remove(self.seq + self.ahead.len() as u64);
        st.trim_back();
        st.settle_if_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    fn end() -> EndEvent {
        EndEvent {
            exit_code: 0,
            exited: true,
            status: "exit status 0".into(),
            error: None,
        }
    }

    fn behind(missed: u64) -> Next {
        Next::Behind {
            missed,
            spill_error: None,
        }
    }

    /// Polls `cond` (the spill writer and file closing run on other threads).
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting until {what}");
    }

    /// Until the writer has taken everything waiting in memory.
    async fn flushed(out: &Arc<Output>) {
        until("the spill writer is done", || {
            let st = out.lock();
            !st.back.writing && st.back.pending.is_empty()
        })
        .await;
    }

    fn spill(per_command: u64, total: u64) -> Arc<Spill> {
        Spill::new(std::env::temp_dir(), per_command, total).expect("spill")
    }

    /// Chunk `i`: 8 KiB, every byte naming it.
    fn chunk(i: u32) -> Vec<u8> {
        i.to_le_bytes().repeat(2048)
    }

    fn stdout_of(next: Next) -> Vec<u8> {
        let Next::Frame(envelope) = next else {
            panic!("not a frame: {next:?}");
        };
        let m: ProcessEventMessage =
            serde_json::from_slice(&envelope[codec::HEADER_LEN..]).expect("event");
        match m.event {
            ProcessEvent::Data(DataEvent::Stdout(d)) => d,
            e => panic!("not stdout: {e:?}"),
        }
    }

    #[test]
    fn readers_are_cursors_and_a_lagging_one_learns_what_it_missed() {
        rt().block_on(async {
            let out = Output::new(10);
            let mut fast = out.reader(false);
            let mut slow = out.reader(false);
            out.push(Stream::Stdout, b"aaaa");
            assert_eq!(
                fast.next().await,
                Next::Frame(data_envelope(Stream::Stdout, b"aaaa"))
            );
            out.push(Stream::Stderr, b"bbbb");
            out.push(Stream::Stdout, b"cccc"); // evicts "aaaa": 12 > 10
            assert!(matches!(fast.next().await, Next::Frame(_)));
            assert!(matches!(fast.next().await, Next::Frame(_)));
            assert_eq!(slow.next().await, behind(4));
            let mut late = out.reader(true);
            assert_eq!(out.dropped(), 4);
            out.finish(end());
            assert_eq!(fast.next().await, Next::End(end()));
            assert_eq!(
                late.next().await,
                Next::Frame(data_envelope(Stream::Stderr, b"bbbb"))
            );
            assert!(matches!(late.next().await, Next::Frame(_)));
            assert_eq!(late.next().await, Next::End(end()));
        });
    }

    #[test]
    fn a_waiting_reader_wakes_on_output_and_the_ended_ring_shrinks_once_idle() {
        rt().block_on(async {
            let out = Output::new(1 << 20);
            let mut r = out.reader(false);
            let o = out.clone();
            let writer = tokio::spawn(async move {
                tokio::task::yield_now().await;
                o.push(Stream::Pty, &vec![b'x'; 200 << 10]);
                o.finish(end());
            });
            assert!(matches!(r.next().await, Next::Frame(_)));
            assert_eq!(r.next().await, Next::End(end()));
            writer.await.expect("writer");
            // Still held for the reader; dropped to the ended budget once it leaves.
            assert_eq!(out.dropped(), 0);
            drop(r);
            assert_eq!(out.dropped(), 200 << 10);
        });
    }

    #[test]
    fn a_lagging_reader_gets_everything_from_the_spill_in_order_and_it_is_freed_after() {
        rt().block_on(async {
            // 2 MiB segments.
            let sp = spill(16 << 20, 16 << 20);
            let out = Output::with_spill(64 << 10, Some(sp.clone()));
            let mut slow = out.reader(false);
            let mut fast = out.reader(false);
            // 8 MiB: more than the ring and than the writer's memory queue, so most of it
            // is read back from disk.
            let n = 1024u32;
            for i in 0..n {
                out.push(Stream::Stdout, &chunk(i));
                assert_eq!(stdout_of(fast.next().await), chunk(i));
                if i % 64 == 63 {
                    flushed(&out).await;
                }
            }
            out.finish(end());
            assert_eq!(fast.next().await, Next::End(end()));
            flushed(&out).await;
            assert!(out.spilled() > 7 << 20, "{} on disk", out.spilled());
            for i in 0..n {
                assert_eq!(stdout_of(slow.next().await), chunk(i), "chunk {i}");
                if i == n / 2 {
                    // What it has read is freed as it goes, a segment at a time.
                    assert!(out.spilled() < 8 << 20, "{} on disk", out.spilled());
                }
            }
            assert_eq!(slow.next().await, Next::End(end()));
            assert_eq!(out.spilled(), 0);
            until("the files are closed", || sp.used() == 0).await;
            drop(slow);
            drop(fast);
        });
    }

    #[test]
    fn lagging_readers_at_different_places_each_get_everything_in_order() {
        rt().block_on(async {
            let sp = spill(16 << 20, 16 << 20);
            let out = Output::with_spill(64 << 10, Some(sp.clone()));
            let mut slowest = out.reader(false);
            let mut slow = out.reader(false);
            let n = 600u32;
            let mut next = 0;
            for i in 0..n {
                out.push(Stream::Stdout, &chunk(i));
                // A third of the pace: it reads from memory, from the writer's queue and
                // from the middle of segments the slowest reader started.
                if i % 3 == 0 {
                    assert_eq!(stdout_of(slow.next().await), chunk(next));
                    next += 1;
                }
                if i % 50 == 49 {
                    flushed(&out).await;
                }
            }
            out.finish(end());
            for i in next..n {
                assert_eq!(stdout_of(slow.next().await), chunk(i), "chunk {i}");
            }
            assert_eq!(slow.next().await, Next::End(end()));
            for i in 0..n {
                assert_eq!(stdout_of(slowest.next().await), chunk(i), "chunk {i}");
            }
            assert_eq!(slowest.next().await, Next::End(end()));
        });
    }

    #[test]
    fn readers_that_keep_up_never_touch_the_disk() {
        rt().block_on(async {
            let sp = spill(64 << 20, 64 << 20);
            let out = Output::with_spill(64 << 10, Some(sp.clone()));
            let mut a = out.reader(false);
            let mut b = out.reader(false);
            for i in 0..512 {
                out.push(Stream::Stdout, &chunk(i));
                assert_eq!(stdout_of(a.next().await), chunk(i));
                assert_eq!(stdout_of(b.next().await), chunk(i));
            }
            // And output nobody reads is not spilled either.
            drop((a, b));
            for i in 0..512 {
                out.push(Stream::Stdout, &chunk(i));
            }
            assert_eq!(sp.files_opened(), 0);
            assert_eq!(out.spilled(), 0);
        });
    }

    #[test]
    fn a_reader_behind_the_spill_cap_learns_exactly_what_it_missed() {
        rt().block_on(async {
            let sp = spill(1 << 20, 64 << 20);
            let out = Output::with_spill(64 << 10, Some(sp.clone()));
            let mut r = out.reader(false);
            let n = 1024u32;
            for i in 0..n {
                out.push(Stream::Stdout, &chunk(i));
                if i % 64 == 63 {
                    flushed(&out).await;
                }
            }
            flushed(&out).await;
            assert!(out.spilled() <= 1 << 20, "{} on disk", out.spilled());
            let Next::Behind {
                missed,
                spill_error: None,
            } = r.next().await
            else {
                panic!("not behind");
            };
            // It missed whole chunks up to the oldest one still spilled.
            assert_eq!(missed % 8192, 0);
            let kept = u64::from(n) * 8192 - missed;
            assert!(kept > 64 << 10 && kept <= (64 << 10) + (1 << 20), "{kept}");
            // A reader that joins now starts at the ring and gets all of it.
            let mut late = out.reader(true);
            let first = u32::try_from(out.dropped() / 8192).expect("chunks");
            out.finish(end());
            for i in first..n {
                assert_eq!(stdout_of(late.next().await), chunk(i));
            }
            assert_eq!(late.next().await, Next::End(end()));
        });
    }

    #[test]
    fn the_agent_wide_cap_drops_the_oldest_spilled_data_of_any_command() {
        rt().block_on(async {
            let sp = spill(4 << 20, 1 << 20);
            let first = Output::with_spill(64 << 10, Some(sp.clone()));
            let second = Output::with_spill(64 << 10, Some(sp.clone()));
            let mut old = first.reader(false);
            for i in 0..128 {
                first.push(Stream::Stdout, &chunk(i));
                flushed(&first).await;
            }
            assert!(first.spilled() > 512 << 10);
            let mut new = second.reader(false);
            for i in 0..64 {
                second.push(Stream::Stdout, &chunk(i));
                flushed(&second).await;
                assert!(sp.used() <= 1 << 20, "{} on disk", sp.used());
            }
            second.finish(end());
            for i in 0..64 {
                assert_eq!(stdout_of(new.next().await), chunk(i));
            }
            assert_eq!(new.next().await, Next::End(end()));
            // The older command's oldest spilled chunks made room.
            assert!(matches!(old.next().await, Next::Behind { missed, .. } if missed > 0));
        });
    }

    #[test]
    fn spilling_stops_when_the_disk_fails_and_lagging_readers_learn_why() {
        rt().block_on(async {
            let dir = PathBuf::from("/nonexistent/colima-e2b-spill");
            let sp = Spill::new(dir, 64 << 20, 64 << 20).expect("spill");
            let out = Output::with_spill(64 << 10, Some(sp.clone()));
            let mut r = out.reader(false);
            for i in 0..64 {
                out.push(Stream::Stdout, &chunk(i));
            }
            flushed(&out).await;
            let Next::Behind {
                missed,
                spill_error: Some(why),
            } = r.next().await
            else {
                panic!("not behind");
            };
            assert!(why.contains("No such file"), "{why}");
            assert_eq!(missed, out.dropped());
            // Later output is not spilled any more, and memory holds only the ring.
            for i in 0..64 {
                out.push(Stream::Stdout, &chunk(i));
            }
            assert_eq!(out.lock().back.pending_bytes, 0);
            assert_eq!(sp.used(), 0);
        });
    }
}
