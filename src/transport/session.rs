//! One session type over every transport: [`Session`] wraps a [`Transport`], which
//! raw QUIC ([`quinn`]), WebTransport ([`wtransport`]) and the in-memory pair of
//! [`super::memory`] implement. The gateway and the client see only [`Session`] and
//! boxed byte streams.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};

use super::TransportKind;

/// The sending half of a stream: an [`AsyncWrite`], which over QUIC (raw or
/// WebTransport) can also take a shared buffer without copying it
/// ([`try_write_chunk`](Self::try_write_chunk)).
pub struct SendStream(Tx);

enum Tx {
    Quic(quinn::SendStream),
    WebTransport(wtransport::SendStream),
    Other(Box<dyn AsyncWrite + Send + Unpin>),
}

impl SendStream {
    /// A stream over any byte sink (the in-memory transport's).
    pub fn new(stream: impl AsyncWrite + Send + Unpin + 'static) -> Self {
        Self(Tx::Other(Box::new(stream)))
    }

    /// One write attempt that does not wait: how much of `chunk` the stream takes
    /// now (flow control and its send buffer permitting), or `Pending` when it
    /// takes nothing. The caller's own poll registers the waker that counts.
    ///
    /// Over QUIC the stream keeps a reference to `chunk`'s bytes rather than a
    /// copy, so one publication encoded once is shared by every subscriber's
    /// stream until each has been acknowledged: no allocation and no copy per
    /// subscriber. Other streams copy.
    pub fn try_write_chunk(&mut self, chunk: &Bytes) -> Poll<std::io::Result<usize>> {
        use futures_util::FutureExt;
        let quic = match &mut self.0 {
            Tx::Quic(s) => s,
            // A WebTransport stream's header went with its opening; what follows
            // on the QUIC stream is the application's bytes.
            Tx::WebTransport(s) => s.quic_stream_mut(),
            Tx::Other(s) => {
                let mut cx = Context::from_waker(Waker::noop());
                return Pin::new(s).poll_write(&mut cx, chunk);
            }
        };
        let mut chunks = [chunk.clone()];
        // `now_or_never` polls once with a no-op waker.
        match quic.write_chunks(&mut chunks).now_or_never() {
            None => Poll::Pending,
            Some(Ok(written)) => Poll::Ready(Ok(written.bytes)),
            Some(Err(e)) => Poll::Ready(Err(e.into())),
        }
    }
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.0 {
            Tx::Quic(_) => "quic",
            Tx::WebTransport(_) => "webtransport",
            Tx::Other(_) => "other",
        };
        f.debug_tuple("SendStream").field(&kind).finish()
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().0 {
            // The trait's, not quinn's inherent `poll_write` (which returns its own error).
            Tx::Quic(s) => AsyncWrite::poll_write(Pin::new(s), cx, buf),
            Tx::WebTransport(s) => Pin::new(s).poll_write(cx, buf),
            Tx::Other(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            Tx::Quic(s) => Pin::new(s).poll_flush(cx),
            Tx::WebTransport(s) => Pin::new(s).poll_flush(cx),
            Tx::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            Tx::Quic(s) => Pin::new(s).poll_shutdown(cx),
            Tx::WebTransport(s) => Pin::new(s).poll_shutdown(cx),
            Tx::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The receiving half of a stream: an [`AsyncRead`], which can also hand over
/// what has arrived without a buffer of the caller's ([`read_chunk`](Self::read_chunk)).
pub struct RecvStream(Recv);

enum Recv {
    Quic(quinn::RecvStream),
    WebTransport(wtransport::RecvStream),
    Other(Box<dyn AsyncRead + Send + Unpin>),
}

impl RecvStream {
    /// A stream over any byte source (the in-memory transport's).
    pub fn new(stream: impl AsyncRead + Send + Unpin + 'static) -> Self {
        Self(Recv::Other(Box::new(stream)))
    }

    /// Up to `max` bytes that have arrived, in order; `None` once the peer has
    /// finished the stream.
    ///
    /// Over QUIC (raw or WebTransport) this takes the bytes out of the stream's
    /// receive buffer as they are, so a reader that spends most of its life waiting
    /// holds no buffer of its own while it does. Cancel safe: bytes are taken only
    /// when the future completes.
    pub async fn read_chunk(&mut self, max: usize) -> std::io::Result<Option<Bytes>> {
        // A WebTransport stream's header is read when the stream is accepted; what
        // follows on the QUIC stream is the application's bytes.
        let quic = match &mut self.0 {
            Recv::Quic(s) => s,
            Recv::WebTransport(s) => s.quic_stream_mut(),
            Recv::Other(s) => {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0; max];
                let n = s.read(&mut buf).await?;
                buf.truncate(n);
                return Ok((n > 0).then(|| buf.into()));
            }
        };
        Ok(quic.read_chunk(max, true).await?.map(|chunk| chunk.bytes))
    }
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.0 {
            Recv::Quic(_) => "quic",
            Recv::WebTransport(_) => "webtransport",
            Recv::Other(_) => "other",
        };
        f.debug_tuple("RecvStream").field(&kind).finish()
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            Recv::Quic(s) => Pin::new(s).poll_read(cx, buf),
            Recv::WebTransport(s) => Pin::new(s).poll_read(cx, buf),
            Recv::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

/// How a session ended, as seen from this side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The application close code, when the peer (or this side) closed with one.
    pub code: Option<u32>,
    /// The close reason or a description of the failure.
    pub reason: String,
}

/// A session-level failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The session is closed.
    #[error("session closed: {0:?}")]
    Closed(CloseInfo),
    /// A datagram could not be sent (too large, or datagrams unsupported).
    #[error("datagram not sent: {0}")]
    Datagram(String),
}

/// What a session offers: bidirectional and unidirectional streams, datagrams, a
/// typed close, and a few statistics. Object safe, so that a [`Session`] can carry
/// any implementation.
pub trait Transport: Send + Sync + std::fmt::Debug + 'static {
    /// Which transport carries this session.
    fn kind(&self) -> TransportKind;
    /// Waits for the peer to open a bidirectional stream.
    fn accept_bi(&self) -> BoxFuture<'_, Result<(SendStream, RecvStream), SessionError>>;
    /// Opens a bidirectional stream.
    fn open_bi(&self) -> BoxFuture<'_, Result<(SendStream, RecvStream), SessionError>>;
    /// Opens a unidirectional stream.
    fn open_uni(&self) -> BoxFuture<'_, Result<SendStream, SessionError>>;
    /// Waits for the peer to open a unidirectional stream.
    fn accept_uni(&self) -> BoxFuture<'_, Result<RecvStream, SessionError>>;
    /// Sends a datagram (unreliable, unordered).
    fn send_datagram(&self, data: Bytes) -> Result<(), SessionError>;
    /// Waits for the next datagram.
    fn read_datagram(&self) -> BoxFuture<'_, Result<Bytes, SessionError>>;
    /// The largest datagram payload the path allows now, if datagrams are supported.
    fn max_datagram_size(&self) -> Option<usize>;
    /// Closes the session with an application code. Unsent data is dropped.
    fn close(&self, code: u32, reason: &str);
    /// Waits until the session is closed, by either side or by a timeout.
    fn closed(&self) -> BoxFuture<'_, CloseInfo>;
    /// The peer's address.
    fn remote_address(&self) -> SocketAddr;
    /// Payload bytes (received, sent) over the connection so far.
    fn transferred(&self) -> (u64, u64);
    /// The current round-trip time estimate.
    fn rtt(&self) -> Duration;
    /// Starts a TLS key update: the connection's packets move to new keys (QUIC
    /// key phases, RFC 9001 section 6) and the session goes on. Transports
    /// without packet keys ignore it.
    fn update_keys(&self) {}
    /// Acknowledgement traffic over the connection so far (zeros for transports
    /// that do not count it).
    fn ack_counts(&self) -> AckCounts {
        AckCounts::default()
    }
}

