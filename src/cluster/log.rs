//! The command log on JetStream: proposing a command, and the node's one reader
//! that applies every command in log order (`crate::services::replica`).
//!
//! - One stream, one subject: the stream sequence is the cluster's single order of
//!   writes. Its replicas (`cluster.replicas`, 3 in production) make a command
//!   durable on a majority before the publish is acknowledged.
//! - `Nats-Msg-Id` (`<node>-<command id>`) makes a publish that is retried after a
//!   lost acknowledgement land once (within the stream's duplicate window); a
//!   client's own resend is recognised by the services (client message ids,
//!   document client sequence numbers), which every node applies alike.
//! - Each node reads the stream with one ordered consumer (not one per client),
//!   which the client library recreates from the last sequence it delivered after
//!   a gap or a reconnect.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, message::PublishMessage as Publish, stream};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use prost::Message;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::protocol::ErrorCode;
use crate::services::replica::{Command, Op, Outcome, RemoteSession, Replicator};
use crate::services::{ServiceError, ServiceResult, Services, SessionCtx};
use crate::util::Unpoisoned;

type Pending = HashMap<u64, (Option<SessionCtx>, oneshot::Sender<Outcome>)>;

/// Proposes this node's commands and matches them with their application.
#[derive(Debug)]
pub struct CommandLog {
    js: jetstream::Context,
    stream: String,
    subject: String,
    node: String,
    next_id: AtomicU64,
    pending: std::sync::Mutex<Pending>,
    timeout: Duration,
    /// The last sequence this node applied.
    applied: watch::Sender<u64>,
    /// Messages the reader has received from the stream.
    received: AtomicU64,
    /// Wakes the reader when a command stored in the stream has not reached it in
    /// time while it received nothing: it reads again from what it applied.
    stalled: tokio::sync::Notify,
}

fn unavailable(what: impl std::fmt::Display) -> ServiceError {
    tracing::warn!(cause = %what, "cluster log unavailable");
    ServiceError::new(
        ErrorCode::Unavailable,
        "the cluster log is unavailable; retry with backoff",
    )
}

fn random_u64() -> u64 {
    u64::from_str_radix(&crate::util::random_hex(8), 16).expect("16 hex digits")
}

