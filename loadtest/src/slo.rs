//! Service-level objectives: thresholds from the scenario's `[slo]` table and the
//! PASS/FAIL verdict of a run against them.

use serde::{Deserialize, Serialize};

/// `[slo]`: the thresholds a run must meet.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SloSpec {
    /// Connections established and not dropped, in percent of those attempted (above).
    pub connection_stability_pct: f64,
    /// Messages delivered, in percent of those expected (above).
    pub message_delivery_pct: f64,
    /// The 99th percentile of end-to-end latency, in milliseconds (below).
    pub latency_p99_ms: f64,
    /// Operations rejected, in percent of those submitted (below).
    pub collab_conflicts_pct: f64,
    /// Documents whose copies differ from the server's at the end (at most).
    pub divergent_documents: u64,
    /// A send that starts this much later than scheduled counts as late.
    pub late_send_ms: f64,
    /// More than this percentage of late sends marks the run `generator_bound`.
    pub late_sends_pct: f64,
}

impl Default for SloSpec {
    fn default() -> Self {
        Self {
            connection_stability_pct: 99.9,
            message_delivery_pct: 99.99,
            latency_p99_ms: 100.0,
            collab_conflicts_pct: 0.1,
            divergent_documents: 0,
            late_send_ms: 20.0,
            late_sends_pct: 1.0,
        }
    }
}

/// One objective's verdict.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    /// `connection_stability`, `message_delivery`, `latency_p99`, `collab_conflicts`
    /// or `divergent_documents`.
    pub name: &'static str,
    /// The threshold, for people: `"> 99.9%"`.
    pub target: String,
    /// The measured value (percent, milliseconds or a count).
    pub actual: f64,
    /// Whether the objective is met.
    pub pass: bool,
}

/// What the verdicts are computed from.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections established.
    pub established: u64,
    /// Established connections that closed unexpectedly.
    pub dropped: u64,
    /// Deliveries expected and made; `None` when the workload has no such count.
    pub delivery: Option<(u64, u64)>,
    /// The p99 latency in ms, when anything was measured.
    pub p99_ms: Option<f64>,
    /// Operations submitted and rejected, and divergent documents (collaboration only).
    pub collab: Option<(u64, u64, u64)>,
    /// The knee found, in deliveries per second (knee search only; 0: no step passed).
    pub knee: Option<f64>,
}

/// `part` of `whole` in percent; an empty whole is 100%.
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Evaluates every objective that applies to `m`.
pub fn evaluate(spec: &SloSpec, m: &Measured) -> Vec<Verdict> {
    let mut out = Vec::new();
    let stable = percent(m.established.saturating_sub(m.dropped), m.attempted);
    out.push(Verdict {
        name: "connection_stability",
        target: format!("> {}%", spec.connection_stability_pct),
        actual: stable,
        pass: m.attempted > 0 && stable > spec.connection_stability_pct,
    });
    if let Some((expected, delivered)) = m.delivery {
        let actual = percent(delivered.min(expected), expected);
        out.push(Verdict {
            name: "message_delivery",
            target: format!("> {}%", spec.message_delivery_pct),
            actual,
            pass: expected > 0 && actual > spec.message_delivery_pct,
        });
    }
    if let Some(p99) = m.p99_ms {
        out.push(Verdict {
            name: "latency_p99",
            target: format!("< {} ms", spec.latency_p99_ms),
            actual: p99,
            pass: p99 < spec.latency_p99_ms,
        });
    }
    if let Some((submitted, rejected, divergent)) = m.collab {
        let rate = if submitted == 0 {
            0.0
        } else {
            rejected as f64 * 100.0 / submitted as f64
        };
        out.push(Verdict {
            name: "collab_conflicts",
            target: format!("< {}%", spec.collab_conflicts_pct),
            actual: rate,
            pass: submitted > 0 && rate < spec.collab_conflicts_pct,
        });
        out.push(Verdict {
            name: "divergent_documents",
            target: format!("<= {}", spec.divergent_documents),
            actual: divergent as f64,
            pass: divergent <= spec.divergent_documents,
        });
    }
    if let Some(k) = m.knee {
        out.push(Verdict {
            name: "knee_found",
            target: "a passing step".into(),
            actual: k,
            pass: k > 0.0,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[Verdict]) -> Vec<&str> {
        v.iter().map(|v| v.name).collect()
    }

    #[test]
    fn a_clean_chat_run_passes() {
        let v = evaluate(
            &SloSpec::default(),
            &Measured {
                attempted: 1000,
                established: 1000,
                dropped: 0,
                delivery: Some((100_000, 100_000)),
                p99_ms: Some(12.5),
                collab: None,
                knee: None,
            },
        );
        assert_eq!(
            names(&v),
            ["connection_stability", "message_delivery", "latency_p99"]
        );
        assert!(v.iter().all(|v| v.pass), "{v:?}");
        assert_eq!(v[0].target, "> 99.9%");
        assert_eq!(v[2].target, "< 100 ms");
    }

    #[test]
    fn each_threshold_fails_on_its_own() {
        let spec = SloSpec::default();
        let base = Measured {
            attempted: 10_000,
            established: 10_000,
            dropped: 0,
            delivery: Some((1_000_000, 1_000_000)),
            p99_ms: Some(1.0),
            collab: Some((10_000, 0, 0)),
            knee: Some(5000.0),
        };
        let fails = |m: Measured| -> Vec<&'static str> {
            evaluate(&spec, &m)
                .into_iter()
                .filter(|v| !v.pass)
                .map(|v| v.name)
                .collect()
        };
        assert!(fails(base.clone()).is_empty());
        // 99.9% exactly is not above 99.9%.
        assert_eq!(
            fails(Measured {
                dropped: 10,
                ..base.clone()
            }),
            ["connection_stability"]
        );
        assert_eq!(
            fails(Measured {
                delivery: Some((1_000_000, 999_899)),
                ..base.clone()
            }),
            ["message_delivery"]
        );
        assert_eq!(
            fails(Measured {
                p99_ms: Some(100.0),
                ..base.clone()
            }),
            ["latency_p99"]
        );
        assert_eq!(
            fails(Measured {
                collab: Some((10_000, 10, 0)),
                ..base.clone()
            }),
            ["collab_conflicts"]
        );
        assert_eq!(
            fails(Measured {
                collab: Some((10_000, 0, 1)),
                ..base.clone()
            }),
            ["divergent_documents"]
        );
        assert_eq!(
            fails(Measured {
                knee: Some(0.0),
                ..base.clone()
            }),
            ["knee_found"]
        );
    }

    #[test]
    fn nothing_attempted_or_expected_fails() {
        let v = evaluate(
            &SloSpec::default(),
            &Measured {
                delivery: Some((0, 0)),
                ..Default::default()
            },
        );
        assert!(v.iter().all(|v| !v.pass), "{v:?}");
    }
}
