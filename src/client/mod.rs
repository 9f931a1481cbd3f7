//! The native Rust client: raw QUIC or WebTransport, the handshake, pipelined
//! requests, datagram pings and the stream of pushed events.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tutti::client::ClientError> {
//! use tutti::client::{Client, ClientConfig, Trust};
//! use tutti::transport::TransportKind;
//! let config = ClientConfig::new(
//!     "127.0.0.1:4433".parse().unwrap(),
//!     TransportKind::Quic,
//!     Trust::Pinned(vec![[0u8; 32]]), // from GET /cert-hash or `tutti cert`
//!     "TOKEN",
//! );
//! let client = Client::connect(config).await?;
//! println!("hello {}", client.welcome().user_id);
//! let echoed = client.echo(b"hi".to_vec(), false).await?;
//! # Ok(()) }
//! ```

pub mod collab;
mod tls;

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};

pub use tls::{TlsSessions, Trust, parse_pin};

use crate::protocol::v1::{
    self, ClientFrame, Datagram, Push, PushStreamHeader, ServerFrame, StreamKind, client_frame,
    datagram, request, response, server_frame,
};
use crate::protocol::{
    ALPN_NATIVE, CloseCode, FrameDecoder, PROTOCOL_VERSION, WEBTRANSPORT_PATH, encode_frame,
};
use crate::transport::{RecvStream, SendStream, Session, TransportKind};
use crate::util::Unpoisoned;

/// Pushed events that wait for the application; past this the client stops reading
/// its push streams and the server sees a slow consumer.
const EVENT_QUEUE: usize = 16 * 1024;

/// Unidirectional streams the server may have open to a raw QUIC client at once:
/// one push stream per [`StreamKind`] (six kinds), with room for kinds a newer
/// server adds. The server opens no bidirectional stream. quinn's default, 100 of
/// each, makes every connection set up state for 200 streams that never come.
const SERVER_UNI_STREAMS: u32 = 8;

/// How to reach and authenticate to a server.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's UDP address.
    pub addr: SocketAddr,
    /// Raw QUIC or WebTransport.
    pub transport: TransportKind,
    /// The TLS server name (checked only with [`Trust::Roots`]).
    pub server_name: String,
    /// How the server certificate is trusted.
    pub trust: Trust,
    /// The JWT sent in `Hello`.
    pub token: String,
    /// Offsets to resume from, sent in `Hello`.
    pub resume: HashMap<String, u64>,
    /// The largest frame accepted from the server.
    pub max_frame_size: usize,
    /// Bound on connecting, the handshake and each request.
    pub timeout: Duration,
    /// QUIC keep-alive interval (keeps an idle session open). 15 s by default:
    /// longer than a server's default heartbeat (10 s), whose keep-alives reset
    /// this timer, so that an idle connection costs one PING and its ACK per
    /// heartbeat; a backstop for a server whose heartbeat is longer, and within
    /// the 30 s idle timeout. At 5 s, every idle client sent a PING of its own
    /// every 5 s, and holding 10,000 idle connections cost the server half again
    /// as much CPU (docs/BENCHMARKS.md, "Idle connections"). On an idle
    /// connection, a server that vanishes without a word is noticed after at most
    /// this plus the idle timeout (a PING sent after the last packet received
    /// restarts the idle timer once); a request notices sooner, at `timeout`.
    pub keep_alive: Duration,
    /// A UDP endpoint to share with other connections; `None` binds a new one for
    /// this connection. See [`ClientEndpoint`].
    pub endpoint: Option<ClientEndpoint>,
    /// TLS sessions to resume, shared by the config's clones: a reconnect with
    /// this config or a clone of it resumes the last session instead of a full
    /// handshake (on any node of a cluster, whose nodes open each other's tickets,
    /// when it trusts them alike: with [`Trust::Roots`], or the same pins).
    /// `None`: every connect is a full handshake.
    pub tls_sessions: Option<Arc<TlsSessions>>,
}

impl ClientConfig {
    /// This config aimed at another node of the cluster (from `Welcome.nodes` or a
    /// `Close`): its address and, for a pinned config, its certificate pin. `None`
    /// when the node's address or pin does not parse.
    pub fn for_node(&self, node: &v1::Node) -> Option<ClientConfig> {
        let mut next = self.clone();
        next.addr = node.address.parse().ok()?;
        if let Trust::Pinned(_) = next.trust {
            next.trust = Trust::Pinned(vec![tls::parse_pin(&node.cert_hash).ok()?]);
        }
        Some(next)
    }

