//! The run's report: the final table, the JSON document (every number), the HDR
//! percentile distribution in the standard `.hgrm` text format, and an SVG chart
//! of latency by percentile on a log-scale percentile axis.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tutti::metrics::Percentiles;

use crate::outcome::Outcome;
use crate::slo::Verdict;

/// Facts about the run besides the outcome.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The scenario's name.
    pub scenario: String,
    /// Its kind.
    pub kind: &'static str,
    /// `quic` or `webtransport`.
    pub transport: String,
    /// RFC 3339 start time.
    pub date: String,
    /// The scenario's parameters.
    pub params: Value,
    /// The server's pid, CPU seconds used during the run and RSS at the end.
    pub server: (Option<u32>, Option<f64>, Option<u64>),
    /// The server's own latency histograms (`/api/v1/stats`), when readable.
    pub server_latency: Option<BTreeMap<String, Percentiles>>,
    /// The generator's CPU seconds during the run.
    pub generator_cpu_secs: Option<f64>,
    /// The whole run's wall time in seconds.
    pub wall_secs: f64,
    /// Whether the generator fell behind its schedule.
    pub generator_bound: bool,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Latency percentiles in milliseconds (zeros when nothing was measured).
pub(crate) fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"p50":0.0,"p90":0.0,"p99":0.0,"p999":0.0,"max":0.0,"mean":0.0,"count":0});
    }
    json!({
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "mean": h.mean() / 1000.0,
        "count": h.len(),
    })
}

/// The JSON report (schema in README.md).
pub fn to_json(info: &RunInfo, o: &Outcome, slo: &[Verdict]) -> Value {
    let secs = o.measured_secs.max(1e-9);
    let mut v = json!({
        "system": "tutti",
        "scenario": info.scenario,
        "kind": info.kind,
        "transport": info.transport,
        "date": info.date,
        "params": info.params,
        "connections": {
            "attempted": o.attempted,
            "established": o.established,
            "dropped": o.dropped,
            "connect_secs": o.connect_secs,
            "connects_per_sec": if o.connect_secs > 0.0 { o.established as f64 / o.connect_secs } else { 0.0 },
        },
        "throughput": {
            "deliveries_per_sec": o.messages.map(|m| m.delivered as f64 / secs).unwrap_or(0.0),
            "sends_per_sec": o.messages.map(|m| m.sent as f64 / secs).unwrap_or(0.0),
        },
        "latency_ms": latency_json(&o.latency),
        "server": {
            "pid": info.server.0,
            "cpu_secs": info.server.1,
            "rss_bytes": info.server.2,
            "latency_ms": info.server_latency,
        },
        "generator": {
            "cpu_secs": info.generator_cpu_secs,
            "behind_schedule_max_ms": ms(o.late.max_us),
            "late_sends": o.late.late,
            "scheduled_sends": o.late.scheduled,
            "generator_bound": info.generator_bound,
        },
        "measured_secs": o.measured_secs,
        "wall_secs": info.wall_secs,
        "slo": slo,
        "pass": slo.iter().all(|v| v.pass),
    });
    let m = o.messages.unwrap_or_default();
    v["messages"] = json!({
        "sent": m.sent,
        "send_errors": m.send_errors,
        "expected": m.expected,
        "delivered": m.delivered,
        "lost": m.lost(),
        "duplicated": m.duplicated,
        "out_of_order": m.out_of_order,
    });
    if let Some(c) = &o.collab {
        let mut cj = serde_json::to_value(c).unwrap_or_default();
        cj["conflict_rate"] = json!(if c.ops_submitted == 0 {
            0.0
        } else {
            c.ops_rejected as f64 / c.ops_submitted as f64
        });
        if let Some(h) = &o.collab_latency {
            cj["ack_latency_ms"] = latency_json(h);
        }
        v["collab"] = cj;
    }
    if let Some(r) = o.rss_per_conn {
        v["server"]["rss_per_conn_bytes"] = json!(r);
    }
    if let Some(k) = &o.knee {
        v["knee"] = serde_json::to_value(k).unwrap_or_default();
    }
    if !o.extra.is_empty() {
        v["details"] = Value::Object(o.extra.clone());
    }
    v
}