/// Acknowledgement traffic of a QUIC connection, from this end's side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckCounts {
    /// ACK frames this end sent.
    pub sent: u64,
    /// ACK frames this end received.
    pub received: u64,
    /// ACK_FREQUENCY frames this end received: requests of the peer to acknowledge
    /// less often (QUIC's ACK-frequency extension).
    pub frequency_requests: u64,
    /// IMMEDIATE_ACK frames this end received: requests of the peer to acknowledge
    /// a packet at once (the same extension).
    pub immediate_requests: u64,
}

impl AckCounts {
    fn of(stats: &quinn::ConnectionStats) -> Self {
        Self {
            sent: stats.frame_tx.acks,
            received: stats.frame_rx.acks,
            frequency_requests: stats.frame_rx.ack_frequency,
            immediate_requests: stats.frame_rx.immediate_ack,
        }
    }
}

/// The counts of several connections together.
impl std::iter::Sum for AckCounts {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |sum, c| Self {
            sent: sum.sent + c.sent,
            received: sum.received + c.received,
            frequency_requests: sum.frequency_requests + c.frequency_requests,
            immediate_requests: sum.immediate_requests + c.immediate_requests,
        })
    }
}

/// A session over any [`Transport`]. Cloning is cheap (one reference count).
#[derive(Clone, Debug)]
pub struct Session(Arc<dyn Transport>);

