//! The workload runners, one module per scenario kind, and what they share:
//! connecting many clients with a ramp and a concurrency bound, and noticing
//! connections that close on their own.

pub mod chat;
pub mod collab;
pub mod failover;
pub mod idle;
pub mod knee;
pub mod mixed;
pub mod notify;
pub mod presence;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tutti::client::{Client, ClientConfig};

use crate::scenario::Scenario;
use crate::stats::{Counter, live};
use crate::target::Target;

/// What every runner gets.
#[derive(Debug)]
pub struct Ctx {
    /// The server.
    pub target: Target,
    /// The scenario.
    pub scenario: Scenario,
    /// A short id unique to this run: user, room and document ids start with it, so
    /// runs against a long-lived server do not collide.
    pub run_id: String,
}

impl Ctx {
    /// A user id of this run.
    pub fn user(&self, kind: &str, i: usize) -> String {
        format!("{}-{kind}{i}", self.run_id)
    }
}

/// Clients connected for a workload.
#[derive(Debug)]
pub struct Pool {
    /// One slot per user; `None` where connecting failed.
    pub clients: Vec<Option<Arc<Client>>>,
    /// Connections attempted.
    pub attempted: u64,
    /// Connections established.
    pub established: u64,
    /// From the first attempt to the last connect finishing, in seconds.
    pub connect_secs: f64,
    /// Set before the generator closes its connections, so the close is expected.
    pub closing: Arc<AtomicBool>,
    /// Connections that closed while not `closing`.
    pub dropped: Arc<Counter>,
}

impl Pool {
    /// Connected clients and their indexes.
    pub fn connected(&self) -> impl Iterator<Item = (usize, &Arc<Client>)> {
        self.clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
    }

    /// Closes every connection (expected closes, not drops).
    pub fn close_all(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        for c in self.clients.iter_mut().filter_map(Option::take) {
            c.close();
        }
    }
}

/// Connects one client per user: starts spread evenly over `ramp`, at most
/// `concurrency` handshakes at once. Failures are counted and logged (the first few).
pub async fn connect_all(
    target: &Target,
    users: &[String],
    ramp: Duration,
    concurrency: usize,
) -> Pool {
    let configs: Vec<Option<ClientConfig>> = users
        .iter()
        .map(|user| match target.client_config(user) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, user, "cannot mint a token");
                None
            }
        })
        .collect();
    connect_configs(&configs, ramp, concurrency).await
}

/// [`connect_all`] with the clients' configs (reconnecting with the same configs
/// resumes their TLS sessions).
pub async fn connect_configs(
    configs: &[Option<ClientConfig>],
    ramp: Duration,
    concurrency: usize,
) -> Pool {
    let n = configs.len();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let start = tokio::time::Instant::now();
    let t0 = Instant::now();
    let failures = Arc::new(Counter::default());
    let mut set = tokio::task::JoinSet::new();
    for (i, config) in configs.iter().enumerate() {
        let Some(config) = config.clone() else {
            continue;
        };
        let at = start + ramp.mul_f64(i as f64 / n.max(1) as f64);
        let sem = sem.clone();
        let failures = failures.clone();
        set.spawn(async move {
            tokio::time::sleep_until(at).await;
            let _permit = sem.acquire_owned().await.ok()?;
            live().attempted.inc();
            match Client::connect(config).await {
                Ok(c) => {
                    live().connected.inc();
                    Some((i, Arc::new(c), Instant::now()))
                }
                Err(e) => {
                    live().errors.inc();
                    failures.inc();
                    if failures.get() <= 5 {
                        tracing::warn!(error = %e, "connect failed");
                    }
                    None
                }
            }
        });
    }
    let mut clients: Vec<Option<Arc<Client>>> = (0..n).map(|_| None).collect();
    let mut last = t0;
    while let Some(r) = set.join_next().await {
        if let Ok(Some((i, c, at))) = r {
            clients[i] = Some(c);
            last = last.max(at);
        }
    }
    let established = clients.iter().filter(|c| c.is_some()).count() as u64;
    Pool {
        clients,
        attempted: n as u64,
        established,
        connect_secs: (last - t0).as_secs_f64(),
        closing: Arc::new(AtomicBool::new(false)),
        dropped: Arc::new(Counter::default()),
    }
}

/// Waits up to `within` for each task to finish (after the clients closed or were
/// told to stop), then aborts it.
pub async fn join_within(tasks: Vec<tokio::task::JoinHandle<()>>, within: Duration) {
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout(within, t).await.is_err() {
            abort.abort();
        }
    }
}

/// Marks a connection that ended: a drop unless the generator was closing.
pub fn ended(closing: &AtomicBool, dropped: &Counter) {
    live().connected.dec();
    if !closing.load(Ordering::SeqCst) {
        dropped.inc();
        live().errors.inc();
    }
}

/// A small deterministic generator (xorshift), seeded per task: edits and phases
/// differ between clients without a dependency on a random crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A value below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}
