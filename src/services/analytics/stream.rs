//! Metrics streaming: a session with the `metrics` role subscribes to event types
//! and server metrics, and receives a `MetricsUpdate` on its analytics push stream
//! every interval with only what changed since the previous update:
//! - event types: occurrences since the last update (types with none are left out);
//! - counters and gauges: the current value, when it differs from the last one sent;
//! - histograms: percentiles of the samples recorded during the interval (the
//!   merged histogram minus the one taken at the previous update).
//!
//! One task per subscription; it ends with the subscription, the session, or a full
//! push queue (the gateway then closes the session as a slow consumer).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::{AnalyticsService, validate_type};
use crate::metrics::{Metrics, Percentiles, VALUE_NAMES};
use crate::protocol::ErrorCode;
use crate::protocol::v1;
use crate::services::{ServiceError, ServiceResult, SessionCtx};
use crate::util::Unpoisoned;

/// Event types one subscription may name at most.
const MAX_EVENT_TYPES: usize = 64;
/// Interval bounds, ms.
const MIN_INTERVAL_MS: u32 = 100;
const MAX_INTERVAL_MS: u32 = 60_000;

/// Which event types a subscription follows.
#[derive(Debug, Clone)]
enum Events {
    All,
    Named(Vec<String>),
}

/// The metric names (counters, gauges and `latency.*` histograms) matching the
/// patterns: a name, a prefix ending in `.*`, or `*`.
pub fn resolve_metrics(patterns: &[String]) -> ServiceResult<Vec<String>> {
    let all: Vec<String> = VALUE_NAMES
        .iter()
        .map(|n| (*n).to_owned())
        .chain(Metrics::latency_names())
        .collect();
    let mut out: Vec<String> = Vec::new();
    for p in patterns {
        let matched: Vec<&String> = if p == "*" {
            all.iter().collect()
        } else if let Some(prefix) = p.strip_suffix('*').filter(|s| s.ends_with('.')) {
            all.iter().filter(|n| n.starts_with(prefix)).collect()
        } else {
            all.iter().filter(|n| *n == p).collect()
        };
        if matched.is_empty() {
            return Err(ServiceError::bad_request(format!(
                "unknown metric {p:?} (see docs/OPERATIONS.md)"
            )));
        }
        for m in matched {
            if !out.contains(m) {
                out.push(m.clone());
            }
        }
    }
    Ok(out)
}

impl AnalyticsService {
    /// Starts (or replaces) the session's metrics subscription.
    pub(super) fn subscribe(
        self: &Arc<Self>,
        ctx: &SessionCtx,
        req: v1::MetricsSubscribeRequest,
    ) -> ServiceResult<v1::MetricsSubscribeResponse> {
        let (stream, metrics) = Stream::from_request(self.clone(), &req)?;
        let interval_ms = stream.interval_ms;
        let mut streams = self.streams.locked();
        if let Some(old) = streams.remove(ctx.session_id()) {
            old.abort();
        } else if streams.len() >= self.config.max_metrics_subscribers {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "at most {} metrics subscriptions per node",
                    self.config.max_metrics_subscribers
                ),
            ));
        }
        let task = self.spawn_subscription(ctx, stream, req);
        streams.insert(ctx.session_id().to_owned(), task);
        Ok(v1::MetricsSubscribeResponse {
            interval_ms,
            metrics,
        })
    }

    /// Ends the session's metrics subscription, if any.
    pub(super) fn stop_stream(&self, session_id: &str) {
        if let Some(task) = self.streams.locked().remove(session_id) {
            task.abort();
        }
    }

    /// Totals of the followed event types, by name.
    fn event_totals(&self, events: &Events) -> Vec<(Arc<str>, u64)> {
        let st = self.state();
        match events {
            Events::All => st
                .type_ids()
                .map(|id| (st.names[id as usize].clone(), st.totals[id as usize]))
                .collect(),
            Events::Named(names) => names
                .iter()
                .filter_map(|n| {
                    st.ids
                        .get(n.as_str())
                        .map(|id| (st.names[*id as usize].clone(), st.totals[*id as usize]))
                })
                .collect(),
        }
    }
}

