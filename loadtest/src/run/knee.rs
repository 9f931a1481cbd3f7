//! The knee search: chat fan-out on one set of connections, stepping the offered
//! rate up by `factor` until a step breaks an SLO (delivery, p99 latency, or a
//! dropped connection), then `bisections` geometric bisections between the last
//! passing and the first failing rate. The knee is the highest passing rate.
//! Before every step after the first, the run waits (at most `SETTLE_MAX`, 60 s)
//! until no message has arrived for `SETTLE_QUIET` (1 s): a failed step leaves a
//! backlog in the server, which would otherwise be charged to the next step (the
//! Socket.IO baseline's `load.js` waits the same way).

use super::Ctx;
use super::chat::{Phase, World, setup};
use crate::outcome::{Knee, KneeStep, Outcome};
use crate::slo::percent;
use crate::stats::{Counter, live};
use std::time::Duration;

/// How long no message may arrive before the next step starts.
const SETTLE_QUIET: Duration = Duration::from_secs(1);
/// The longest wait for a backlog to flush before a step.
const SETTLE_MAX: Duration = Duration::from_secs(60);

/// The `knee` scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let p = &ctx.scenario.chat;
    let k = &ctx.scenario.knee;
    let world = setup(ctx, p, "knee").await?;
    let mut steps = Vec::new();
    let mut best: Option<(f64, Phase)> = None;
    let mut last = None;
    let (mut lo, mut hi) = (None, None);
    let mut rate = k.start_deliveries_per_sec;
    for _ in 0..k.max_steps {
        let (step, phase) = step(ctx, &world, rate, steps.len() + 1).await;
        let pass = step.pass;
        steps.push(step);
        if pass {
            best = Some((rate, phase));
            lo = Some(rate);
            rate *= k.factor;
        } else {
            hi = Some(rate);
            last = Some(phase);
            break;
        }
    }
    if hi.is_none() && lo.is_some() {
        tracing::warn!(
            rate = lo,
            "every step passed: the knee is above the last one (raise knee.max_steps)"
        );
    }
    if let (Some(mut l), Some(mut h)) = (lo, hi) {
        // Geometric bisections: the ladder is a ratio ladder, and each one takes the
        // square root of the ratio between the last passing and first failing rate.
        for _ in 0..k.bisections {
            let mid = f64::sqrt(l * h);
            let (step, phase) = step(ctx, &world, mid, steps.len() + 1).await;
            if step.pass {
                best = Some((mid, phase));
                l = mid;
            } else {
                h = mid;
            }
            steps.push(step);
        }
    }
    let mut o = Outcome::default();
    world.connections(&mut o);
    let shown = best.as_ref().map(|(_, ph)| ph.clone()).or(last);
    if let Some(ph) = shown {
        o.messages = Some(ph.messages);
        o.latency = ph.latency;
        o.measured_secs = ph.measured_secs;
        o.late = ph.late;
    }
    o.knee = Some(Knee {
        deliveries_per_sec: best
            .map(|(_, ph)| ph.messages.delivered as f64 / ph.measured_secs)
            .unwrap_or(0.0),
        steps,
    });
    world.teardown().await;
    Ok(o)
}

/// Runs one step at `rate` deliveries per second and judges it.
async fn step(ctx: &Ctx, world: &World, rate: f64, n: usize) -> (KneeStep, Phase) {
    let p = &ctx.scenario.chat;
    let k = &ctx.scenario.knee;
    let slo = &ctx.scenario.slo;
    let per_client = rate / (world.established().max(1) as f64 * p.room_size as f64);
    let before = world.dropped();
    let label = format!("knee step {n} ({rate:.0} deliveries/s)");
    if n > 1 {
        live().set_phase(format!("{label}: waiting for the last step's backlog"));
        let waited = settle(&live().deliveries).await;
        if waited > SETTLE_QUIET + Duration::from_millis(500) {
            tracing::info!(?waited, "the previous step's backlog flushed");
        }
    }
    let phase = world
        .phase(&label, per_client, k.step_warm_up, k.step_measure, p.drain)
        .await;
    let dropped = world.dropped() - before;
    let m = &phase.messages;
    let p99 = if phase.latency.is_empty() {
        f64::INFINITY
    } else {
        phase.latency.value_at_quantile(0.99) as f64 / 1000.0
    };
    let delivered_pct = percent(m.delivered.min(m.expected), m.expected);
    let generator_bound = phase.late.scheduled > 0
        && percent(phase.late.late, phase.late.scheduled) > slo.late_sends_pct;
    let pass = m.expected > 0
        && delivered_pct > slo.message_delivery_pct
        && p99 < slo.latency_p99_ms
        && dropped == 0;
    tracing::info!(rate, p99, delivered_pct, pass, generator_bound, "knee step");
    let step = KneeStep {
        offered_deliveries_per_sec: rate,
        deliveries_per_sec: m.delivered as f64 / phase.measured_secs,
        p99_ms: if p99.is_finite() { p99 } else { -1.0 },
        lost: m.lost(),
        dropped,
        generator_bound,
        backpressured_sends: phase.backpressured,
        server_cpu_us_per_delivery: phase.server_cpu_us_per_delivery(),
        server_cpu_util: phase.window_cpu.map(|(s, _)| s / phase.measured_secs),
        pass,
    };
    (step, phase)
}

/// Waits until `arrivals` (messages received) has not moved for [`SETTLE_QUIET`],
/// at most [`SETTLE_MAX`]; returns how long it waited.
async fn settle(arrivals: &Counter) -> Duration {
    let start = tokio::time::Instant::now();
    let mut seen = arrivals.get();
    let mut quiet_since = start;
    while start.elapsed() < SETTLE_MAX {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = arrivals.get();
        if now != seen {
            seen = now;
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() >= SETTLE_QUIET {
            break;
        }
    }
    start.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Counts one arrival every 100 ms for `for_how_long`.
    fn arriving(arrivals: &Arc<Counter>, for_how_long: Duration) -> tokio::task::JoinHandle<()> {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + for_how_long;
            while tokio::time::Instant::now() < end {
                arrivals.inc();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_run_starts_the_next_step_after_one_quiet_second() {
        let waited = settle(&Counter::default()).await;
        assert!(waited >= SETTLE_QUIET && waited < SETTLE_QUIET + Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_waited_out_until_a_second_after_its_last_message() {
        let arrivals = Arc::new(Counter::default());
        let backlog = arriving(&arrivals, Duration::from_secs(3));
        let waited = settle(&arrivals).await;
        backlog.await.unwrap();
        let after = Duration::from_secs(3) + SETTLE_QUIET;
        assert!(
            waited >= after && waited < after + Duration::from_millis(300),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_that_never_ends_is_waited_for_at_most_a_minute() {
        let arrivals = Arc::new(Counter::default());
        let endless = arriving(&arrivals, SETTLE_MAX * 2);
        let waited = settle(&arrivals).await;
        endless.abort();
        assert!(
            waited >= SETTLE_MAX && waited < SETTLE_MAX + Duration::from_millis(200),
            "{waited:?}"
        );
    }
}
