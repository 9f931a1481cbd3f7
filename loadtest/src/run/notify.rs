//! Notification burst: `users` sessions are connected, then `users × per_user`
//! notifications are created through the server API (`POST /api/v1/notifications`,
//! API key) over `http_connections` keep-alive connections, at `rate` per second or
//! as fast as they go. Each notification's title carries the payload header, so
//! the receiving session measures creation-to-push latency and offsets.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tutti::client::{Client, Event};
use tutti::protocol::v1::{StreamKind, push};

use super::{Ctx, connect_all, ended, join_within};
use crate::http::HttpConn;
use crate::outcome::{Messages, Outcome};
use crate::scenario::NotifyParams;
use crate::stats::{
    Counter, Header, Latencies, OffsetTracker, Seen, encode_payload, live, now_us, parse_payload,
};

#[derive(Debug, Default)]
struct Shared {
    delivered: Counter,
    duplicated: Counter,
    out_of_order: Counter,
    latency: Latencies,
}

/// The `notify_burst` scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Outcome> {
    run_with(ctx, &ctx.scenario.notify, "notify").await
}

/// A notification burst with `p`.
pub async fn run_with(ctx: &Ctx, p: &NotifyParams, tag: &str) -> anyhow::Result<Outcome> {
    let http = ctx
        .target
        .http
        .context("the notification burst needs the HTTP port (--http, or --spawn)")?;
    let key = ctx
        .target
        .api_key
        .clone()
        .context("the notification burst needs the API key (--api-key or TUTTI_API_KEY)")?;
    let users: Vec<String> = (0..p.users).map(|i| ctx.user(tag, i)).collect();
    live().set_phase(format!("{tag}: connecting {}", p.users));
    let mut pool = connect_all(&ctx.target, &users, p.ramp_up, 64).await;
    let shared = Arc::new(Shared::default());
    let receivers: Vec<_> = pool
        .connected()
        .map(|(i, c)| {
            tokio::spawn(receiver(
                c.clone(),
                i,
                shared.clone(),
                pool.closing.clone(),
                pool.dropped.clone(),
            ))
        })
        .collect();
    let targets: Arc<Vec<(usize, String)>> = Arc::new(
        pool.connected()
            .map(|(i, _)| (i, users[i].clone()))
            .collect(),
    );
    let total = (targets.len() * p.per_user) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(Counter::default());
    let errors = Arc::new(Counter::default());
    let base = tokio::time::Instant::now();
    live().set_phase(format!("{tag}: posting {total} notifications"));
    let started = std::time::Instant::now();
    let mut workers = Vec::new();
    for _ in 0..p.http_connections {
        let (targets, next, sent, errors, key) = (
            targets.clone(),
            next.clone(),
            sent.clone(),
            errors.clone(),
            key.clone(),
        );
        let (rate, payload) = (p.rate, p.payload_bytes);
        workers.push(tokio::spawn(async move {
            let mut conn = HttpConn::connect(http).await.ok();
            let mut title = String::with_capacity(64);
            let mut body = String::with_capacity(payload + 256);
            let pad = "x".repeat(payload);
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= total {
                    break;
                }
                if rate > 0.0 {
                    tokio::time::sleep_until(base + Duration::from_secs_f64(j as f64 / rate))
                        .await;
                }
                let (idx, user) = &targets[(j % targets.len() as u64) as usize];
                encode_payload(
                    &mut title,
                    &Header {
                        phase: 1,
                        measured: true,
                        sender: *idx as u32,
                        seq: j,
                        sent_us: now_us(),
                    },
                    0,
                );
                body.clear();
                body.push_str(&format!(
                    "{{\"user_id\":\"{user}\",\"kind\":\"load\",\"title\":\"{title}\",\"body\":\"{pad}\"}}"
                ));
                sent.inc();
                live().sends.inc();
                let ok = match conn.as_mut() {
                    Some(c) => matches!(
                        c.request("POST", "/api/v1/notifications", Some(&body), Some(&key))
                            .await,
                        Ok((201, _))
                    ),
                    None => false,
                };
                if !ok {
                    errors.inc();
                    live().errors.inc();
                    // Reconnect for the next one (the connection may be broken).
                    conn = HttpConn::connect(http).await.ok();
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let post_secs = started.elapsed().as_secs_f64();
    live().set_phase(format!("{tag}: draining"));
    let expected = sent.get();
    let end = tokio::time::Instant::now() + p.drain;
    while tokio::time::Instant::now() < end && shared.delivered.get() < expected {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut o = Outcome {
        attempted: pool.attempted,
        established: pool.established,
        dropped: pool.dropped.get(),
        connect_secs: pool.connect_secs,
        messages: Some(Messages {
            sent: sent.get(),
            send_errors: errors.get(),
            expected,
            delivered: shared.delivered.get(),
            duplicated: shared.duplicated.get(),
            out_of_order: shared.out_of_order.get(),
        }),
        measured_secs: post_secs,
        latency: shared.latency.merged(),
        ..Outcome::default()
    };
    o.extra.insert(
        "posts_per_sec".into(),
        (sent.get() as f64 / post_secs.max(1e-9)).into(),
    );
    pool.close_all();
    join_within(receivers, Duration::from_secs(5)).await;
    Ok(o)
}

async fn receiver(
    client: Arc<Client>,
    idx: usize,
    shared: Arc<Shared>,
    closing: Arc<AtomicBool>,
    dropped: Arc<Counter>,
) {
    let mut offsets: HashMap<String, OffsetTracker> = HashMap::new();
    while let Some(ev) = client.next_event().await {
        let Event::Push(StreamKind::Notifications, p) = ev else {
            continue;
        };
        let Some(push::Event::Notification(n)) = p.event else {
            continue;
        };
        live().deliveries.inc();
        match offsets.entry(p.stream).or_default().observe(n.offset) {
            Seen::Duplicate => {
                shared.duplicated.inc();
                continue;
            }
            Seen::OutOfOrder => shared.out_of_order.inc(),
            Seen::New => {}
        }
        if let Some(h) = parse_payload(&n.title) {
            shared.delivered.inc();
            shared
                .latency
                .record(idx, now_us().saturating_sub(h.sent_us));
        }
    }
    drop(client);
    ended(&closing, &dropped);
}