/// One subscription's state: what the client was last told.
pub(super) struct Stream {
    svc: Arc<AnalyticsService>,
    events: Events,
    interval_ms: u32,
    last_events: HashMap<Arc<str>, u64>,
    values: Vec<(&'static str, Option<f64>)>,
    latencies: Vec<(String, Histogram<u64>)>,
    seq: u64,
}

impl Stream {
    /// The stream a subscription asks for (checked), and the metric names it
    /// matched.
    pub(super) fn from_request(
        svc: Arc<AnalyticsService>,
        req: &v1::MetricsSubscribeRequest,
    ) -> ServiceResult<(Self, Vec<String>)> {
        if req.event_types.len() > MAX_EVENT_TYPES {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!("at most {MAX_EVENT_TYPES} event types per subscription"),
            ));
        }
        let events = if req.event_types.iter().any(|t| t == "*") {
            Events::All
        } else {
            for t in &req.event_types {
                validate_type(t)?;
            }
            Events::Named(req.event_types.clone())
        };
        let metrics = resolve_metrics(&req.metrics)?;
        let interval_ms = match req.interval_ms {
            0 => svc.config.metrics_interval.as_millis() as u32,
            n => n,
        }
        .clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS);
        Ok((
            Self::new(svc, events, metrics.clone(), interval_ms),
            metrics,
        ))
    }

    fn new(
        svc: Arc<AnalyticsService>,
        events: Events,
        metrics: Vec<String>,
        interval_ms: u32,
    ) -> Self {
        let m = &svc.deps.metrics;
        let values = VALUE_NAMES
            .iter()
            .filter(|n| metrics.iter().any(|m| m == *n))
            .map(|n| (*n, None))
            .collect();
        // Histograms and event counts start from now: the first update reports what
        // happened during its interval.
        let latencies = metrics
            .iter()
            .filter_map(|n| m.latency(n).map(|l| (n.clone(), l.snapshot())))
            .collect();
        let last_events = svc.event_totals(&events).into_iter().collect();
        Self {
            svc,
            events,
            interval_ms,
            last_events,
            values,
            latencies,
            seq: 0,
        }
    }

    /// Sends an update every interval with something in it, until `send` says
    /// stop (returns false).
    pub(super) async fn run(mut self, mut send: impl FnMut(v1::MetricsUpdate) -> bool) {
        let mut tick = tokio::time::interval(Duration::from_millis(u64::from(self.interval_ms)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(update) = self.update() else {
                continue;
            };
            if !send(update) {
                return;
            }
        }
    }

    /// What changed since the last update, or `None` if nothing did.
    fn update(&mut self) -> Option<v1::MetricsUpdate> {
        let mut events = Vec::new();
        for (name, total) in self.svc.event_totals(&self.events) {
            let last = self.last_events.entry(name.clone()).or_insert(0);
            if total > *last {
                events.push(v1::AnalyticsTypeCount {
                    r#type: name.to_string(),
                    count: total - *last,
                });
                *last = total;
            }
        }
        let metrics = &self.svc.deps.metrics;
        let mut values = Vec::new();
        for (name, last) in &mut self.values {
            let Some(now) = metrics.value(name) else {
                continue;
            };
            if *last != Some(now) {
                values.push(v1::MetricValue {
                    name: (*name).to_owned(),
                    value: now,
                });
                *last = Some(now);
            }
        }
        let mut latencies = Vec::new();
        for (name, last) in &mut self.latencies {
            let Some(l) = metrics.latency(name) else {
                continue;
            };
            let now = l.snapshot();
            if now.len() > last.len() {
                let mut interval = now.clone();
                if interval.subtract(&*last).is_ok() {
                    let p = Percentiles::of(&interval);
                    latencies.push(v1::LatencySummary {
                        name: name.clone(),
                        count: p.count,
                        p50: p.p50_ms,
                        p90: p.p90_ms,
                        p99: p.p99_ms,
                        p999: p.p999_ms,
                        max: p.max_ms,
                    });
                }
                *last = now;
            }
        }
        if events.is_empty() && values.is_empty() && latencies.is_empty() {
            return None;
        }
        self.seq += 1;
        Some(v1::MetricsUpdate {
            seq: self.seq,
            at_ms: self.svc.clock.now_ms(),
            interval_ms: self.interval_ms,
            events,
            values,
            latencies,
            node_id: self.svc.node_id().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_patterns_resolve_to_names() {
        let one = resolve_metrics(&["connections".into()]).unwrap();
        assert_eq!(one, ["connections"]);
        let lat = resolve_metrics(&["latency.*".into()]).unwrap();
        assert!(lat.contains(&"latency.fanout".to_owned()));
        assert!(lat.contains(&"latency.request.chat_send".to_owned()));
        assert!(!lat.contains(&"connections".to_owned()));
        let req = resolve_metrics(&[
            "latency.request.*".into(),
            "latency.request.doc_open".into(),
        ])
        .unwrap();
        assert!(req.iter().all(|n| n.starts_with("latency.request.")));
        assert_eq!(
            req.iter()
                .filter(|n| *n == "latency.request.doc_open")
                .count(),
            1
        );
        let all = resolve_metrics(&["*".into()]).unwrap();
        assert!(all.len() > lat.len());
        for bad in ["nope", "latency.nope", "latency*", "*.x"] {
            assert_eq!(
                resolve_metrics(&[bad.into()]).unwrap_err().code,
                ErrorCode::BadRequest,
                "{bad}"
            );
        }
    }
}
