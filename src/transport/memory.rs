//! An in-memory session pair: two [`Session`]s joined by in-process byte pipes, with
//! no socket, no TLS and no clock of their own. Unit tests drive the gateway and the
//! client through it, on tokio's virtual time when they pause it.
//!
//! Streams are [`tokio::io::duplex`] pipes whose buffer plays the part of QUIC's
//! per-stream flow-control window: a writer whose peer does not read blocks once
//! `window` bytes are buffered, as a QUIC sender does. Datagrams go through a small
//! queue and are dropped when it is full, as a congested path drops them. Closing
//! either side fails every stream and wait on both.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::TransportKind;
use super::session::{CloseInfo, RecvStream, SendStream, Session, SessionError, Transport};
use crate::util::Unpoisoned;

/// Datagrams queued per direction before new ones are dropped.
const DATAGRAM_QUEUE: usize = 256;
/// Streams a side may have opened and the peer not yet accepted.
const PENDING_STREAMS: usize = 64;

/// Options of a [`pair`].
#[derive(Debug, Clone, Copy)]
pub struct PairConfig {
    /// The transport both sessions report (only a label here).
    pub kind: TransportKind,
    /// Bytes buffered per stream direction before a writer waits.
    pub window: usize,
    /// The largest datagram payload.
    pub max_datagram_size: usize,
}

impl Default for PairConfig {
    fn default() -> Self {
        Self {
            kind: TransportKind::Quic,
            window: 64 * 1024,
            max_datagram_size: 1200,
        }
    }
}

/// The state both ends share: whether and how the session closed.
#[derive(Debug)]
struct Shared {
    token: CancellationToken,
    info: Mutex<Option<CloseInfo>>,
}

impl Shared {
    fn close(&self, info: CloseInfo) {
        let mut slot = self.info.locked();
        if slot.is_none() {
            *slot = Some(info);
        }
        drop(slot);
        self.token.cancel();
    }

    fn info(&self) -> CloseInfo {
        self.info.locked().clone().unwrap_or(CloseInfo {
            code: None,
            reason: "closed".into(),
        })
    }

    fn error(&self) -> SessionError {
        SessionError::Closed(self.info())
    }
}

type BiHalves = (Guarded, Guarded);

/// One end of a pair.
#[derive(Debug)]
struct End {
    config: PairConfig,
    shared: Arc<Shared>,
    /// To the peer: streams this end opens.
    open_bi: mpsc::Sender<BiHalves>,
    open_uni: mpsc::Sender<Guarded>,
    datagrams_out: mpsc::Sender<Bytes>,
    /// From the peer.
    accept_bi: tokio::sync::Mutex<mpsc::Receiver<BiHalves>>,
    accept_uni: tokio::sync::Mutex<mpsc::Receiver<Guarded>>,
    datagrams_in: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    peer_address: SocketAddr,
}

/// Two connected sessions: what one opens or sends, the other accepts or receives.
pub fn pair(config: PairConfig) -> (Session, Session) {
    let shared = Arc::new(Shared {
        token: CancellationToken::new(),
        info: Mutex::new(None),
    });
    let (a_bi, b_accept_bi) = mpsc::channel(PENDING_STREAMS);
    let (b_bi, a_accept_bi) = mpsc::channel(PENDING_STREAMS);
    let (a_uni, b_accept_uni) = mpsc::channel(PENDING_STREAMS);
    let (b_uni, a_accept_uni) = mpsc::channel(PENDING_STREAMS);
    let (a_dg, b_dg_in) = mpsc::channel(DATAGRAM_QUEUE);
    let (b_dg, a_dg_in) = mpsc::channel(DATAGRAM_QUEUE);
    let end = |open_bi, open_uni, datagrams_out, accept_bi, accept_uni, datagrams_in, port| End {
        config,
        shared: shared.clone(),
        open_bi,
        open_uni,
        datagrams_out,
        accept_bi: tokio::sync::Mutex::new(accept_bi),
        accept_uni: tokio::sync::Mutex::new(accept_uni),
        datagrams_in: tokio::sync::Mutex::new(datagrams_in),
        peer_address: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
    };
    let a = end(a_bi, a_uni, a_dg, a_accept_bi, a_accept_uni, a_dg_in, 2);
    let b = end(b_bi, b_uni, b_dg, b_accept_bi, b_accept_uni, b_dg_in, 1);
    (Session::new(a), Session::new(b))
}

impl End {
    fn check_open(&self) -> Result<(), SessionError> {
        if self.shared.token.is_cancelled() {
            Err(self.shared.error())
        } else {
            Ok(())
        }
    }

    fn guarded(&self, pipe: DuplexStream) -> Guarded {
        Guarded {
            inner: pipe,
            token: self.shared.token.clone(),
            closed: Box::pin(self.shared.token.clone().cancelled_owned()),
        }
    }

    /// Waits for `rx` to yield, or fails once the session closes.
    async fn recv<T>(&self, rx: &tokio::sync::Mutex<mpsc::Receiver<T>>) -> Result<T, SessionError> {
        let mut rx = rx.lock().await;
        tokio::select! {
            biased;
            _ = self.shared.token.cancelled() => Err(self.shared.error()),
            item = rx.recv() => item.ok_or_else(|| self.shared.error()),
        }
    }
}