/// The final table, for people.
pub fn table(info: &RunInfo, o: &Outcome, slo: &[Verdict]) -> String {
    let mut t = String::new();
    let secs = o.measured_secs.max(1e-9);
    let _ = writeln!(
        t,
        "\n{} ({}) over {} — {:.1} s",
        info.scenario, info.kind, info.transport, info.wall_secs
    );
    let _ = writeln!(t, "{}", "─".repeat(64));
    let row = |t: &mut String, k: &str, v: String| {
        let _ = writeln!(t, "  {k:<28} {v}");
    };
    row(
        &mut t,
        "connections",
        format!(
            "{} attempted, {} established, {} dropped",
            o.attempted, o.established, o.dropped
        ),
    );
    if o.connect_secs > 0.0 {
        row(
            &mut t,
            "connect rate",
            format!(
                "{:.0}/s ({:.2} s for all)",
                o.established as f64 / o.connect_secs,
                o.connect_secs
            ),
        );
    }
    if let Some(m) = o.messages {
        row(
            &mut t,
            "messages",
            format!(
                "{} sent ({} failed), {} expected, {} delivered",
                m.sent, m.send_errors, m.expected, m.delivered
            ),
        );
        row(
            &mut t,
            "lost / duplicated / reordered",
            format!("{} / {} / {}", m.lost(), m.duplicated, m.out_of_order),
        );
        row(
            &mut t,
            "throughput",
            format!(
                "{:.0} deliveries/s, {:.0} sends/s (over {:.1} s)",
                m.delivered as f64 / secs,
                m.sent as f64 / secs,
                o.measured_secs
            ),
        );
    }
    if !o.latency.is_empty() {
        let h = &o.latency;
        row(
            &mut t,
            "latency ms",
            format!(
                "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  mean {:.2}",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.9)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max()),
                h.mean() / 1000.0
            ),
        );
    }
    if let Some(c) = &o.collab {
        row(
            &mut t,
            "collaboration",
            format!(
                "{} docs, {} editors: {} ops submitted, {} acked, {} rejected, {} rate-limited and sent again",
                c.documents,
                c.editors,
                c.ops_submitted,
                c.ops_acked,
                c.ops_rejected,
                c.ops_rate_limited
            ),
        );
        row(
            &mut t,
            "divergent documents",
            format!(
                "{} ({} editors unsettled)",
                c.divergent_documents, c.unsettled_editors
            ),
        );
        if let Some(h) = o.collab_latency.as_ref().filter(|h| !h.is_empty()) {
            row(
                &mut t,
                "op ack latency ms",
                format!(
                    "p50 {:.2}  p99 {:.2}  max {:.2}",
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.max())
                ),
            );
        }
    }
    if let Some(k) = &o.knee {
        for (i, s) in k.steps.iter().enumerate() {
            row(
                &mut t,
                &format!("knee step {}", i + 1),
                format!(
                    "offered {:.0}/s achieved {:.0}/s p99 {:.2} ms lost {} server {} {}{}",
                    s.offered_deliveries_per_sec,
                    s.deliveries_per_sec,
                    s.p99_ms,
                    s.lost,
                    s.server_cpu_us_per_delivery
                        .map_or("?".into(), |us| format!("{us:.1} us/delivery")),
                    if s.pass { "PASS" } else { "FAIL" },
                    if s.generator_bound {
                        " (generator bound)"
                    } else {
                        ""
                    }
                ),
            );
        }
        row(
            &mut t,
            "knee",
            format!("{:.0} deliveries/s", k.deliveries_per_sec),
        );
    }
    let (pid, cpu, rss) = info.server;
    if let Some(pid) = pid {
        row(
            &mut t,
            "server",
            format!(
                "pid {pid}, cpu {}, rss {}",
                cpu.map_or("?".into(), |c| format!("{c:.2} s")),
                rss.map_or("?".into(), |r| format!("{:.1} MiB", r as f64 / 1048576.0))
            ),
        );
    }
    // Where the server's time went: a durable commit (fsync) on every chat
    // message, and the fan-out from queued to written.
    for (name, label) in [
        ("commit", "server group commit"),
        ("fanout", "server fan-out"),
    ] {
        if let Some(p) = info
            .server_latency
            .as_ref()
            .and_then(|l| l.get(name))
            .filter(|p| p.count > 0)
        {
            row(
                &mut t,
                label,
                format!(
                    "ms p50 {:.2}  p99 {:.2}  max {:.2}  ({} since start)",
                    p.p50_ms, p.p99_ms, p.max_ms, p.count
                ),
            );
        }
    }
    if let Some(us) = o
        .extra
        .get("server_cpu_us_per_delivery")
        .and_then(|v| v.as_f64())
    {
        let window = o
            .extra
            .get("server_window_cpu_secs")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        row(
            &mut t,
            "server cpu per delivery",
            format!(
                "{us:.1} us (measured window: {window:.2} s cpu, {:.0}% of a core)",
                100.0 * window / o.measured_secs.max(1e-9)
            ),
        );
    }
    if let Some(acks) = o
        .extra
        .get("client_acks_per_delivery")
        .and_then(|v| v.as_f64())
    {
        row(&mut t, "client acks per delivery", format!("{acks:.2}"));
    }
    if let Some(n) = o
        .extra
        .get("client_ack_frequency_requests")
        .and_then(|v| v.as_u64())
        .filter(|n| *n > 0)
    {
        row(&mut t, "ack-frequency requests", n.to_string());
    }
    for name in ["resumed", "full"] {
        let get = |k: String| o.extra.get(&k).and_then(|v| v.as_f64());
        if let Some(rate) = get(format!("reconnect_{name}_per_sec")) {
            row(
                &mut t,
                &format!("reconnect storm, {name}"),
                format!(
                    "{rate:.0}/s ({} connected), cpu per connect: server {}, generator {}",
                    get(format!("reconnect_{name}_established")).unwrap_or(0.0),
                    get(format!("server_cpu_ms_per_{name}_connect"))
                        .map_or("?".into(), |ms| format!("{ms:.2} ms")),
                    get(format!("generator_cpu_ms_per_{name}_connect"))
                        .map_or("?".into(), |ms| format!("{ms:.2} ms"))
                ),
            );
        }
    }
    let idle_cpu = |side: &str| {
        o.extra
            .get(&format!("{side}_idle_cpu_us_per_conn_per_sec"))
            .and_then(|v| v.as_f64())
    };
    if let Some(server) = idle_cpu("server") {
        row(
            &mut t,
            "cpu per idle connection",
            format!(
                "server {server:.2} us/s, generator {}",
                idle_cpu("generator").map_or("?".into(), |g| format!("{g:.2} us/s"))
            ),
        );
    }
    if let Some(r) = o.rss_per_conn {
        row(
            &mut t,
            "server memory per connection",
            format!("{:.1} KiB", r / 1024.0),
        );
    }
    row(
        &mut t,
        "generator",
        format!(
            "cpu {}, behind schedule max {:.1} ms, {} of {} sends late{}",
            info.generator_cpu_secs
                .map_or("?".into(), |c| format!("{c:.2} s")),
            ms(o.late.max_us),
            o.late.late,
            o.late.scheduled,
            if info.generator_bound {
                " — GENERATOR BOUND"
            } else {
                ""
            }
        ),
    );
    let _ = writeln!(t, "{}", "─".repeat(64));
    for v in slo {
        let _ = writeln!(
            t,
            "  {:<4} {:<22} {:>12.4}  target {}",
            if v.pass { "PASS" } else { "FAIL" },
            v.name,
            v.actual,
            v.target
        );
    }
    let _ = writeln!(
        t,
        "  => {}",
        if slo.iter().all(|v| v.pass) {
            "PASS"
        } else {
            "FAIL"
        }
    );
    t
}

