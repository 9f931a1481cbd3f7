//! The per-connection task: handshake and authentication, request dispatch on the
//! control stream, bounded push queues on unidirectional streams, datagrams, and the
//! typed close.
//!
//! The gateway works on [`Session`]s and never sees which transport carries them.

mod config;
pub mod control;
pub mod limits;
mod push;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{LimitsConfig, TimeoutsConfig};
pub use control::{Action, Control, HelloOutcome, SessionToken};
pub use push::{PushQueues, SlowConsumer};

use control::{error_code, error_response, frame};

use crate::auth::{Auth, Claims};
use crate::hub::{SlowConsumer as Slow, Subscriber};
use crate::metrics::Metrics;
use crate::protocol::v1::{
    self, Datagram, ServerFrame, StreamKind, datagram, request, response, server_frame,
};
use crate::protocol::{CloseCode, ErrorCode, FrameDecoder, PROTOCOL_VERSION};
use crate::services::{ServiceError, Services, SessionCtx};
use crate::transport::{Accepted, RecvStream, SendStream, Session};
use crate::util::Unpoisoned;
use crate::util::unix_millis;
use limits::{ByteBudget, Tally};

/// How often the open sessions' QUIC round-trip estimates are sampled into the
/// histogram (and their bytes moved added to the counters), by one task for all of
/// them: a timer in each session's task woke every idle session that often, which
/// was a third of an idle server's CPU (10,000 connections: 4.6% of a core, 2.9%
/// without it).
const RTT_SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Sessions sampled by the sampling task between two yields to the runtime, so that
/// a pass over many sessions never holds the worker for long.
const SAMPLE_BATCH: usize = 1024;

/// Bytes taken from the control stream at a time at most (a chunk is what arrived
/// in one packet, so usually less; a large frame takes several). Nothing of this
/// size is held while a session waits: the stream hands over its own buffers.
const READ_CHUNK: usize = 2 * 1024;
/// Control frames written in one write at most (coalesced when they queue up).
const WRITE_COALESCE: usize = 16 * 1024;

/// What the gateway needs from the rest of the server.
#[derive(Debug)]
pub struct GatewayConfig {
    /// Limits announced to and enforced on clients.
    pub limits: LimitsConfig,
    /// Timeouts.
    pub timeouts: TimeoutsConfig,
    /// This node's id, sent in `Welcome`.
    pub node_id: String,
}

/// Accepts sessions and runs one task per session.
#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    auth: Auth,
    metrics: Arc<Metrics>,
    services: Arc<Services>,
    active: AtomicUsize,
    /// Sessions per user.
    users: Tally<String>,
    /// Sessions per source IP address (from the end of the transport handshake).
    addresses: Tally<std::net::IpAddr>,
    next_session: AtomicU64,
    stop: CancellationToken,
    /// Session tasks.
    tasks: TaskTracker,
    /// Request tasks: they outlive their session, and shutdown waits for them.
    requests: TaskTracker,
    /// In a cluster: the other nodes, for `Welcome`, redirects and going away.
    directory: std::sync::OnceLock<Arc<dyn Directory>>,
    /// Open sessions by id, for the sampling task ([`RTT_SAMPLE_EVERY`]).
    sampled: std::sync::Mutex<HashMap<u64, Arc<Connection>>>,
    /// Starts the sampling task with the first session.
    sampler: std::sync::Once,
}

/// The nodes of a cluster, as the gateway needs them (no NATS type here).
pub trait Directory: Send + Sync + std::fmt::Debug {
    /// The live nodes, this one included.
    fn nodes(&self) -> Vec<v1::Node>;
    /// `Some(nodes, best first)` when this node should send a new session
    /// elsewhere: it is draining, or it has more than its share of the sessions.
    fn redirect(&self, sessions_here: usize) -> Option<Vec<v1::Node>>;
    /// How long sessions told `GOING_AWAY` by a draining node should spread their
    /// reconnects over.
    fn reconnect_spread(&self) -> Duration;
}

/// Why a session ends.
enum End {
    /// The server closes it with this code.
    Close(CloseCode, String),
    /// The peer closed it or the connection died: nothing to tell.
    Gone,
}

