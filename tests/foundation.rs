//! The foundation through the real server: handshake and auth, pipelined requests,
//! datagrams, push streams, bad frames, the handshake timeout, graceful shutdown,
//! certificate rotation and the HTTP side port. Every session case runs over raw
//! QUIC and over WebTransport.

mod support;

use std::time::Duration;

use support::{TestServer, test_config};
use tutti::auth::{Auth, Claims, SecretSource, unix_now};
use tutti::client::{Client, ClientEndpoint, ClientError, Event, Trust, connect_transport};
use tutti::protocol::v1::{self, StreamKind, push};
use tutti::protocol::{CloseCode, ErrorCode};
use tutti::transport::TransportKind;

both_transports!(
    handshake_welcomes_a_valid_token,
    missing_token_is_refused,
    expired_token_is_refused,
    forged_token_is_refused,
    pipelined_requests_are_answered_by_id,
    datagram_ping_round_trip,
    push_arrives_on_its_stream,
    oversize_frame_is_answered_and_the_session_goes_on,
    garbage_frame_is_answered_and_the_session_goes_on,
    second_hello_is_an_unexpected_frame,
    silent_client_is_closed_after_the_handshake_timeout,
    graceful_shutdown_tells_clients_to_reconnect,
    rotated_certificate_is_served_without_restart,
    clients_share_one_endpoint,
    a_reconnect_resumes_the_tls_session,
    a_client_whose_address_changes_keeps_its_session,
    a_key_update_keeps_the_session,
    a_server_on_bbr_answers_and_pushes,
    the_server_asks_native_clients_to_acknowledge_later,
    after_a_loss_a_client_is_asked_for_its_own_ack_delay,
    a_sparse_connection_asks_its_client_for_its_own_ack_delay,
    a_large_answer_is_not_held_up_by_the_ack_delay,
);

async fn handshake_welcomes_a_valid_token(t: TransportKind) {
    let s = TestServer::start().await;
    let c = s.connect(t, "alice").await;
    let w = c.welcome();
    assert_eq!(w.user_id, "alice");
    assert_eq!(w.node_id, s.server().store().node_id());
    assert!(w.session_id.starts_with(&w.node_id));
    let limits = w.limits.as_ref().unwrap();
    assert_eq!(
        limits.max_frame_size as usize,
        s.server().config().limits.max_frame_size
    );
    assert!(w.heartbeat_interval_ms > 0 && w.heartbeat_interval_ms < w.idle_timeout_ms);
    assert_eq!(c.transport(), t);
    assert_eq!(s.server().metrics().active(t), 1);
}

async fn refused_with(t: TransportKind, token: &str, code: CloseCode) {
    let s = TestServer::start().await;
    let err = Client::connect(s.client_config(t, token))
        .await
        .unwrap_err();
    assert_eq!(err.close_code(), Some(code), "{err:?}");
    // The server is still there for well-behaved clients.
    let ok = s.connect(t, "bob").await;
    assert_eq!(ok.welcome().user_id, "bob");
}

async fn missing_token_is_refused(t: TransportKind) {
    refused_with(t, "", CloseCode::TokenMissing).await;
}

async fn expired_token_is_refused(t: TransportKind) {
    let s = TestServer::start().await;
    let expired = s
        .server()
        .auth()
        .sign(&Claims {
            sub: "alice".into(),
            exp: unix_now() - 3600,
            iat: unix_now() - 7200,
            ..Claims::default()
        })
        .unwrap();
    let err = Client::connect(s.client_config(t, &expired))
        .await
        .unwrap_err();
    assert_eq!(err.close_code(), Some(CloseCode::TokenExpired), "{err:?}");
}

async fn forged_token_is_refused(t: TransportKind) {
    let other = Auth::new(&[42; 32], SecretSource::Configured, Duration::ZERO);
    let forged = other.mint("alice", Duration::from_secs(60), &[]).unwrap();
    refused_with(t, &forged, CloseCode::Unauthorized).await;
    refused_with(t, "not-a-jwt", CloseCode::Unauthorized).await;
}

async fn pipelined_requests_are_answered_by_id(t: TransportKind) {
    let s = TestServer::start().await;
    let c = s.connect(t, "alice").await;
    // Both requests are written before either answer is read.
    let (a, b) = tokio::join!(
        c.echo(b"first".to_vec(), false),
        c.echo(b"second".to_vec(), false)
    );
    assert_eq!(&a.unwrap()[..], b"first");
    assert_eq!(&b.unwrap()[..], b"second");
    // Many at once, each matched to its own answer.
    let many =
        futures_util::future::join_all((0..50u32).map(|i| c.echo(i.to_be_bytes().to_vec(), false)))
            .await;
    for (i, r) in many.into_iter().enumerate() {
        assert_eq!(&r.unwrap()[..], &(i as u32).to_be_bytes());
    }
}

