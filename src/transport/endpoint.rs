//! One UDP port for both transports: a single quinn endpoint offers the ALPNs `h3`
//! and `tutti/1`; after the TLS handshake the negotiated ALPN decides whether the
//! connection is handed to wtransport (HTTP/3 + WebTransport) or used as raw QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{SOCKET_BUFFER, Session, udp_socket};
use crate::protocol::{ALPN_H3, ALPN_NATIVE, WEBTRANSPORT_PATH};
use crate::tls::CertStore;

/// Streams of each direction a client may have open at once.
const MAX_CLIENT_STREAMS: u32 = 16;

/// A session that completed its transport handshake.
#[derive(Debug)]
pub struct Accepted {
    /// The session.
    pub session: Session,
    /// When the first packet arrived, for handshake latency.
    pub started: Instant,
}

/// Transport settings of the endpoint.
#[derive(Debug, Clone, Copy)]
pub struct EndpointSettings {
    /// A connection with no packet for this long is closed.
    pub idle_timeout: Duration,
    /// The server sends a keep-alive this often when it has nothing to send.
    pub keep_alive: Duration,
    /// Time allowed for the QUIC and WebTransport handshakes.
    pub handshake_timeout: Duration,
}

/// The bound UDP endpoint.
#[derive(Debug, Clone)]
pub struct ServerEndpoint {
    endpoint: quinn::Endpoint,
    settings: EndpointSettings,
}

impl ServerEndpoint {
    /// Binds `addr` with the certificates of `certs`.
    pub fn bind(
        addr: SocketAddr,
        certs: &Arc<CertStore>,
        settings: EndpointSettings,
    ) -> anyhow::Result<Self> {
        let tls = certs.server_config(&[ALPN_H3, ALPN_NATIVE]);
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(settings.idle_timeout.try_into()?))
            .keep_alive_interval(Some(settings.keep_alive))
            // quinn keeps state for every stream a peer may open (100 + 100 by
            // default, about 8 KiB per connection). A client opens one control
            // stream (plus, over WebTransport, the CONNECT stream and HTTP/3's three
            // unidirectional streams); the server opens the push streams.
            .max_concurrent_bidi_streams(MAX_CLIENT_STREAMS.into())
            .max_concurrent_uni_streams(MAX_CLIENT_STREAMS.into());
        config.transport_config(Arc::new(transport));
        // No NEW_TOKEN frames: a token only lets a returning client's first flight
        // exceed the 3x anti-amplification limit, which Tutti's handshakes never
        // reach, and each costs the server a key derivation and an encryption per
        // connection.
        let mut tokens = quinn::ValidationTokenConfig::default();
        tokens.sent(0);
        config.validation_token_config(tokens);
        let socket = udp_socket(addr)?;
        // Linux reports twice the usable size (it counts its own bookkeeping).
        let sock = socket2::SockRef::from(&socket);
        let recv = sock.recv_buffer_size().unwrap_or(0) / 2;
        let send = sock.send_buffer_size().unwrap_or(0) / 2;
        if recv < SOCKET_BUFFER || send < SOCKET_BUFFER {
            tracing::info!(
                recv_kib = recv / 1024,
                send_kib = send / 1024,
                wanted_kib = SOCKET_BUFFER / 1024,
                "UDP socket buffers are smaller than wanted; raise net.core.rmem_max and \
                 net.core.wmem_max (docs/OPERATIONS.md)"
            );
        }
        let runtime = quinn::default_runtime()
            .ok_or_else(|| anyhow::anyhow!("quinn needs a Tokio runtime"))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(config),
            socket,
            runtime,
        )?;
        Ok(Self { endpoint, settings })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accepts connections until `stop` fires, calling `on_session` for each session
    /// that completes its transport handshake. Handshakes run in `tasks`.
    pub async fn run<F>(&self, tasks: TaskTracker, stop: CancellationToken, on_session: F)
    where
        F: Fn(Accepted) + Send + Sync + 'static,
    {
        let on_session = Arc::new(on_session);
        loop {
            let incoming = tokio::select! {
                _ = stop.cancelled() => break,
                i = self.endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let started = Instant::now();
            let on_session = on_session.clone();
            let timeout = self.settings.handshake_timeout;
            tasks.spawn(async move {
                match tokio::time::timeout(timeout, handshake(incoming)).await {
                    Ok(Ok(session)) => on_session(Accepted { session, started }),
                    Ok(Err(e)) => tracing::debug!(error = %e, "transport handshake failed"),
                    Err(_) => tracing::debug!("transport handshake timed out"),
                }
            });
        }
        // No new connections; open ones are closed by their own tasks.
        self.endpoint.set_server_config(None);
    }

    /// Closes every connection at once and waits (bounded) for the peers to be told.
    pub async fn close(&self, within: Duration) {
        self.endpoint.close(0u32.into(), b"server stopped");
        let _ = tokio::time::timeout(within, self.endpoint.wait_idle()).await;
    }
}

async fn handshake(incoming: quinn::Incoming) -> anyhow::Result<Session> {
    let mut connecting = incoming.accept()?;
    let alpn = connecting
        .handshake_data()
        .await?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .map_err(|_| anyhow::anyhow!("no TLS handshake data"))?
        .protocol
        .unwrap_or_default();
    if alpn == ALPN_NATIVE {
        return Ok(Session::quic(connecting.await?));
    }
    // The only other ALPN offered is h3.
    let request =
        wtransport::endpoint::IncomingSessionFuture::with_quic_connecting(connecting).await?;
    if request.path() != WEBTRANSPORT_PATH {
        tracing::debug!(
            path = request.path(),
            "WebTransport request for an unknown path"
        );
        request.not_found().await;
        anyhow::bail!("unknown WebTransport path");
    }
    Ok(Session::webtransport(request.accept().await?))
}
