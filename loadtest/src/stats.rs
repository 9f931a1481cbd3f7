//! What a run measures: counters, latency histograms, per-stream offset tracking,
//! the payload header that carries sequence numbers and send times, and the live
//! counters the progress line reads.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use hdrhistogram::Histogram;
use tutti::util::Unpoisoned;

/// Microseconds since the first call in this process (monotonic; senders and
/// receivers share the clock, so a difference is a one-way latency).
pub fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A latency histogram in microseconds, 1 µs to 5 minutes, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 300_000_000, 3).expect("valid bounds")
}

/// Latencies recorded from many tasks: a few independently locked shards, merged at
/// the end, so recording neither contends much nor allocates.
#[derive(Debug)]
pub struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            shards: (0..16).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }
}

impl Latencies {
    /// Records one latency; `shard` is any number stable per recording task.
    pub fn record(&self, shard: usize, us: u64) {
        let mut h = self.shards[shard % self.shards.len()].locked();
        h.saturating_record(us.max(1));
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for s in &self.shards {
            let h = s.locked();
            out.add(&*h).expect("same bounds");
        }
        out
    }

    /// Forgets everything recorded.
    pub fn reset(&self) {
        for s in &self.shards {
            s.locked().reset();
        }
    }
}

/// A counter that is shared between tasks.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Subtracts one (not below zero).
    pub fn dec(&self) {
        let _ = self
            .0
            .fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(1)));
    }
    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    /// Raises the value to `v` if it is higher.
    pub fn max(&self, v: u64) {
        self.0.fetch_max(v, Relaxed);
    }
    /// Sets the value to zero.
    pub fn reset(&self) {
        self.0.store(0, Relaxed);
    }
}

/// How far behind its schedule the generator ran.
#[derive(Debug, Default)]
pub struct Lateness {
    /// Sends scheduled (and started).
    pub scheduled: Counter,
    /// Sends started later than the threshold.
    pub late: Counter,
    /// The worst lateness, in microseconds.
    pub max_us: Counter,
    /// The threshold in microseconds.
    pub threshold_us: Counter,
}

impl Lateness {
    /// Notes a send that was due at `due_us` and starts at `now_us`.
    pub fn note(&self, due_us: u64, now_us: u64) {
        let late = now_us.saturating_sub(due_us);
        self.scheduled.inc();
        self.max_us.max(late);
        if late > self.threshold_us.get() {
            self.late.inc();
        }
    }

    /// A snapshot.
    pub fn snapshot(&self) -> LateSnapshot {
        LateSnapshot {
            scheduled: self.scheduled.get(),
            late: self.late.get(),
            max_us: self.max_us.get(),
        }
    }
}

/// A copy of [`Lateness`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LateSnapshot {
    /// Sends scheduled.
    pub scheduled: u64,
    /// Sends started late.
    pub late: u64,
    /// Worst lateness in microseconds.
    pub max_us: u64,
}

impl LateSnapshot {
    /// Both combined.
    pub fn merge(&mut self, o: LateSnapshot) {
        self.scheduled += o.scheduled;
        self.late += o.late;
        self.max_us = self.max_us.max(o.max_us);
    }
}

/// What one receiver learns from a stream offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next one, or one after a gap (the gap may fill later).
    New,
    /// One that filled an earlier gap: delivered, but out of order.
    OutOfOrder,
    /// One already delivered.
    Duplicate,
}

/// Per-stream offsets seen by one receiver. The first offset seen starts the
/// stream (earlier history is not a gap).
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    last: Option<u64>,
    gaps: BTreeSet<u64>,
}

/// Gaps remembered per stream at most (beyond that, late fills count as duplicates).
const MAX_GAPS: usize = 65_536;

impl OffsetTracker {
    /// Classifies `offset`.
    pub fn observe(&mut self, offset: u64) -> Seen {
        let Some(last) = self.last else {
            self.last = Some(offset);
            return Seen::New;
        };
        if offset > last {
            for missing in (last + 1)..offset {
                if self.gaps.len() >= MAX_GAPS {
                    break;
                }
                self.gaps.insert(missing);
            }
            self.last = Some(offset);
            Seen::New
        } else if self.gaps.remove(&offset) {
            Seen::OutOfOrder
        } else {
            Seen::Duplicate
        }
    }
}

