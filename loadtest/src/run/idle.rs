//! Idle connections: open `connections` sessions, hold them, and report the connect
//! rate, the server's resident memory per connection (RSS growth from before the
//! first connect to the end of the hold, divided by the connections established),
//! and what holding them costs: the CPU of the server and of this generator over
//! the last two thirds of the hold, per connection and second (keep-alives,
//! acknowledgements, timers).

use std::time::Duration;

use tutti::client::ClientConfig;

use super::{Ctx, Pool, connect_configs, ended, join_within};
use crate::outcome::Outcome;
use crate::procstat;
use crate::stats::live;

/// The `idle` scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let p = &ctx.scenario.idle;
    let limit = procstat::raise_nofile_limit();
    if let Some(l) = limit
        && l < p.connections as u64 + 256
    {
        anyhow::bail!(
            "the open-file limit is {l}, too low for {} connections (each is one UDP socket): \
             raise it with `ulimit -n {}`",
            p.connections,
            p.connections + 1024
        );
    }
    let pid = ctx.target.server_pid;
    let rss_before = pid.and_then(procstat::rss_bytes);
    let configs: Vec<Option<ClientConfig>> = (0..p.connections)
        .map(|i| ctx.target.client_config(&ctx.user("idle", i)).ok())
        .collect();
    live().set_phase(format!("idle: connecting {}", p.connections));
    let mut pool = connect_configs(&configs, p.ramp_up, p.connect_concurrency).await;
    let watchers = watch(&pool);
    live().set_phase(format!("idle: holding {} connections", pool.established));
    let pids = ctx.target.server_pids();
    // The first third of the hold lets the connects' tail settle; the CPU of
    // holding them is measured over the rest.
    tokio::time::sleep(p.hold / 3).await;
    let (held_from, started) = (cpu_now(&pids), std::time::Instant::now());
    tokio::time::sleep(p.hold - p.hold / 3).await;
    let (held_to, held_secs) = (cpu_now(&pids), started.elapsed().as_secs_f64());
    let rss_after = pid.and_then(procstat::rss_bytes);
    let mut o = Outcome {
        attempted: pool.attempted,
        established: pool.established,
        dropped: pool.dropped.get(),
        connect_secs: pool.connect_secs,
        ..Outcome::default()
    };
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        o.rss_per_conn = Some(a.saturating_sub(b) as f64 / pool.established.max(1) as f64);
        o.extra.insert("server_rss_before_bytes".into(), b.into());
        o.extra.insert("server_rss_after_bytes".into(), a.into());
    }
    if let Some(l) = limit {
        o.extra.insert("open_file_limit".into(), l.into());
    }
    for (side, from, to) in [
        ("server", held_from.0, held_to.0),
        ("generator", held_from.1, held_to.1),
    ] {
        if let (Some(from), Some(to)) = (from, to)
            && pool.established > 0
            && held_secs > 0.0
        {
            let us = (to - from) * 1e6 / held_secs / pool.established as f64;
            o.extra
                .insert(format!("{side}_idle_cpu_us_per_conn_per_sec"), us.into());
        }
    }
    pool.close_all();
    join_within(watchers, Duration::from_secs(5)).await;
    if p.reconnect {
        // Resumed: the same configs hold the sessions of the first connects.
        let resumed = storm(ctx, &configs, "resumed").await;
        // Full: the same clients without their sessions.
        let fresh: Vec<Option<ClientConfig>> = configs
            .iter()
            .map(|c| c.clone().map(ClientConfig::with_new_tls_sessions))
            .collect();
        let full = storm(ctx, &fresh, "full").await;
        for (name, storm) in [("resumed", resumed), ("full", full)] {
            o.extra
                .insert(format!("reconnect_{name}_per_sec"), storm.rate.into());
            o.extra.insert(
                format!("reconnect_{name}_established"),
                storm.established.into(),
            );
            if let Some(ms) = storm.server_cpu_ms {
                o.extra
                    .insert(format!("server_cpu_ms_per_{name}_connect"), ms.into());
            }
            if let Some(ms) = storm.generator_cpu_ms {
                o.extra
                    .insert(format!("generator_cpu_ms_per_{name}_connect"), ms.into());
            }
        }
    }
    Ok(o)
}

/// Watches each connection of `pool` until it ends.
fn watch(pool: &Pool) -> Vec<tokio::task::JoinHandle<()>> {
    pool.connected()
        .map(|(_, c)| {
            let (c, closing, dropped) = (c.clone(), pool.closing.clone(), pool.dropped.clone());
            tokio::spawn(async move {
                while c.next_event().await.is_some() {}
                drop(c);
                ended(&closing, &dropped);
            })
        })
        .collect()
}

/// CPU seconds so far of the server's processes and of this generator.
fn cpu_now(server_pids: &[u32]) -> (Option<f64>, Option<f64>) {
    (
        procstat::cpu_secs_of(server_pids),
        procstat::cpu_secs(std::process::id()),
    )
}

/// What one reconnect storm measured.
struct Storm {
    /// Connects per second.
    rate: f64,
    /// The server's CPU milliseconds per connect.
    server_cpu_ms: Option<f64>,
    /// This generator's CPU milliseconds per connect: a client's side of the same
    /// handshakes. On shared cores it bounds the rate as much as the server does.
    generator_cpu_ms: Option<f64>,
    /// How many connected.
    established: u64,
}

/// Reconnects every client at once (no ramp), measures it, then closes them again.
async fn storm(ctx: &Ctx, configs: &[Option<ClientConfig>], label: &str) -> Storm {
    let p = &ctx.scenario.idle;
    let pids = ctx.target.server_pids();
    live().set_phase(format!("idle: reconnecting all ({label} handshakes)"));
    let before = cpu_now(&pids);
    let mut pool = connect_configs(configs, Duration::ZERO, p.connect_concurrency).await;
    let after = cpu_now(&pids);
    let per_connect = |b: Option<f64>, a: Option<f64>| match (b, a) {
        (Some(b), Some(a)) if pool.established > 0 => {
            Some((a - b) * 1000.0 / pool.established as f64)
        }
        _ => None,
    };
    let storm = Storm {
        rate: pool.established as f64 / pool.connect_secs.max(1e-9),
        server_cpu_ms: per_connect(before.0, after.0),
        generator_cpu_ms: per_connect(before.1, after.1),
        established: pool.established,
    };
    let watchers = watch(&pool);
    pool.close_all();
    join_within(watchers, Duration::from_secs(5)).await;
    storm
}
