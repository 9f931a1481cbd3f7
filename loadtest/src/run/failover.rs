//! Failover: chat through a cluster (`--spawn --cluster N`, N ≥ 2) while the last
//! node is SIGKILLed mid-run. Each user sends its messages one at a time with a
//! client message id; when a request fails it reconnects to another node with its
//! room's resume offset and resends with the same id. The run judges what a
//! cluster promises: every acknowledged message delivered to every room mate
//! exactly once (delivery 100%, duplicates 0), every room's history the same on
//! every live node (divergence 0), and how long the killed node's users took to
//! send again on another node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tutti::client::{Client, ClientConfig, Event};
use tutti::protocol::v1::{self, StreamKind, push, request, response};

use super::Ctx;
use crate::outcome::{CollabCounts, Messages, Outcome};
use crate::stats::{live, new_histogram};

/// What one user saw.
#[derive(Debug, Default)]
struct UserReport {
    acked: u64,
    /// Offsets received, in arrival order.
    received: Vec<u64>,
    /// Send-to-delivery latencies, microseconds.
    latencies: Vec<u64>,
    /// From the kill to this user's next acknowledged send, when its node died.
    reconnect: Option<Duration>,
    connects: u64,
}

fn now_us() -> u64 {
    tutti::util::unix_millis() * 1000
}

async fn send(c: &Client, room: &str, text: String, id: String) -> Result<u64, String> {
    match c
        .request(request::Body::ChatSend(v1::ChatSendRequest {
            room_id: room.into(),
            text,
            client_message_id: id,
        }))
        .await
    {
        Ok(response::Body::ChatSend(r)) => Ok(r.message.map_or(0, |m| m.offset)),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Takes what has arrived until `until`.
async fn take_pushes(c: &Client, r: &mut UserReport, until: Instant) {
    while let Ok(Some(ev)) = tokio::time::timeout(
        until.saturating_duration_since(Instant::now()),
        c.next_event(),
    )
    .await
    {
        record(ev, r);
    }
}

fn record(ev: Event, r: &mut UserReport) {
    if let Event::Push(StreamKind::Chat, p) = ev
        && let Some(push::Event::ChatMessage(m)) = p.event
    {
        r.received.push(m.offset);
        if let Some(sent) = m.text.split(' ').next().and_then(|t| t.parse::<u64>().ok()) {
            r.latencies.push(now_us().saturating_sub(sent));
        }
    }
}

/// Connects to node `first`, else the next ones in turn, until one takes it.
async fn connect(
    configs: &[ClientConfig],
    first: usize,
    resume: Option<(&str, u64)>,
) -> (Client, usize) {
    let mut i = first;
    loop {
        let mut c = configs[i % configs.len()].clone();
        if let Some((room, offset)) = resume {
            c.resume.insert(format!("room/{room}"), offset);
        }
        if let Ok(client) = Client::connect(c).await
            && client.echo(vec![], false).await.is_ok()
        {
            return (client, i % configs.len());
        }
        i += 1;
        if i.is_multiple_of(configs.len()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[allow(clippy::too_many_arguments)] // one user's part of the scenario
async fn user(
    configs: Vec<ClientConfig>,
    home: usize,
    user: String,
    room: String,
    messages: usize,
    gap: Duration,
    total_in_room: u64,
    started: Arc<tokio::sync::Barrier>,
    killed_at: Arc<std::sync::OnceLock<Instant>>,
) -> UserReport {
    let mut r = UserReport::default();
    let (mut client, mut at) = connect(&configs, home, None).await;
    r.connects += 1;
    started.wait().await;
    let mut failed = false;
    let mut next = tokio::time::Instant::now();
    let mut i = 0;
    while i < messages {
        // Read what arrived while waiting for the next send's time.
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            ev = client.next_event() => {
                if let Some(ev) = ev { record(ev, &mut r); }
                continue;
            }
        }
        let text = format!("{} {user} {i}", now_us());
        match send(&client, &room, text, format!("{user}-{i}")).await {
            Ok(_) => {
                r.acked += 1;
                i += 1;
                next += gap;
                if failed {
                    failed = false;
                    r.reconnect = killed_at.get().map(Instant::elapsed);
                }
            }
            Err(_) => {
                failed = true;
                take_pushes(&client, &mut r, Instant::now() + Duration::from_millis(5)).await;
                let resume = r.received.iter().max().copied().unwrap_or(0);
                let (c, now_at) = connect(&configs, at + 1, Some((&room, resume))).await;
                (client, at) = (c, now_at);
                r.connects += 1;
                live().connected.inc();
            }
        }
    }
    // Then every message of the room, from everyone.
    let deadline = Instant::now() + Duration::from_secs(30);
    while distinct(&r.received) < total_in_room && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), client.next_event()).await {
            Ok(Some(ev)) => record(ev, &mut r),
            Ok(None) => {
                let resume = r.received.iter().max().copied().unwrap_or(0);
                let (c, now_at) = connect(&configs, at + 1, Some((&room, resume))).await;
                (client, at) = (c, now_at);
                r.connects += 1;
            }
            Err(_) => {}
        }
    }
    client.close();
    r
}

fn distinct(offsets: &[u64]) -> u64 {
    let mut v = offsets.to_vec();
    v.sort_unstable();
    v.dedup();
    v.len() as u64
}

/// A room's history on one node: (offset, text), oldest first.
async fn history(c: &Client, room: &str) -> anyhow::Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    let mut before = 0;
    loop {
        let r = match c
            .request(request::Body::ChatHistory(v1::ChatHistoryRequest {
                room_id: room.into(),
                before_offset: before,
                limit: 0,
            }))
            .await?
        {
            response::Body::ChatHistory(r) => r,
            other => anyhow::bail!("unexpected answer {other:?}"),
        };
        let first = r.messages.first().map(|m| m.offset);
        out.extend(r.messages.into_iter().map(|m| (m.offset, m.text)));
        match (r.more, first) {
            (true, Some(f)) => before = f,
            _ => break,
        }
    }
    out.sort();
    Ok(out)
}

