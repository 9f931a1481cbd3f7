//! Counters, gauges and latency histograms (HDR), rendered as Prometheus text and
//! as JSON percentiles.
//!
//! Recording never takes a global lock: each [`Latency`] histogram is split in
//! shards and a thread records into its own shard (an uncontended lock); reads
//! merge the shards.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::protocol::{CloseCode, ErrorCode};
use crate::transport::TransportKind;
use crate::util::Unpoisoned;

/// Shards per histogram: more than the threads that record at once.
const SHARDS: usize = 16;
/// The largest value recorded, in microseconds (one hour).
const MAX_US: u64 = 3_600_000_000;

thread_local! {
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Relaxed) % SHARDS
    };
}

/// A latency histogram in microseconds, 3 significant digits, 1 µs to 1 h.
///
/// A shard's histogram (about 180 KiB of counters, written when allocated) is
/// allocated by the first record from a thread mapped to it, so histograms that are
/// never recorded (request types nobody sends) and shards of threads that never
/// record cost nothing.
#[derive(Debug)]
pub struct Latency {
    shards: Vec<Shard>,
}

/// One shard, alone on its cache lines so that threads recording into neighbouring
/// shards do not contend for the same line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<Option<Histogram<u64>>>);

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid bounds")
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

/// Whether latency histograms record; see [`set_latency_recording`].
static RECORDING: AtomicBool = AtomicBool::new(true);

/// Turns the recording of every latency histogram in the process on or off. On by
/// default; `benches/fanout.rs` turns it off to measure what recording costs.
pub fn set_latency_recording(on: bool) {
    RECORDING.store(on, Relaxed);
}

impl Latency {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        if !RECORDING.load(Relaxed) {
            return;
        }
        let us = (d.as_micros() as u64).clamp(1, MAX_US);
        let shard = SHARD.with(|s| *s);
        let mut h = self.shards[shard].0.locked();
        h.get_or_insert_with(histogram).saturating_record(us);
    }

    /// All shards merged.
    pub fn snapshot(&self) -> Histogram<u64> {
        let mut all = histogram();
        for s in &self.shards {
            if let Some(h) = &*s.0.locked() {
                let _ = all.add(h);
            }
        }
        all
    }
}

/// Percentiles of one histogram, in milliseconds (as served by `/api/v1/stats`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// The largest value.
    pub max_ms: f64,
}

impl Percentiles {
    /// The percentiles of `h` (microsecond values).
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Names of the request types, as recorded (`request` label).
pub const REQUEST_TYPES: &[&str] = &[
    "echo",
    "auth_refresh",
    "room_create",
    "room_add",
    "room_remove",
    "room_leave",
    "room_list",
    "chat_send",
    "chat_history",
    "chat_mark_read",
    "room_invite_list",
    "room_invite_accept",
    "room_invite_decline",
    "notify_list",
    "notify_mark_read",
    "notify_mark_all_read",
    "presence_set",
    "presence_get",
    "contact_request",
    "contact_accept",
    "contact_remove",
    "contact_list",
    "doc_create",
    "doc_share",
    "doc_open",
    "doc_close",
    "doc_submit",
    "doc_list",
    "analytics_track",
    "analytics_series",
    "analytics_top",
    "analytics_distinct_users",
    "metrics_subscribe",
    "metrics_unsubscribe",
    "unknown",
];

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    sessions_accepted: [AtomicU64; 2],
    sessions_active: [AtomicI64; 2],
    sessions_closed: Vec<AtomicU64>,
    frames_rejected: AtomicU64,
    errors: Vec<AtomicU64>,
    /// Time from the first packet to `Welcome`.
    pub handshake: Latency,
    /// Server processing time per request type (index in [`REQUEST_TYPES`]).
    requests: Vec<Latency>,
    /// From an event's publication to its being written to a subscriber's stream.
    pub fanout: Latency,
    /// One group commit (fsync included).
    pub commit: Latency,
    /// QUIC round-trip time estimates, sampled per session.
    pub rtt: Latency,
    /// Writes committed (summed over group commits).
    pub writes_committed: AtomicU64,
    /// Collaboration counters.
    pub collab: CollabCounters,
    /// QUIC connections open now (in the handshake or in a session).
    pub connections_open: AtomicI64,
    /// Streams opened (control streams accepted, push streams opened).
    pub streams_opened: AtomicU64,
    /// UDP payload bytes received, summed over connections (sampled every few
    /// seconds and at the end of each connection).
    pub bytes_in: AtomicU64,
    /// UDP payload bytes sent, as `bytes_in`.
    pub bytes_out: AtomicU64,
    /// Datagrams handed to QUIC.
    pub datagrams_sent: AtomicU64,
    /// Datagrams not sent (too large or unsupported by the peer).
    pub datagrams_dropped: AtomicU64,
    /// Connection attempts answered with a QUIC Retry (address validation while
    /// too many handshakes were in progress).
    pub quic_retries: AtomicU64,
    /// TLS handshakes resumed from a session ticket (no certificate signed).
    pub tls_resumed: std::sync::Arc<AtomicU64>,
    /// HTTP connections refused because the side port had as many as it allows.
    pub http_refused: AtomicU64,
    /// HTTP connections open on the side port.
    pub http_open: AtomicI64,
    /// Idempotency records forgotten past their window or count: chat sends'
    /// client message ids, then the server API's idempotency keys.
    pub idempotency_pruned: [AtomicU64; 2],
}

