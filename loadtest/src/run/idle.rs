//! Idle connections: open `connections` sessions, hold them, and report the connect
//! rate and the server's resident memory per connection (RSS growth from before the
//! first connect to the end of the hold, divided by the connections established).

use std::time::Duration;

use super::{Ctx, connect_all, ended, join_within};
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
    let users: Vec<String> = (0..p.connections).map(|i| ctx.user("idle", i)).collect();
    live().set_phase(format!("idle: connecting {}", p.connections));
    let mut pool = connect_all(&ctx.target, &users, p.ramp_up, p.connect_concurrency).await;
    let watchers: Vec<_> = pool
        .connected()
        .map(|(_, c)| {
            let (c, closing, dropped) = (c.clone(), pool.closing.clone(), pool.dropped.clone());
            tokio::spawn(async move {
                while c.next_event().await.is_some() {}
                drop(c);
                ended(&closing, &dropped);
            })
        })
        .collect();
    live().set_phase(format!("idle: holding {} connections", pool.established));
    tokio::time::sleep(p.hold).await;
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
    pool.close_all();
    join_within(watchers, Duration::from_secs(5)).await;
    Ok(o)
}
