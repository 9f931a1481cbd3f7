//! One UDP port for both transports: a single quinn endpoint offers the ALPNs `h3`
//! and `tutti/1`; after the TLS handshake the negotiated ALPN decides whether the
//! connection is handed to wtransport (HTTP/3 + WebTransport) or used as raw QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{SOCKET_BUFFER, Session, udp_socket};
use crate::protocol::{ALPN_H3, ALPN_NATIVE, WEBTRANSPORT_PATH};
use crate::tls::CertStore;

/// Bidirectional streams a client may open. Raw QUIC uses one (the control
/// stream); WebTransport two: HTTP/3's CONNECT request stream and the control
/// stream inside the session. One endpoint serves both ALPNs and the limit is sent
/// in the handshake, before the ALPN is known, so this is the larger of the two;
/// a raw QUIC connection is lowered to [`NATIVE_BIDI_STREAMS`] once it is known.
const MAX_CLIENT_BIDI_STREAMS: u32 = 2;
/// Unidirectional streams a client may open: HTTP/3's control stream and the two
/// QPACK streams, plus one for a browser that greases HTTP/3 with a stream of a
/// reserved type. Tutti clients open none of their own.
const MAX_CLIENT_UNI_STREAMS: u32 = 4;
/// Bidirectional streams a raw QUIC (`tutti/1`) client may open: the control stream.
const NATIVE_BIDI_STREAMS: u32 = 1;

/// A session that completed its transport handshake.
#[derive(Debug)]
pub struct Accepted {
    /// The session.
    pub session: Session,
    /// When the first packet arrived, for handshake latency.
    pub started: Instant,
}

/// Transport settings of the endpoint.
#[derive(Debug, Clone)]
pub struct EndpointSettings {
    /// Makes and opens TLS session tickets (resumption); `None`: rustls's default
    /// (tickets for this process only).
    pub tickets: Option<Arc<dyn rustls::server::ProducesTickets>>,
    /// A connection with no packet for this long is closed.
    pub idle_timeout: Duration,
    /// The server sends a keep-alive this often when it has nothing to send.
    pub keep_alive: Duration,
    /// Time allowed for the QUIC and WebTransport handshakes.
    pub handshake_timeout: Duration,
    /// QUIC stream flow-control window: bytes a client may send on one stream
    /// ahead of the server reading them.
    pub stream_receive_window: u64,
    /// QUIC connection flow-control window: bytes a client may send on all of its
    /// streams together ahead of the server reading them.
    pub connection_receive_window: u64,
    /// Bytes sent on one connection ahead of the client's acknowledgements.
    pub send_window: u64,
    /// Handshakes in progress past which new connections must validate their
    /// address with a Retry first.
    pub retry_above_handshakes: usize,
    /// Bytes of datagrams buffered per connection in each direction; past this
    /// the oldest are dropped (datagrams may be lost anyway).
    pub datagram_buffer: usize,
    /// The congestion controller of every connection.
    pub congestion_control: CongestionControl,
    /// The longest a client offering QUIC's ACK-frequency extension is asked to
    /// wait before acknowledging; zero asks nothing.
    pub ack_delay: Duration,
}

/// For how long after a packet to a client is lost that client is asked for its
/// own ACK delay rather than [`EndpointSettings::ack_delay`], and for an ACK every
/// second packet rather than every tenth. At 2% loss and ten packets a second a
/// connection loses a packet every 5 s on average, so it stays on its own delay;
/// on a clean path one stray loss costs 10 s of more ACKs.
pub const ACK_DELAY_LOSS_FALLBACK: Duration = Duration::from_secs(10);

/// A QUIC congestion controller (quinn's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CongestionControl {
    /// CUBIC (RFC 9438), quinn's default.
    #[default]
    Cubic,
    /// BBR, opt-in. CUBIC takes every loss as congestion and does not grow its
    /// window while a connection is application-limited, as a real-time
    /// connection mostly is: on a path with random loss its window shrinks and
    /// stays small, so a burst (a history page, a document snapshot) takes many
    /// round trips. BBR paces by measured bandwidth and round trip instead
    /// (docs/BENCHMARKS.md, "Through an impaired network"). Not the default:
    /// quinn marks its BBR experimental, it follows an early draft (quinn issue
    /// #1254), and it was measured here against random loss, not against
    /// competing flows or deep queues.
    Bbr,
}