/// Counters and gauges by the names metrics streaming uses (see docs/OPERATIONS.md).
pub const VALUE_NAMES: &[&str] = &[
    "connections",
    "sessions.quic",
    "sessions.webtransport",
    "sessions.accepted",
    "streams.opened",
    "bytes.in",
    "bytes.out",
    "datagrams.sent",
    "datagrams.dropped",
    "slow_consumers",
    "errors",
    "frames.rejected",
    "writes.committed",
    "tls.resumed",
    "http.connections",
];

/// The fixed histograms by the names metrics streaming uses; request types follow
/// as `latency.request.<type>`.
const LATENCY_NAMES: &[&str] = &[
    "latency.handshake",
    "latency.fanout",
    "latency.commit",
    "latency.rtt",
];

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sessions_accepted: Default::default(),
            sessions_active: Default::default(),
            sessions_closed: CloseCode::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            frames_rejected: AtomicU64::new(0),
            errors: ErrorCode::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            handshake: Latency::default(),
            requests: REQUEST_TYPES.iter().map(|_| Latency::default()).collect(),
            fanout: Latency::default(),
            commit: Latency::default(),
            rtt: Latency::default(),
            writes_committed: AtomicU64::new(0),
            collab: Default::default(),
            connections_open: AtomicI64::new(0),
            streams_opened: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            datagrams_sent: AtomicU64::new(0),
            datagrams_dropped: AtomicU64::new(0),
            quic_retries: AtomicU64::new(0),
            tls_resumed: Default::default(),
            http_refused: AtomicU64::new(0),
            http_open: AtomicI64::new(0),
            idempotency_pruned: Default::default(),
        }
    }
}

fn idx(t: TransportKind) -> usize {
    match t {
        TransportKind::Quic => 0,
        TransportKind::WebTransport => 1,
    }
}

const TRANSPORTS: [TransportKind; 2] = [TransportKind::Quic, TransportKind::WebTransport];