    /// This config with a TLS session store of its own, empty (not shared with
    /// the clones it came from): its next connect is a full handshake.
    pub fn with_new_tls_sessions(mut self) -> Self {
        self.tls_sessions = Some(Arc::default());
        self
    }

    /// A config with defaults for everything but the essentials.
    pub fn new(
        addr: SocketAddr,
        transport: TransportKind,
        trust: Trust,
        token: impl Into<String>,
    ) -> Self {
        Self {
            addr,
            transport,
            server_name: "localhost".into(),
            trust,
            token: token.into(),
            resume: HashMap::new(),
            max_frame_size: 16 << 20,
            timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(15),
            endpoint: None,
            tls_sessions: Some(Arc::default()),
        }
    }
}

/// A client UDP socket and its QUIC endpoint, shared by many connections.
///
/// By default every [`Client`] binds its own socket, as a browser tab or an app
/// would. A program that holds many connections (a load generator, a gateway)
/// shares a few endpoints instead: one endpoint receives the packets of all its
/// connections in batches (`recvmmsg`, GRO) and runs one driver task, instead of a
/// socket, a driver and a wakeup per connection. Cloning is cheap.
#[derive(Clone)]
pub struct ClientEndpoint {
    kind: EndpointKind,
}

#[derive(Clone)]
enum EndpointKind {
    Quic(quinn::Endpoint),
    // The WebTransport endpoint carries the TLS trust (pins or roots) of the config
    // it was made from; a connection is refused one made for other trust.
    WebTransport(
        Arc<wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>>,
        Arc<Trust>,
    ),
}

impl std::fmt::Debug for ClientEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            EndpointKind::Quic(_) => "quic",
            EndpointKind::WebTransport(..) => "webtransport",
        };
        f.debug_struct("ClientEndpoint")
            .field("transport", &kind)
            .finish()
    }
}

impl ClientEndpoint {
    /// Binds an endpoint for connections like `config`: its transport, and for
    /// WebTransport its certificate trust and keep-alive, which every connection on
    /// the endpoint then uses (one with a different trust is refused). The socket
    /// gets kernel buffers of up to 4 MiB.
    pub fn bind(config: &ClientConfig) -> Result<Self, ClientError> {
        let bind: SocketAddr = if config.addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket =
            crate::transport::udp_socket(bind).map_err(|e| ClientError::Connect(e.to_string()))?;
        let kind = match config.transport {
            TransportKind::Quic => {
                let runtime = quinn::default_runtime()
                    .ok_or_else(|| ClientError::Connect("no Tokio runtime".into()))?;
                let endpoint =
                    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
                        .map_err(|e| ClientError::Connect(e.to_string()))?;
                EndpointKind::Quic(endpoint)
            }
            TransportKind::WebTransport => {
                // Tutti's own TLS config for both kinds of trust (the pin verifier
                // checks what wtransport's certificate hashes would), so that its
                // sessions resume like raw QUIC's.
                let tls = match &config.tls_sessions {
                    // A clone shares the verifier and the session store.
                    Some(s) => (*s.config(&config.trust, crate::protocol::ALPN_H3)).clone(),
                    None => tls::client_config(&config.trust, crate::protocol::ALPN_H3),
                };
                let wc = wtransport::ClientConfig::builder()
                    .with_bind_socket(socket)
                    .with_custom_tls(tls)
                    .keep_alive_interval(Some(config.keep_alive))
                    .build();
                let endpoint = wtransport::Endpoint::client(wc)
                    .map_err(|e| ClientError::Connect(e.to_string()))?;
                EndpointKind::WebTransport(Arc::new(endpoint), Arc::new(config.trust.clone()))
            }
        };
        Ok(Self { kind })
    }

    /// Moves this endpoint and its open connections to a new UDP socket on a new
    /// local port, as after a network change: QUIC connection migration keeps the
    /// sessions (the server sees the new address and validates it). Returns the new
    /// local address.
    pub fn rebind(&self) -> Result<SocketAddr, ClientError> {
        let connect = |e: std::io::Error| ClientError::Connect(e.to_string());
        let old = match &self.kind {
            EndpointKind::Quic(e) => e.local_addr(),
            EndpointKind::WebTransport(e, _) => e.local_addr(),
        }
        .map_err(connect)?;
        let socket = crate::transport::udp_socket((old.ip(), 0).into()).map_err(connect)?;
        let new = socket.local_addr().map_err(connect)?;
        match &self.kind {
            EndpointKind::Quic(e) => e.rebind(socket),
            EndpointKind::WebTransport(e, _) => e.rebind(socket),
        }
        .map_err(connect)?;
        Ok(new)
    }

