//! What a workload runner hands back: plain numbers and histograms, merged for the
//! mixed scenario and turned into the report by `report`.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stats::{LateSnapshot, new_histogram};

/// Message accounting of one run (or one knee step).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Messages {
    /// Sends attempted inside the measured window.
    pub sent: u64,
    /// Of those, sends the server refused or that failed.
    pub send_errors: u64,
    /// Deliveries expected: each measured send times the receivers connected to its stream.
    pub expected: u64,
    /// Deliveries received (each receiver and message once).
    pub delivered: u64,
    /// Deliveries received again (same receiver, same stream offset).
    pub duplicated: u64,
    /// Deliveries that filled a gap in their stream's offsets (arrived late).
    pub out_of_order: u64,
}

impl Messages {
    /// Expected deliveries that never arrived.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }

    fn merge(&mut self, o: &Messages) {
        self.sent += o.sent;
        self.send_errors += o.send_errors;
        self.expected += o.expected;
        self.delivered += o.delivered;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
    }
}

/// Collaboration accounting.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CollabCounts {
    /// Documents edited.
    pub documents: u64,
    /// Editors (sessions) that had their document open.
    pub editors: u64,
    /// Operations submitted (resends excluded).
    pub ops_submitted: u64,
    /// Operations acknowledged.
    pub ops_acked: u64,
    /// Operations refused by the server (or failed in transit).
    pub ops_rejected: u64,
    /// Refusals with `RATE_LIMITED`, each operation sent again after the server's
    /// `retry_after_ms` (not counted in `ops_rejected`).
    pub ops_rate_limited: u64,
    /// Documents where some editor's text differs from the server's at the end.
    pub divergent_documents: u64,
    /// Editors that had not caught up with the server's final revision in time.
    pub unsettled_editors: u64,
    /// The server's final revisions, summed over documents.
    pub final_revisions: u64,
}

/// One step of a knee search.
#[derive(Debug, Clone, Serialize)]
pub struct KneeStep {
    /// The rate offered, in deliveries per second.
    pub offered_deliveries_per_sec: f64,
    /// The rate achieved in the measured window.
    pub deliveries_per_sec: f64,
    /// Its p99 latency.
    pub p99_ms: f64,
    /// Deliveries lost.
    pub lost: u64,
    /// Connections dropped during the step.
    pub dropped: u64,
    /// Whether the generator fell behind its schedule.
    pub generator_bound: bool,
    /// Sends that waited for the server to answer earlier requests.
    pub backpressured_sends: u64,
    /// Server CPU microseconds per delivery over the measured window.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Server CPU over the measured window, as a share of one core.
    pub server_cpu_util: Option<f64>,
    /// Whether every SLO held.
    pub pass: bool,
}

/// The knee: the highest rate that met the SLOs.
#[derive(Debug, Clone, Serialize)]
pub struct Knee {
    /// Deliveries per second at the highest passing step (0 when none passed).
    pub deliveries_per_sec: f64,
    /// Every step, in the order run.
    pub steps: Vec<KneeStep>,
}

/// Everything a runner measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections established.
    pub established: u64,
    /// Established connections that closed without the generator closing them.
    pub dropped: u64,
    /// Seconds from the first connect attempt to the last connect finishing.
    pub connect_secs: f64,
    /// Message accounting, for workloads that deliver messages.
    pub messages: Option<Messages>,
    /// Length of the measured window in seconds (for rates).
    pub measured_secs: f64,
    /// End-to-end latency of measured deliveries, in microseconds.
    pub latency: Histogram<u64>,
    /// Collaboration accounting.
    pub collab: Option<CollabCounts>,
    /// Submit-to-acknowledgement latency of operations, in microseconds.
    pub collab_latency: Option<Histogram<u64>>,
    /// The knee search.
    pub knee: Option<Knee>,
    /// Server memory per idle connection, in bytes.
    pub rss_per_conn: Option<f64>,
    /// How far the generator fell behind its schedule.
    pub late: LateSnapshot,
    /// Kind-specific numbers for the report.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for Outcome {
    fn default() -> Self {
        Self {
            attempted: 0,
            established: 0,
            dropped: 0,
            connect_secs: 0.0,
            messages: None,
            measured_secs: 0.0,
            latency: new_histogram(),
            collab: None,
            collab_latency: None,
            knee: None,
            rss_per_conn: None,
            late: LateSnapshot::default(),
            extra: serde_json::Map::new(),
        }
    }
}

impl Outcome {
    /// Combines the outcomes of workloads that ran at the same time.
    pub fn merge(&mut self, prefix: &str, o: Outcome) {
        self.attempted += o.attempted;
        self.established += o.established;
        self.dropped += o.dropped;
        self.connect_secs = self.connect_secs.max(o.connect_secs);
        if let Some(m) = &o.messages {
            self.messages.get_or_insert_with(Messages::default).merge(m);
        }
        self.measured_secs = self.measured_secs.max(o.measured_secs);
        self.latency.add(&o.latency).expect("same bounds");
        if o.collab.is_some() {
            self.collab = o.collab;
            self.collab_latency = o.collab_latency;
        }
        self.late.merge(o.late);
        let mut part = o.extra;
        part.insert("connections_attempted".into(), o.attempted.into());
        part.insert("connections_dropped".into(), o.dropped.into());
        if let Some(m) = o.messages {
            part.insert(
                "messages".into(),
                serde_json::to_value(m).unwrap_or_default(),
            );
        }
        if !o.latency.is_empty() {
            part.insert(
                "p99_ms".into(),
                (o.latency.value_at_quantile(0.99) as f64 / 1000.0).into(),
            );
        }
        self.extra.insert(prefix.into(), part.into());
    }
}
