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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::task::JoinHandle;
use tutti::client::{Client, Event};
use tutti::protocol::v1::{self, StreamKind, datagram, push, request, response};

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
    /// Client index by user id (typing indicators name their sender by user).
    user_index: HashMap<String, usize>,
    /// Per client: when its latest "on" and "off" typing indicator was sent (µs,
    /// with [`MEASURED`] set when it is in the measured window; 0: none yet).
    typing_sent_at: Vec<[AtomicU64; 2]>,
    typing_received: Counter,
    typing_latency: Latencies,
    history_pages: Counter,
    history_errors: Counter,
    /// Measured fetches sent and not yet answered: the drain waits for them, so
    /// that a slow page at the end of the window is timed rather than dropped.
    history_outstanding: Counter,
    history_bytes: Counter,
    history_latency: Latencies,
}

/// Marks a typing indicator's send time as measured.
const MEASURED: u64 = 1 << 63;

impl Shared {
    fn reset(&self) {
        self.delivered.reset();
        self.duplicated.reset();
        self.out_of_order.reset();
        self.latency.reset();
        for at in &self.typing_sent_at {
            at[0].store(0, Ordering::SeqCst);
            at[1].store(0, Ordering::SeqCst);
        }
        self.typing_received.reset();
        self.typing_latency.reset();
        self.history_pages.reset();
        self.history_errors.reset();
        self.history_bytes.reset();
        self.history_latency.reset();
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
    client_message_ids: bool,
    typing_per_client: f64,
    history_every: Duration,
    /// With `rebind_at`: the endpoints to move, and when into the window.
    rebind: Option<(Vec<tutti::client::ClientEndpoint>, Duration)>,
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
    /// ACK frames the clients sent during the measured window (QUIC; the server
    /// receives and processes each).
    pub window_acks: u64,
    /// ACK_FREQUENCY frames the clients received during the measured window: the
    /// server's requests to acknowledge later or sooner (`timeouts.ack_delay` and
    /// its fallbacks after a loss and for sparse traffic).
    pub window_ack_frequency_requests: u64,
    /// Typing indicators, when the scenario sends them.
    pub typing: Option<Typing>,
    /// History pages, when the scenario fetches them.
    pub history: Option<History>,
    /// Endpoints moved to a new local port during the window, and those that
    /// failed to, when the scenario moves them.
    pub rebound: Option<(u64, u64)>,
}

/// Typing indicators of the measured window. Each one goes to the sender's room
/// but not back to the sender; datagrams may be lost, so fewer may arrive.
#[derive(Debug, Clone)]
pub struct Typing {
    /// Indicators sent.
    pub sent: u64,
    /// Arrivals expected: each indicator times the room's other connected members.
    pub expected: u64,
    /// Arrivals (at most one per indicator and receiver).
    pub received: u64,
    /// From the send to the arrival (µs). An arrival is timed against its
    /// sender's latest indicator of the same value (on or off), so one delayed
    /// past the next indicator of that value (two intervals) is timed short.
    pub latency: hdrhistogram::Histogram<u64>,
}

/// History pages fetched in the measured window.
#[derive(Debug, Clone)]
pub struct History {
    /// Pages received.
    pub pages: u64,
    /// Fetches that failed, or had no answer by the end of the drain.
    pub errors: u64,
    /// Message text bytes in the pages.
    pub bytes: u64,
    /// From the request to the whole page (µs).
    pub latency: hdrhistogram::Histogram<u64>,
}

impl Phase {
    /// Server CPU microseconds per delivery over the measured window.
    pub fn server_cpu_us_per_delivery(&self) -> Option<f64> {
        let (server, _) = self.window_cpu?;
        (self.messages.delivered > 0).then(|| server * 1e6 / self.messages.delivered as f64)
    }