impl EndpointSettings {
    /// The QUIC transport parameters of every connection.
    fn transport(&self) -> anyhow::Result<quinn::TransportConfig> {
        let window = |n: u64, key: &str| {
            quinn::VarInt::from_u64(n).map_err(|_| anyhow::anyhow!("{key} is too large"))
        };
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(self.idle_timeout.try_into()?))
            .keep_alive_interval(Some(self.keep_alive))
            // quinn's defaults (100 + 100 streams, 1.25 MB per stream and no
            // connection window) let a client park tens of megabytes in the server
            // on streams nobody reads. Only the streams the protocol uses are
            // allowed, and the connection window bounds what they hold together.
            .max_concurrent_bidi_streams(MAX_CLIENT_BIDI_STREAMS.into())
            .max_concurrent_uni_streams(MAX_CLIENT_UNI_STREAMS.into())
            .stream_receive_window(window(
                self.stream_receive_window,
                "limits.stream_receive_window",
            )?)
            .receive_window(window(
                self.connection_receive_window,
                "limits.connection_receive_window",
            )?)
            .send_window(self.send_window)
            // quinn buffers 1.25 MB of datagrams each way by default.
            .datagram_receive_buffer_size(Some(self.datagram_buffer))
            .datagram_send_buffer_size(self.datagram_buffer);
        if !self.ack_delay.is_zero() {
            // A client that offers the extension (quinn does) is asked to
            // acknowledge after `ack_delay` instead of its own 25 ms, or after ten
            // packets instead of two, and at once when a packet is missing, so
            // that a loss followed by another packet is found and resent without
            // waiting. quinn clamps the delay it asks for to the RTT (or 25 ms)
            // unless told to ask for it as it is: `exact_max_ack_delay`, a change
            // of the vendored quinn-proto (vendor/quinn-proto/PATCHES.md). On a
            // lossy path both cost time: a lost packet that is the last for a
            // while is resent after a probe timeout, which includes the delay
            // asked for, and a burst (a history page) needs its ACK clock. So for
            // `ACK_DELAY_LOSS_FALLBACK` after a loss the client is asked to
            // acknowledge as without the extension (its own delay, every second
            // packet), and a lossy path recovers as fast as without it. A long
            // delay saves ACKs only when several packets fall within it; a
            // connection whose packets come further apart than `ack_delay` (a few
            // notifications a minute) would save none and only wait longer for a
            // lost one, so while its mean gap (smoothed as the RTT is) exceeds the
            // delay, its client is asked for its own delay too (`sparse_fallback`,
            // another vendored change), until the gap is half the delay again.
            // And a client asked for an ACK only every tenth packet would leave
            // the server waiting out the whole delay whenever its congestion
            // window fills first (ten packets of 1,200 bytes do not fit in the
            // initial window): a busy stream to one client stalled for up to
            // 500 ms. So the last packet the window lets out asks for an ACK at
            // once (`immediate_ack_when_window_fills`, another vendored change).
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(quinn::VarInt::from_u32(9))
                .max_ack_delay(Some(self.ack_delay))
                .reordering_threshold(quinn::VarInt::from_u32(1))
                .exact_max_ack_delay(true)
                .loss_fallback(ACK_DELAY_LOSS_FALLBACK)
                .sparse_fallback(true)
                .immediate_ack_when_window_fills(true);
            transport.ack_frequency_config(Some(ack));
        }
        if let Some(factory) = self.congestion_control.factory() {
            transport.congestion_controller_factory(factory);
        }
        Ok(transport)
    }
}

impl CongestionControl {
    /// The controller factory to set, or `None` for quinn's default (CUBIC).
    fn factory(self) -> Option<Arc<dyn quinn::congestion::ControllerFactory + Send + Sync>> {
        match self {
            Self::Cubic => None,
            Self::Bbr => Some(Arc::new(quinn::congestion::BbrConfig::default())),
        }
    }
}

/// Whether a connection attempt must first validate its address (answered with a
/// QUIC Retry): when it has not already, and `in_progress` handshakes are running
/// at or past `threshold`. A Retry costs a legitimate client one round trip, and a
/// flood from spoofed addresses no handshake state at all.
pub fn needs_retry(address_validated: bool, in_progress: usize, threshold: usize) -> bool {
    !address_validated && in_progress >= threshold
}

/// The bound UDP endpoint.
#[derive(Debug, Clone)]
pub struct ServerEndpoint {
    endpoint: quinn::Endpoint,
    settings: EndpointSettings,
    /// Handshakes in progress.
    handshakes: Arc<AtomicUsize>,
    /// Counts Retries sent.
    metrics: Arc<crate::metrics::Metrics>,
}

impl ServerEndpoint {
    /// Binds `addr` with the certificates of `certs`.
    pub fn bind(
        addr: SocketAddr,
        certs: &Arc<CertStore>,
        settings: EndpointSettings,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        let mut tls = certs.server_config(&[ALPN_H3, ALPN_NATIVE]);
        if let Some(tickets) = &settings.tickets {
            tls.ticketer = tickets.clone();
            // One ticket per handshake is enough for a client that reconnects
            // one connection at a time; each costs an encryption and its bytes.
            tls.send_tls13_tickets = 1;
        }
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(settings.transport()?));
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
        Ok(Self {
            endpoint,
            settings,
            handshakes: Arc::new(AtomicUsize::new(0)),
            metrics,
        })
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
            if needs_retry(
                incoming.remote_address_validated(),
                self.handshakes.load(Ordering::Relaxed),
                self.settings.retry_above_handshakes,
            ) && incoming.may_retry()
            {
                // The client comes back with a token proving its address; that
                // attempt is validated and goes through.
                self.metrics.quic_retries.fetch_add(1, Ordering::Relaxed);
                let _ = incoming.retry();
                continue;
            }
            let on_session = on_session.clone();
            let timeout = self.settings.handshake_timeout;
            let handshakes = HandshakeGuard::new(self.handshakes.clone());
            tasks.spawn(async move {
                let result = tokio::time::timeout(timeout, handshake(incoming)).await;
                drop(handshakes);
                match result {
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

/// Counts a handshake while it runs.
struct HandshakeGuard(Arc<AtomicUsize>);

impl HandshakeGuard {
    fn new(n: Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
        let connection = connecting.await?;
        // Credit already granted in the handshake stays; no more is given than
        // the control stream needs.
        connection.set_max_concurrent_bi_streams(NATIVE_BIDI_STREAMS.into());
        connection.set_max_concurrent_uni_streams(0u32.into());
        return Ok(Session::quic(connection));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bbr_builds_quinns_bbr_controller_and_cubic_keeps_the_default() {
        let bbr = CongestionControl::Bbr.factory().expect("a factory for BBR");
        let controller = bbr.build(std::time::Instant::now(), 1200);
        assert!(
            controller
                .into_any()
                .downcast::<quinn::congestion::Bbr>()
                .is_ok(),
            "not quinn's BBR"
        );
        assert!(CongestionControl::Cubic.factory().is_none());
    }
}