async fn clients_share_one_endpoint(t: TransportKind) {
    let s = TestServer::start().await;
    let base = s.client_config(t, &s.token("alice"));
    let endpoint = ClientEndpoint::bind(&base).unwrap();
    let mut clients = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let mut c = s.client_config(t, &s.token(user));
        c.endpoint = Some(endpoint.clone());
        clients.push(
            Client::connect(c)
                .await
                .expect("connects on the shared endpoint"),
        );
    }
    // Three sessions on one local socket, each with its own requests and pushes.
    for (i, c) in clients.iter().enumerate() {
        let payload = vec![i as u8; 3];
        assert_eq!(&c.echo(payload.clone(), true).await.unwrap()[..], &payload);
        match c.next_event().await {
            Some(Event::Push(StreamKind::System, p)) => match p.event {
                Some(push::Event::Echo(e)) => assert_eq!(&e.payload[..], &payload),
                other => panic!("unexpected push {other:?}"),
            },
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(endpoint.open_connections(), 3);
    assert_eq!(s.server().metrics().active(t), 3);
    // One client closing leaves the others (and the endpoint) working.
    clients.remove(0).close();
    assert_eq!(
        &clients[0].echo(b"on".to_vec(), false).await.unwrap()[..],
        b"on"
    );
    // An endpoint is for one transport.
    let other = match t {
        TransportKind::Quic => TransportKind::WebTransport,
        TransportKind::WebTransport => TransportKind::Quic,
    };
    let mut wrong = s.client_config(other, &s.token("dave"));
    wrong.endpoint = Some(endpoint.clone());
    assert!(matches!(
        Client::connect(wrong).await,
        Err(ClientError::Connect(_))
    ));
    // Over WebTransport the endpoint holds the certificate trust: a connection
    // that trusts another pin is refused rather than given the endpoint's trust.
    if t == TransportKind::WebTransport {
        let mut other_pin = s.client_config(t, &s.token("erin"));
        other_pin.trust = Trust::Pinned(vec![[7u8; 32]]);
        other_pin.endpoint = Some(endpoint);
        assert!(matches!(
            Client::connect(other_pin).await,
            Err(ClientError::Connect(_))
        ));
    }
}

async fn a_client_whose_address_changes_keeps_its_session(t: TransportKind) {
    let s = TestServer::start().await;
    let mut config = s.client_config(t, &s.token("alice"));
    let endpoint = ClientEndpoint::bind(&config).unwrap();
    config.endpoint = Some(endpoint.clone());
    let c = Client::connect(config).await.unwrap();
    assert_eq!(
        &c.echo(b"before".to_vec(), false).await.unwrap()[..],
        b"before"
    );
    // A network change: the client's packets now come from another port. QUIC
    // moves the connection (the server validates the new path); the session, its
    // streams and its subscriptions go on, with no reconnect.
    endpoint.rebind().unwrap();
    assert_eq!(
        &c.echo(b"after".to_vec(), true).await.unwrap()[..],
        b"after"
    );
    match c.next_event().await {
        Some(Event::Push(StreamKind::System, p)) => match p.event {
            Some(push::Event::Echo(e)) => assert_eq!(&e.payload[..], b"after"),
            other => panic!("unexpected push {other:?}"),
        },
        other => panic!("unexpected event {other:?}"),
    }
    assert_eq!(
        s.server().metrics().value("sessions.accepted"),
        Some(1.0),
        "one session throughout"
    );
    assert_eq!(s.server().metrics().active(t), 1);
}

async fn a_key_update_keeps_the_session(t: TransportKind) {
    let s = TestServer::start().await;
    let c = s.connect(t, "alice").await;
    assert_eq!(&c.echo(b"one".to_vec(), false).await.unwrap()[..], b"one");
    // The client moves to the next key phase; the server derives that phase's
    // keys when the first packet in it arrives (they are not kept in advance),
    // answers in it, and the session goes on both ways.
    c.update_keys();
    assert_eq!(&c.echo(b"two".to_vec(), true).await.unwrap()[..], b"two");
    match c.next_event().await {
        Some(Event::Push(StreamKind::System, p)) => match p.event {
            Some(push::Event::Echo(e)) => assert_eq!(&e.payload[..], b"two"),
            other => panic!("unexpected push {other:?}"),
        },
        other => panic!("unexpected event {other:?}"),
    }
    assert_eq!(s.server().metrics().value("sessions.accepted"), Some(1.0));
}

/// Whether `done` holds within `limit`, looked at every 2 ms: for a client's
/// connection statistics, which no event signals.
async fn within(limit: Duration, done: impl Fn() -> bool) -> bool {
    tokio::time::timeout(limit, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .is_ok()
}

/// Whether the server asked the client to acknowledge later (an ACK_FREQUENCY
/// frame), and how long after a lone packet from the server (a datagram pong) the
/// client acknowledged it: the longest of a few tries, as an ACK the client sends
/// for another reason soon after the pong (a gap, or the tenth packet) covers it
/// early.
async fn ack_of_a_lone_packet(s: &TestServer, t: TransportKind) -> (bool, Duration) {
    let c = s.connect(t, "alice").await;
    c.echo(b"ready".to_vec(), false).await.unwrap();
    let mut longest = None;
    for _ in 0..5 {
        // A few answers just before keep the server's packets dense: a pong that
        // only came after the last one's ACK, each one `ack_delay` apart, would
        // soon make the connection sparse, and its client is then asked for its
        // own delay instead (a_sparse_connection_asks_its_client_for_its_own_ack_delay).
        for _ in 0..3 {
            c.echo(b"dense".to_vec(), false).await.unwrap();
        }
        // The ping carries the client's pending ACKs; the pong is then the one
        // packet left to acknowledge. A datagram may be lost even on loopback.
        if c.ping_datagram().await.is_err() {
            continue;
        }
        let (received, before) = (std::time::Instant::now(), c.ack_counts().sent);
        if within(Duration::from_secs(2), || c.ack_counts().sent > before).await {
            longest = longest.max(Some(received.elapsed()));
        }
    }
    let longest = longest.expect("a datagram pong acknowledged in 5 tries");
    (c.ack_counts().frequency_requests > 0, longest)
}

/// Both transports run on quinn, which offers QUIC's ACK-frequency extension: the
/// server asks the client to wait up to `timeouts.ack_delay` (here 100 ms, for a
/// short test) before it acknowledges a lone packet, where it would otherwise wait
/// 25 ms. With `ack_delay = 0s` nothing is asked.
async fn the_server_asks_native_clients_to_acknowledge_later(t: TransportKind) {
    let s = TestServer::start_with(|c| c.timeouts.ack_delay = Duration::from_millis(100)).await;
    let (asked, after) = ack_of_a_lone_packet(&s, t).await;
    assert!(asked, "the server asks for later ACKs by default");
    // At least the 100 ms asked for, less the time the pong took from its
    // arrival to this task (a lower bound: a slow machine only adds to it).
    assert!(
        after >= Duration::from_millis(50),
        "acknowledged after {after:?}"
    );
    let s = TestServer::start_with(|c| c.timeouts.ack_delay = Duration::ZERO).await;
    let (asked, _) = ack_of_a_lone_packet(&s, t).await;
    assert!(!asked, "nothing is asked with ack_delay = 0s");
}

/// A client asked to acknowledge only every tenth packet would leave the server
/// waiting out the whole ACK delay whenever its congestion window filled first: a
/// large answer (here 60,000 bytes, some fifty packets, where the initial window
/// holds ten of 1,200 bytes) stalled for `timeouts.ack_delay`. The last packet the
/// window lets out asks for an ACK at once instead.
async fn a_large_answer_is_not_held_up_by_the_ack_delay(t: TransportKind) {
    const ACK_DELAY: Duration = Duration::from_secs(1);
    let s = TestServer::start_with(|c| c.timeouts.ack_delay = ACK_DELAY).await;
    let c = s.connect(t, "alice").await;
    c.echo(b"ready".to_vec(), false).await.unwrap();
    let before = c.ack_counts().immediate_requests;
    let started = std::time::Instant::now();
    let answer = c.echo(vec![7; 60_000], false).await.unwrap();
    let took = started.elapsed();
    assert_eq!(answer.len(), 60_000);
    assert!(
        c.ack_counts().immediate_requests > before,
        "the server asked for an ACK at once"
    );
    assert!(
        took < ACK_DELAY,
        "the answer took {took:?}: held up by the ACK delay"
    );
}

/// A UDP relay between clients and the server that drops the server's next small
/// packets when asked (small: not a path MTU probe, whose loss is not a loss).
struct LossyRelay {
    addr: std::net::SocketAddr,
    drop_next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl LossyRelay {
    async fn start(server: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(server).await.unwrap();
        let addr = front.local_addr().unwrap();
        let drop_next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let dropping = drop_next.clone();
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            loop {
                // A receive error (an ICMP error reported on a UDP socket) is
                // skipped: the relay goes on, as a router would.
                tokio::select! {
                    r = front.recv_from(&mut up) => if let Ok((n, from)) = r {
                        client = Some(from);
                        let _ = back.send(&up[..n]).await;
                    },
                    r = back.recv(&mut down) => if let Ok(n) = r {
                        let lose = n < 1000
                            && dropping
                                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
                                .is_ok();
                        if let (false, Some(to)) = (lose, client) {
                            let _ = front.send_to(&down[..n], to).await;
                        }
                    },
                }
            }
        });
        Self {
            addr,
            drop_next,
            task,
        }
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Once a packet to a client is lost, the server asks that client for its own ACK
/// delay again (a second ACK_FREQUENCY request; what it asks for is checked in
/// the vendored quinn-proto's tests, `vendor/quinn-proto/src/tests/patches.rs`), so
/// a lossy path recovers a lost last packet as fast as without the extension.
async fn after_a_loss_a_client_is_asked_for_its_own_ack_delay(t: TransportKind) {
    let s = TestServer::start().await;
    let relay = LossyRelay::start(s.server().quic_addr()).await;
    let mut config = s.client_config(t, &s.token("alice"));
    config.addr = relay.addr;
    let c = Client::connect(config).await.unwrap();
    c.echo(b"ready".to_vec(), false).await.unwrap();
    assert_eq!(c.ack_counts().frequency_requests, 1, "asked once");
    // The server's answer is lost and resent. The dropped packet could be one
    // without anything to resend (an ACK alone), so a few tries bound the test.
    for _ in 0..5 {
        relay
            .drop_next
            .store(1, std::sync::atomic::Ordering::Release);
        c.echo(b"lost".to_vec(), false).await.unwrap();
        if within(Duration::from_secs(1), || {
            c.ack_counts().frequency_requests >= 2
        })
        .await
        {
            return;
        }
    }
    panic!("no new ACK_FREQUENCY request after five losses");
}

/// The server's count of resumed TLS handshakes.
fn resumed(s: &TestServer) -> f64 {
    s.server().metrics().value("tls.resumed").unwrap()
}

async fn a_reconnect_resumes_the_tls_session(t: TransportKind) {
    let s = TestServer::start().await;
    let config = s.client_config(t, &s.token("alice"));
    let first = Client::connect(config.clone()).await.unwrap();
    // The ticket comes after the handshake: a request's answer is after it.
    first.echo(b"x".to_vec(), false).await.unwrap();
    assert_eq!(resumed(&s), 0.0, "a first connect is a full handshake");
    first.close();
    first.closed().await;
    // The same config again (as after a network change or a failover): resumed.
    let again = Client::connect(config.clone()).await.unwrap();
    again.echo(b"x".to_vec(), false).await.unwrap();
    assert_eq!(resumed(&s), 1.0);
    // A client without the earlier session runs a full handshake.
    let fresh = config.clone().with_new_tls_sessions();
    let other = Client::connect(fresh).await.unwrap();
    other.echo(b"x".to_vec(), false).await.unwrap();
    assert_eq!(resumed(&s), 1.0);
    // A server with another secret (another cluster) cannot open the ticket: a
    // full handshake, not a failure.
    let s2 = TestServer::start_with(|c| {
        c.auth.jwt_secret = Some("another-secret-of-at-least-32-bytes-for-tests".into())
    })
    .await;
    let mut elsewhere = s2.client_config(t, &s2.token("alice"));
    elsewhere.tls_sessions = config.tls_sessions.clone();
    let c = Client::connect(elsewhere).await.unwrap();
    c.echo(b"x".to_vec(), false).await.unwrap();
    assert_eq!(resumed(&s2), 0.0);
}

async fn datagram_ping_round_trip(t: TransportKind) {
    let s = TestServer::start().await;
    let c = s.connect(t, "alice").await;
    // A datagram may be lost even on loopback; a few tries bound the test.
    let mut rtt = None;
    for _ in 0..5 {
        if let Ok(d) = c.ping_datagram().await {
            rtt = Some(d);
            break;
        }
    }
    assert!(rtt.is_some(), "no datagram pong in 5 tries");
}

async fn push_arrives_on_its_stream(t: TransportKind) {
    let s = TestServer::start().await;
    let c = s.connect(t, "alice").await;
    c.echo(b"pushed".to_vec(), true).await.unwrap();
    match c.next_event().await {
        Some(Event::Push(StreamKind::System, p)) => match p.event {
            Some(push::Event::Echo(e)) => assert_eq!(&e.payload[..], b"pushed"),
            other => panic!("unexpected push {other:?}"),
        },
        other => panic!("unexpected event {other:?}"),
    }
}

/// `limits.congestion_control = "bbr"`: answers and a burst of pushes (20 of 32
/// KiB, past BBR's initial window) arrive whole and in order.
async fn a_server_on_bbr_answers_and_pushes(t: TransportKind) {
    let s = TestServer::start_with(|c| {
        c.limits.congestion_control = tutti::transport::CongestionControl::Bbr;
    })
    .await;
    let c = s.connect(t, "alice").await;
    for i in 0..20u8 {
        let answer = c.echo(vec![i; 32 * 1024], true).await.unwrap();
        assert_eq!(answer.len(), 32 * 1024);
    }
    for i in 0..20u8 {
        match c.next_event().await {
            Some(Event::Push(StreamKind::System, p)) => match p.event {
                Some(push::Event::Echo(e)) => assert_eq!(e.payload, vec![i; 32 * 1024]),
                other => panic!("unexpected push {other:?}"),
            },
            other => panic!("unexpected event {other:?}"),
        }
    }
}

fn frame_error(e: Option<Event>) -> v1::Error {
    match e {
        Some(Event::FrameError(e)) => e,
        other => panic!("expected a frame error, got {other:?}"),
    }
}

async fn oversize_frame_is_answered_and_the_session_goes_on(t: TransportKind) {
    let s = TestServer::start().await;
    let c = s.connect(t, "alice").await;
    let bystander = s.connect(t, "bob").await;
    let max = s.server().config().limits.max_frame_size;
    let mut raw = Vec::new();
    prost::encoding::encode_varint((max * 4) as u64, &mut raw);
    raw.extend(std::iter::repeat_n(0x55u8, max * 4));
    c.send_raw(&raw).await.unwrap();
    let err = frame_error(c.next_event().await);
    assert_eq!(err.error_code(), Some(ErrorCode::FrameTooLarge), "{err:?}");
    assert_eq!(err.name, "FRAME_TOO_LARGE");
    // The oversize body was skipped: the stream is in sync again.
    assert_eq!(
        &c.echo(b"still here".to_vec(), false).await.unwrap()[..],
        b"still here"
    );
    assert_eq!(
        &bystander.echo(b"me too".to_vec(), false).await.unwrap()[..],
        b"me too"
    );
}

async fn garbage_frame_is_answered_and_the_session_goes_on(t: TransportKind) {
    let s = TestServer::start().await;
    let c = s.connect(t, "alice").await;
    let bystander = s.connect(t, "bob").await;
    // A 4-byte frame that is not a protobuf message (field number 0).
    c.send_raw(&[4, 0x00, 0xff, 0xff, 0xff]).await.unwrap();
    let err = frame_error(c.next_event().await);
    assert_eq!(err.error_code(), Some(ErrorCode::FrameMalformed), "{err:?}");
    assert_eq!(&c.echo(b"ok".to_vec(), false).await.unwrap()[..], b"ok");
    assert_eq!(
        &bystander.echo(b"ok".to_vec(), false).await.unwrap()[..],
        b"ok"
    );
}

async fn second_hello_is_an_unexpected_frame(t: TransportKind) {
    let s = TestServer::start().await;
    let c = s.connect(t, "alice").await;
    let hello = v1::ClientFrame {
        kind: Some(v1::client_frame::Kind::Hello(v1::Hello::default())),
    };
    let mut buf = bytes::BytesMut::new();
    tutti::protocol::encode_frame(&hello, &mut buf);
    c.send_raw(&buf).await.unwrap();
    let err = frame_error(c.next_event().await);
    assert_eq!(err.error_code(), Some(ErrorCode::UnexpectedFrame));
    assert_eq!(c.welcome().user_id, "alice");
}

async fn silent_client_is_closed_after_the_handshake_timeout(t: TransportKind) {
    let s = TestServer::start_with(|c| c.timeouts.handshake = Duration::from_millis(300)).await;
    let config = s.client_config(t, "");
    let session = connect_transport(&config).await.unwrap();
    // Never send Hello: the server closes the session with HANDSHAKE_TIMEOUT.
    let info = session.closed().await;
    assert_eq!(
        info.code,
        Some(CloseCode::HandshakeTimeout as u32),
        "{info:?}"
    );
    // Others can still connect.
    s.connect(t, "alice").await;
}

async fn graceful_shutdown_tells_clients_to_reconnect(t: TransportKind) {
    let mut s = TestServer::start().await;
    let a = s.connect(t, "alice").await;
    let b = s.connect(t, "bob").await;
    s.shutdown().await;
    for c in [&a, &b] {
        let closed = c.closed().await;
        assert_eq!(
            closed.close_code(),
            Some(CloseCode::GoingAway),
            "{closed:?}"
        );
        assert!(closed.close_code().unwrap().should_reconnect());
    }
    match a.echo(b"late".to_vec(), false).await {
        Err(ClientError::Closed(_)) => {}
        other => panic!("expected closed, got {other:?}"),
    }
}

async fn rotated_certificate_is_served_without_restart(t: TransportKind) {
    let s = TestServer::start().await;
    let old_pin = s.server().certs().pin();
    let before = s.connect(t, "alice").await;
    s.server().certs().rotate_now().unwrap();
    let new_pin = s.server().certs().pin();
    assert_ne!(old_pin, new_pin);
    // New handshakes get the new certificate: the old pin no longer matches.
    let mut stale = s.client_config(t, &s.token("bob"));
    stale.trust = Trust::Pinned(vec![old_pin]);
    assert!(Client::connect(stale).await.is_err());
    let fresh = s.connect(t, "bob").await;
    assert_eq!(fresh.welcome().user_id, "bob");
    // Sessions opened before the rotation carry on.
    assert_eq!(&before.echo(b"x".to_vec(), false).await.unwrap()[..], b"x");
    // The published pin follows.
    let (_, body) = s.http_get("/cert-hash").await;
    assert!(body.contains(&tutti::util::hex(&new_pin)), "{body}");
}

/// The native client lets the server open the streams the protocol has it open,
/// one push stream per kind (with a little room), and no bidirectional stream:
/// not quinn's default of 100 of each, whose state every connection would set up.
/// A bare QUIC server stands in for Tutti's, to try opening more.
#[tokio::test]
async fn a_native_client_lets_the_server_open_only_its_push_streams() {
    use futures_util::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let certs = std::sync::Arc::new(
        tutti::tls::CertStore::from_config(&tutti::tls::TlsConfig {
            cert_dir: dir.path().to_owned(),
            ..Default::default()
        })
        .unwrap(),
    );
    let tls = certs.server_config(&[tutti::protocol::ALPN_NATIVE]);
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(std::sync::Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let config = tutti::client::ClientConfig::new(
        addr,
        TransportKind::Quic,
        Trust::Pinned(vec![certs.pin()]),
        "",
    );
    let (session, conn) = tokio::time::timeout(Duration::from_secs(10), async {
        let accept = async { server.accept().await.unwrap().await.unwrap() };
        tokio::join!(connect_transport(&config), accept)
    })
    .await
    .expect("the client connects to the bare server");
    let _session = session.unwrap();
    // Opening a stream the peer allows completes at once; one it does not allow
    // waits for credit that never comes.
    assert!(
        conn.open_bi().now_or_never().is_none(),
        "the client allows no bidirectional stream from the server"
    );
    let kinds = StreamKind::Analytics as usize;
    let mut opened = Vec::new();
    while let Some(stream) = conn.open_uni().now_or_never() {
        opened.push(stream.unwrap());
        assert!(opened.len() <= 64, "the client allows quinn's 100 streams");
    }
    assert!(
        (kinds..=2 * kinds).contains(&opened.len()),
        "{} unidirectional streams allowed for {kinds} push kinds",
        opened.len()
    );
}

#[tokio::test]
async fn http_side_port_health_readiness_metrics_and_pin() {
    let s = TestServer::start().await;
    assert_eq!(s.http_get("/healthz").await.0, 200);
    assert_eq!(s.http_get("/readyz").await.0, 200);
    let c = s.connect(TransportKind::Quic, "alice").await;
    c.echo(b"x".to_vec(), true).await.unwrap();
    assert!(matches!(c.next_event().await, Some(Event::Push(..))));
    let (status, metrics) = s.http_get("/metrics").await;
    // The connect's round trip and this one.
    assert!(
        metrics.contains("tutti_request_seconds_count{request=\"echo\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tutti_fanout_seconds_count 1"),
        "{metrics}"
    );
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tutti_sessions_active{transport=\"quic\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tutti_handshake_seconds_count 1"),
        "{metrics}"
    );
    let (status, body) = s.http_get("/cert-hash").await;
    assert_eq!(status, 200);
    let pins: tutti::http::CertHashes = serde_json::from_str(&body).unwrap();
    assert_eq!(pins.hashes[0].algorithm, "sha-256");
    assert_eq!(pins.hashes[0].value, s.server().certs().pin_hex());
    let (_, info) = s.http_get("/api/info").await;
    let info: tutti::http::Info = serde_json::from_str(&info).unwrap();
    assert_eq!(info.webtransport, s.server().webtransport_url());
    assert!(info.dev_mode);
    // Percentiles as JSON for the server API (with the API key).
    assert_eq!(s.http_get("/api/v1/stats").await.0, 401);
    let (status, stats) = s.api("GET", "/api/v1/stats", None).await;
    assert_eq!(status, 200);
    let stats: std::collections::BTreeMap<String, tutti::metrics::Percentiles> =
        serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["request.echo"].count, 2);
    assert_eq!(stats["handshake"].count, 1);
    assert!(stats["request.echo"].p99_ms <= stats["request.echo"].max_ms);
}

#[tokio::test]
async fn dev_token_endpoint_exists_only_in_development_mode() {
    let dev = TestServer::start().await;
    let (status, body) = dev.http_post("/api/dev/token", r#"{"user":"carol"}"#).await;
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let claims = dev
        .server()
        .auth()
        .verify(token["token"].as_str().unwrap())
        .unwrap();
    assert_eq!(claims.sub, "carol");
    assert!(claims.roles.is_empty());
    let (status, _) = dev
        .http_post("/api/dev/token", r#"{"user":"bad name"}"#)
        .await;
    assert_eq!(status, 400);

    let prod = TestServer::start_with(|c| {
        c.dev = false;
        c.auth.jwt_secret = Some("p".repeat(40));
    })
    .await;
    let (status, _) = prod
        .http_post("/api/dev/token", r#"{"user":"carol"}"#)
        .await;
    assert_eq!(status, 404);
    assert!(!prod.dir.path().join("data/dev-secret").exists());
}

#[tokio::test]
async fn secret_certificate_and_node_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = tutti::start(test_config(dir.path())).await.unwrap();
    let token = first
        .auth()
        .mint("alice", Duration::from_secs(600), &[])
        .unwrap();
    let (pin, node) = (first.certs().pin(), first.store().node_id().to_owned());
    first.shutdown().await.unwrap();

    let second = tutti::start(test_config(dir.path())).await.unwrap();
    assert_eq!(second.certs().pin(), pin);
    assert_eq!(second.store().node_id(), node);
    let config = tutti::client::ClientConfig::new(
        second.quic_addr(),
        TransportKind::Quic,
        Trust::Pinned(vec![pin]),
        token,
    );
    let c = Client::connect(config).await.unwrap();
    assert_eq!(c.welcome().user_id, "alice");
    drop(c);
    second.shutdown().await.unwrap();
}

// ---- requests finish whatever happens to their session ------------------------

/// How a session ends while one of its requests waits for its commit.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// The client closes the connection while the commit is held.
    Close,
    /// The client breaks its control stream (an invalid length prefix): the server
    /// closes the session with `PROTOCOL_ERROR` while the commit is held.
    BrokenPrefix,
    /// The client closes the connection just as the commit is released: the session
    /// ends around the commit, after `n` scheduler turns.
    CloseRacingCommit(usize),
}

const ENDINGS: [Ending; 6] = [
    Ending::Close,
    Ending::BrokenPrefix,
    Ending::CloseRacingCommit(0),
    Ending::CloseRacingCommit(1),
    Ending::CloseRacingCommit(4),
    Ending::CloseRacingCommit(16),
];

/// Sends `body` on `client`, waits until its write is queued behind a held writer,
/// ends the session as `ending` says, releases the writer, and returns once the
/// session is closed. The server must be one from
/// `TestServer::start_without_background_writes`: any other write would be taken for the
/// request's, and the session could end before the request was even read.
async fn end_session_during_commit(
    s: &TestServer,
    client: Client,
    body: v1::request::Body,
    ending: Ending,
) {
    let writer = s.server().writer().clone();
    let hold = writer.hold();
    assert_eq!(writer.in_flight(), 0, "no write but the request's");
    let client = std::sync::Arc::new(client);
    let c = client.clone();
    let request = tokio::spawn(async move { c.request(body).await });
    while writer.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    match ending {
        Ending::Close => {
            client.close();
            drop(hold);
        }
        Ending::BrokenPrefix => {
            client.send_raw(&[0xff; 10]).await.unwrap();
            let closed = client.closed().await;
            assert_eq!(closed.close_code(), Some(CloseCode::ProtocolError));
            drop(hold);
        }
        Ending::CloseRacingCommit(turns) => {
            drop(hold);
            for _ in 0..turns {
                tokio::task::yield_now().await;
            }
            client.close();
        }
    }
    // The answer may or may not reach the client; the effect must not depend on it.
    let _ = request.await.unwrap();
}

/// Waits for the next operation push of `doc` on `c`.
async fn next_doc_op(c: &Client, doc: &str) -> v1::DocOperation {
    loop {
        match c.next_event().await.expect("session open") {
            Event::Push(
                _,
                v1::Push {
                    event: Some(push::Event::DocOperation(op)),
                    ..
                },
            ) if op.doc_id == doc => return op,
            _ => {}
        }
    }
}

async fn doc_request(c: &Client, body: v1::request::Body) -> v1::response::Body {
    c.request(body).await.expect("request answered")
}

async fn open_doc(c: &Client, doc: &str, known: Option<u64>) -> v1::DocOpenResponse {
    match doc_request(
        c,
        v1::request::Body::DocOpen(v1::DocOpenRequest {
            doc_id: doc.into(),
            known_revision: known,
        }),
    )
    .await
    {
        v1::response::Body::DocOpen(r) => r,
        other => panic!("{other:?}"),
    }
}

/// A `DocSubmit` whose session ends while its commit is in flight is applied once,
/// reaches every editor with the document open exactly once, stays in the log for
/// catch-up, and a resend is acknowledged as a duplicate.
async fn a_doc_submit_finishes_after_its_session_ends(t: TransportKind) {
    use tutti::client::collab::Document;
    use tutti::ot::TextOperation;

    let s = TestServer::start_without_background_writes().await;
    let owner = s.connect(t, "ann").await;
    doc_request(
        &owner,
        v1::request::Body::DocCreate(v1::DocCreateRequest {
            doc_id: "lifecycle".into(),
            text: "ab".into(),
        }),
    )
    .await;
    doc_request(
        &owner,
        v1::request::Body::DocShare(v1::DocShareRequest {
            doc_id: "ann~lifecycle".into(),
            user_id: "bob".into(),
            role: v1::DocRole::Editor as i32,
        }),
    )
    .await;
    // Two editors keep the document open throughout.
    let editors = [s.connect(t, "bob").await, s.connect(t, "ann").await];
    let mut revision = 0;
    for e in &editors {
        revision = open_doc(e, "ann~lifecycle", None).await.revision;
    }
    for (i, ending) in ENDINGS.into_iter().enumerate() {
        let author = s.connect(t, "ann").await;
        let open = open_doc(&author, "ann~lifecycle", None).await;
        assert_eq!(open.revision, revision, "{ending:?}");
        let mut doc = Document::from_open(format!("author-{i}"), open).unwrap();
        let insert = TextOperation::new()
            .retain(doc.text().chars().count())
            .insert(&format!("[{i}🎵]"));
        let submit = doc.edit(insert).unwrap().expect("sent at once");
        end_session_during_commit(
            &s,
            author,
            v1::request::Body::DocSubmit(submit.clone()),
            ending,
        )
        .await;

        // Every editor receives it, as the next revision.
        for e in &editors {
            let op = tokio::time::timeout(Duration::from_secs(10), next_doc_op(e, "ann~lifecycle"))
                .await
                .unwrap_or_else(|_| panic!("{ending:?}: the operation never reached an editor"));
            assert_eq!(op.revision, revision + 1, "{ending:?}");
            assert_eq!(op.client_id, format!("author-{i}"));
        }
        // Catch-up from before it returns it as an operation, not a snapshot.
        let reader = s.connect(t, "bob").await;
        let caught = open_doc(&reader, "ann~lifecycle", Some(revision)).await;
        match caught.state {
            Some(v1::doc_open_response::State::CatchUp(c)) => {
                assert_eq!(c.operations.len(), 1, "{ending:?}");
                assert_eq!(c.operations[0].revision, revision + 1);
            }
            other => panic!("{ending:?}: catch-up gave {other:?}"),
        }
        // The author reconnects and resends: a duplicate, applied once.
        let again = s.connect(t, "ann").await;
        open_doc(&again, "ann~lifecycle", Some(revision)).await;
        match doc_request(&again, v1::request::Body::DocSubmit(submit)).await {
            v1::response::Body::DocSubmit(r) => {
                assert!(r.duplicate, "{ending:?}: the resend was applied again");
                assert_eq!(r.revision, revision + 1);
            }
            other => panic!("{other:?}"),
        }
        revision += 1;
    }
    // Exactly once: a last edit from an editor is the next thing each editor sees.
    let last = open_doc(&editors[0], "ann~lifecycle", None).await;
    assert_eq!(last.revision, revision);
    let mut doc = Document::from_open("closer", last).unwrap();
    let text = doc.text().to_owned();
    let submit = doc
        .edit(
            TextOperation::new()
                .retain(text.chars().count())
                .insert("."),
        )
        .unwrap()
        .unwrap();
    doc_request(&editors[0], v1::request::Body::DocSubmit(submit)).await;
    for e in &editors[1..] {
        let op = next_doc_op(e, "ann~lifecycle").await;
        assert_eq!(op.revision, revision + 1, "no operation arrived twice");
    }
    let stored = open_doc(&s.connect(t, "ann").await, "ann~lifecycle", None).await;
    let expected: String = (0..ENDINGS.len()).map(|i| format!("[{i}🎵]")).collect();
    assert_eq!(
        stored.state,
        Some(v1::doc_open_response::State::Snapshot(format!(
            "ab{expected}."
        )))
    );
}

/// A `ChatSend` whose session ends while its commit is in flight is delivered to
/// every participant once, and the room's offsets stay contiguous.
async fn a_chat_send_finishes_after_its_session_ends(t: TransportKind) {
    let s = TestServer::start_without_background_writes().await;
    let ann = s.connect(t, "ann").await;
    doc_request(
        &ann,
        v1::request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: "lifecycle".into(),
            name: "lifecycle".into(),
            participants: vec!["bob".into()],
        }),
    )
    .await;
    let bob = s.connect(t, "bob").await;
    for (i, ending) in ENDINGS.into_iter().enumerate() {
        let sender = s.connect(t, "ann").await;
        end_session_during_commit(
            &s,
            sender,
            v1::request::Body::ChatSend(v1::ChatSendRequest {
                room_id: "ann~lifecycle".into(),
                text: format!("m{i}"),
                client_message_id: String::new(),
            }),
            ending,
        )
        .await;
        for c in [&ann, &bob] {
            let Ok(m) = tokio::time::timeout(Duration::from_secs(10), next_message(c)).await else {
                // Say whether it was stored and not pushed, or not stored at all.
                let history = doc_request(
                    &bob,
                    v1::request::Body::ChatHistory(v1::ChatHistoryRequest {
                        room_id: "ann~lifecycle".into(),
                        ..Default::default()
                    }),
                )
                .await;
                panic!("{ending:?}: the message never arrived; the room holds {history:?}");
            };
            assert_eq!(m.offset, i as u64 + 1, "{ending:?}: offsets are contiguous");
            assert_eq!(m.text, format!("m{i}"));
        }
    }
    // Nothing twice: the next message is the next offset for both.
    doc_request(
        &bob,
        v1::request::Body::ChatSend(v1::ChatSendRequest {
            room_id: "ann~lifecycle".into(),
            text: "last".into(),
            client_message_id: String::new(),
        }),
    )
    .await;
    for c in [&ann, &bob] {
        let m = next_message(c).await;
        assert_eq!(m.offset, ENDINGS.len() as u64 + 1);
    }
}

async fn next_message(c: &Client) -> v1::ChatMessage {
    loop {
        if let Event::Push(
            _,
            v1::Push {
                event: Some(push::Event::ChatMessage(m)),
                ..
            },
        ) = c.next_event().await.expect("session open")
        {
            return m;
        }
    }
}

both_transports!(
    a_doc_submit_finishes_after_its_session_ends,
    a_chat_send_finishes_after_its_session_ends,
);

// ---- a session that stops reading holds up nobody else ----------------------

/// A session opened by hand: the control stream after `Welcome`, so a test can
/// write requests and choose never to read the answers.
async fn raw_session(
    s: &TestServer,
    t: TransportKind,
    user: &str,
) -> (tutti::transport::Session, tutti::transport::SendStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = s.client_config(t, &s.token(user));
    let session = connect_transport(&config).await.unwrap();
    let (mut send, mut recv) = session.open_bi().await.unwrap();
    let hello = v1::ClientFrame {
        kind: Some(v1::client_frame::Kind::Hello(v1::Hello {
            token: s.token(user),
            protocol_version: tutti::protocol::PROTOCOL_VERSION,
            ..Default::default()
        })),
    };
    let mut buf = bytes::BytesMut::new();
    tutti::protocol::encode_frame(&hello, &mut buf);
    send.write_all(&buf).await.unwrap();
    let mut decoder = tutti::protocol::FrameDecoder::new(1 << 20);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(f) = decoder.decode::<v1::ServerFrame>().unwrap() {
            assert!(matches!(f.kind, Some(v1::server_frame::Kind::Welcome(_))));
            break;
        }
        let n = recv.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the server closed the control stream");
        decoder.extend(&chunk[..n]);
    }
    // The receiving half stays unread from here on (it is kept alive, unread).
    std::mem::forget(recv);
    (session, send)
}