    /// The connections open on this endpoint now.
    pub fn open_connections(&self) -> usize {
        match &self.kind {
            EndpointKind::Quic(e) => e.open_connections(),
            EndpointKind::WebTransport(e, _) => e.open_connections(),
        }
    }
}

/// How the server closed the session.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Closed {
    /// The close code, from the `Close` frame or the QUIC application close.
    pub code: Option<u32>,
    /// Its name, when the server sent a `Close` frame.
    pub name: String,
    /// The reason.
    pub message: String,
    /// With `GOING_AWAY` from a draining node: wait this long before reconnecting.
    pub retry_after_ms: u32,
    /// With `GOING_AWAY` and `REDIRECT` in a cluster: where to go, best first.
    pub nodes: Vec<v1::Node>,
}

impl Closed {
    /// The typed close code, if known.
    pub fn close_code(&self) -> Option<CloseCode> {
        self.code.and_then(CloseCode::from_u32)
    }
}

/// Chooses a node of a cluster to connect to (from `Welcome.nodes`, a `Close`, or
/// `GET /cluster`): of two nodes taken at random among those not draining, the one
/// with fewer sessions (the power of two choices: close to the least loaded node
/// without every client rushing to the same one). `None` when none is available.
pub fn pick_node(nodes: &[v1::Node]) -> Option<&v1::Node> {
    let live: Vec<&v1::Node> = nodes.iter().filter(|n| !n.draining).collect();
    let random = || u64::from_str_radix(&crate::util::random_hex(8), 16).unwrap_or(0) as usize;
    match live.len() {
        0 => None,
        1 => Some(live[0]),
        n => {
            let a = random() % n;
            let b = (a + 1 + random() % (n - 1)) % n;
            Some(if live[b].sessions < live[a].sessions {
                live[b]
            } else {
                live[a]
            })
        }
    }
}

/// A new client message id for [`Client::send_message_with_id`]: 32 hex digits,
/// the first 12 the Unix time in milliseconds and the rest random (80 bits). The
/// server keeps its idempotency records in id order, so ids that start with the
/// time are stored next to each other, at less cost than random ones.
///
/// It takes this machine's clock; [`Client::new_message_id`] takes the server's,
/// so that the ids of clients whose clocks disagree still line up.
pub fn new_client_message_id() -> String {
    client_message_id_at(crate::util::unix_millis())
}

/// A client message id that starts with the time `ms`.
fn client_message_id_at(ms: u64) -> String {
    format!(
        "{:012x}{}",
        ms & 0xffff_ffff_ffff,
        crate::util::random_hex(10)
    )
}

/// Client errors.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection could not be set up.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The session is closed (or was refused at the handshake).
    #[error("session closed: {0:?}")]
    Closed(Closed),
    /// The server answered the request with an error.
    #[error("server error {}: {}", .0.name, .0.message)]
    Server(v1::Error),
    /// No answer within the configured timeout.
    #[error("timed out")]
    Timeout,
    /// The server sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The close code when the session was closed with one.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            ClientError::Closed(c) => c.close_code(),
            _ => None,
        }
    }
}

/// Something the server sent that is not a response.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A push on the stream of `kind`.
    Push(StreamKind, Push),
    /// An error about a frame (`FRAME_TOO_LARGE`, ...), not tied to a request.
    FrameError(v1::Error),
    /// A datagram from the server other than a pong (a cursor move, ...).
    Datagram(datagram::Kind),
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<response::Body, ClientError>>>>;

struct Shared {
    session: Session,
    pending: Pending,
    pings: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    closed: watch::Sender<Option<Closed>>,
    epoch: Instant,
}

impl Shared {
    fn close_with(&self, closed: Closed) {
        self.closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(closed.clone());
                true
            } else {
                false
            }
        });
        let waiters: Vec<_> = self.pending.locked().drain().collect();
        for (_, tx) in waiters {
            let _ = tx.send(Err(ClientError::Closed(closed.clone())));
        }
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed(self.closed.borrow().clone().unwrap_or(Closed {
            code: None,
            name: String::new(),
            message: "session closed".into(),
            ..Default::default()
        }))
    }
}