impl CommandLog {
    /// Makes sure the stream exists (`replicas` copies) and returns the log.
    pub async fn open(
        js: jetstream::Context,
        stream_name: &str,
        subject: &str,
        replicas: usize,
        node: &str,
        timeout: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        js.get_or_create_stream(stream::Config {
            name: stream_name.to_owned(),
            subjects: vec![subject.to_owned()],
            num_replicas: replicas,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the stream {stream_name}: {e}"))?;
        Ok(Arc::new(Self {
            js,
            stream: stream_name.to_owned(),
            subject: subject.to_owned(),
            node: node.to_owned(),
            // Random base: ids stay unique when a node restarts with the same id.
            next_id: AtomicU64::new(random_u64() >> 1),
            pending: std::sync::Mutex::new(HashMap::new()),
            timeout,
            applied: watch::channel(0).0,
            received: AtomicU64::new(0),
            stalled: tokio::sync::Notify::new(),
        }))
    }

    /// The last sequence of the stream now.
    pub async fn last_sequence(&self, stream_name: &str) -> anyhow::Result<u64> {
        let mut s = self
            .js
            .get_stream(stream_name)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = s.info().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(info.state.last_sequence)
    }

    /// Waits until this node has applied everything up to `seq`.
    pub async fn applied_through(&self, seq: u64) {
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|a| *a >= seq).await;
    }

    /// The last sequence this node applied.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    async fn publish(&self, command: &Command) -> Result<u64, ServiceError> {
        let publish = Publish::build()
            .payload(command.encode_to_vec().into())
            .message_id(format!("{}-{}", command.origin, command.id));
        let ack = self
            .js
            .send_publish(self.subject.clone(), publish)
            .await
            .map_err(unavailable)?;
        match tokio::time::timeout(self.timeout, ack).await {
            Ok(Ok(ack)) => Ok(ack.sequence),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable("no acknowledgement in time")),
        }
    }

    /// Reads the stream from the start and applies every command, in order, until
    /// `stop`. A command this node proposed is applied with its session and its
    /// outcome goes to the proposer.
    pub async fn run_applier(
        self: Arc<Self>,
        stream_name: String,
        services: Arc<Services>,
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let start = self.applied() + 1;
            match self.read_from(&stream_name, start, &services, &stop).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, start, "reading the cluster log; retrying");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn read_from(
        self: &Arc<Self>,
        stream_name: &str,
        start: u64,
        services: &Arc<Services>,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let stream = self
            .js
            .get_stream(stream_name)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Commands of one room or document are applied one after the other, in log
        // order; commands of different ones side by side (up to MAX_IN_FLIGHT);
        // any other command waits for everything before it and runs alone. Each
        // room's offsets and each document's revisions are assigned in log order
        // on every node, whatever the interleaving between rooms.
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut seqs: HashMap<tokio::task::Id, u64> = HashMap::new();
        let mut done: BTreeSet<u64> = BTreeSet::new();
        let mut chains: HashMap<String, oneshot::Receiver<()>> = HashMap::new();
        let mut dispatched = self.applied();
        let result = loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = self.stalled.notified() => {
                    break Err(anyhow::anyhow!("a stored command did not arrive in time"));
                }
                Some(r) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    self.finished(r, &mut seqs, &mut done);
                    continue;
                }
                m = messages.next() => m,
            };
            let Some(msg) = msg else {
                break Err(anyhow::anyhow!("the consumer ended"));
            };
            self.received.fetch_add(1, Ordering::Relaxed);
            let msg = match msg {
                Ok(m) => m,
                Err(e) => break Err(anyhow::anyhow!("{e}")),
            };
            let seq = match msg.info() {
                Ok(i) => i.stream_sequence,
                Err(e) => break Err(anyhow::anyhow!("{e}")),
            };
            if seq <= dispatched {
                continue;
            }
            dispatched = seq;
            let command = match Command::decode(msg.payload.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    // Every node skips it alike.
                    tracing::error!(seq, error = %e, "undecodable command skipped");
                    done.insert(seq);
                    self.advance(&mut done);
                    continue;
                }
            };
            match parallel_key(&command) {
                None => {
                    while let Some(r) = tasks.join_next_with_id().await {
                        self.finished(r, &mut seqs, &mut done);
                    }
                    chains.clear();
                    self.apply(&command, services, stop).await;
                    done.insert(seq);
                    self.advance(&mut done);
                }
                Some(key) => {
                    if tasks.is_empty() {
                        chains.clear();
                    }
                    while tasks.len() >= MAX_IN_FLIGHT {
                        if let Some(r) = tasks.join_next_with_id().await {
                            self.finished(r, &mut seqs, &mut done);
                        }
                    }
                    let before = chains.remove(&key);
                    let (tx, rx) = oneshot::channel();
                    chains.insert(key, rx);
                    let (this, services, stop) = (self.clone(), services.clone(), stop.clone());
                    let handle = tasks.spawn(async move {
                        if let Some(before) = before {
                            let _ = before.await;
                        }
                        this.apply(&command, &services, &stop).await;
                        let _ = tx.send(());
                    });
                    seqs.insert(handle.id(), seq);
                }
            }
        };
        // Whatever was started finishes before the log is read again.
        while let Some(r) = tasks.join_next_with_id().await {
            self.finished(r, &mut seqs, &mut done);
        }
        result
    }

    /// Records a finished command and moves the applied mark over every command
    /// finished without a gap.
    fn finished(
        &self,
        r: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
        seqs: &mut HashMap<tokio::task::Id, u64>,
        done: &mut BTreeSet<u64>,
    ) {
        let id = match r {
            Ok((id, ())) => id,
            Err(e) => {
                tracing::error!(error = %e, "applying a command failed");
                e.id()
            }
        };
        if let Some(seq) = seqs.remove(&id) {
            done.insert(seq);
        }
        self.advance(done);
    }

    fn advance(&self, done: &mut BTreeSet<u64>) {
        let mut applied = self.applied();
        while done.remove(&(applied + 1)) {
            applied += 1;
        }
        self.applied.send_replace(applied);
    }

    async fn apply(
        self: &Arc<Self>,
        command: &Command,
        services: &Arc<Services>,
        stop: &CancellationToken,
    ) {
        // Another node took this one for dead (its heartbeats stopped reaching the
        // node list for a while) but it is alive: its sessions, gone from presence
        // everywhere by this command, are announced again once it is applied.
        let still_here = match &command.op {
            Some(Op::NodeGone(node)) if *node == self.node && command.origin != self.node => {
                services.presence.sessions_of_node(&self.node)
            }
            _ => Vec::new(),
        };
        let mine = (command.origin == self.node)
            .then(|| self.pending.locked().remove(&command.id))
            .flatten();
        let (ctx, reply) = match mine {
            Some((ctx, reply)) => (ctx, Some(reply)),
            None => (None, None),
        };
        let mut backoff = Duration::from_millis(10);
        let outcome = loop {
            let outcome = crate::clock::replay::scope(
                command.time_ms,
                command.seed,
                services.apply(command, ctx.clone()),
            )
            .await;
            // A failing disk here must not make this node skip what the others
            // applied: retry until it works.
            if !outcome_unavailable(&outcome) || stop.is_cancelled() {
                break outcome;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        };
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
        if !still_here.is_empty() {
            tracing::warn!(
                sessions = still_here.len(),
                "this node was taken for dead; announcing its sessions again"
            );
            // Not from the applier itself: a proposal waits for its application.
            let this = self.clone();
            tokio::spawn(async move {
                for (session, user) in still_here {
                    let ctx = SessionCtx {
                        subscriber: Arc::new(RemoteSession::new(session, user)),
                        roles: Arc::from([]),
                    };
                    if let Err(e) = this.propose(Op::Connected(true), Some(ctx)).await {
                        tracing::warn!(error = %e.message, "announcing a session again");
                    }
                }
            });
        }
    }
}