/// Reads and discards every push stream of `session` (so only the control stream
/// is left unread).
fn drain_pushes(session: tutti::transport::Session) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(mut stream) = session.accept_uni().await {
            tokio::spawn(async move {
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut stream, &mut sink).await;
            });
        }
    })
}

/// A participant of a room that sends requests and never reads the answers fills
/// its control stream; the server stops reading it and closes it as a slow consumer
/// after `timeouts.slow_consumer` without progress and, meanwhile, the other
/// participant's sends in the same room are answered promptly.
async fn a_session_that_stops_reading_does_not_stall_others(t: TransportKind) {
    use tokio::io::AsyncWriteExt;
    const BOUND: Duration = Duration::from_millis(1500);
    // Long enough that Ann is still stuck while Bob sends (his sends take
    // milliseconds; each is bounded by BOUND); Ann's flood of sends is
    // the point, so the per-user chat rate limit is off.
    let s = TestServer::start_with(|c| {
        c.timeouts.slow_consumer = Duration::from_secs(10);
        c.limits.rate.chat_send = tutti::services::rate::Rate::new(0, 0.0);
    })
    .await;
    let bob = s.connect(t, "bob").await;
    doc_request(
        &bob,
        v1::request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: "stall".into(),
            name: "stall".into(),
            participants: vec!["ann".into()],
        }),
    )
    .await;
    let (ann, mut control) = raw_session(&s, t, "ann").await;
    let _pushes = drain_pushes(ann.clone());
    let frame = |id: u64, body: v1::request::Body| {
        let mut buf = bytes::BytesMut::new();
        let req = v1::ClientFrame {
            kind: Some(v1::client_frame::Kind::Request(v1::Request {
                id,
                body: Some(body),
            })),
        };
        tutti::protocol::encode_frame(&req, &mut buf);
        buf
    };
    // Ann sends into the room (and never reads an answer)...
    let mut id = 0u64;
    let mut buf = bytes::BytesMut::new();
    for i in 0..32 {
        id += 1;
        buf.extend_from_slice(&frame(
            id,
            v1::request::Body::ChatSend(v1::ChatSendRequest {
                room_id: "bob~stall".into(),
                text: format!("ann {i}"),
                client_message_id: String::new(),
            }),
        ));
    }
    control.write_all(&buf).await.unwrap();
    for _ in 0..32 {
        tokio::time::timeout(Duration::from_secs(10), next_message(&bob))
            .await
            .expect("Ann's messages reach Bob");
    }
    // ...then pipelines requests with large answers, still reading none, until the
    // server closes her session: her unread answers fill her stream window, then
    // the server's control queue, and the server stops reading her requests. She
    // keeps writing whatever the machine's speed, so the server ends up stuck on
    // her for sure (each write is bounded; the stream stays open until the close).
    let flood = tokio::spawn(async move {
        for _ in 0..200 {
            let mut buf = bytes::BytesMut::new();
            for _ in 0..64 {
                id += 1;
                buf.extend_from_slice(&frame(
                    id,
                    v1::request::Body::Echo(v1::EchoRequest {
                        payload: vec![7; 4000].into(),
                        push: false,
                    }),
                ));
            }
            if control.write_all(&buf).await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await;
    });

    // Bob's sends in the same room go through while Ann's session is stuck.
    for i in 0..10 {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            BOUND,
            bob.request(v1::request::Body::ChatSend(v1::ChatSendRequest {
                room_id: "bob~stall".into(),
                text: format!("bob {i}"),
                client_message_id: String::new(),
            })),
        )
        .await;
        assert!(
            matches!(answer, Ok(Ok(_))),
            "send {i} took over {BOUND:?} ({:?}): {answer:?}",
            started.elapsed()
        );
        let history = tokio::time::timeout(
            BOUND,
            bob.request(v1::request::Body::ChatHistory(v1::ChatHistoryRequest {
                room_id: "bob~stall".into(),
                before_offset: 0,
                limit: 1,
            })),
        )
        .await;
        assert!(matches!(history, Ok(Ok(_))), "history {i}: {history:?}");
    }
    // Ann is closed as a slow consumer within the configured bound.
    // slow_consumer (10 s) after her last write made progress, with room for a
    // loaded machine.
    let closed = tokio::time::timeout(Duration::from_secs(60), ann.closed())
        .await
        .expect("the stuck session is closed");
    assert_eq!(
        closed.code,
        Some(CloseCode::SlowConsumer as u32),
        "{closed:?}"
    );
    flood.abort();
}