fn summary(out: &mut String, name: &str, help: &str, series: &[(String, Histogram<u64>)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
    for (labels, h) in series {
        let sep = if labels.is_empty() { "" } else { "," };
        for q in [0.5, 0.9, 0.99, 0.999] {
            let _ = writeln!(
                out,
                "{name}{{{labels}{sep}quantile=\"{q}\"}} {}",
                h.value_at_quantile(q) as f64 / 1e6
            );
        }
        let sum: f64 = h
            .iter_recorded()
            .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
            .sum();
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", sum / 1e6);
        let _ = writeln!(out, "{name}_count{braces} {}", h.len());
    }
}

impl Metrics {
    /// A session completed its handshake after `took`.
    pub fn session_opened(&self, t: TransportKind, took: Duration) {
        self.sessions_accepted[idx(t)].fetch_add(1, Relaxed);
        self.sessions_active[idx(t)].fetch_add(1, Relaxed);
        self.handshake.record(took);
    }

    /// A session that had completed its handshake ended.
    pub fn session_ended(&self, t: TransportKind) {
        self.sessions_active[idx(t)].fetch_sub(1, Relaxed);
    }

    /// The server closed a session (before or after its handshake) with `code`.
    pub fn closed_with(&self, code: CloseCode) {
        if let Some(i) = CloseCode::ALL.iter().position(|c| *c == code) {
            self.sessions_closed[i].fetch_add(1, Relaxed);
        }
    }

    /// A frame was answered with a frame error.
    pub fn frame_rejected(&self) {
        self.frames_rejected.fetch_add(1, Relaxed);
    }

    /// An error was answered with `code`.
    pub fn error(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }

    /// A request of type `name` (one of [`REQUEST_TYPES`]) took `d` to handle.
    pub fn request(&self, name: &str, d: Duration) {
        let i = REQUEST_TYPES
            .iter()
            .position(|n| *n == name)
            .unwrap_or(REQUEST_TYPES.len() - 1);
        self.requests[i].record(d);
    }

    /// A group commit of `writes` took `d`.
    pub fn committed(&self, writes: usize, d: Duration) {
        self.writes_committed.fetch_add(writes as u64, Relaxed);
        self.commit.record(d);
    }

    /// Sessions open now over `t`.
    pub fn active(&self, t: TransportKind) -> i64 {
        self.sessions_active[idx(t)].load(Relaxed)
    }

    /// The counter or gauge called `name` (one of [`VALUE_NAMES`]).
    pub fn value(&self, name: &str) -> Option<f64> {
        let closed = |code: CloseCode| {
            CloseCode::ALL
                .iter()
                .position(|c| *c == code)
                .map_or(0, |i| self.sessions_closed[i].load(Relaxed))
        };
        let v = match name {
            "connections" => self.connections_open.load(Relaxed) as f64,
            "sessions.quic" => self.active(TransportKind::Quic) as f64,
            "sessions.webtransport" => self.active(TransportKind::WebTransport) as f64,
            "sessions.accepted" => self
                .sessions_accepted
                .iter()
                .map(|a| a.load(Relaxed))
                .sum::<u64>() as f64,
            "streams.opened" => self.streams_opened.load(Relaxed) as f64,
            "bytes.in" => self.bytes_in.load(Relaxed) as f64,
            "bytes.out" => self.bytes_out.load(Relaxed) as f64,
            "datagrams.sent" => self.datagrams_sent.load(Relaxed) as f64,
            "datagrams.dropped" => self.datagrams_dropped.load(Relaxed) as f64,
            "slow_consumers" => closed(CloseCode::SlowConsumer) as f64,
            "errors" => self.errors.iter().map(|a| a.load(Relaxed)).sum::<u64>() as f64,
            "frames.rejected" => self.frames_rejected.load(Relaxed) as f64,
            "writes.committed" => self.writes_committed.load(Relaxed) as f64,
            "tls.resumed" => self.tls_resumed.load(Relaxed) as f64,
            "http.connections" => self.http_open.load(Relaxed) as f64,
            _ => return None,
        };
        Some(v)
    }

    /// Every histogram's streaming name: `latency.handshake`, `latency.fanout`,
    /// `latency.commit`, `latency.rtt`, then `latency.request.<type>`.
    pub fn latency_names() -> Vec<String> {
        LATENCY_NAMES
            .iter()
            .map(|n| (*n).to_owned())
            .chain(REQUEST_TYPES.iter().map(|t| format!("latency.request.{t}")))
            .collect()
    }

    /// The histogram called `name` (see [`latency_names`](Self::latency_names)).
    pub fn latency(&self, name: &str) -> Option<&Latency> {
        match name {
            "latency.handshake" => Some(&self.handshake),
            "latency.fanout" => Some(&self.fanout),
            "latency.commit" => Some(&self.commit),
            "latency.rtt" => Some(&self.rtt),
            _ => {
                let t = name.strip_prefix("latency.request.")?;
                let i = REQUEST_TYPES.iter().position(|n| *n == t)?;
                Some(&self.requests[i])
            }
        }
    }

    /// A connection was accepted (before its handshake); the guard counts it closed
    /// when dropped.
    pub fn connection(self: &std::sync::Arc<Self>) -> ConnectionGuard {
        self.connections_open.fetch_add(1, Relaxed);
        ConnectionGuard(self.clone())
    }

    /// Adds a connection's transfer since its last sample.
    pub fn transferred(&self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in.fetch_add(bytes_in, Relaxed);
        self.bytes_out.fetch_add(bytes_out, Relaxed);
    }

    /// Counts a datagram sent (`true`) or dropped.
    pub fn datagram(&self, sent: bool) {
        if sent {
            self.datagrams_sent.fetch_add(1, Relaxed);
        } else {
            self.datagrams_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Percentiles of every histogram with data: `handshake`, `fanout`, `commit`,
    /// `rtt`, and `request.<type>`.
    pub fn stats(&self) -> std::collections::BTreeMap<String, Percentiles> {
        let mut out = std::collections::BTreeMap::new();
        for (name, l) in [
            ("handshake", &self.handshake),
            ("fanout", &self.fanout),
            ("commit", &self.commit),
            ("rtt", &self.rtt),
        ] {
            out.insert(name.to_owned(), Percentiles::of(&l.snapshot()));
        }
        for (name, l) in REQUEST_TYPES.iter().zip(&self.requests) {
            let h = l.snapshot();
            if !h.is_empty() {
                out.insert(format!("request.{name}"), Percentiles::of(&h));
            }
        }
        out
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP tutti_sessions_accepted_total Sessions that completed the handshake.\n# TYPE tutti_sessions_accepted_total counter\n");
        for t in TRANSPORTS {
            let _ = writeln!(
                out,
                "tutti_sessions_accepted_total{{transport=\"{}\"}} {}",
                t.as_str(),
                self.sessions_accepted[idx(t)].load(Relaxed)
            );
        }
        out.push_str(
            "# HELP tutti_sessions_active Sessions open now.\n# TYPE tutti_sessions_active gauge\n",
        );
        for t in TRANSPORTS {
            let _ = writeln!(
                out,
                "tutti_sessions_active{{transport=\"{}\"}} {}",
                t.as_str(),
                self.active(t)
            );
        }
        out.push_str("# HELP tutti_sessions_closed_total Sessions closed by the server, by close code.\n# TYPE tutti_sessions_closed_total counter\n");
        for (i, code) in CloseCode::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "tutti_sessions_closed_total{{code=\"{}\"}} {}",
                code.name(),
                self.sessions_closed[i].load(Relaxed)
            );
        }
        out.push_str("# HELP tutti_idempotency_pruned_total Idempotency records forgotten past their window or count, by service.\n# TYPE tutti_idempotency_pruned_total counter\n");
        for (service, n) in ["chat", "notify"].iter().zip(&self.idempotency_pruned) {
            let _ = writeln!(
                out,
                "tutti_idempotency_pruned_total{{service=\"{service}\"}} {}",
                n.load(Relaxed)
            );
        }
        out.push_str("# HELP tutti_errors_total Errors answered, by code.\n# TYPE tutti_errors_total counter\n");
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "tutti_errors_total{{code=\"{}\"}} {}",
                code.name(),
                self.errors[i].load(Relaxed)
            );
        }
        // Every family with one unlabelled value.
        for (name, kind, help, v) in [
            (
                "tutti_tls_resumed_total",
                "counter",
                "TLS handshakes resumed from a session ticket.",
                self.tls_resumed.load(Relaxed) as f64,
            ),
            (
                "tutti_quic_retries_total",
                "counter",
                "Connection attempts asked to validate their address (QUIC Retry).",
                self.quic_retries.load(Relaxed) as f64,
            ),
            (
                "tutti_http_refused_total",
                "counter",
                "HTTP connections refused at the side port's connection cap.",
                self.http_refused.load(Relaxed) as f64,
            ),
            (
                "tutti_http_connections_open",
                "gauge",
                "HTTP connections open on the side port.",
                self.http_open.load(Relaxed) as f64,
            ),
            (
                "tutti_frames_rejected_total",
                "counter",
                "Frames answered with a frame error.",
                self.frames_rejected.load(Relaxed) as f64,
            ),
            (
                "tutti_connections_open",
                "gauge",
                "QUIC connections open (handshaking or in a session).",
                self.connections_open.load(Relaxed) as f64,
            ),
            (
                "tutti_streams_opened_total",
                "counter",
                "Streams opened: control streams accepted and push streams opened.",
                self.streams_opened.load(Relaxed) as f64,
            ),
            (
                "tutti_received_bytes_total",
                "counter",
                "UDP payload bytes received (sampled every 5 s per connection and at its end).",
                self.bytes_in.load(Relaxed) as f64,
            ),
            (
                "tutti_sent_bytes_total",
                "counter",
                "UDP payload bytes sent (sampled every 5 s per connection and at its end).",
                self.bytes_out.load(Relaxed) as f64,
            ),
            (
                "tutti_datagrams_sent_total",
                "counter",
                "QUIC datagrams sent.",
                self.datagrams_sent.load(Relaxed) as f64,
            ),
            (
                "tutti_datagrams_dropped_total",
                "counter",
                "QUIC datagrams not sent (too large or unsupported by the peer).",
                self.datagrams_dropped.load(Relaxed) as f64,
            ),
            (
                "tutti_writes_committed_total",
                "counter",
                "Writes made durable.",
                self.writes_committed.load(Relaxed) as f64,
            ),
            (
                "tutti_collab_operations_applied_total",
                "counter",
                "Document operations applied.",
                self.collab.applied.load(Relaxed) as f64,
            ),
            (
                "tutti_collab_operations_transformed_total",
                "counter",
                "Operations transformed against concurrent ones.",
                self.collab.transformed.load(Relaxed) as f64,
            ),
            (
                "tutti_collab_operations_rejected_total",
                "counter",
                "Operations refused (malformed, not allowed, too large).",
                self.collab.rejected.load(Relaxed) as f64,
            ),
            (
                "tutti_collab_resyncs_total",
                "counter",
                "Operations answered with RESYNC_REQUIRED.",
                self.collab.resyncs.load(Relaxed) as f64,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        summary(
            &mut out,
            "tutti_handshake_seconds",
            "Time from connection to Welcome.",
            &[(String::new(), self.handshake.snapshot())],
        );
        summary(
            &mut out,
            "tutti_fanout_seconds",
            "From publication to a subscriber's stream.",
            &[(String::new(), self.fanout.snapshot())],
        );
        summary(
            &mut out,
            "tutti_commit_seconds",
            "One group commit, fsync included.",
            &[(String::new(), self.commit.snapshot())],
        );
        summary(
            &mut out,
            "tutti_rtt_seconds",
            "QUIC round-trip time samples.",
            &[(String::new(), self.rtt.snapshot())],
        );
        let requests: Vec<(String, Histogram<u64>)> = REQUEST_TYPES
            .iter()
            .zip(&self.requests)
            .map(|(n, l)| (format!("request=\"{n}\""), l.snapshot()))
            .filter(|(_, h)| !h.is_empty())
            .collect();
        summary(
            &mut out,
            "tutti_request_seconds",
            "Server processing time per request type.",
            &requests,
        );
        out
    }
}

/// Counts a connection open until dropped.
#[derive(Debug)]
pub struct ConnectionGuard(std::sync::Arc<Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}

/// Counters of the collaboration service, shown at `/metrics`.
#[derive(Debug, Default)]
pub struct CollabCounters {
    /// Operations applied.
    pub applied: AtomicU64,
    /// Operations that had to be transformed against concurrent ones.
    pub transformed: AtomicU64,
    /// Operations refused (malformed, not allowed, too large).
    pub rejected: AtomicU64,
    /// Operations answered with `RESYNC_REQUIRED`.
    pub resyncs: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_quantiles() {
        let m = Metrics::default();
        m.session_opened(TransportKind::Quic, Duration::from_millis(3));
        m.session_opened(TransportKind::WebTransport, Duration::from_millis(5));
        m.session_ended(TransportKind::Quic);
        m.closed_with(CloseCode::GoingAway);
        m.error(ErrorCode::NotFound);
        m.request("chat_send", Duration::from_millis(2));
        let text = m.render();
        assert!(text.contains("tutti_sessions_accepted_total{transport=\"quic\"} 1"));
        assert!(text.contains("tutti_sessions_active{transport=\"quic\"} 0"));
        assert!(text.contains("tutti_sessions_active{transport=\"webtransport\"} 1"));
        assert!(text.contains("tutti_sessions_closed_total{code=\"GOING_AWAY\"} 1"));
        assert!(text.contains("tutti_errors_total{code=\"NOT_FOUND\"} 1"));
        assert!(text.contains("tutti_handshake_seconds_count 2"));
        assert!(text.contains("tutti_request_seconds_count{request=\"chat_send\"} 1"));
        assert!(
            text.contains("tutti_request_seconds{request=\"chat_send\",quantile=\"0.99\"} 0.002")
        );
    }

    #[test]
    fn shards_merge_on_read() {
        let l = std::sync::Arc::new(Latency::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for i in 1..=1000 {
                        l.record(Duration::from_micros(i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let p = Percentiles::of(&l.snapshot());
        assert_eq!(p.count, 4000);
        assert!((p.p50_ms - 0.5).abs() < 0.01, "{p:?}");
        assert!((p.max_ms - 1.0).abs() < 0.01, "{p:?}");
    }
}