/// Commands applied side by side at most.
const MAX_IN_FLIGHT: usize = 256;

/// The room or document a command writes to alone, when it is one that may be
/// applied beside commands of other rooms and documents (chat sends, document
/// operations: the bulk of the log); `None` for every other command.
fn parallel_key(command: &Command) -> Option<String> {
    use crate::protocol::v1::{self, request::Body};
    let Some(Op::Request(bytes)) = &command.op else {
        return None;
    };
    match v1::Request::decode(bytes.as_slice()).ok()?.body? {
        Body::ChatSend(r) => Some(format!("room/{}", r.room_id)),
        Body::DocSubmit(r) => Some(format!("doc/{}", r.doc_id)),
        _ => None,
    }
}

fn outcome_unavailable(o: &Outcome) -> bool {
    let code = match o {
        Outcome::Response(Err(e)) => e.code,
        Outcome::Notified(Err(e)) => e.code,
        Outcome::Posted(Err(e)) => e.code,
        Outcome::Added(Err(e)) => e.code,
        Outcome::Pruned(Err(e)) => e.code,
        _ => return false,
    };
    code == ErrorCode::Unavailable
}

impl Replicator for CommandLog {
    fn sync(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let caught_up = async {
                match self.last_sequence(&self.stream).await {
                    Ok(last) => self.applied_through(last).await,
                    Err(e) => tracing::debug!(error = %e, "reading the log's last sequence"),
                }
            };
            let _ = tokio::time::timeout(self.timeout, caught_up).await;
        })
    }

    fn propose(&self, op: Op, ctx: Option<SessionCtx>) -> BoxFuture<'_, ServiceResult<Outcome>> {
        Box::pin(async move {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let command = Command {
                origin: self.node.clone(),
                id,
                time_ms: crate::util::unix_millis(),
                seed: random_u64(),
                session: ctx
                    .as_ref()
                    .map(|c| c.session_id().to_owned())
                    .unwrap_or_default(),
                user: ctx
                    .as_ref()
                    .map(|c| c.user_id().to_owned())
                    .unwrap_or_default(),
                roles: ctx.as_ref().map(|c| c.roles.to_vec()).unwrap_or_default(),
                op: Some(op),
            };
            let (tx, rx) = oneshot::channel();
            self.pending.locked().insert(id, (ctx, tx));
            let forget = || {
                self.pending.locked().remove(&id);
            };
            let received = self.received.load(Ordering::Relaxed);
            let seq = match self.publish(&command).await {
                Ok(seq) => seq,
                Err(e) => {
                    forget();
                    return Err(e);
                }
            };
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(outcome)) => Ok(outcome),
                _ => {
                    forget();
                    // The command is in the stream, and the reader got nothing
                    // meanwhile: its pull may have died with the NATS server it
                    // went to (the client only notices after two missed 15 s
                    // heartbeats, then recreates the consumer with backoff, over a
                    // minute in all). It reads again from what it applied.
                    if self.applied() < seq && self.received.load(Ordering::Relaxed) == received {
                        tracing::warn!(seq, "the cluster log reader stalled; reading again");
                        self.stalled.notify_waiters();
                    }
                    Err(unavailable("the command was not applied here in time"))
                }
            }
        })
    }
}
