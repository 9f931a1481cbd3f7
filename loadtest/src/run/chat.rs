//! Chat fan-out: clients in rooms of `room_size` (the sender included), each sending
//! `rate_per_client` messages per second; every member receives every message.
//!
//! Each message's text starts with a header (phase, measured flag, sender, sequence
//! number, send time; see [`crate::stats::Header`]). Receivers classify room
//! offsets (new / duplicate / out of order) and record the latency of measured
//! messages of the current phase. A world (clients and rooms) is set up once and can
//! run several phases at different rates: the knee search reuses it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::task::JoinHandle;
use tutti::client::{Client, Event};
use tutti::protocol::v1::{self, StreamKind, push, request};

use super::{Ctx, Pool, Rng, connect_all, ended, join_within};
use crate::outcome::{Messages, Outcome};
use crate::scenario::ChatParams;
use crate::stats::{
    Counter, Header, LateSnapshot, Latencies, Lateness, OffsetTracker, Seen, encode_payload, live,
    now_us, parse_payload,
};

/// Counters the receivers share with the phase that reads them.
#[derive(Debug, Default)]
struct Shared {
    phase: AtomicU32,
    delivered: Counter,
    duplicated: Counter,
    out_of_order: Counter,
    latency: Latencies,
}

impl Shared {
    fn reset(&self) {
        self.delivered.reset();
        self.duplicated.reset();
        self.out_of_order.reset();
        self.latency.reset();
    }
}

#[derive(Debug)]
struct Room {
    id: String,
    members: Vec<usize>,
    connected: u64,
}

/// Connected clients in their rooms, with a receiver task per client.
#[derive(Debug)]
pub struct World {
    pool: Pool,
    rooms: Vec<Room>,
    room_of: Vec<usize>,
    shared: Arc<Shared>,
    receivers: Vec<JoinHandle<()>>,
    payload_bytes: usize,
    max_inflight: usize,
    late_threshold_us: u64,
    /// The processes whose CPU is the server's (the node, or the nodes and NATS).
    server_pids: Vec<u32>,
}

/// One phase's numbers.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Message accounting.
    pub messages: Messages,
    /// Latency of measured deliveries (µs).
    pub latency: hdrhistogram::Histogram<u64>,
    /// The measured window in seconds.
    pub measured_secs: f64,
    /// How far the senders fell behind.
    pub late: LateSnapshot,
    /// Sends that waited because `max_inflight_per_client` requests were unanswered.
    pub backpressured: u64,
    /// CPU seconds used during the measured window: (server, generator), when
    /// readable from /proc.
    pub window_cpu: Option<(f64, f64)>,
}

impl Phase {
    /// Server CPU microseconds per delivery over the measured window.
    pub fn server_cpu_us_per_delivery(&self) -> Option<f64> {
        let (server, _) = self.window_cpu?;
        (self.messages.delivered > 0).then(|| server * 1e6 / self.messages.delivered as f64)
    }
}

/// Connects `p.clients` users, creates their rooms and starts the receivers.
pub async fn setup(ctx: &Ctx, p: &ChatParams, tag: &str) -> anyhow::Result<World> {
    let users: Vec<String> = (0..p.clients).map(|i| ctx.user(tag, i)).collect();
    live().set_phase(format!("{tag}: connecting {} clients", p.clients));
    let pool = connect_all(&ctx.target, &users, p.ramp_up, p.connect_concurrency).await;
    let mut rooms = Vec::new();
    let mut room_of = vec![0; p.clients];
    for (r, chunk) in (0..p.clients)
        .collect::<Vec<_>>()
        .chunks(p.room_size)
        .enumerate()
    {
        for &i in chunk {
            room_of[i] = r;
        }
        // A chosen room id is namespaced by its creator (the first connected
        // member): "<creator>~<name>".
        let name = format!("{}-{tag}-r{r}", ctx.run_id);
        let creator = chunk.iter().find_map(|&i| {
            pool.clients[i]
                .as_ref()
                .map(|c| c.welcome().user_id.clone())
        });
        rooms.push(Room {
            id: creator.map_or_else(|| name.clone(), |c| format!("{c}~{name}")),
            members: chunk.to_vec(),
            connected: chunk.iter().filter(|&&i| pool.clients[i].is_some()).count() as u64,
        });
    }
    live().set_phase(format!("{tag}: creating {} rooms", rooms.len()));
    let creates = rooms.iter().filter_map(|room| {
        let creator = room.members.iter().find_map(|&i| pool.clients[i].clone())?;
        let others: Vec<String> = room
            .members
            .iter()
            .map(|&i| users[i].clone())
            .filter(|u| *u != creator.welcome().user_id)
            .collect();
        let id = room.id.clone();
        Some(async move {
            creator
                .request(request::Body::RoomCreate(v1::RoomCreateRequest {
                    room_id: id
                        .rsplit_once('~')
                        .map_or(id.as_str(), |(_, n)| n)
                        .to_owned(),
                    name: id.clone(),
                    participants: others,
                }))
                .await
                .map_err(|e| anyhow::anyhow!("creating room {id}: {e}"))
        })
    });
    let results: Vec<_> = futures_util::stream::iter(creates)
        .buffer_unordered(32)
        .collect()
        .await;
    for r in results {
        r?;
    }
    let shared = Arc::new(Shared::default());
    let receivers = pool
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
    Ok(World {
        pool,
        rooms,
        room_of,
        shared,
        receivers,
        payload_bytes: p.payload_bytes,
        max_inflight: p.max_inflight_per_client.max(1),
        late_threshold_us: (ctx.scenario.slo.late_send_ms * 1000.0) as u64,
        server_pids: ctx.target.server_pids(),
    })
}