impl Session {
    /// A session over `transport`.
    pub fn new(transport: impl Transport) -> Self {
        Self(Arc::new(transport))
    }

    /// A raw QUIC session.
    pub fn quic(connection: quinn::Connection) -> Self {
        Self::new(QuicTransport(connection))
    }

    /// A WebTransport session.
    pub fn webtransport(connection: wtransport::Connection) -> Self {
        Self::new(WebTransportTransport(connection))
    }

    /// Which transport carries this session.
    pub fn kind(&self) -> TransportKind {
        self.0.kind()
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), SessionError> {
        self.0.accept_bi().await
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), SessionError> {
        self.0.open_bi().await
    }

    /// Opens a unidirectional stream.
    pub async fn open_uni(&self) -> Result<SendStream, SessionError> {
        self.0.open_uni().await
    }

    /// Waits for the peer to open a unidirectional stream.
    pub async fn accept_uni(&self) -> Result<RecvStream, SessionError> {
        self.0.accept_uni().await
    }

    /// Sends a datagram (unreliable, unordered).
    pub fn send_datagram(&self, data: Bytes) -> Result<(), SessionError> {
        self.0.send_datagram(data)
    }

    /// Waits for the next datagram. The future is boxed (and so `Unpin`): a caller
    /// may keep it across loop iterations and poll it by reference.
    pub fn read_datagram(&self) -> BoxFuture<'_, Result<Bytes, SessionError>> {
        self.0.read_datagram()
    }

    /// The largest datagram payload the path allows now, if datagrams are supported.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.0.max_datagram_size()
    }

    /// Closes the session with an application code. Unsent data is dropped.
    pub fn close(&self, code: u32, reason: &str) {
        self.0.close(code, reason)
    }

    /// Waits until the session is closed, by either side or by a timeout.
    pub async fn closed(&self) -> CloseInfo {
        self.0.closed().await
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.0.remote_address()
    }

    /// Payload bytes (received, sent) over the connection so far.
    pub fn transferred(&self) -> (u64, u64) {
        self.0.transferred()
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.0.rtt()
    }

    /// Starts a TLS key update; see [`Transport::update_keys`].
    pub fn update_keys(&self) {
        self.0.update_keys()
    }

    /// Acknowledgement traffic so far; see [`Transport::ack_counts`].
    pub fn ack_counts(&self) -> AckCounts {
        self.0.ack_counts()
    }
}

fn quinn_close(e: quinn::ConnectionError) -> CloseInfo {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => CloseInfo {
            code: u32::try_from(c.error_code.into_inner()).ok(),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        other => CloseInfo {
            code: None,
            reason: other.to_string(),
        },
    }
}

fn wt_close(e: wtransport::error::ConnectionError) -> CloseInfo {
    match e {
        wtransport::error::ConnectionError::ApplicationClosed(c) => CloseInfo {
            code: u32::try_from(c.code().into_inner()).ok(),
            reason: String::from_utf8_lossy(c.reason()).into_owned(),
        },
        other => CloseInfo {
            code: None,
            reason: other.to_string(),
        },
    }
}

fn opening_failed(e: impl std::fmt::Display) -> SessionError {
    SessionError::Closed(CloseInfo {
        code: None,
        reason: e.to_string(),
    })
}

/// Raw QUIC (ALPN `tutti/1`).
#[derive(Debug)]
struct QuicTransport(quinn::Connection);