/// The `failover` scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let p = &ctx.scenario.failover;
    let nodes = ctx.target.nodes();
    anyhow::ensure!(
        nodes.len() >= 2,
        "the failover scenario needs a cluster: run it with --spawn --cluster 3"
    );
    anyhow::ensure!(
        p.room_size >= 1 && p.users >= p.room_size && p.users.is_multiple_of(p.room_size),
        "failover.users must be a multiple of failover.room_size"
    );
    let users: Vec<String> = (0..p.users).map(|i| ctx.user("f", i)).collect();
    let rooms = p.users / p.room_size;
    // Each room is created by its first member, with the others in it.
    let mut room_ids = Vec::new();
    live().set_phase(format!("failover: creating {rooms} rooms"));
    for r in 0..rooms {
        let members = &users[r * p.room_size..(r + 1) * p.room_size];
        let owner = Client::connect(ctx.target.client_config_on(&members[0], 0)?).await?;
        let room = match owner
            .request(request::Body::RoomCreate(v1::RoomCreateRequest {
                room_id: format!("{}-room{r}", ctx.run_id),
                name: String::new(),
                participants: members[1..].to_vec(),
            }))
            .await?
        {
            response::Body::RoomCreate(c) => c.room.map(|r| r.room_id).unwrap_or_default(),
            other => anyhow::bail!("creating a room: {other:?}"),
        };
        owner.close();
        room_ids.push(room);
    }
    let total_in_room = (p.room_size * p.messages) as u64;
    let gap = Duration::from_secs_f64(1.0 / p.rate_per_user.max(0.001));
    let started = Arc::new(tokio::sync::Barrier::new(p.users + 1));
    let killed_at = Arc::new(std::sync::OnceLock::new());
    let victim = nodes.len() - 1;
    let mut tasks = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let configs: Vec<ClientConfig> = (0..nodes.len())
            .map(|n| {
                let mut c = ctx.target.client_config_on(u, n)?;
                c.timeout = p.request_timeout;
                Ok(c)
            })
            .collect::<anyhow::Result<_>>()?;
        live().attempted.inc();
        tasks.push(tokio::spawn(user(
            configs,
            i % nodes.len(),
            u.clone(),
            room_ids[i / p.room_size].clone(),
            p.messages,
            gap,
            total_in_room,
            started.clone(),
            killed_at.clone(),
        )));
    }
    live().set_phase(format!("failover: {} users chatting", p.users));
    started.wait().await;
    let t0 = Instant::now();
    tokio::time::sleep(p.kill_after).await;
    live().set_phase(format!("failover: node {} killed", victim + 1));
    killed_at.set(Instant::now()).expect("set once");
    anyhow::ensure!(
        ctx.target.kill_node(victim),
        "could not kill node {}",
        victim + 1
    );
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await?);
    }
    let measured = t0.elapsed().as_secs_f64();

    // Judge: every room member received every offset of the room once.
    let mut m = Messages::default();
    let mut latency = new_histogram();
    let mut reconnects = Vec::new();
    for r in &reports {
        m.sent += r.acked;
        m.expected += total_in_room;
        let d = distinct(&r.received);
        m.delivered += d.min(total_in_room);
        m.duplicated += r.received.len() as u64 - d;
        let mut seen = 0;
        for o in &r.received {
            if *o < seen {
                m.out_of_order += 1;
            }
            seen = seen.max(*o);
        }
        for l in &r.latencies {
            let _ = latency.record((*l).max(1));
        }
        if let Some(t) = r.reconnect {
            reconnects.push(t);
        }
    }
    // Divergence: each room's history on each live node, against node 1's.
    let mut divergent = 0u64;
    let mut per_node_len = BTreeMap::new();
    for room in &room_ids {
        let owner =
            users[room_ids.iter().position(|r| r == room).unwrap_or(0) * p.room_size].clone();
        let mut views = Vec::new();
        for n in 0..victim {
            let c = Client::connect(ctx.target.client_config_on(&owner, n)?).await?;
            let h = history(&c, room).await?;
            *per_node_len.entry(n + 1).or_insert(0u64) += h.len() as u64;
            views.push(h);
            c.close();
        }
        let dense = views[0].iter().map(|(o, _)| *o).eq(1..=total_in_room);
        if !dense || views.iter().any(|v| *v != views[0]) {
            divergent += 1;
        }
    }
    reconnects.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let mut o = Outcome {
        attempted: p.users as u64,
        established: p.users as u64,
        messages: Some(m),
        measured_secs: measured,
        latency,
        collab: Some(CollabCounts {
            documents: rooms as u64,
            editors: p.users as u64,
            ops_submitted: m.sent,
            ops_acked: m.sent,
            divergent_documents: divergent,
            ..CollabCounts::default()
        }),
        ..Outcome::default()
    };
    let mut by_node = HashMap::new();
    for (n, len) in per_node_len {
        by_node.insert(format!("node{n}"), len);
    }
    o.extra.insert("killed_node".into(), (victim + 1).into());
    o.extra.insert("divergent_rooms".into(), divergent.into());
    o.extra.insert(
        "messages_stored_per_live_node".into(),
        serde_json::to_value(by_node)?,
    );
    o.extra
        .insert("moved_users".into(), reconnects.len().into());
    if !reconnects.is_empty() {
        let pick = |q: f64| ms(&reconnects[((reconnects.len() - 1) as f64 * q) as usize]);
        o.extra
            .insert("reconnect_ms_min".into(), ms(&reconnects[0]).into());
        o.extra.insert("reconnect_ms_p50".into(), pick(0.5).into());
        o.extra.insert(
            "reconnect_ms_max".into(),
            ms(reconnects.last().expect("not empty")).into(),
        );
    }
    Ok(o)
}
