//! Presence churn: groups of users share a room, so they watch each other's
//! presence. Watchers stay connected; churners connect, change their status
//! (alternating AWAY and DO_NOT_DISTURB, so every change is a change), disconnect,
//! pause, and again, until the storm ends. Every acknowledged change is expected at
//! every connected watcher of the group; the latency is from the request to the
//! watcher receiving the new state.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tutti::client::{Client, ClientError, Event};
use tutti::protocol::v1::{self, PresenceStatus, StreamKind, push, request};
use tutti::util::Unpoisoned;

use super::{Ctx, connect_all, ended, join_within};
use crate::outcome::{Messages, Outcome};
use crate::scenario::PresenceParams;
use crate::stats::{Counter, Latencies, live, now_us};

/// The last change each churner asked for: (status, version, send time).
type Changes = Mutex<HashMap<String, (i32, u64, u64)>>;

#[derive(Debug, Default)]
struct Shared {
    changes: Changes,
    delivered: Counter,
    latency: Latencies,
    attempted: Counter,
    established: Counter,
    dropped: Counter,
    sets: Counter,
    set_errors: Counter,
    expected: Counter,
}

/// The `presence_churn` scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Outcome> {
    run_with(ctx, &ctx.scenario.presence, "presence").await
}

/// Presence churn with `p`.
pub async fn run_with(ctx: &Ctx, p: &PresenceParams, tag: &str) -> anyhow::Result<Outcome> {
    let watcher = |g: usize, i: usize| ctx.user(&format!("{tag}{g}w"), i);
    let churner = |g: usize, i: usize| ctx.user(&format!("{tag}{g}c"), i);
    let watchers: Vec<String> = (0..p.groups)
        .flat_map(|g| (0..p.watchers_per_group).map(move |i| (g, i)))
        .map(|(g, i)| watcher(g, i))
        .collect();
    live().set_phase(format!("{tag}: connecting {} watchers", watchers.len()));
    let mut pool = connect_all(&ctx.target, &watchers, Duration::from_secs(1), 64).await;
    let shared = Arc::new(Shared::default());
    let mut connected_watchers = vec![0u64; p.groups];
    for (i, _) in pool.connected() {
        connected_watchers[i / p.watchers_per_group] += 1;
    }
    // One room per group, created by its first connected watcher.
    live().set_phase(format!("{tag}: creating {} rooms", p.groups));
    for g in 0..p.groups {
        let Some(creator) = (0..p.watchers_per_group)
            .find_map(|i| pool.clients[g * p.watchers_per_group + i].clone())
        else {
            continue;
        };
        let me = creator.welcome().user_id.clone();
        let participants = (0..p.watchers_per_group)
            .map(|i| watcher(g, i))
            .chain((0..p.churners_per_group).map(|i| churner(g, i)))
            .filter(|u| *u != me)
            .collect();
        creator
            .request(request::Body::RoomCreate(v1::RoomCreateRequest {
                room_id: format!("{}-{tag}-g{g}", ctx.run_id),
                name: String::new(),
                participants,
            }))
            .await
            .map_err(|e| anyhow::anyhow!("creating a presence room: {e}"))?;
    }
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
    live().set_phase(format!("{tag}: churning for {:?}", p.duration));
    let started = std::time::Instant::now();
    let end = tokio::time::Instant::now() + p.duration;
    let mut churners = Vec::new();
    for (g, &watchers) in connected_watchers.iter().enumerate() {
        for i in 0..p.churners_per_group {
            let user = churner(g, i);
            let config = ctx.target.client_config(&user)?;
            let shared = shared.clone();
            let p = p.clone();
            // Stagger the churners over one session length.
            let offset = p.session.mul_f64(
                (g * p.churners_per_group + i) as f64 / (p.groups * p.churners_per_group) as f64,
            );
            churners.push(tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut away = true;
                while tokio::time::Instant::now() < end {
                    shared.attempted.inc();
                    live().attempted.inc();
                    let Ok(client) = Client::connect(config.clone()).await else {
                        live().errors.inc();
                        tokio::time::sleep(p.pause).await;
                        continue;
                    };
                    shared.established.inc();
                    live().connected.inc();
                    let per_change = p.session / p.status_changes.max(1) as u32;
                    let mut lost = false;
                    for _ in 0..p.status_changes {
                        let status = if away {
                            PresenceStatus::Away
                        } else {
                            PresenceStatus::DoNotDisturb
                        };
                        away = !away;
                        let sent = now_us();
                        {
                            let mut ch = shared.changes.locked();
                            let e = ch.entry(user.clone()).or_insert((0, 0, 0));
                            *e = (status as i32, e.1 + 1, sent);
                        }
                        shared.sets.inc();
                        live().sends.inc();
                        match client
                            .request(request::Body::PresenceSet(v1::PresenceSetRequest {
                                status: status as i32,
                            }))
                            .await
                        {
                            Ok(_) => shared.expected.add(watchers),
                            Err(e) => {
                                shared.set_errors.inc();
                                live().errors.inc();
                                if matches!(e, ClientError::Closed(_) | ClientError::Timeout) {
                                    lost = true;
                                    break;
                                }
                            }
                        }
                        tokio::time::sleep(per_change).await;
                    }
                    if lost {
                        shared.dropped.inc();
                    }
                    client.close();
                    drop(client);
                    live().connected.dec();
                    tokio::time::sleep(p.pause).await;
                }
            }));
        }
    }
    for c in churners {
        let _ = c.await;
    }
    let churn_secs = started.elapsed().as_secs_f64();
    // Let the last announcements arrive.
    let drain_end = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < drain_end && shared.delivered.get() < shared.expected.get()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut o = Outcome {
        attempted: pool.attempted + shared.attempted.get(),
        established: pool.established + shared.established.get(),
        dropped: pool.dropped.get() + shared.dropped.get(),
        connect_secs: pool.connect_secs,
        messages: Some(Messages {
            sent: shared.sets.get(),
            send_errors: shared.set_errors.get(),
            expected: shared.expected.get(),
            delivered: shared.delivered.get(),
            duplicated: 0,
            out_of_order: 0,
        }),
        measured_secs: churn_secs,
        latency: shared.latency.merged(),
        ..Outcome::default()
    };
    o.extra.insert(
        "churn_connects_per_sec".into(),
        (shared.established.get() as f64 / churn_secs.max(1e-9)).into(),
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
    // The version of each churner's change this watcher already counted.
    let mut counted: HashMap<String, u64> = HashMap::new();
    while let Some(ev) = client.next_event().await {
        let Event::Push(StreamKind::Presence, p) = ev else {
            continue;
        };
        let Some(push::Event::Presence(state)) = p.event else {
            continue;
        };
        live().deliveries.inc();
        let change = shared.changes.locked().get(&state.user_id).copied();
        if let Some((status, version, sent)) = change
            && status == state.status
            && counted.get(&state.user_id) != Some(&version)
        {
            counted.insert(state.user_id, version);
            shared.delivered.inc();
            shared.latency.record(idx, now_us().saturating_sub(sent));
        }
    }
    drop(client);
    ended(&closing, &dropped);
}