both_transports!(a_session_that_stops_reading_does_not_stall_others);

// ---- authentication hardening: development mode, token checks, expiry ---------

#[tokio::test]
async fn development_tokens_carry_no_roles() {
    let dev = TestServer::start().await;
    let (status, body) = dev
        .http_post(
            "/api/dev/token",
            r#"{"user":"mallory","roles":["metrics"]}"#,
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let refused: tutti::api::ApiError = serde_json::from_str(&body).unwrap();
    assert_eq!(refused.code, ErrorCode::PermissionDenied as u32);
    assert!(refused.message.contains("tutti token --role"), "{body}");
}

#[tokio::test]
async fn a_server_without_a_secret_starts_only_in_development_mode_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.dev = false;
    let err = tutti::start(config.clone()).await.unwrap_err();
    assert!(format!("{err:#}").contains("--dev"), "{err:#}");
    assert!(!dir.path().join("data/dev-secret").exists());
    // Development mode with an address other machines reach.
    config.dev = true;
    config.http = "0.0.0.0:0".parse().unwrap();
    let err = tutti::start(config.clone()).await.unwrap_err();
    assert!(format!("{err:#}").contains("loopback"), "{err:#}");
    config.http = "127.0.0.1:0".parse().unwrap();
    config.listen = "0.0.0.0:0".parse().unwrap();
    assert!(tutti::start(config).await.is_err());
}