impl Transport for QuicTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }

    fn accept_bi(&self) -> BoxFuture<'_, Result<(SendStream, RecvStream), SessionError>> {
        Box::pin(async move {
            let (s, r) = self
                .0
                .accept_bi()
                .await
                .map_err(|e| SessionError::Closed(quinn_close(e)))?;
            Ok((SendStream(Tx::Quic(s)), RecvStream(Recv::Quic(r))))
        })
    }

    fn open_bi(&self) -> BoxFuture<'_, Result<(SendStream, RecvStream), SessionError>> {
        Box::pin(async move {
            let (s, r) = self
                .0
                .open_bi()
                .await
                .map_err(|e| SessionError::Closed(quinn_close(e)))?;
            Ok((SendStream(Tx::Quic(s)), RecvStream(Recv::Quic(r))))
        })
    }

    fn open_uni(&self) -> BoxFuture<'_, Result<SendStream, SessionError>> {
        Box::pin(async move {
            let s = self
                .0
                .open_uni()
                .await
                .map_err(|e| SessionError::Closed(quinn_close(e)))?;
            Ok(SendStream(Tx::Quic(s)))
        })
    }

    fn accept_uni(&self) -> BoxFuture<'_, Result<RecvStream, SessionError>> {
        Box::pin(async move {
            let r = self
                .0
                .accept_uni()
                .await
                .map_err(|e| SessionError::Closed(quinn_close(e)))?;
            Ok(RecvStream(Recv::Quic(r)))
        })
    }

    fn send_datagram(&self, data: Bytes) -> Result<(), SessionError> {
        self.0
            .send_datagram(data)
            .map_err(|e| SessionError::Datagram(e.to_string()))
    }

    fn read_datagram(&self) -> BoxFuture<'_, Result<Bytes, SessionError>> {
        Box::pin(async move {
            self.0
                .read_datagram()
                .await
                .map_err(|e| SessionError::Closed(quinn_close(e)))
        })
    }

    fn max_datagram_size(&self) -> Option<usize> {
        self.0.max_datagram_size()
    }

    fn close(&self, code: u32, reason: &str) {
        self.0
            .close(quinn::VarInt::from_u32(code), reason.as_bytes())
    }

    fn closed(&self) -> BoxFuture<'_, CloseInfo> {
        Box::pin(async move { quinn_close(self.0.closed().await) })
    }

    fn remote_address(&self) -> SocketAddr {
        self.0.remote_address()
    }

    fn transferred(&self) -> (u64, u64) {
        let stats = self.0.stats();
        (stats.udp_rx.bytes, stats.udp_tx.bytes)
    }

    fn rtt(&self) -> Duration {
        self.0.rtt()
    }

    fn update_keys(&self) {
        self.0.force_key_update();
    }

    fn ack_counts(&self) -> AckCounts {
        AckCounts::of(&self.0.stats())
    }
}

/// WebTransport over HTTP/3.
#[derive(Debug)]
struct WebTransportTransport(wtransport::Connection);

impl Transport for WebTransportTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::WebTransport
    }

    fn accept_bi(&self) -> BoxFuture<'_, Result<(SendStream, RecvStream), SessionError>> {
        Box::pin(async move {
            let (s, r) = self
                .0
                .accept_bi()
                .await
                .map_err(|e| SessionError::Closed(wt_close(e)))?;
            Ok((
                SendStream(Tx::WebTransport(s)),
                RecvStream(Recv::WebTransport(r)),
            ))
        })
    }

    fn open_bi(&self) -> BoxFuture<'_, Result<(SendStream, RecvStream), SessionError>> {
        Box::pin(async move {
            let opening = self
                .0
                .open_bi()
                .await
                .map_err(|e| SessionError::Closed(wt_close(e)))?;
            let (s, r) = opening.await.map_err(opening_failed)?;
            Ok((
                SendStream(Tx::WebTransport(s)),
                RecvStream(Recv::WebTransport(r)),
            ))
        })
    }

    fn open_uni(&self) -> BoxFuture<'_, Result<SendStream, SessionError>> {
        Box::pin(async move {
            let opening = self
                .0
                .open_uni()
                .await
                .map_err(|e| SessionError::Closed(wt_close(e)))?;
            let s = opening.await.map_err(opening_failed)?;
            Ok(SendStream(Tx::WebTransport(s)))
        })
    }

    fn accept_uni(&self) -> BoxFuture<'_, Result<RecvStream, SessionError>> {
        Box::pin(async move {
            let r = self
                .0
                .accept_uni()
                .await
                .map_err(|e| SessionError::Closed(wt_close(e)))?;
            Ok(RecvStream(Recv::WebTransport(r)))
        })
    }

    fn send_datagram(&self, data: Bytes) -> Result<(), SessionError> {
        self.0
            .send_datagram(data)
            .map_err(|e| SessionError::Datagram(e.to_string()))
    }

    fn read_datagram(&self) -> BoxFuture<'_, Result<Bytes, SessionError>> {
        Box::pin(async move {
            self.0
                .receive_datagram()
                .await
                .map(|d| d.payload())
                .map_err(|e| SessionError::Closed(wt_close(e)))
        })
    }

    fn max_datagram_size(&self) -> Option<usize> {
        self.0.max_datagram_size()
    }

    fn close(&self, code: u32, reason: &str) {
        self.0
            .close(wtransport::VarInt::from_u32(code), reason.as_bytes())
    }

    fn closed(&self) -> BoxFuture<'_, CloseInfo> {
        Box::pin(async move { wt_close(self.0.closed().await) })
    }

    fn remote_address(&self) -> SocketAddr {
        self.0.remote_address()
    }

    fn transferred(&self) -> (u64, u64) {
        let stats = self.0.quic_connection().stats();
        (stats.udp_rx.bytes, stats.udp_tx.bytes)
    }

    fn rtt(&self) -> Duration {
        self.0.rtt()
    }

    fn update_keys(&self) {
        self.0.quic_connection().force_key_update();
    }

    fn ack_counts(&self) -> AckCounts {
        AckCounts::of(&self.0.quic_connection().stats())
    }
}