impl World {
    /// Connections dropped so far.
    pub fn dropped(&self) -> u64 {
        self.pool.dropped.get()
    }

    /// Clients connected at the start.
    pub fn established(&self) -> u64 {
        self.pool.established
    }

    /// Fills the connection numbers of `o`.
    pub fn connections(&self, o: &mut Outcome) {
        o.attempted = self.pool.attempted;
        o.established = self.pool.established;
        o.dropped = self.dropped();
        o.connect_secs = self.pool.connect_secs;
    }

    /// Runs one phase: every connected client sends at `rate` per second; messages
    /// due in `[warm_up, warm_up + measure)` are measured; afterwards sending goes on
    /// until the measured messages have arrived or `drain` has passed.
    pub async fn phase(
        &self,
        label: &str,
        rate: f64,
        warm_up: Duration,
        measure: Duration,
        drain: Duration,
    ) -> Phase {
        let phase = self.shared.phase.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.reset();
        let room_sent: Arc<Vec<Counter>> =
            Arc::new(self.rooms.iter().map(|_| Counter::default()).collect());
        let totals = Arc::new(SendTotals::default());
        let lateness = Arc::new(Lateness::default());
        lateness.threshold_us.add(self.late_threshold_us);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let base_us = now_us() + 200_000;
        let base = tokio::time::Instant::now() + Duration::from_micros(200_000);
        let plan = Plan {
            phase,
            base,
            base_us,
            interval_us: (1e6 / rate).max(1.0) as u64,
            warm_us: warm_up.as_micros() as u64,
            end_us: (warm_up + measure).as_micros() as u64,
            payload: self.payload_bytes,
            max_inflight: self.max_inflight,
        };
        let senders: Vec<JoinHandle<()>> = self
            .pool
            .connected()
            .map(|(i, c)| {
                let r = self.room_of[i];
                tokio::spawn(sender(
                    c.clone(),
                    i as u32,
                    self.rooms[r].id.clone(),
                    plan.clone(),
                    room_sent.clone(),
                    r,
                    totals.clone(),
                    lateness.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        live().set_phase(format!("{label}: warm-up ({rate:.2} msg/s per client)"));
        tokio::time::sleep_until(base + warm_up).await;
        let cpu0 = self.cpu();
        live().set_phase(format!("{label}: measuring ({rate:.2} msg/s per client)"));
        tokio::time::sleep_until(base + warm_up + measure).await;
        let window_cpu = match (cpu0, self.cpu()) {
            (Some((s0, g0)), Some((s1, g1))) => Some((s1 - s0, g1 - g0)),
            _ => None,
        };
        live().set_phase(format!("{label}: draining"));
        let expected = || -> u64 {
            self.rooms
                .iter()
                .zip(room_sent.iter())
                .map(|(room, sent)| sent.get() * room.connected)
                .sum()
        };
        let drain_end = tokio::time::Instant::now() + drain;
        // Give the last measured sends time to be issued before comparing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while tokio::time::Instant::now() < drain_end && self.shared.delivered.get() < expected() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop_tx.send(true);
        join_within(senders, Duration::from_secs(2)).await;
        Phase {
            messages: Messages {
                sent: totals.sent.get(),
                send_errors: totals.errors.get(),
                expected: expected(),
                delivered: self.shared.delivered.get(),
                duplicated: self.shared.duplicated.get(),
                out_of_order: self.shared.out_of_order.get(),
            },
            latency: self.shared.latency.merged(),
            measured_secs: measure.as_secs_f64(),
            late: lateness.snapshot(),
            backpressured: totals.backpressured.get(),
            window_cpu,
        }
    }

    /// CPU seconds so far of the server's processes and of this generator.
    fn cpu(&self) -> Option<(f64, f64)> {
        let server = crate::procstat::cpu_secs_of(&self.server_pids)?;
        Some((server, crate::procstat::cpu_secs(std::process::id())?))
    }

    /// Closes every connection and stops the receivers.
    pub async fn teardown(mut self) {
        self.pool.close_all();
        join_within(self.receivers, Duration::from_secs(5)).await;
    }
}

#[derive(Debug, Default)]
struct SendTotals {
    sent: Counter,
    errors: Counter,
    backpressured: Counter,
}

#[derive(Debug, Clone)]
struct Plan {
    phase: u32,
    base: tokio::time::Instant,
    base_us: u64,
    interval_us: u64,
    warm_us: u64,
    end_us: u64,
    payload: usize,
    max_inflight: usize,
}

#[allow(clippy::too_many_arguments)]
async fn sender(
    client: Arc<Client>,
    idx: u32,
    room_id: String,
    plan: Plan,
    room_sent: Arc<Vec<Counter>>,
    room: usize,
    totals: Arc<SendTotals>,
    lateness: Arc<Lateness>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // A random phase within the first interval spreads the clients' sends evenly.
    let mut rng = Rng::new(u64::from(idx) ^ (u64::from(plan.phase) << 32));
    let offset = rng.below(plan.interval_us);
    let mut text = String::with_capacity(plan.payload + 8);
    let mut inflight = FuturesUnordered::new();
    let handle = |r: (bool, Result<(), tutti::client::ClientError>)| {
        if let (measured, Err(e)) = r {
            live().errors.inc();
            if measured {
                totals.errors.inc();
            }
            tracing::debug!(error = %e, "send failed");
        }
    };
    for k in 0u64.. {
        let due_off = offset + k * plan.interval_us;
        let due = plan.base + Duration::from_micros(due_off);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => break,
                Some(r) = inflight.next(), if !inflight.is_empty() => handle(r),
                _ = stop.changed() => return,
            }
        }
        if *stop.borrow() {
            return;
        }
        // Lateness of the wake-up itself: the generator's own scheduling delay.
        lateness.note(plan.base_us + due_off, now_us());
        if inflight.len() >= plan.max_inflight {
            // The server has not acknowledged the last requests yet: waiting here
            // is the server's backpressure, not the generator falling behind.
            totals.backpressured.inc();
            while inflight.len() >= plan.max_inflight {
                if let Some(r) = inflight.next().await {
                    handle(r);
                }
            }
        }
        let now = now_us();
        let measured = due_off >= plan.warm_us && due_off < plan.end_us;
        encode_payload(
            &mut text,
            &Header {
                phase: plan.phase,
                measured,
                sender: idx,
                seq: k,
                sent_us: now,
            },
            plan.payload,
        );
        if measured {
            room_sent[room].inc();
            totals.sent.inc();
        }
        live().sends.inc();
        let body = request::Body::ChatSend(v1::ChatSendRequest {
            room_id: room_id.clone(),
            text: text.clone(),
            client_message_id: String::new(),
        });
        let c = client.clone();
        inflight.push(async move { (measured, c.request(body).await.map(|_| ())) });
    }
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
        let Event::Push(StreamKind::Chat, p) = ev else {
            continue;
        };
        let Some(push::Event::ChatMessage(m)) = p.event else {
            continue;
        };
        live().deliveries.inc();
        let tracker = match offsets.get_mut(&m.room_id) {
            Some(t) => t,
            None => offsets.entry(m.room_id.clone()).or_default(),
        };
        let seen = tracker.observe(m.offset);
        match seen {
            Seen::Duplicate => {
                shared.duplicated.inc();
                continue;
            }
            Seen::OutOfOrder => shared.out_of_order.inc(),
            Seen::New => {}
        }
        if let Some(h) = parse_payload(&m.text)
            && h.measured
            && h.phase == shared.phase.load(Ordering::Relaxed)
        {
            shared.delivered.inc();
            shared
                .latency
                .record(idx, now_us().saturating_sub(h.sent_us));
        }
    }
    drop(client);
    ended(&closing, &dropped);
}

/// The `chat_fanout` scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Outcome> {
    run_with(ctx, &ctx.scenario.chat, "chat").await
}