/// Runs the `tutti` binary with `args` and no `TUTTI_*` variables; returns
/// (success, stdout, stderr). A run that has not ended in 30 s is killed and fails.
fn tutti_cli(args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tutti"));
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("TUTTI_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("tutti {args:?} still runs after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_refuses_to_run_without_a_secret_and_mints_role_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let certs = dir.path().join("certs");
    let certs = certs.to_str().unwrap();
    let serve = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        data,
        "--cert-dir",
        certs,
    ];
    let (ok, _, stderr) = tokio::task::block_in_place(|| tutti_cli(&serve));
    assert!(!ok && stderr.contains("no token secret"), "{stderr}");
    let (ok, _, stderr) =
        tokio::task::block_in_place(|| tutti_cli(&["token", "--user", "ops", "--data-dir", data]));
    assert!(!ok && stderr.contains("--dev"), "{stderr}");
    let (ok, _, stderr) = tokio::task::block_in_place(|| {
        tutti_cli(&["serve", "--dev", "--http", "0.0.0.0:0", "--data-dir", data])
    });
    assert!(!ok && stderr.contains("loopback"), "{stderr}");
    // An operator's role token, signed with the development secret, is what a
    // development server accepts.
    let (ok, token, stderr) = tokio::task::block_in_place(|| {
        tutti_cli(&[
            "token",
            "--dev",
            "--user",
            "ops",
            "--role",
            "metrics",
            "--data-dir",
            data,
        ])
    });
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = tokio::task::block_in_place(|| {
        tutti_cli(&[
            "token",
            "--dev",
            "--user",
            "ops",
            "--ttl",
            "2days",
            "--data-dir",
            data,
        ])
    });
    assert!(!ok && stderr.contains("max_lifetime"), "{stderr}");
    let mut config = test_config(dir.path());
    config.data_dir = data.into();
    let server = tutti::start(config).await.unwrap();
    let claims = server.auth().verify(token.trim()).unwrap();
    assert_eq!(
        (claims.sub.as_str(), &claims.roles[..]),
        ("ops", &["metrics".to_owned()][..])
    );
    server.shutdown().await.unwrap();
}