impl Gateway {
    /// A gateway; sessions are told to go away when `stop` fires.
    pub fn new(
        config: GatewayConfig,
        auth: Auth,
        metrics: Arc<Metrics>,
        services: Arc<Services>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            auth,
            metrics,
            services,
            active: AtomicUsize::new(0),
            users: Tally::default(),
            addresses: Tally::default(),
            next_session: AtomicU64::new(1),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            requests: TaskTracker::new(),
            directory: std::sync::OnceLock::new(),
            sampled: Default::default(),
            sampler: std::sync::Once::new(),
        })
    }

    /// Joins the gateway to a cluster's node list.
    pub fn set_directory(&self, directory: Arc<dyn Directory>) {
        let _ = self.directory.set(directory);
    }

    /// Starts the task of a new session.
    pub fn accept(self: &Arc<Self>, accepted: Accepted) {
        self.sampler.call_once(|| {
            tokio::spawn(sample_sessions(Arc::downgrade(self), self.stop.clone()));
        });
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        // Debug level: entering a span on every poll of the session's task cost 2%
        // of the server's CPU at 10,000 deliveries/s. `TUTTI_LOG=debug` shows it.
        let span = tracing::debug_span!(
            "session",
            id,
            transport = %accepted.session.kind(),
            peer = %accepted.session.remote_address()
        );
        self.tasks
            .spawn(self.clone().run(accepted, id).instrument(span));
    }

    /// Sessions open now (handshake completed or in progress).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Requests running now, on open sessions or on sessions that have ended.
    pub fn requests_running(&self) -> usize {
        self.requests.len()
    }

    /// Tells every session to go away (`GOING_AWAY`) and waits up to `within` for
    /// them to close and for every accepted request to finish. Returns whether all
    /// did in time.
    pub async fn drain(&self, within: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        self.requests.close();
        tokio::time::timeout(within, async {
            self.tasks.wait().await;
            self.requests.wait().await;
        })
        .await
        .is_ok()
    }

    async fn run(self: Arc<Self>, accepted: Accepted, id: u64) {
        let _guard = ActiveGuard::new(&self.active);
        let _connection = self.metrics.connection();
        let session = accepted.session;
        if self.active() > self.config.limits.max_connections {
            self.metrics.closed_with(CloseCode::Overloaded);
            session.close(CloseCode::Overloaded as u32, "too many sessions");
            return;
        }
        let Some(_address) = self.addresses.enter(
            session.remote_address().ip(),
            self.config.limits.max_connections_per_address,
        ) else {
            tracing::debug!("too many connections from this address");
            self.metrics.closed_with(CloseCode::TooManyConnections);
            session.close(
                CloseCode::TooManyConnections as u32,
                "too many connections from this address",
            );
            return;
        };
        // The Hello and the checks on it are a phase of their own, boxed: the task
        // lives as long as the session and is as large as its largest phase, and
        // the Hello (264 bytes) and a refusal's send (about 1 KiB) are brief.
        let Some(Admitted {
            send,
            recv,
            decoder,
            claims,
            resume,
            _user,
        }) = Box::pin(self.admit(&session, accepted.started)).await
        else {
            return;
        };
        let kind = session.kind();
        let session_id = format!("{}-{id}", self.config.node_id);
        let welcome = v1::Welcome {
            session_id: session_id.clone(),
            user_id: claims.sub.clone(),
            node_id: self.config.node_id.clone(),
            limits: Some(v1::Limits {
                max_frame_size: self.config.limits.max_frame_size as u32,
                max_datagram_size: self.config.limits.max_datagram_size as u32,
                max_inflight_requests: self.config.limits.max_inflight_requests as u32,
            }),
            heartbeat_interval_ms: self.config.timeouts.heartbeat.as_millis() as u32,
            idle_timeout_ms: self.config.timeouts.idle.as_millis() as u32,
            server_time_ms: unix_millis(),
            protocol_version: PROTOCOL_VERSION,
            token_expires_at_ms: claims.exp.saturating_mul(1000),
            nodes: self.directory.get().map(|d| d.nodes()).unwrap_or_default(),
        };
        // The session's queues are flume's: about 150 bytes each until used, where
        // a tokio channel takes about 1 KiB when made (cache-line padding and a
        // first block of 32 slots), and a session holds two for its whole life.
        let (control_tx, control_rx) = flume::bounded(self.config.limits.control_queue_frames);
        let stalled = CancellationToken::new();
        let control_bytes = Arc::new(ByteBudget::new(self.config.limits.control_queue_bytes));
        let writer = tokio::spawn(write_control(
            send,
            control_rx,
            control_bytes.clone(),
            self.config.timeouts.slow_consumer,
            stalled.clone(),
        ));
        if control_tx
            .send_async((Box::new(frame(server_frame::Kind::Welcome(welcome))), 0))
            .await
            .is_err()
        {
            return;
        }
        self.metrics
            .session_opened(kind, accepted.started.elapsed());
        tracing::debug!(user = %claims.sub, session_id, "session open");

        let mut token = SessionToken::new(claims.clone());
        let conn = Arc::new(Connection {
            session: session.clone(),
            session_id,
            user: claims.sub,
            pushes: PushQueues::new(
                session.clone(),
                self.config.limits.push_queue_frames,
                self.config.limits.push_queue_bytes,
                self.metrics.clone(),
            ),
            patience: self.config.timeouts.slow_consumer,
            control_stalled: stalled,
            metrics: self.metrics.clone(),
            reported: Default::default(),
        });
        // Sampled now (the handshake's estimate), then with every open session.
        self.metrics.rtt.record(session.rtt());
        let _sampled = Sampled::new(self.as_ref(), id, &conn);
        let ctx = SessionCtx {
            subscriber: conn.clone(),
            roles: claims.roles.into(),
        };
        // What the client missed, then live events. Requests are read only after
        // this, so a response proves the session's subscriptions are in place.
        // Boxed, as is `send`: the task lives as long as the session and is as
        // large as its largest phase, and this one (the catch-up of what the client
        // missed) and a send in progress are brief; inline, they made every
        // session's task 3.1 KiB (`a_session_task_stays_small`).
        let setup = tokio::select! {
            r = Box::pin(self.services.connected(&ctx, &resume)) => r,
            _ = conn.pushes.slow() => Ok(()),
            _ = session.closed() => Ok(()),
        };
        if let Err(e) = setup {
            // Not subscribed to everything it should be: rather than leave it
            // silently missing events, close it; it reconnects and resumes.
            tracing::warn!(
                session = id,
                user = ctx.user_id(),
                error = %e,
                "storage failed while a session was set up"
            );
            self.close(
                &session,
                &control_tx,
                writer,
                CloseCode::StorageUnavailable,
                "storage unavailable: reconnect with backoff and resume".into(),
            )
            .await;
            self.services.disconnected(&ctx).await;
            conn.pushes.abort();
            self.metrics.session_ended(kind);
            return;
        }
        let mut control = Control::new(decoder, self.config.limits.max_inflight_requests);
        // Request tasks answer here; never more than `max_inflight` at once, so a
        // task never waits to hand in its answer.
        let (replies_tx, replies) = flume::bounded(self.config.limits.max_inflight_requests.max(1));
        let out = ControlOut {
            tx: &control_tx,
            bytes: &control_bytes,
            stalled: &conn.control_stalled,
        };
        let end = self
            .serve(
                &conn,
                &ctx,
                recv,
                &mut control,
                &mut token,
                &replies_tx,
                &replies,
                out,
            )
            .await;
        drop(replies_tx);
        // A control writer that gave up on an unread stream ends the loop as if the
        // session were gone; it is a slow consumer, and told so.
        let end = match end {
            End::Gone if conn.control_stalled.is_cancelled() => End::Close(
                CloseCode::SlowConsumer,
                "control stream not read: reconnect and resume".into(),
            ),
            end => end,
        };
        match end {
            End::Close(code, message) => {
                // Answers to requests already running go out before the Close frame,
                // for as long as the client keeps reading (bounded).
                let linger = self.config.timeouts.close_linger;
                let _ = tokio::time::timeout(linger, async {
                    while control.inflight() > 0 {
                        let Ok((id, reply)) = replies.recv_async().await else {
                            break;
                        };
                        let Action::Send(reply) = control.completed(id, *reply) else {
                            continue;
                        };
                        if control_tx.send_async((Box::new(reply), 0)).await.is_err() {
                            break;
                        }
                    }
                })
                .await;
                self.close(&session, &control_tx, writer, code, message)
                    .await
            }
            End::Gone => writer.abort(),
        }
        // Requests accepted on this session run to completion whatever happened to
        // the session (they are tasks of their own); its subscriptions are removed
        // only after the last one, so none can subscribe the ended session again.
        while control.inflight() > 0 {
            match replies.recv_async().await {
                Ok((id, reply)) => {
                    control.completed(id, *reply);
                }
                Err(_) => break,
            }
        }
        self.services.disconnected(&ctx).await;
        conn.pushes.abort();
        conn.report_transfer();
        self.metrics.session_ended(kind);
    }

    /// Reads the session's Hello and admits it: `None` when it was refused (told
    /// why) or gone. The guard counts the session against its user's limit.
    async fn admit(&self, session: &Session, started: std::time::Instant) -> Option<Admitted<'_>> {
        let deadline = tokio::time::Instant::from_std(started + self.config.timeouts.handshake);
        let hello = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.read_hello(session)) => r,
            _ = self.stop.cancelled() => {
                self.metrics.closed_with(CloseCode::GoingAway);
                session.close(CloseCode::GoingAway as u32, "server shutting down");
                return None;
            }
        };
        let (send, recv, decoder, claims, resume) = match hello {
            Err(_elapsed) => {
                tracing::debug!("no Hello in time");
                self.metrics.closed_with(CloseCode::HandshakeTimeout);
                session.close(CloseCode::HandshakeTimeout as u32, "no Hello in time");
                return None;
            }
            Ok(Err(HelloFailure::Gone)) => return None,
            Ok(Err(HelloFailure::Refused(send, code, message))) => {
                self.refuse(session, send, code, message).await;
                return None;
            }
            Ok(Ok(ok)) => ok,
        };
        let Some(_user) = self
            .users
            .enter(claims.sub.clone(), self.config.limits.max_sessions_per_user)
        else {
            let message = format!(
                "{} has {} sessions open already",
                claims.sub, self.config.limits.max_sessions_per_user
            );
            self.refuse(session, send, CloseCode::TooManyConnections, message)
                .await;
            return None;
        };

        if let Some(nodes) = self.directory.get().and_then(|d| d.redirect(self.active())) {
            let mut close = v1::Close::new(
                CloseCode::Redirect,
                "this node has more than its share of sessions: connect to the first node listed",
            );
            close.nodes = nodes;
            self.refuse_with(session, send, close).await;
            return None;
        }
        Some(Admitted {
            send,
            recv,
            decoder,
            claims,
            resume,
            _user,
        })
    }

    /// Reads the control stream and answers requests until the session ends.
    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &self,
        conn: &Arc<Connection>,
        ctx: &SessionCtx,
        mut recv: RecvStream,
        control: &mut Control,
        token: &mut SessionToken,
        replies_tx: &flume::Sender<Reply>,
        replies: &flume::Receiver<Reply>,
        out: ControlOut<'_>,
    ) -> End {
        // The session ends when its token does, unless a refresh moves this.
        // tokio's clock measures the wait, so tests can run it on paused time.
        let expiry = tokio::time::sleep(token.remaining(unix_millis()));
        tokio::pin!(expiry);
        // Datagrams are read here rather than by a task of their own (a task per
        // session is about 0.35 KiB); their handling never waits. This read and the
        // wait for request answers are kept across iterations, and a new one is
        // made only when one completes: a flume wait that goes pending registers
        // (allocates) a waiter, which a wait made anew each iteration would redo.
        let max_datagram = self.config.limits.max_datagram_size;
        let mut datagram = conn.session.read_datagram();
        let mut datagrams_open = true;
        let mut answer = replies.recv_async();
        let mut answers_open = true;
        loop {
            // Frames already buffered are handled before reading more.
            while let Some(action) = control.poll_action(unix_millis()) {
                match action {
                    Action::Dispatch(v1::Request {
                        id,
                        body: Some(request::Body::AuthRefresh(refresh)),
                    }) => {
                        let reply = self.refresh(id, token, &refresh.token);
                        let now = unix_millis();
                        expiry
                            .as_mut()
                            .reset(tokio::time::Instant::now() + token.remaining(now));
                        if let Action::Send(reply) = control.completed(id, reply)
                            && let Err(end) = self.send(out, reply).await
                        {
                            return end;
                        }
                    }
                    Action::Dispatch(req) => self.dispatch(conn, ctx, req, replies_tx),
                    Action::Send(reply) => {
                        if let Some(code @ (ErrorCode::FrameTooLarge | ErrorCode::FrameMalformed)) =
                            error_code(&reply)
                        {
                            self.metrics.frame_rejected();
                            self.metrics.error(code);
                        }
                        if let Err(end) = self.send(out, reply).await {
                            return end;
                        }
                    }
                    Action::Close(code, message) => {
                        self.metrics.frame_rejected();
                        return End::Close(code, message);
                    }
                }
            }

            tokio::select! {
                _ = self.stop.cancelled() => {
                    return End::Close(CloseCode::GoingAway, "server shutting down".into());
                }
                _ = &mut expiry => {
                    return End::Close(
                        CloseCode::TokenExpired,
                        "token expired: reconnect with a new token".into(),
                    );
                }
                _ = conn.pushes.slow() => {
                    return End::Close(CloseCode::SlowConsumer, "push queue full: reconnect and resume".into());
                }
                _ = conn.control_stalled.cancelled() => {
                    return End::Close(CloseCode::SlowConsumer, "control stream not read: reconnect and resume".into());
                }
                received = &mut answer, if answers_open => {
                    answer = replies.recv_async();
                    match received {
                        Ok((id, reply)) => {
                            if let Action::Send(reply) = control.completed(id, *reply)
                                && let Err(end) = self.send(out, reply).await
                            {
                                return end;
                            }
                        }
                        // Not while the caller holds `replies_tx`.
                        Err(_) => answers_open = false,
                    }
                }
                read = &mut datagram, if datagrams_open => match read {
                    Ok(data) => {
                        received_datagram(conn, ctx, &self.services, max_datagram, data);
                        datagram = conn.session.read_datagram();
                    }
                    // The session is closing; the control stream ends the loop.
                    Err(_) => datagrams_open = false,
                },
                read = recv.read_chunk(READ_CHUNK) => match read {
                    Ok(None) => {
                        let Action::Close(code, message) = control.finished() else {
                            unreachable!("finishing the stream closes the session")
                        };
                        return End::Close(code, message);
                    }
                    Ok(Some(bytes)) => control.received(&bytes),
                    Err(_) => return End::Gone,
                },
            }
        }
    }

    /// Queues a frame on the control stream, waiting at most `slow_consumer` for
    /// room: a client that does not read its control stream is closed, and nothing
    /// else ever waits for it.
    ///
    /// Boxed: a send in progress is brief, and inline its future would make every
    /// session's task (which lives as long as the session) that much larger.
    fn send<'a>(
        &'a self,
        out: ControlOut<'a>,
        reply: ServerFrame,
    ) -> futures_util::future::BoxFuture<'a, Result<(), End>> {
        Box::pin(self.send_inline(out, reply))
    }

    async fn send_inline(&self, out: ControlOut<'_>, reply: ServerFrame) -> Result<(), End> {
        let slow = || {
            End::Close(
                CloseCode::SlowConsumer,
                "control stream not read: reconnect and resume".into(),
            )
        };
        // Bounded in bytes as well as in frames: the writer gives the bytes back
        // once they are written.
        // One bound for both waits: room in bytes, then room in frames.
        let patience = self.config.timeouts.slow_consumer;
        let deadline = tokio::time::Instant::now() + patience;
        let len = reply.encoded_len();
        let taken = tokio::select! {
            taken = out.bytes.take(len, patience) => taken,
            // The writer gave up on the stream: nothing will be released.
            _ = out.stalled.cancelled() => false,
        };
        if !taken {
            return Err(slow());
        }
        // A zero duration still takes a free slot (the send is tried first).
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, out.tx.send_async((Box::new(reply), len))).await {
            Ok(Ok(())) => Ok(()),
            // The bytes taken are not given back: the session closes as a slow
            // consumer and takes no more, and a frame that the writer took just as
            // the wait ran out gives them back once written.
            Err(_elapsed) => Err(slow()),
            Ok(Err(_disconnected)) => Err(End::Gone),
        }
    }

    /// Answers an `AuthRefreshRequest`: the session's token is replaced if `offered`
    /// verifies and may replace it (same user and roles, later expiry).
    fn refresh(&self, id: u64, token: &mut SessionToken, offered: &str) -> ServerFrame {
        let started = std::time::Instant::now();
        let body = match token.refresh(self.auth.verify(offered)) {
            Ok(expires_at_ms) => {
                tracing::debug!(expires_at_ms, "token refreshed");
                response::Body::AuthRefresh(v1::AuthRefreshResponse {
                    token_expires_at_ms: expires_at_ms,
                })
            }
            Err(e) => {
                if let Some(code) = e.error_code() {
                    self.metrics.error(code);
                }
                response::Body::Error(e)
            }
        };
        self.metrics.request("auth_refresh", started.elapsed());
        frame(server_frame::Kind::Response(v1::Response {
            id,
            body: Some(body),
        }))
    }

    /// Refuses a session whose `Hello` was read: a `Close` frame with `code` on the
    /// control stream, then the connection close.
    async fn refuse(&self, session: &Session, send: SendStream, code: CloseCode, message: String) {
        self.refuse_with(session, send, v1::Close::new(code, message))
            .await;
    }

    async fn refuse_with(&self, session: &Session, send: SendStream, close: v1::Close) {
        tracing::debug!(
            code = close.code,
            message = close.message,
            "session refused"
        );
        let (tx, rx) = flume::bounded(1);
        let writer = tokio::spawn(write_control(
            send,
            rx,
            Arc::new(ByteBudget::new(0)),
            self.config.timeouts.slow_consumer,
            CancellationToken::new(),
        ));
        self.close_with(session, &tx, writer, close).await;
    }

    /// Runs a request as a task of its own, so that once accepted it completes
    /// (committed, published, cached) whatever happens to its session; the answer
    /// comes back through `replies` while the session lasts.
    fn dispatch(
        &self,
        conn: &Arc<Connection>,
        ctx: &SessionCtx,
        req: v1::Request,
        replies: &flume::Sender<Reply>,
    ) {
        // Boxed: the request's future is a few KiB, and the task's own future,
        // moved several times on its way into tokio's task cell and overwritten
        // with the output at the end, is then a pointer and a sender, not a copy
        // of it each time (about 1% of the server's CPU at 80,000 deliveries/s).
        let task = Box::pin(handle_request(
            conn.clone(),
            ctx.clone(),
            self.services.clone(),
            self.metrics.clone(),
            req,
            self.config.limits.max_frame_size,
        ));
        let replies = replies.clone();
        self.requests.spawn(
            async move {
                let (id, answer) = task.await;
                // The session may be gone; the request's effect is not.
                let _ = replies.try_send((id, Box::new(answer)));
            }
            .in_current_span(),
        );
    }

    /// Reads the first frame of the first bidirectional stream; it must be a `Hello`
    /// with a valid token.
    async fn read_hello(
        &self,
        session: &Session,
    ) -> Result<(SendStream, RecvStream, FrameDecoder, Claims, Resume), HelloFailure> {
        let (send, mut recv) = session.accept_bi().await.map_err(|_| HelloFailure::Gone)?;
        self.metrics.streams_opened.fetch_add(1, Ordering::Relaxed);
        let mut decoder = FrameDecoder::new(self.config.limits.max_frame_size);
        let hello = loop {
            match control::read_hello(&mut decoder) {
                HelloOutcome::Hello(hello) => break hello,
                HelloOutcome::Refuse(code, message) => {
                    return Err(HelloFailure::Refused(send, code, message));
                }
                HelloOutcome::NeedMore => {}
            }
            match recv.read_chunk(READ_CHUNK).await {
                Ok(None) | Err(_) => return Err(HelloFailure::Gone),
                Ok(Some(bytes)) => decoder.extend(&bytes),
            }
        };
        match self.auth.verify(&hello.token) {
            Ok(claims) => Ok((send, recv, decoder, claims, hello.resume)),
            Err(e) => Err(HelloFailure::Refused(send, e.close_code(), e.to_string())),
        }
    }

    /// Sends a `Close` frame, lets the client read it (it closes on reading it), then
    /// closes the connection with the same code. Bounded by `close_linger`.
    async fn close(
        &self,
        session: &Session,
        control: &flume::Sender<Queued>,
        writer: tokio::task::JoinHandle<()>,
        code: CloseCode,
        message: String,
    ) {
        let mut close = v1::Close::new(code, &message);
        // A node going away in a cluster says where to go, and when: reconnects
        // spread over a while rather than all landing on the others at once.
        if code == CloseCode::GoingAway
            && let Some(d) = self.directory.get()
        {
            close.nodes = d
                .nodes()
                .into_iter()
                .filter(|n| n.node_id != self.config.node_id && !n.draining)
                .collect();
            let spread = d.reconnect_spread().as_millis() as u64;
            let jitter = u64::from_str_radix(&crate::util::random_hex(4), 16).unwrap_or(0);
            close.retry_after_ms = (jitter % spread.max(1)) as u32;
        }
        self.close_with(session, control, writer, close).await;
    }

    async fn close_with(
        &self,
        session: &Session,
        control: &flume::Sender<Queued>,
        mut writer: tokio::task::JoinHandle<()>,
        close: v1::Close,
    ) {
        let code = CloseCode::from_u32(close.code).unwrap_or(CloseCode::ServerError);
        let message = close.message.clone();
        if code != CloseCode::Normal {
            self.metrics.closed_with(code);
        }
        let linger = self.config.timeouts.close_linger;
        let close = frame(server_frame::Kind::Close(close));
        let _ = tokio::time::timeout(linger, async {
            if control.send_async((Box::new(close), 0)).await.is_ok() {
                // The writer ends once the Close frame is written and the stream
                // finished; the client closes the session when it has read it.
                let _ = (&mut writer).await;
                session.closed().await;
            }
        })
        .await;
        writer.abort();
        session.close(code as u32, &message);
    }
}