/// A connected, authenticated session.
pub struct Client {
    shared: Arc<Shared>,
    welcome: v1::Welcome,
    control: tokio::sync::Mutex<SendStream>,
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    next_id: AtomicU64,
    timeout: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session_id", &self.welcome.session_id)
            .field("user", &self.welcome.user_id)
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared
            .session
            .close(CloseCode::Normal as u32, "client dropped");
    }
}

/// Opens a transport session without the Tutti handshake (tests use it to act as a
/// client that never says Hello).
pub async fn connect_transport(config: &ClientConfig) -> Result<Session, ClientError> {
    let connect = async {
        let endpoint = match &config.endpoint {
            Some(e) => e.clone(),
            None => ClientEndpoint::bind(config)?,
        };
        match (config.transport, endpoint.kind) {
            (TransportKind::Quic, EndpointKind::Quic(endpoint)) => {
                let tls = match &config.tls_sessions {
                    Some(s) => s.config(&config.trust, ALPN_NATIVE),
                    None => Arc::new(tls::client_config(&config.trust, ALPN_NATIVE)),
                };
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
                    .map_err(|e| ClientError::Connect(e.to_string()))?;
                let mut qc = quinn::ClientConfig::new(Arc::new(crypto));
                let mut transport = quinn::TransportConfig::default();
                transport
                    .keep_alive_interval(Some(config.keep_alive))
                    .max_concurrent_bidi_streams(0u32.into())
                    .max_concurrent_uni_streams(SERVER_UNI_STREAMS.into());
                qc.transport_config(Arc::new(transport));
                let conn = endpoint
                    .connect_with(qc, config.addr, &config.server_name)
                    .map_err(|e| ClientError::Connect(e.to_string()))?
                    .await
                    .map_err(|e| ClientError::Connect(e.to_string()))?;
                Ok(Session::quic(conn))
            }
            (TransportKind::WebTransport, EndpointKind::WebTransport(endpoint, trust)) => {
                if *trust != config.trust {
                    return Err(ClientError::Connect(
                        "the shared endpoint was made for another certificate trust".into(),
                    ));
                }
                // The URL carries the address itself; with pins no name is checked.
                let conn = endpoint
                    .connect(format!("https://{}{WEBTRANSPORT_PATH}", config.addr))
                    .await
                    .map_err(|e| match e {
                        // Closed by the server with a code as soon as the session
                        // was set up (too many sessions): a typed refusal.
                        wtransport::error::ConnectingError::ConnectionError(
                            wtransport::error::ConnectionError::ApplicationClosed(c),
                        ) => {
                            let code = u32::try_from(c.code().into_inner()).ok();
                            ClientError::Closed(Closed {
                                code,
                                name: code
                                    .and_then(CloseCode::from_u32)
                                    .map(|c| c.name().to_owned())
                                    .unwrap_or_default(),
                                message: String::from_utf8_lossy(c.reason()).into_owned(),
                                ..Default::default()
                            })
                        }
                        e => ClientError::Connect(e.to_string()),
                    })?;
                Ok(Session::webtransport(conn))
            }
            (t, _) => Err(ClientError::Connect(format!(
                "the shared endpoint is not for {t} connections"
            ))),
        }
    };
    tokio::time::timeout(config.timeout, connect)
        .await
        .map_err(|_| ClientError::Timeout)?
}