const OLD_KEY: &str = "an old key of at least thirty-two bytes!";
const NEW_KEY: &str = "a new key of at least thirty-two bytes!!";

/// A server in production mode with two keys by kid, an issuer, an audience and
/// a one-hour maximum lifetime.
async fn strict_server() -> TestServer {
    TestServer::start_with(|c| {
        c.dev = false;
        c.auth.keys = [("new", NEW_KEY), ("old", OLD_KEY)]
            .map(|(kid, secret)| tutti::config::KeyConfig {
                kid: kid.into(),
                secret: secret.into(),
            })
            .to_vec();
        c.auth.issuer = Some("https://id.example".into());
        c.auth.audience = Some("tutti".into());
        c.auth.max_lifetime = Duration::from_secs(3600);
    })
    .await
}

/// An issuer of tokens: keys by kid (or a legacy secret), issuer and audience.
fn issuer(kid: Option<&str>, secret: &str, iss: &str, aud: &str) -> Auth {
    let policy = tutti::auth::AuthPolicy {
        issuer: Some(iss.into()),
        audience: Some(aud.into()),
        ..Default::default()
    };
    match kid {
        Some(kid) => Auth::with_keys(
            None,
            &[(kid.to_owned(), secret.as_bytes().to_vec())],
            SecretSource::Configured,
            policy,
        ),
        None => Auth::with_keys(
            Some(secret.as_bytes()),
            &[],
            SecretSource::Configured,
            policy,
        ),
    }
}