/// A control frame on its way to the writer, with the bytes it took from the
/// control queue's budget (0 for the frames the server itself adds: `Welcome`,
/// `Close`, the answers of a closing session).
type Queued = (Box<ServerFrame>, usize);

/// A request's answer on its way back to the session loop: its id and the frame,
/// boxed so that the queue's slots, which it keeps once grown, stay small: 16
/// bytes instead of a `ServerFrame`'s 152.
type Reply = (u64, Box<ServerFrame>);

/// Where the serve loop queues control frames.
#[derive(Clone, Copy)]
struct ControlOut<'a> {
    tx: &'a flume::Sender<Queued>,
    bytes: &'a ByteBudget,
    /// Cancelled when the writer stopped on a stream that took nothing.
    stalled: &'a CancellationToken,
}

/// Counts a session while it runs.
struct ActiveGuard<'a>(&'a AtomicUsize);

impl<'a> ActiveGuard<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A session's place among the sampled ones, for as long as it is open.
struct Sampled<'a> {
    gateway: &'a Gateway,
    id: u64,
}

impl<'a> Sampled<'a> {
    fn new(gateway: &'a Gateway, id: u64, conn: &Arc<Connection>) -> Self {
        gateway.sampled.locked().insert(id, conn.clone());
        Self { gateway, id }
    }
}