    /// ACK frames the clients sent per delivery over the measured window.
    pub fn client_acks_per_delivery(&self) -> Option<f64> {
        (self.messages.delivered > 0)
            .then(|| self.window_acks as f64 / self.messages.delivered as f64)
    }
}

/// Connects `p.clients` users, creates their rooms and starts the receivers.
pub async fn setup(ctx: &Ctx, p: &ChatParams, tag: &str) -> anyhow::Result<World> {
    anyhow::ensure!(
        p.rebind_at.is_zero() || !ctx.target.shared_endpoints().is_empty(),
        "chat.rebind_at moves the shared sockets: run with --sockets above 0"
    );
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
    prefill(&pool, &rooms, p).await?;
    let shared = Arc::new(Shared {
        user_index: users.iter().cloned().zip(0..).collect(),
        typing_sent_at: (0..p.clients).map(|_| Default::default()).collect(),
        ..Default::default()
    });
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
        client_message_ids: p.client_message_ids,
        typing_per_client: p.typing_per_client,
        history_every: p.history_every,
        rebind: (!p.rebind_at.is_zero()).then(|| (ctx.target.shared_endpoints(), p.rebind_at)),
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
            client_message_ids: self.client_message_ids,
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
        let room_typed: Arc<Vec<Counter>> =
            Arc::new(self.rooms.iter().map(|_| Counter::default()).collect());
        let mut extras: Vec<JoinHandle<()>> = Vec::new();
        if self.typing_per_client > 0.0 {
            let typing = Plan {
                interval_us: (1e6 / self.typing_per_client).max(1.0) as u64,
                ..plan.clone()
            };
            extras.extend(self.pool.connected().map(|(i, c)| {
                let r = self.room_of[i];
                tokio::spawn(typer(
                    c.clone(),
                    i,
                    self.rooms[r].id.clone(),
                    typing.clone(),
                    self.shared.clone(),
                    (room_typed.clone(), r),
                    stop.clone(),
                ))
            }));
        }
        if !self.history_every.is_zero() {
            let history = Plan {
                interval_us: self.history_every.as_micros() as u64,
                ..plan.clone()
            };
            extras.extend(self.pool.connected().map(|(i, c)| {
                tokio::spawn(fetcher(
                    c.clone(),
                    i,
                    self.rooms[self.room_of[i]].id.clone(),
                    history.clone(),
                    self.shared.clone(),
                    stop.clone(),
                ))
            }));
        }
        let rebinder = self.rebind.clone().map(|(endpoints, at)| {
            let when = base + warm_up + at;
            tokio::spawn(async move {
                tokio::time::sleep_until(when).await;
                let mut moved = (0, 0);
                for e in &endpoints {
                    match e.rebind() {
                        Ok(addr) => {
                            tracing::debug!(%addr, "endpoint moved");
                            moved.0 += 1;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "an endpoint could not move");
                            moved.1 += 1;
                        }
                    }
                }
                moved
            })
        });
        live().set_phase(format!("{label}: warm-up ({rate:.2} msg/s per client)"));
        tokio::time::sleep_until(base + warm_up).await;
        let cpu0 = self.cpu();
        let acks0 = self.ack_counts();
        live().set_phase(format!("{label}: measuring ({rate:.2} msg/s per client)"));
        tokio::time::sleep_until(base + warm_up + measure).await;
        let window_cpu = match (cpu0, self.cpu()) {
            (Some((s0, g0)), Some((s1, g1))) => Some((s1 - s0, g1 - g0)),
            _ => None,
        };
        let acks1 = self.ack_counts();
        let window_acks = acks1.sent.saturating_sub(acks0.sent);
        let window_ack_frequency_requests = acks1
            .frequency_requests
            .saturating_sub(acks0.frequency_requests);
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
        // As the Socket.IO baseline's drain: every measured message delivered and
        // every measured history fetch answered, or the drain's end.
        while tokio::time::Instant::now() < drain_end
            && (self.shared.delivered.get() < expected()
                || self.shared.history_outstanding.get() > 0)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop_tx.send(true);
        join_within(senders, Duration::from_secs(2)).await;
        join_within(extras, Duration::from_secs(2)).await;
        let rebound = match rebinder {
            Some(task) => task.await.ok(),
            None => None,
        };
        let typing = (self.typing_per_client > 0.0).then(|| Typing {
            sent: room_typed.iter().map(Counter::get).sum(),
            expected: self
                .rooms
                .iter()
                .zip(room_typed.iter())
                .map(|(room, sent)| sent.get() * room.connected.saturating_sub(1))
                .sum(),
            received: self.shared.typing_received.get(),
            latency: self.shared.typing_latency.merged(),
        });
        let history = (!self.history_every.is_zero()).then(|| History {
            pages: self.shared.history_pages.get(),
            errors: self.shared.history_errors.get(),
            bytes: self.shared.history_bytes.get(),
            latency: self.shared.history_latency.merged(),
        });
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
            window_acks,
            window_ack_frequency_requests,
            typing,
            history,
            rebound,
        }
    }

    /// CPU seconds so far of the server's processes and of this generator.
    fn cpu(&self) -> Option<(f64, f64)> {
        let server = crate::procstat::cpu_secs_of(&self.server_pids)?;
        Some((server, crate::procstat::cpu_secs(std::process::id())?))
    }

    /// ACK frames sent and ACK_FREQUENCY frames received so far by the connected
    /// clients.
    fn ack_counts(&self) -> tutti::transport::AckCounts {
        self.pool.connected().map(|(_, c)| c.ack_counts()).sum()
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
    /// Each send with a new client message id.
    client_message_ids: bool,
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
            client_message_id: if plan.client_message_ids {
                client.new_message_id()
            } else {
                String::new()
            },
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
    // The last indicator counted per (sender, value): a duplicated datagram
    // counts once.
    let mut typed: HashMap<(usize, bool), u64> = HashMap::new();
    while let Some(ev) = client.next_event().await {
        if let Event::Datagram(datagram::Kind::Typing(t)) = &ev {
            typing_arrived(&shared, idx, t, &mut typed);
            continue;
        }
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

/// Times a typing indicator's arrival at client `idx`.
fn typing_arrived(
    shared: &Shared,
    idx: usize,
    t: &v1::ChatTyping,
    typed: &mut HashMap<(usize, bool), u64>,
) {
    let Some(&from) = shared.user_index.get(&t.user_id) else {
        return;
    };
    let at = shared.typing_sent_at[from][usize::from(t.typing)].load(Ordering::SeqCst);
    if at & MEASURED == 0 || typed.insert((from, t.typing), at) == Some(at) {
        return;
    }
    shared.typing_received.inc();
    shared
        .typing_latency
        .record(idx, now_us().saturating_sub(at & !MEASURED));
}

/// One client's schedule for extra traffic (typing, history) on a plan: a random
/// phase in the first interval, seeded by client and `salt`, then one tick per
/// interval.
struct Ticks {
    plan: Plan,
    offset: u64,
    k: u64,
}

impl Ticks {
    fn new(plan: Plan, idx: usize, salt: u64) -> Self {
        let mut rng = Rng::new(idx as u64 ^ (u64::from(plan.phase) << 32) ^ salt);
        let offset = rng.below(plan.interval_us);
        Self { plan, offset, k: 0 }
    }

    /// Waits for the next tick; gives its number and whether it falls in the
    /// measured window, or `None` once the phase stops.
    async fn next(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Option<(u64, bool)> {
        let k = self.k;
        self.k += 1;
        let due_off = self.offset + k * self.plan.interval_us;
        let due = self.plan.base + Duration::from_micros(due_off);
        let go = tokio::select! {
            _ = tokio::time::sleep_until(due) => !*stop.borrow(),
            _ = stop.changed() => false,
        };
        go.then_some((
            k,
            due_off >= self.plan.warm_us && due_off < self.plan.end_us,
        ))
    }
}

/// Sends typing indicators (datagrams), alternating on and off, on the plan's
/// schedule; counts those of the measured window per room.
async fn typer(
    client: Arc<Client>,
    idx: usize,
    room_id: String,
    plan: Plan,
    shared: Arc<Shared>,
    (room_typed, room): (Arc<Vec<Counter>>, usize),
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = Ticks::new(plan, idx, 0x7479_7065);
    while let Some((k, measured)) = ticks.next(&mut stop).await {
        let on = k % 2 == 0;
        // Noted before the send, so that no arrival finds an older time.
        let at = now_us() | if measured { MEASURED } else { 0 };
        shared.typing_sent_at[idx][usize::from(on)].store(at, Ordering::SeqCst);
        let sent = client.send_datagram(datagram::Kind::Typing(v1::ChatTyping {
            room_id: room_id.clone(),
            user_id: String::new(),
            typing: on,
        }));
        if measured && sent.is_ok() {
            room_typed[room].inc();
        }
    }
}

/// Fetches the room's latest history page on the plan's schedule, one at a time.
async fn fetcher(
    client: Arc<Client>,
    idx: usize,
    room_id: String,
    plan: Plan,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = Ticks::new(plan, idx, 0x6869_7374);
    while let Some((_, measured)) = ticks.next(&mut stop).await {
        let started = now_us();
        let request = client.request(request::Body::ChatHistory(v1::ChatHistoryRequest {
            room_id: room_id.clone(),
            before_offset: 0,
            limit: 0,
        }));
        if measured {
            shared.history_outstanding.inc();
        }
        let answer = tokio::select! {
            r = request => r,
            _ = stop.changed() => {
                if measured {
                    shared.history_outstanding.dec();
                    shared.history_errors.inc();
                }
                return;
            }
        };
        if !measured {
            continue;
        }
        shared.history_outstanding.dec();
        match answer {
            Ok(response::Body::ChatHistory(page)) => {
                shared.history_pages.inc();
                shared
                    .history_bytes
                    .add(page.messages.iter().map(|m| m.text.len() as u64).sum());
                shared
                    .history_latency
                    .record(idx, now_us().saturating_sub(started));
            }
            other => {
                tracing::debug!(answer = ?other.err(), "history fetch failed");
                shared.history_errors.inc();
            }
        }
    }
}

/// Gives every room `p.prefill_messages` messages (not measured) from its first
/// connected member, so that a history page is full.
async fn prefill(pool: &Pool, rooms: &[Room], p: &ChatParams) -> anyhow::Result<()> {
    if p.prefill_messages == 0 {
        return Ok(());
    }
    live().set_phase(format!("prefilling {} rooms", rooms.len()));
    let fills = rooms.iter().filter_map(|room| {
        let (idx, client) = room
            .members
            .iter()
            .find_map(|&i| pool.clients[i].clone().map(|c| (i, c)))?;
        let id = room.id.clone();
        Some(async move {
            let mut text = String::new();
            let sends = (0..p.prefill_messages as u64).map(|seq| {
                encode_payload(
                    &mut text,
                    &Header {
                        phase: 0,
                        measured: false,
                        sender: idx as u32,
                        seq,
                        sent_us: now_us(),
                    },
                    p.payload_bytes,
                );
                client.request(request::Body::ChatSend(v1::ChatSendRequest {
                    room_id: id.clone(),
                    text: text.clone(),
                    client_message_id: String::new(),
                }))
            });
            let results: Vec<_> = futures_util::stream::iter(sends)
                .buffered(p.max_inflight_per_client.max(1))
                .collect()
                .await;
            for r in results {
                r.map_err(|e| anyhow::anyhow!("prefilling room {id}: {e}"))?;
            }
            anyhow::Ok(())
        })
    });
    let results: Vec<_> = futures_util::stream::iter(fills)
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
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
    let acks_per_delivery = phase.client_acks_per_delivery();
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
    if let Some(acks) = acks_per_delivery {
        o.extra
            .insert("client_acks_per_delivery".into(), acks.into());
    }
    o.extra.insert(
        "client_ack_frequency_requests".into(),
        phase.window_ack_frequency_requests.into(),
    );
    if let Some(t) = &phase.typing {
        o.extra.insert(
            "typing".into(),
            serde_json::json!({
                "sent": t.sent,
                "expected": t.expected,
                "received": t.received,
                "delivery_pct": if t.expected == 0 { 0.0 } else { t.received as f64 * 100.0 / t.expected as f64 },
                "latency_ms": crate::report::latency_json(&t.latency),
            }),
        );
    }
    if let (Some((moved, failed)), Some((_, at))) = (phase.rebound, &world.rebind) {
        o.extra.insert(
            "rebind".into(),
            serde_json::json!({
                "at_secs": (p.warm_up + *at).as_secs_f64(),
                "endpoints_moved": moved,
                "endpoints_failed": failed,
            }),
        );
    }
    if let Some(h) = &phase.history {
        o.extra.insert(
            "history".into(),
            serde_json::json!({
                "pages": h.pages,
                "errors": h.errors,
                "bytes": h.bytes,
                "latency_ms": crate::report::latency_json(&h.latency),
            }),
        );
    }
    o.extra.insert(
        "offered_deliveries_per_sec".into(),
        (world.established() as f64 * p.rate_per_client * p.room_size as f64).into(),
    );
    world.teardown().await;
    Ok(o)
}