async fn tokens_are_checked_for_key_id_issuer_audience_and_lifetime(t: TransportKind) {
    let s = strict_server().await;
    let iss = "https://id.example";
    let hour = Duration::from_secs(3600);
    // Both keys of the rotation are accepted.
    for kid in ["new", "old"] {
        let secret = if kid == "new" { NEW_KEY } else { OLD_KEY };
        let token = issuer(Some(kid), secret, iss, "tutti")
            .mint("alice", hour, &[])
            .unwrap();
        let c = Client::connect(s.client_config(t, &token)).await.unwrap();
        assert_eq!(c.welcome().user_id, "alice");
    }
    let now = unix_now();
    let good = issuer(Some("new"), NEW_KEY, iss, "tutti");
    let refused = [
        (
            "an unknown kid",
            issuer(Some("gone"), NEW_KEY, iss, "tutti").mint("alice", hour, &[]),
        ),
        (
            "no kid",
            issuer(None, NEW_KEY, iss, "tutti").mint("alice", hour, &[]),
        ),
        (
            "another audience",
            issuer(Some("new"), NEW_KEY, iss, "other").mint("alice", hour, &[]),
        ),
        (
            "another issuer",
            issuer(Some("new"), NEW_KEY, "https://evil.example", "tutti").mint("alice", hour, &[]),
        ),
        (
            "over the maximum lifetime",
            good.mint("alice", hour * 2, &[]),
        ),
        (
            "not yet valid",
            good.sign(&Claims {
                sub: "alice".into(),
                exp: now + 600,
                nbf: Some(now + 300),
                iss: Some(iss.into()),
                ..Claims::default()
            }),
        ),
    ];
    for (what, token) in refused {
        let err = Client::connect(s.client_config(t, &token.unwrap()))
            .await
            .unwrap_err();
        assert_eq!(
            err.close_code(),
            Some(CloseCode::Unauthorized),
            "{what}: {err:?}"
        );
    }
}