impl Transport for End {
    fn kind(&self) -> TransportKind {
        self.config.kind
    }

    fn accept_bi(&self) -> BoxFuture<'_, Result<(SendStream, RecvStream), SessionError>> {
        Box::pin(async move {
            let (send, recv) = self.recv(&self.accept_bi).await?;
            Ok((SendStream::new(send), RecvStream::new(recv)))
        })
    }

    fn open_bi(&self) -> BoxFuture<'_, Result<(SendStream, RecvStream), SessionError>> {
        Box::pin(async move {
            self.check_open()?;
            // Two pipes: this end writes one and reads the other.
            let (my_send, peer_recv) = tokio::io::duplex(self.config.window);
            let (peer_send, my_recv) = tokio::io::duplex(self.config.window);
            self.open_bi
                .send((self.guarded(peer_send), self.guarded(peer_recv)))
                .await
                .map_err(|_| self.shared.error())?;
            Ok((
                SendStream::new(self.guarded(my_send)),
                RecvStream::new(self.guarded(my_recv)),
            ))
        })
    }

    fn open_uni(&self) -> BoxFuture<'_, Result<SendStream, SessionError>> {
        Box::pin(async move {
            self.check_open()?;
            let (mine, theirs) = tokio::io::duplex(self.config.window);
            self.open_uni
                .send(self.guarded(theirs))
                .await
                .map_err(|_| self.shared.error())?;
            Ok(SendStream::new(self.guarded(mine)))
        })
    }

    fn accept_uni(&self) -> BoxFuture<'_, Result<RecvStream, SessionError>> {
        Box::pin(async move {
            let recv = self.recv(&self.accept_uni).await?;
            Ok(RecvStream::new(recv))
        })
    }

    fn send_datagram(&self, data: Bytes) -> Result<(), SessionError> {
        self.check_open()?;
        if data.len() > self.config.max_datagram_size {
            return Err(SessionError::Datagram("datagram too large".into()));
        }
        // A full queue drops the datagram, as a congested path would.
        let _ = self.datagrams_out.try_send(data);
        Ok(())
    }

    fn read_datagram(&self) -> BoxFuture<'_, Result<Bytes, SessionError>> {
        Box::pin(async move { self.recv(&self.datagrams_in).await })
    }

    fn max_datagram_size(&self) -> Option<usize> {
        Some(self.config.max_datagram_size)
    }

    fn close(&self, code: u32, reason: &str) {
        self.shared.close(CloseInfo {
            code: Some(code),
            reason: reason.to_owned(),
        });
    }

    fn closed(&self) -> BoxFuture<'_, CloseInfo> {
        Box::pin(async move {
            self.shared.token.cancelled().await;
            self.shared.info()
        })
    }

    fn remote_address(&self) -> SocketAddr {
        self.peer_address
    }

    fn transferred(&self) -> (u64, u64) {
        // No packets: nothing is counted.
        (0, 0)
    }

    fn rtt(&self) -> Duration {
        Duration::ZERO
    }
}

/// A pipe end that fails once its session is closed, like a QUIC stream of a
/// closed connection.
struct Guarded {
    inner: DuplexStream,
    token: CancellationToken,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("closed", &self.token.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Guarded {
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> bool {
        self.token.is_cancelled() || self.closed.as_mut().poll(cx).is_ready()
    }
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "session closed")
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.poll_closed(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.poll_closed(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn streams_and_datagrams_cross_and_close_fails_both_sides() {
        let (a, b) = pair(PairConfig::default());
        let (mut send, _recv) = a.open_bi().await.unwrap();
        let (_bsend, mut brecv) = b.accept_bi().await.unwrap();
        send.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        brecv.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");

        let mut uni = b.open_uni().await.unwrap();
        let mut auni = a.accept_uni().await.unwrap();
        uni.write_all(b"xyz").await.unwrap();
        uni.shutdown().await.unwrap();
        drop(uni);
        assert_eq!(auni.read_chunk(2).await.unwrap().unwrap(), &b"xy"[..]);
        let mut all = Vec::new();
        auni.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"z");
        assert_eq!(auni.read_chunk(2).await.unwrap(), None, "finished");

        a.send_datagram(Bytes::from_static(b"d")).unwrap();
        assert_eq!(b.read_datagram().await.unwrap(), Bytes::from_static(b"d"));
        assert!(a.send_datagram(Bytes::from(vec![0; 2000])).is_err());

        a.close(7, "bye");
        let info = b.closed().await;
        assert_eq!(info.code, Some(7));
        assert_eq!(info.reason, "bye");
        assert!(brecv.read(&mut got).await.is_err(), "streams fail");
        assert!(b.accept_bi().await.is_err());
        assert!(b.open_uni().await.is_err());
    }

    #[tokio::test]
    async fn an_unread_stream_blocks_its_writer_at_the_window() {
        tokio::time::pause();
        let (a, b) = pair(PairConfig {
            window: 1024,
            ..PairConfig::default()
        });
        let mut send = a.open_uni().await.unwrap();
        let _recv = b.accept_uni().await.unwrap();
        send.write_all(&[0; 1024]).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_secs(5), send.write_all(&[0; 1])).await;
        assert!(blocked.is_err(), "the window is full");
    }
}