impl Client {
    /// Connects, sends `Hello` and waits for `Welcome`. A refused session is
    /// [`ClientError::Closed`] with the server's close code.
    ///
    /// A node of a cluster that has more than its share of sessions answers
    /// `REDIRECT` with a less loaded node: the client connects there instead, once,
    /// trusting the certificate pin the first node gave for it.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let session = connect_transport(&config).await?;
        match Self::over(session, config.clone()).await {
            Err(ClientError::Closed(c)) if c.close_code() == Some(CloseCode::Redirect) => {
                let Some(next) = c.nodes.first().and_then(|n| config.for_node(n)) else {
                    return Err(ClientError::Closed(c));
                };
                let session = connect_transport(&next).await?;
                Self::over(session, next).await
            }
            other => other,
        }
    }

    /// Sends `Hello` on a session that is already open (of any transport, such as
    /// [`crate::transport::memory::pair`]) and waits for `Welcome`. `config` gives
    /// the token, the resume offsets, the frame limit and the timeout.
    pub async fn over(session: Session, config: ClientConfig) -> Result<Self, ClientError> {
        let hello = ClientFrame {
            kind: Some(client_frame::Kind::Hello(v1::Hello {
                token: config.token.clone(),
                client: Some(v1::ClientInfo {
                    name: "tutti-rust".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    transport: config.transport.as_str().into(),
                }),
                resume: config.resume.clone(),
                protocol_version: PROTOCOL_VERSION,
            })),
        };
        // A server that refuses the connection before reading `Hello` (too many
        // sessions, from this address or in all) closes it with a close code.
        let refused = |e: String| match futures_util::FutureExt::now_or_never(session.closed()) {
            Some(info) if info.code.is_some() => ClientError::Closed(Closed {
                code: info.code,
                name: info
                    .code
                    .and_then(CloseCode::from_u32)
                    .map(|c| c.name().to_owned())
                    .unwrap_or_default(),
                message: info.reason,
                ..Default::default()
            }),
            _ => ClientError::Connect(e),
        };
        let handshake = async {
            let (mut send, mut recv) = session
                .open_bi()
                .await
                .map_err(|e| refused(e.to_string()))?;
            let mut buf = BytesMut::new();
            encode_frame(&hello, &mut buf);
            send.write_all(&buf)
                .await
                .map_err(|e| refused(e.to_string()))?;
            let mut decoder = FrameDecoder::new(config.max_frame_size);
            let first = read_frame(&mut recv, &mut decoder).await;
            Ok::<_, ClientError>((send, recv, decoder, first))
        };
        let (send, recv, decoder, first) = tokio::time::timeout(config.timeout, handshake)
            .await
            .map_err(|_| ClientError::Timeout)??;
        let welcome = match first {
            Some(Ok(ServerFrame {
                kind: Some(server_frame::Kind::Welcome(w)),
            })) => w,
            Some(Ok(ServerFrame {
                kind: Some(server_frame::Kind::Close(c)),
            })) => {
                session.close(CloseCode::Normal as u32, "");
                return Err(ClientError::Closed(Closed {
                    code: Some(c.code),
                    name: c.name,
                    message: c.message,
                    retry_after_ms: c.retry_after_ms,
                    nodes: c.nodes,
                }));
            }
            Some(Ok(other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
            Some(Err(e)) => return Err(ClientError::Protocol(e.to_string())),
            None => {
                let info = session.closed().await;
                return Err(ClientError::Closed(Closed {
                    code: info.code,
                    name: info
                        .code
                        .and_then(CloseCode::from_u32)
                        .map(|c| c.name().to_owned())
                        .unwrap_or_default(),
                    message: info.reason,
                    ..Default::default()
                }));
            }
        };

        let (closed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            session: session.clone(),
            pending: Mutex::new(HashMap::new()),
            pings: Mutex::new(HashMap::new()),
            closed,
            epoch: Instant::now(),
        });
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let tasks = vec![
            tokio::spawn(control_reader(
                shared.clone(),
                recv,
                decoder,
                events_tx.clone(),
            )),
            tokio::spawn(push_acceptor(
                shared.clone(),
                events_tx.clone(),
                config.max_frame_size,
            )),
            tokio::spawn(datagram_reader(shared.clone(), events_tx.clone())),
        ];
        Ok(Self {
            shared,
            welcome,
            control: tokio::sync::Mutex::new(send),
            events: tokio::sync::Mutex::new(events_rx),
            next_id: AtomicU64::new(1),
            timeout: config.timeout,
            tasks,
        })
    }

    /// The server's `Welcome`.
    pub fn welcome(&self) -> &v1::Welcome {
        &self.welcome
    }

    /// The server's clock now, in milliseconds since the Unix epoch:
    /// `Welcome.server_time_ms` plus the time since it arrived (this machine's
    /// clock when the server sent none).
    pub fn server_now_ms(&self) -> u64 {
        match self.welcome.server_time_ms {
            0 => crate::util::unix_millis(),
            t => t.saturating_add(self.shared.epoch.elapsed().as_millis() as u64),
        }
    }

    /// A new client message id for [`Client::send_message_with_id`], as
    /// [`new_client_message_id`] makes them but starting with the server's time
    /// ([`Client::server_now_ms`]): ids of clients whose clocks disagree are still
    /// recorded next to each other.
    pub fn new_message_id(&self) -> String {
        client_message_id_at(self.server_now_ms())
    }

    /// Which transport carries the session.
    pub fn transport(&self) -> TransportKind {
        self.shared.session.kind()
    }

    /// Starts a TLS key update on the connection (RFC 9001, section 6): its
    /// packets move to new keys and the session goes on. QUIC stacks do this
    /// themselves before a key wears out; this starts one now.
    pub fn update_keys(&self) {
        self.shared.session.update_keys()
    }

    /// The connection's acknowledgement traffic so far: ACK frames sent and
    /// received, and the server's requests to acknowledge less often
    /// (`timeouts.ack_delay`).
    pub fn ack_counts(&self) -> crate::transport::AckCounts {
        self.shared.session.ack_counts()
    }

    /// Sends a request and waits for its response.
    pub async fn request(&self, body: request::Body) -> Result<response::Body, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.pending.locked().insert(id, tx);
        if self.shared.closed.borrow().is_some() {
            self.forget(id);
            return Err(self.shared.closed_error());
        }
        let frame = ClientFrame {
            kind: Some(client_frame::Kind::Request(v1::Request {
                id,
                body: Some(body),
            })),
        };
        if let Err(e) = self.send_frame(&frame).await {
            self.forget(id);
            return Err(e);
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => {
                self.forget(id);
                Err(ClientError::Timeout)
            }
        }
    }

    fn forget(&self, id: u64) {
        self.shared.pending.locked().remove(&id);
    }

    /// Diagnostics: the server returns `payload` (and pushes it when `push`).
    pub async fn echo(&self, payload: Vec<u8>, push: bool) -> Result<Bytes, ClientError> {
        match self
            .request(request::Body::Echo(v1::EchoRequest {
                payload: payload.into(),
                push,
            }))
            .await?
        {
            response::Body::Echo(e) => Ok(e.payload),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Replaces the session's token with `token` (same user and roles, later
    /// expiry) so the session outlives the current one; returns the new expiry in
    /// milliseconds since the Unix epoch. Without a refresh the server closes the
    /// session with `TOKEN_EXPIRED` at `Welcome.token_expires_at_ms`. A refused
    /// token comes back as [`ClientError::Server`] and changes nothing.
    pub async fn refresh_token(&self, token: impl Into<String>) -> Result<u64, ClientError> {
        match self
            .request(request::Body::AuthRefresh(v1::AuthRefreshRequest {
                token: token.into(),
            }))
            .await?
        {
            response::Body::AuthRefresh(r) => Ok(r.token_expires_at_ms),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Sends a chat message with a fresh client message id; returns the stored
    /// message. This does not retry, and the id it made is not returned: to send
    /// a message that may need a retry (after a timeout, a reconnect), make its id
    /// with [`Client::new_message_id`] and send every attempt with
    /// [`send_message_with_id`](Self::send_message_with_id); it is then stored once.
    pub async fn send_message(
        &self,
        room_id: &str,
        text: &str,
    ) -> Result<v1::ChatMessage, ClientError> {
        self.send_message_with_id(room_id, text, &self.new_message_id())
            .await
    }

    /// Sends a chat message with the client message id `id` (1-64 bytes): the
    /// server stores a message once per (room, user, id) and answers a repeat
    /// with the stored message.
    pub async fn send_message_with_id(
        &self,
        room_id: &str,
        text: &str,
        id: &str,
    ) -> Result<v1::ChatMessage, ClientError> {
        match self
            .request(request::Body::ChatSend(v1::ChatSendRequest {
                room_id: room_id.to_owned(),
                text: text.to_owned(),
                client_message_id: id.to_owned(),
            }))
            .await?
        {
            response::Body::ChatSend(v1::ChatSendResponse {
                message: Some(message),
            }) => Ok(message),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Tracks analytics events for this session's user; returns the occurrences
    /// the server counted. Server errors (`RATE_LIMITED`, `LIMIT_EXCEEDED`, ...)
    /// come back as [`ClientError::Server`].
    pub async fn track(&self, events: Vec<v1::AnalyticsEvent>) -> Result<u64, ClientError> {
        match self
            .request(request::Body::AnalyticsTrack(v1::AnalyticsTrackRequest {
                events,
            }))
            .await?
        {
            response::Body::AnalyticsTrack(r) => Ok(r.accepted),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// The user's pending room invitations, oldest first. New ones arrive as
    /// `Push.room_invite` on the chat stream while connected; list again after a
    /// reconnect.
    pub async fn room_invites(&self) -> Result<Vec<v1::RoomInvite>, ClientError> {
        match self
            .request(request::Body::RoomInviteList(v1::RoomInviteListRequest {}))
            .await?
        {
            response::Body::RoomInviteList(r) => Ok(r.invites),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Accepts an invitation into `room_id`: the user becomes a participant and
    /// starts receiving the room's messages. Returns the room.
    pub async fn accept_invite(&self, room_id: &str) -> Result<v1::Room, ClientError> {
        let body = request::Body::RoomInviteAccept(v1::RoomInviteAcceptRequest {
            room_id: room_id.to_owned(),
        });
        match self.request(body).await? {
            response::Body::RoomInviteAccept(v1::RoomInviteAcceptResponse { room: Some(r) }) => {
                Ok(r)
            }
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Declines an invitation into `room_id`.
    pub async fn decline_invite(&self, room_id: &str) -> Result<(), ClientError> {
        let body = request::Body::RoomInviteDecline(v1::RoomInviteDeclineRequest {
            room_id: room_id.to_owned(),
        });
        match self.request(body).await? {
            response::Body::RoomInviteDecline(_) => Ok(()),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Sends a datagram ping and waits for the pong; returns the round trip.
    /// Datagrams may be lost: this times out after the configured timeout.
    pub async fn ping_datagram(&self) -> Result<Duration, ClientError> {
        static NONCE: AtomicU64 = AtomicU64::new(1);
        let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.pings.locked().insert(nonce, tx);
        let sent = Instant::now();
        let dgram = Datagram {
            kind: Some(datagram::Kind::Ping(v1::DatagramPing {
                nonce,
                sent_at_us: self.shared.epoch.elapsed().as_micros() as u64,
            })),
        };
        let result = async {
            self.shared
                .session
                .send_datagram(dgram.encode_to_vec().into())
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            tokio::time::timeout(self.timeout, rx)
                .await
                .map_err(|_| ClientError::Timeout)?
                .map_err(|_| self.shared.closed_error())
        }
        .await;
        self.shared.pings.locked().remove(&nonce);
        result.map(|()| sent.elapsed())
    }

    /// The next pushed event or frame error; `None` once the session is closed and
    /// every event was read.
    pub async fn next_event(&self) -> Option<Event> {
        self.events.lock().await.recv().await
    }

    /// Sends a datagram (may be lost), such as a cursor move.
    pub fn send_datagram(&self, kind: datagram::Kind) -> Result<(), ClientError> {
        let d = Datagram { kind: Some(kind) };
        self.shared
            .session
            .send_datagram(d.encode_to_vec().into())
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Writes raw bytes on the control stream. For tests of the server's handling of
    /// bad input; a well-behaved application never needs it.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.control
            .lock()
            .await
            .write_all(bytes)
            .await
            .map_err(|_| self.shared.closed_error())
    }

    async fn send_frame(&self, frame: &ClientFrame) -> Result<(), ClientError> {
        let mut buf = BytesMut::new();
        encode_frame(frame, &mut buf);
        self.send_raw(&buf).await
    }

    /// Waits until the session is closed and returns how.
    pub async fn closed(&self) -> Closed {
        let mut rx = self.shared.closed.subscribe();
        let got = rx.wait_for(|c| c.is_some()).await.map(|c| c.clone());
        match got {
            Ok(Some(c)) => c,
            _ => {
                let info = self.shared.session.closed().await;
                closed_from_transport(info)
            }
        }
    }

    /// Closes the session normally.
    pub fn close(&self) {
        self.shared
            .session
            .close(CloseCode::Normal as u32, "client closed");
    }
}

fn closed_from_transport(info: crate::transport::CloseInfo) -> Closed {
    Closed {
        code: info.code,
        name: info
            .code
            .and_then(CloseCode::from_u32)
            .map(|c| c.name().to_owned())
            .unwrap_or_default(),
        message: info.reason,
        ..Default::default()
    }
}

/// Reads one frame; `None` when the stream ends or fails first.
async fn read_frame<M: Message + Default>(
    recv: &mut RecvStream,
    decoder: &mut FrameDecoder,
) -> Option<Result<M, crate::protocol::FrameError>> {
    loop {
        match decoder.decode::<M>() {
            Ok(Some(m)) => return Some(Ok(m)),
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        // The stream's own chunks: no buffer held while the reader waits.
        match recv.read_chunk(16 * 1024).await {
            Ok(None) | Err(_) => return None,
            Ok(Some(bytes)) => decoder.extend(&bytes),
        }
    }
}

async fn control_reader(
    shared: Arc<Shared>,
    mut recv: RecvStream,
    mut decoder: FrameDecoder,
    events: mpsc::Sender<Event>,
) {
    while let Some(frame) = read_frame::<ServerFrame>(&mut recv, &mut decoder).await {
        let Ok(frame) = frame else { break };
        match frame.kind {
            Some(server_frame::Kind::Response(r)) => {
                let tx = shared.pending.locked().remove(&r.id);
                if let Some(tx) = tx {
                    let result = match r.body {
                        Some(response::Body::Error(e)) => Err(ClientError::Server(e)),
                        Some(body) => Ok(body),
                        None => Err(ClientError::Protocol("empty response".into())),
                    };
                    let _ = tx.send(result);
                }
            }
            Some(server_frame::Kind::Error(e)) => {
                let _ = events.send(Event::FrameError(e)).await;
            }
            Some(server_frame::Kind::Close(c)) => {
                shared.close_with(Closed {
                    code: Some(c.code),
                    name: c.name,
                    message: c.message,
                    retry_after_ms: c.retry_after_ms,
                    nodes: c.nodes,
                });
                // The server waits for us to close once we have read its Close.
                shared.session.close(CloseCode::Normal as u32, "");
                return;
            }
            Some(server_frame::Kind::Pong(_)) | Some(server_frame::Kind::Welcome(_)) | None => {}
        }
    }
    let info = shared.session.closed().await;
    shared.close_with(closed_from_transport(info));
}

async fn push_acceptor(shared: Arc<Shared>, events: mpsc::Sender<Event>, max_frame: usize) {
    while let Ok(mut recv) = shared.session.accept_uni().await {
        let events = events.clone();
        tokio::spawn(async move {
            let mut decoder = FrameDecoder::new(max_frame);
            let kind = match read_frame::<PushStreamHeader>(&mut recv, &mut decoder).await {
                Some(Ok(h)) => StreamKind::try_from(h.kind).unwrap_or(StreamKind::Unspecified),
                _ => return,
            };
            while let Some(Ok(push)) = read_frame::<Push>(&mut recv, &mut decoder).await {
                if events.send(Event::Push(kind, push)).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn datagram_reader(shared: Arc<Shared>, events: mpsc::Sender<Event>) {
    while let Ok(data) = shared.session.read_datagram().await {
        let p = match Datagram::decode(data) {
            Ok(Datagram {
                kind: Some(datagram::Kind::Pong(p)),
            }) => p,
            Ok(Datagram { kind: Some(other) }) => {
                // Datagrams may be dropped: never wait for a full queue here.
                let _ = events.try_send(Event::Datagram(other));
                continue;
            }
            _ => continue,
        };
        let tx = shared.pings.locked().remove(&p.nonce);
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, sessions: u64, draining: bool) -> v1::Node {
        v1::Node {
            node_id: id.into(),
            sessions,
            draining,
            ..Default::default()
        }
    }

    #[test]
    fn client_message_ids_start_with_the_time_and_differ() {
        let before = crate::util::unix_millis();
        let (a, b) = (new_client_message_id(), new_client_message_id());
        let after = crate::util::unix_millis();
        for id in [&a, &b] {
            assert_eq!(id.len(), 32);
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
            let ms = u64::from_str_radix(&id[..12], 16).unwrap();
            assert!((before..=after).contains(&ms), "{id}");
        }
        assert_ne!(a, b);
        assert!(client_message_id_at(0x0123_4567_89ab).starts_with("0123456789ab"));
        assert!(client_message_id_at(1 << 48 | 7).starts_with("000000000007"));
    }

    #[test]
    fn pick_node_prefers_the_less_loaded_of_two_and_skips_draining_nodes() {
        assert!(pick_node(&[]).is_none());
        assert!(pick_node(&[node("a", 0, true)]).is_none());
        let two = [
            node("a", 10, false),
            node("b", 3, false),
            node("c", 0, true),
        ];
        for _ in 0..50 {
            assert_eq!(pick_node(&two).unwrap().node_id, "b", "a against b: b");
        }
        // Among three, the busiest is never chosen: it loses every pair it is in.
        let three = [
            node("a", 10, false),
            node("b", 3, false),
            node("c", 5, false),
        ];
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(pick_node(&three).unwrap().node_id.clone());
        }
        assert!(!seen.contains("a"));
        assert!(seen.contains("b") && seen.contains("c"), "{seen:?}");
    }
}