impl Drop for Sampled<'_> {
    fn drop(&mut self) {
        self.gateway.sampled.locked().remove(&self.id);
    }
}

/// Every [`RTT_SAMPLE_EVERY`], records each open session's round-trip estimate
/// and adds the bytes it moved since its last sample to the counters. Ends when
/// the gateway stops or is gone.
async fn sample_sessions(gateway: std::sync::Weak<Gateway>, stop: CancellationToken) {
    let mut every = tokio::time::interval(RTT_SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once; a session is sampled when it opens.
    every.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let open: Vec<Arc<Connection>> = match gateway.upgrade() {
            Some(g) => g.sampled.locked().values().cloned().collect(),
            None => return,
        };
        for (i, conn) in open.iter().enumerate() {
            conn.metrics.rtt.record(conn.session.rtt());
            conn.report_transfer();
            if i % SAMPLE_BATCH == SAMPLE_BATCH - 1 {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// `Hello.resume`: stream name → last offset the client has.
type Resume = HashMap<String, u64>;

/// A session whose Hello was read and accepted: its control stream, what was
/// already read of it, who it is, what it resumes, and its place in its user's count.
struct Admitted<'a> {
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    claims: Claims,
    resume: Resume,
    _user: limits::TallyGuard<'a, String>,
}

enum HelloFailure {
    /// The peer went away.
    Gone,
    /// Refuse with a close code, telling the client on the control stream.
    Refused(SendStream, CloseCode, String),
}

/// One authenticated session, as seen by request handlers and services.
#[derive(Debug)]
struct Connection {
    session: Session,
    session_id: String,
    user: String,
    pushes: PushQueues,
    /// How long a catch-up push waits for room in a queue.
    patience: Duration,
    /// Cancelled when a control-stream write made no progress for `patience`.
    control_stalled: CancellationToken,
    metrics: Arc<Metrics>,
    /// UDP bytes (in, out) already added to the metrics.
    reported: std::sync::Mutex<(u64, u64)>,
}

impl Connection {
    /// Adds the bytes moved since the last report to the metrics.
    fn report_transfer(&self) {
        let (rx, tx) = self.session.transferred();
        let mut last = self.reported.locked();
        self.metrics
            .transferred(rx.saturating_sub(last.0), tx.saturating_sub(last.1));
        *last = (rx, tx);
    }

    /// Sends a datagram, counting it as sent or dropped.
    fn send_datagram(&self, data: Bytes) {
        self.metrics
            .datagram(self.session.send_datagram(data).is_ok());
    }
}

impl Subscriber for Connection {
    fn session_id(&self) -> &str {
        &self.session_id
    }

    fn user_id(&self) -> &str {
        &self.user
    }

    fn push(&self, kind: StreamKind, push: v1::Push) -> Result<(), Slow> {
        self.pushes.push(kind, push)
    }

    fn push_frame(&self, kind: StreamKind, frame: Bytes) -> Result<(), Slow> {
        self.pushes.push_frame(kind, frame)
    }

    fn push_wait(
        &self,
        kind: StreamKind,
        push: v1::Push,
    ) -> futures_util::future::BoxFuture<'_, Result<(), Slow>> {
        Box::pin(self.pushes.push_wait(kind, push, self.patience))
    }

    fn datagram(&self, data: Bytes) {
        // Datagrams may be lost anyway; one that does not fit is dropped.
        self.send_datagram(data);
    }
}

fn service_error(id: u64, e: ServiceError) -> ServerFrame {
    frame(server_frame::Kind::Response(v1::Response {
        id,
        body: Some(response::Body::Error(e.into_wire())),
    }))
}

/// Answers one request. Returns the request id with the response frame.
async fn handle_request(
    conn: Arc<Connection>,
    ctx: SessionCtx,
    services: Arc<Services>,
    metrics: Arc<Metrics>,
    req: v1::Request,
    max_frame_size: usize,
) -> (u64, ServerFrame) {
    let started = std::time::Instant::now();
    let name = req.body.as_ref().map_or("unknown", |b| b.name());
    let (id, reply) = answer(conn, ctx, services, req).await;
    let reply = fit_frame(id, reply, max_frame_size);
    metrics.request(name, started.elapsed());
    if let Some(code) = error_code(&reply) {
        metrics.error(code);
    }
    (id, reply)
}

/// `reply`, or `RESPONSE_TOO_LARGE` in its place when it is larger than the frame
/// limit: the client would refuse it (and could not tell which request it
/// answered), so it is never sent.
pub(crate) fn fit_frame(id: u64, reply: ServerFrame, max_frame_size: usize) -> ServerFrame {
    let size = reply.encoded_len();
    if size <= max_frame_size {
        return reply;
    }
    tracing::debug!(
        size,
        max_frame_size,
        "response over the frame limit not sent"
    );
    error_response(
        id,
        ErrorCode::ResponseTooLarge,
        format!(
            "the answer is {size} bytes, over the {max_frame_size}-byte frame limit: \
             ask for less"
        ),
    )
}

/// The answer to one request.
async fn answer(
    conn: Arc<Connection>,
    ctx: SessionCtx,
    services: Arc<Services>,
    req: v1::Request,
) -> (u64, ServerFrame) {
    let id = req.id;
    let body = match req.body {
        Some(request::Body::Echo(echo)) => {
            if echo.push {
                let push = v1::Push {
                    stream: String::new(),
                    offset: 0,
                    event: Some(v1::push::Event::Echo(v1::EchoEvent {
                        payload: echo.payload.clone(),
                    })),
                };
                // A full queue marks the session slow; the serve loop closes it.
                let _ = conn.pushes.push(StreamKind::System, push);
            }
            response::Body::Echo(v1::EchoResponse {
                payload: echo.payload,
                server_time_ms: unix_millis(),
            })
        }
        Some(body) => match services.handle(&ctx, body).await {
            Some(Ok(body)) => body,
            Some(Err(e)) => return (id, service_error(id, e)),
            None => {
                return (
                    id,
                    error_response(id, ErrorCode::UnknownRequest, "unknown request"),
                );
            }
        },
        None => {
            tracing::trace!(user = %conn.user, "unknown request");
            return (
                id,
                error_response(
                    id,
                    ErrorCode::UnknownRequest,
                    "unknown or empty request body",
                ),
            );
        }
    };
    (
        id,
        frame(server_frame::Kind::Response(v1::Response {
            id,
            body: Some(body),
        })),
    )
}

/// Handles one datagram from the client: a ping is answered, anything else goes to
/// the services (typing indicators, cursors). Oversized or undecodable datagrams are
/// dropped, as datagrams may be.
fn received_datagram(
    conn: &Connection,
    ctx: &SessionCtx,
    services: &Services,
    max_size: usize,
    data: Bytes,
) {
    if data.len() > max_size {
        return;
    }
    let Ok(dgram) = Datagram::decode(data) else {
        return;
    };
    match dgram.kind {
        Some(datagram::Kind::Ping(p)) => {
            let pong = Datagram {
                kind: Some(datagram::Kind::Pong(v1::DatagramPong {
                    nonce: p.nonce,
                    sent_at_us: p.sent_at_us,
                    server_time_ms: unix_millis(),
                })),
            };
            conn.send_datagram(pong.encode_to_vec().into());
        }
        Some(other) => services.datagram(ctx, other),
        None => {}
    }
}

/// Writes control frames in order, several per write when they queue up. Finishes
/// the stream after a `Close` frame or when every sender is gone.
///
/// A write that makes no progress for `patience` (the client reads nothing, so its
/// stream window stays full) cancels `stalled` and ends the writer: the session is
/// then a slow consumer, even when its queue never fills.
async fn write_control(
    mut send: SendStream,
    rx: flume::Receiver<Queued>,
    bytes: Arc<ByteBudget>,
    patience: Duration,
    stalled: CancellationToken,
) {
    let mut buf = BytesMut::new();
    while let Ok((first, taken)) = rx.recv_async().await {
        let mut last_is_close = matches!(first.kind, Some(server_frame::Kind::Close(_)));
        let mut taken_total = taken;
        crate::protocol::encode_frame(&first, &mut buf);
        while !last_is_close && buf.len() < WRITE_COALESCE {
            match rx.try_recv() {
                Ok((f, taken)) => {
                    last_is_close = matches!(f.kind, Some(server_frame::Kind::Close(_)));
                    taken_total += taken;
                    crate::protocol::encode_frame(&f, &mut buf);
                }
                Err(_) => break,
            }
        }
        match tokio::time::timeout(patience, send.write_all(&buf)).await {
            Ok(Ok(())) => bytes.release(taken_total),
            Ok(Err(_)) => return,
            Err(_) => {
                stalled.cancel();
                return;
            }
        }
        buf.clear();
        if last_is_close {
            break;
        }
    }
    let _ = send.shutdown().await;
}

#[cfg(test)]
mod tests;