/// The header every generated payload starts with:
/// `PHASE|M|SENDER|SEQ|SENT_US|` (`M` is `m` inside the measured window, `w` outside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The run phase (knee step) it was sent in.
    pub phase: u32,
    /// Sent inside the measured window.
    pub measured: bool,
    /// The sender's index.
    pub sender: u32,
    /// The sender's sequence number.
    pub seq: u64,
    /// [`now_us`] at the send.
    pub sent_us: u64,
}

/// Writes `h` into `buf` (cleared first) and pads it with `x` to `len` bytes.
pub fn encode_payload(buf: &mut String, h: &Header, len: usize) {
    buf.clear();
    let _ = write!(
        buf,
        "{}|{}|{}|{}|{}|",
        h.phase,
        if h.measured { 'm' } else { 'w' },
        h.sender,
        h.seq,
        h.sent_us
    );
    while buf.len() < len {
        buf.push('x');
    }
}

/// Reads the header of a generated payload; `None` for anything else.
pub fn parse_payload(text: &str) -> Option<Header> {
    let mut it = text.splitn(6, '|');
    let phase = it.next()?.parse().ok()?;
    let measured = match it.next()? {
        "m" => true,
        "w" => false,
        _ => return None,
    };
    let sender = it.next()?.parse().ok()?;
    let seq = it.next()?.parse().ok()?;
    let sent_us = it.next()?.parse().ok()?;
    it.next()?;
    Some(Header {
        phase,
        measured,
        sender,
        seq,
        sent_us,
    })
}

/// Counters the progress line shows while a run goes on.
#[derive(Debug, Default)]
pub struct Live {
    /// Connections open now.
    pub connected: Counter,
    /// Connections attempted so far.
    pub attempted: Counter,
    /// Messages (or operations, notifications, status changes) sent so far.
    pub sends: Counter,
    /// Deliveries received so far.
    pub deliveries: Counter,
    /// Failures so far (failed connects, drops, failed sends).
    pub errors: Counter,
    /// What the run is doing.
    pub phase: Mutex<String>,
}

impl Live {
    /// Sets the phase label.
    pub fn set_phase(&self, p: impl Into<String>) {
        *self.phase.locked() = p.into();
    }
}

/// The process-wide live counters.
pub fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(Live::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_pads() {
        let h = Header {
            phase: 3,
            measured: true,
            sender: 999,
            seq: 12,
            sent_us: 123_456_789,
        };
        let mut buf = String::new();
        encode_payload(&mut buf, &h, 100);
        assert_eq!(buf.len(), 100);
        assert!(buf.starts_with("3|m|999|12|123456789|xx"));
        assert_eq!(parse_payload(&buf), Some(h));
        // Shorter than the header: the header is kept whole.
        encode_payload(&mut buf, &h, 4);
        assert_eq!(parse_payload(&buf), Some(h));
        assert_eq!(parse_payload("hello"), None);
        assert_eq!(parse_payload("1|q|1|1|1|"), None);
    }

    #[test]
    fn offsets_classify_gaps_fills_and_repeats() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.observe(41), Seen::New, "history before is not a gap");
        assert_eq!(t.observe(42), Seen::New);
        assert_eq!(t.observe(45), Seen::New);
        assert_eq!(t.observe(44), Seen::OutOfOrder);
        assert_eq!(t.observe(44), Seen::Duplicate);
        assert_eq!(t.observe(42), Seen::Duplicate);
        assert_eq!(t.observe(43), Seen::OutOfOrder);
        assert_eq!(t.observe(46), Seen::New);
    }

    #[test]
    fn lateness_counts_only_past_the_threshold() {
        let l = Lateness::default();
        l.threshold_us.add(20_000);
        l.note(1_000, 1_500);
        l.note(1_000, 30_000);
        let s = l.snapshot();
        assert_eq!((s.scheduled, s.late, s.max_us), (2, 1, 29_000));
    }

    #[test]
    fn shards_merge() {
        let l = Latencies::default();
        for i in 0..100 {
            l.record(i, 1000 + i as u64);
        }
        let h = l.merged();
        assert_eq!(h.len(), 100);
        assert!(h.value_at_quantile(0.5) >= 1040);
        l.reset();
        assert!(l.merged().is_empty());
    }
}