async fn a_session_ends_when_its_token_expires_unless_refreshed(t: TransportKind) {
    let s = TestServer::start().await;
    let auth = s.server().auth();
    let short = auth.mint("alice", Duration::from_secs(2), &[]).unwrap();
    let c = Client::connect(s.client_config(t, &short)).await.unwrap();
    let first = c.welcome().token_expires_at_ms;
    assert!(first > tutti::util::unix_millis(), "{first}");
    // Another user's token is refused, and changes nothing.
    let bob = auth.mint("bob", Duration::from_secs(600), &[]).unwrap();
    match c.refresh_token(bob).await {
        Err(ClientError::Server(e)) => assert_eq!(e.name, "PERMISSION_DENIED"),
        other => panic!("{other:?}"),
    }
    let later = auth.mint("alice", Duration::from_secs(3), &[]).unwrap();
    let refreshed = c.refresh_token(later).await.unwrap();
    assert!(refreshed > first, "{refreshed} <= {first}");
    // The session outlives its first token and ends with the refreshed one.
    let closed = c.closed().await;
    assert_eq!(
        closed.close_code(),
        Some(CloseCode::TokenExpired),
        "{closed:?}"
    );
    let now = tutti::util::unix_millis();
    assert!(
        now + 100 >= refreshed,
        "closed at {now}, {refreshed} expected"
    );
    let metrics = s.server().metrics().render();
    assert!(
        metrics.contains("tutti_sessions_closed_total{code=\"TOKEN_EXPIRED\"} 1"),
        "{metrics}"
    );
    let (_, stats) = s.api("GET", "/api/v1/stats", None).await;
    let stats: std::collections::BTreeMap<String, tutti::metrics::Percentiles> =
        serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["request.auth_refresh"].count, 2,
        "both refreshes are timed"
    );
}

both_transports!(
    tokens_are_checked_for_key_id_issuer_audience_and_lifetime,
    a_session_ends_when_its_token_expires_unless_refreshed,
);

/// A connection whose packets come further apart than `timeouts.ack_delay` would
/// save no ACK by the long delay, only wait longer for a lost packet: its client is
/// asked for its own delay (a second ACK_FREQUENCY request), and for the long one
/// again (a third) once its packets come close together. What is asked is checked
/// in the vendored quinn-proto's tests (`vendor/quinn-proto/src/tests/patches.rs`).
async fn a_sparse_connection_asks_its_client_for_its_own_ack_delay(t: TransportKind) {
    let s = TestServer::start_with(|c| c.timeouts.ack_delay = Duration::from_millis(40)).await;
    let c = s.connect(t, "alice").await;
    c.echo(b"ready".to_vec(), false).await.unwrap();
    assert_eq!(c.ack_counts().frequency_requests, 1, "asked once");
    // An answer every 100 ms: the mean gap (smoothed over one eighth) passes
    // 40 ms after a few.
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    let mut sparse = false;
    for _ in 0..20 {
        pace.tick().await;
        c.echo(b"sparse".to_vec(), false).await.unwrap();
        if c.ack_counts().frequency_requests >= 2 {
            sparse = true;
            break;
        }
    }
    assert!(sparse, "no new request after 20 answers 100 ms apart");
    assert_eq!(c.ack_counts().frequency_requests, 2);
    // Answers back to back bring the mean gap under 20 ms.
    for _ in 0..40 {
        c.echo(b"dense".to_vec(), false).await.unwrap();
    }
    assert!(
        within(Duration::from_secs(1), || c.ack_counts().frequency_requests
            >= 3)
        .await,
        "no request for the long delay again"
    );
}