/// The percentile distribution in HdrHistogram's `.hgrm` text format, values in
/// milliseconds (the histogram holds microseconds).
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = ms(h.highest_equivalent(v.value_iterated_to()));
            if q < 1.0 {
                let _ = writeln!(
                    out,
                    "{value:12.3} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let (mean, sd, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / 1000.0, h.stdev() / 1000.0, ms(h.max()))
    };
    let _ = writeln!(out, "#[Mean    = {mean:12.3}, StdDeviation   = {sd:12.3}]");
    let _ = writeln!(
        out,
        "#[Max     = {max:12.3}, Total count    = {:12}]",
        h.len()
    );
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    );
    out
}

/// An SVG chart of latency by percentile: x is `1/(1-percentile)` on a log scale
/// (0%, 90%, 99%, 99.9%, ...), y is milliseconds; a dashed line marks the p99 SLO.
pub fn svg(h: &Histogram<u64>, title: &str, slo_p99_ms: f64) -> String {
    let (w, ht) = (960.0, 540.0);
    let (left, right, top, bottom) = (80.0, 30.0, 60.0, 70.0);
    let pw = w - left - right;
    let ph = ht - top - bottom;
    // Decades of the x axis: enough for the sample count, at least 3 (99.9%).
    let decades = ((h.len().max(1) as f64).log10().ceil()).clamp(3.0, 6.0);
    let mut points: Vec<(f64, f64)> = Vec::new();
    if !h.is_empty() {
        for v in h.iter_quantiles(10) {
            let q = v.quantile_iterated_to();
            let x = if q >= 1.0 {
                decades
            } else {
                (1.0 / (1.0 - q)).log10().min(decades)
            };
            points.push((x, ms(h.highest_equivalent(v.value_iterated_to()))));
        }
    }
    let max_ms = points.iter().map(|p| p.1).fold(1e-3, f64::max);
    let ymax = nice_ceiling(
        max_ms.max(if slo_p99_ms < max_ms * 3.0 {
            slo_p99_ms
        } else {
            0.0
        }) * 1.08,
    );
    let sx = |x: f64| left + x / decades * pw;
    let sy = |y: f64| top + ph - (y / ymax) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{ht}" viewBox="0 0 {w} {ht}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="30" text-anchor="middle" font-size="17">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    // Vertical grid: one line per decade.
    for d in 0..=(decades as u32) {
        let x = sx(f64::from(d));
        let label = match d {
            0 => "0%".to_string(),
            _ => {
                let p = 100.0 - 100.0 / 10f64.powi(d as i32);
                format!("{}%", trim_float(p))
            }
        };
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            top + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            top + ph + 20.0
        );
    }
    // Horizontal grid: five steps.
    for i in 0..=5 {
        let y = ymax * f64::from(i) / 5.0;
        let py = sy(y);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/>"##,
            left + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 8.0,
            py + 4.0,
            trim_float(y)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        left + pw / 2.0,
        ht - 20.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">latency (ms)</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    if slo_p99_ms <= ymax {
        let py = sy(slo_p99_ms);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#c33" stroke-dasharray="6 4"/>"##,
            left + pw
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#c33">p99 SLO {} ms</text>"##,
            left + pw - 4.0,
            py - 5.0,
            trim_float(slo_p99_ms)
        );
    }
    if !points.is_empty() {
        let mut path = String::new();
        for (i, (x, y)) in points.iter().enumerate() {
            let _ = write!(
                path,
                "{}{:.1},{:.1}",
                if i == 0 { "M" } else { " L" },
                sx(*x),
                sy(*y)
            );
        }
        let _ = writeln!(
            s,
            r##"<path d="{path}" fill="none" stroke="#1f6feb" stroke-width="2"/>"##
        );
    } else {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">no latency recorded</text>"#,
            left + pw / 2.0,
            top + ph / 2.0
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    s.push_str("</svg>\n");
    s
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Now as RFC 3339 in UTC (`2026-05-01T12:00:00Z`).
pub fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the Unix epoch as RFC 3339 in UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_histogram;

    fn sample() -> Histogram<u64> {
        let mut h = new_histogram();
        for i in 1..=10_000u64 {
            h.record(i * 10).unwrap(); // 10 µs .. 100 ms
        }
        h
    }

    #[test]
    fn hgrm_has_the_standard_shape() {
        let text = hgrm(&sample());
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap(),
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines.next().unwrap(), "");
        let first: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(first.len(), 4);
        assert_eq!(first[1], "0.000000000000");
        assert_eq!(first[3], "1.00");
        let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        let last: Vec<&str> = body.last().unwrap().split_whitespace().collect();
        assert_eq!(last.len(), 3, "the 100% line has no 1/(1-p)");
        assert_eq!(last[1], "1.000000000000");
        assert_eq!(last[2], "10000");
        let max: f64 = last[0].parse().unwrap();
        assert!((max - 100.0).abs() < 0.1, "{max}");
        assert!(
            text.contains("#[Max     =      100.031, Total count    =        10000]"),
            "{text}"
        );
        assert!(text.contains("SubBuckets     =         2048]"));
        // Percentile column increases, counts too.
        let rows: Vec<(f64, u64)> = body[2..]
            .iter()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[1].parse().unwrap(), f[2].parse().unwrap())
            })
            .collect();
        assert!(
            rows.windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
    }

    #[test]
    fn empty_histograms_still_write_valid_files() {
        let h = new_histogram();
        assert!(hgrm(&h).contains("Total count    =            0"));
        let s = svg(&h, "empty", 100.0);
        assert!(s.contains("no latency recorded"));
    }

    #[test]
    fn svg_is_a_chart() {
        let s = svg(&sample(), "chat <fan-out>", 100.0);
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert!(s.contains("chat &lt;fan-out&gt;"));
        assert!(s.contains(">99.99%<"));
        assert!(s.contains("p99 SLO 100 ms"));
        assert!(s.contains("<path d=\"M"));
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
        assert_eq!(nice_ceiling(31.0), 50.0);
    }
}