/// Chat fan-out with `p` (the mixed scenario runs it with its own tag).
pub async fn run_with(ctx: &Ctx, p: &ChatParams, tag: &str) -> anyhow::Result<Outcome> {
    let world = setup(ctx, p, tag).await?;
    let phase = world
        .phase(tag, p.rate_per_client, p.warm_up, p.measure, p.drain)
        .await;
    let mut o = Outcome::default();
    world.connections(&mut o);
    let cpu_per_delivery = phase.server_cpu_us_per_delivery();
    o.messages = Some(phase.messages);
    o.latency = phase.latency;
    o.measured_secs = phase.measured_secs;
    o.late = phase.late;
    o.extra
        .insert("backpressured_sends".into(), phase.backpressured.into());
    if let Some((server, generator)) = phase.window_cpu {
        o.extra
            .insert("server_window_cpu_secs".into(), server.into());
        o.extra
            .insert("generator_window_cpu_secs".into(), generator.into());
    }
    if let Some(us) = cpu_per_delivery {
        o.extra
            .insert("server_cpu_us_per_delivery".into(), us.into());
    }
    o.extra.insert(
        "offered_deliveries_per_sec".into(),
        (world.established() as f64 * p.rate_per_client * p.room_size as f64).into(),
    );
    world.teardown().await;
    Ok(o)
}
