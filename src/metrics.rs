//! Counters, gauges and latency histograms, rendered as Prometheus text.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::protocol::CloseCode;
use crate::transport::TransportKind;

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    sessions_accepted: [AtomicU64; 2],
    sessions_active: [AtomicI64; 2],
    sessions_closed: Vec<AtomicU64>,
    frames_rejected: AtomicU64,
    handshake_us: Mutex<Histogram<u64>>,
    /// Collaboration counters.
    pub collab: crate::services::collab::CollabCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sessions_accepted: Default::default(),
            sessions_active: Default::default(),
            sessions_closed: CloseCode::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            frames_rejected: AtomicU64::new(0),
            // 1 µs to 1 hour, 3 significant digits.
            handshake_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            ),
            collab: Default::default(),
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

impl Metrics {
    /// A session completed its handshake after `took`.
    pub fn session_opened(&self, t: TransportKind, took: Duration) {
        self.sessions_accepted[idx(t)].fetch_add(1, Relaxed);
        self.sessions_active[idx(t)].fetch_add(1, Relaxed);
        let us = (took.as_micros() as u64).clamp(1, 3_600_000_000);
        if let Ok(mut h) = self.handshake_us.lock() {
            h.saturating_record(us);
        }
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

    /// Sessions open now over `t`.
    pub fn active(&self, t: TransportKind) -> i64 {
        self.sessions_active[idx(t)].load(Relaxed)
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
        out.push_str("# HELP tutti_frames_rejected_total Frames answered with a frame error.\n# TYPE tutti_frames_rejected_total counter\n");
        let _ = writeln!(
            out,
            "tutti_frames_rejected_total {}",
            self.frames_rejected.load(Relaxed)
        );
        for (name, help, v) in [
            (
                "tutti_collab_operations_applied_total",
                "Document operations applied.",
                &self.collab.applied,
            ),
            (
                "tutti_collab_operations_transformed_total",
                "Operations transformed against concurrent ones.",
                &self.collab.transformed,
            ),
            (
                "tutti_collab_operations_rejected_total",
                "Operations refused (malformed, not allowed, too large).",
                &self.collab.rejected,
            ),
            (
                "tutti_collab_resyncs_total",
                "Operations answered with RESYNC_REQUIRED.",
                &self.collab.resyncs,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let h = self
            .handshake_us
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        out.push_str("# HELP tutti_handshake_seconds Time from connection to Welcome.\n# TYPE tutti_handshake_seconds summary\n");
        for q in [0.5, 0.9, 0.99, 0.999] {
            let _ = writeln!(
                out,
                "tutti_handshake_seconds{{quantile=\"{q}\"}} {}",
                h.value_at_quantile(q) as f64 / 1e6
            );
        }
        let sum: f64 = h
            .iter_recorded()
            .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
            .sum();
        let _ = writeln!(out, "tutti_handshake_seconds_sum {}", sum / 1e6);
        let _ = writeln!(out, "tutti_handshake_seconds_count {}", h.len());
        out
    }
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
        let text = m.render();
        assert!(text.contains("tutti_sessions_accepted_total{transport=\"quic\"} 1"));
        assert!(text.contains("tutti_sessions_active{transport=\"quic\"} 0"));
        assert!(text.contains("tutti_sessions_active{transport=\"webtransport\"} 1"));
        assert!(text.contains("tutti_sessions_closed_total{code=\"GOING_AWAY\"} 1"));
        assert!(text.contains("tutti_handshake_seconds_count 2"));
    }
}
