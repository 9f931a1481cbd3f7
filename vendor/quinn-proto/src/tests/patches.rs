//! Tests of Tutti's changes to quinn-proto (PATCHES.md), on the same simulated
//! network as quinn-proto's own tests.

use super::*;

/// The Initial and Handshake spaces are let go once the handshake is over, and stay
/// let go through what looks at every space afterwards: stream data both ways, a
/// lost flight, the loss probes and retransmissions that recover it, and idle ACKs.
#[test]
fn early_spaces_are_released_after_the_handshake_and_stay_released() {
    let _guard = subscribe();
    let mut pair = Pair::default();
    let (client_ch, server_ch) = pair.connect();
    pair.drive();
    assert!(pair.client_conn_mut(client_ch).early_spaces_released());
    assert!(pair.server_conn_mut(server_ch).early_spaces_released());

    const MSG: &[u8] = b"hello";
    let s = pair.client_streams(client_ch).open(Dir::Bi).unwrap();
    pair.client_send(client_ch, s).write(MSG).unwrap();
    pair.drive_client();
    // Lose the client's flight: the stream data comes back by a loss probe.
    assert!(!pair.server.inbound.is_empty());
    pair.server.inbound.clear();
    pair.drive();
    assert!(pair.client_conn_mut(client_ch).stats().path.lost_packets > 0);
    assert_matches!(
        pair.server_streams(server_ch).accept(Dir::Bi),
        Some(stream) if stream == s
    );
    let mut recv = pair.server_recv(server_ch, s);
    let mut chunks = recv.read(false).unwrap();
    assert_matches!(
        chunks.next(usize::MAX),
        Ok(Some(chunk)) if chunk.offset == 0 && chunk.bytes == MSG
    );
    let _ = chunks.finalize();
    pair.server_send(server_ch, s).write(MSG).unwrap();
    pair.drive();

    assert!(pair.client_conn_mut(client_ch).early_spaces_released());
    assert!(pair.server_conn_mut(server_ch).early_spaces_released());
}

/// A client sends no TLS message after its Finished over QUIC (RFC 9001, 6: not even
/// a KeyUpdate). A server that has let its rustls connection go refuses one the way
/// rustls would: it closes the connection with `unexpected_message`.
#[test]
fn a_server_refuses_tls_data_after_its_handshake() {
    let _guard = subscribe();
    let mut pair = Pair::default();
    let (client_ch, server_ch) = pair.connect();
    pair.drive();
    // A TLS 1.3 KeyUpdate message: type 24, length 1, update_not_requested.
    pair.client_conn_mut(client_ch)
        .queue_1rtt_crypto(Bytes::from_static(&[24, 0, 0, 1, 0]));
    pair.drive();
    let unexpected_message = TransportErrorCode::crypto(10);
    assert_matches!(
        pair.client_conn_mut(client_ch).poll(),
        Some(Event::ConnectionLost { reason: ConnectionError::ConnectionClosed(close) })
            if close.error_code == unexpected_message
    );
    assert_matches!(
        pair.server_conn_mut(server_ch).poll(),
        Some(Event::ConnectionLost { reason: ConnectionError::TransportError(e) })
            if e.code == unexpected_message
    );
}

/// What a server is asked about its handshake after its rustls connection is let go:
/// the negotiated protocol and the server name are kept; exporting keying material is
/// what it can no longer do (a client still can).
#[test]
fn a_server_keeps_its_handshake_data_after_letting_rustls_go() {
    let _guard = subscribe();
    let server_config = ServerConfig::with_crypto(Arc::new(server_crypto_with_alpn(vec![
        "foo".into(),
        "bar".into(),
    ])));
    let mut pair = Pair::new(Arc::new(EndpointConfig::default()), server_config);
    let client_config = ClientConfig::new(Arc::new(client_crypto_with_alpn(vec!["bar".into()])));
    let (client_ch, server_ch) = pair.connect_with(client_config);
    pair.drive();

    let server = pair.server_conn_mut(server_ch);
    let data = server
        .crypto_session()
        .handshake_data()
        .unwrap()
        .downcast::<crypto::rustls::HandshakeData>()
        .unwrap();
    assert_eq!(data.protocol.as_deref(), Some(&b"bar"[..]));
    assert_eq!(data.server_name.as_deref(), Some("localhost"));
    let mut buf = [0u8; 32];
    assert!(
        server
            .crypto_session()
            .export_keying_material(&mut buf, b"label", b"context")
            .is_err()
    );
    assert!(
        pair.client_conn_mut(client_ch)
            .crypto_session()
            .export_keying_material(&mut buf, b"label", b"context")
            .is_ok()
    );
}

/// A connected pair whose client asks the server, by an ACK_FREQUENCY frame, to
/// acknowledge after up to 200 ms or ten packets, at once on a gap (`exact`: the
/// delay as configured; otherwise clamped to the RTT, here 20 ms, or 25 ms).
fn ack_frequency_pair(
    exact: bool,
    loss_fallback: Duration,
) -> (Pair, ConnectionHandle, ConnectionHandle) {
    ack_frequency_pair_with(exact, loss_fallback, false, false)
}

/// [`ack_frequency_pair`], with [`AckFrequencyConfig::sparse_fallback`] and
/// [`AckFrequencyConfig::immediate_ack_when_window_fills`] as given.
fn ack_frequency_pair_with(
    exact: bool,
    loss_fallback: Duration,
    sparse_fallback: bool,
    window_ack: bool,
) -> (Pair, ConnectionHandle, ConnectionHandle) {
    let mut client_config = client_config_with_deterministic_pns();
    let mut ack_frequency = AckFrequencyConfig::default();
    ack_frequency
        .ack_eliciting_threshold(10u32.into())
        .max_ack_delay(Some(Duration::from_millis(200)))
        .reordering_threshold(1u32.into())
        .exact_max_ack_delay(exact)
        .loss_fallback(loss_fallback)
        .sparse_fallback(sparse_fallback)
        .immediate_ack_when_window_fills(window_ack);
    Arc::get_mut(&mut client_config.transport)
        .unwrap()
        .ack_frequency_config(Some(ack_frequency))
        .mtu_discovery_config(None);
    let mut pair = Pair::default_with_deterministic_pns();
    pair.latency = Duration::from_millis(10);
    let (client_ch, server_ch) = pair.connect_with(client_config);
    pair.drive();
    (pair, client_ch, server_ch)
}

/// The delay after which the server of an [`ack_frequency_pair`] acknowledges a
/// PING.
fn ack_delay_of_a_ping(exact: bool) -> Duration {
    let (mut pair, client_ch, server_ch) = ack_frequency_pair(exact, Duration::ZERO);
    assert_eq!(
        pair.server_conn_mut(server_ch)
            .stats()
            .frame_rx
            .ack_frequency,
        1
    );
    ping_ack_delay(&mut pair, client_ch, server_ch)
}

/// Sends a PING from the client and returns how long the server waits before it
/// acknowledges it.
fn ping_ack_delay(
    pair: &mut Pair,
    client_ch: ConnectionHandle,
    server_ch: ConnectionHandle,
) -> Duration {
    pair.client_conn_mut(client_ch).ping();
    pair.drive_client();
    pair.time += pair.latency;
    pair.drive_server();
    let received = pair.time;
    let acks = pair.server_conn_mut(server_ch).stats().frame_tx.acks;
    // Step through time until the server acknowledges the PING.
    for _ in 0..100 {
        pair.time += Duration::from_millis(5);
        pair.drive_server();
        if pair.server_conn_mut(server_ch).stats().frame_tx.acks > acks {
            let delay = pair.time - received;
            // Let the ACK reach the client, and anything it starts settle.
            pair.drive();
            return delay;
        }
    }
    panic!("the PING was not acknowledged within 500 ms");
}

/// The ACK_FREQUENCY frames the client of an [`ack_frequency_pair`] has sent.
fn frequency_requests(pair: &mut Pair, client_ch: ConnectionHandle) -> u64 {
    pair.client_conn_mut(client_ch)
        .stats()
        .frame_tx
        .ack_frequency
}

/// How long the server of an [`ack_frequency_pair`] waits to acknowledge a PING when
/// asked for the configured delay (200 ms)...
const LONG_DELAY: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(200)..=Duration::from_millis(205);
/// ... and when asked for its own (25 ms).
const OWN_DELAY: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(25)..=Duration::from_millis(30);

/// With `exact_max_ack_delay`, a peer is asked for the configured delay even above
/// the RTT, and honours it; without, the request is clamped as upstream.
#[test]
fn an_exact_max_ack_delay_is_requested_above_the_rtt() {
    let _guard = subscribe();
    let exact = ack_delay_of_a_ping(true);
    assert!(LONG_DELAY.contains(&exact), "{exact:?}");
    let clamped = ack_delay_of_a_ping(false);
    assert!(
        (Duration::from_millis(20)..=Duration::from_millis(30)).contains(&clamped),
        "{clamped:?}"
    );
}

/// With a long requested delay and a reordering threshold of 1, a gap (a lost
/// packet) is still acknowledged at once, so the sender finds the loss by the next
/// packet and not by a probe timeout.
#[test]
fn a_gap_is_acknowledged_at_once_despite_a_long_ack_delay() {
    let _guard = subscribe();
    let (mut pair, client_ch, server_ch) = ack_frequency_pair(true, Duration::ZERO);

    // The first PING is lost, the second arrives: a gap.
    pair.client_conn_mut(client_ch).ping();
    pair.drive_client();
    pair.server.inbound.clear();
    pair.client_conn_mut(client_ch).ping();
    pair.drive_client();
    pair.time += pair.latency;
    let acks = pair.server_conn_mut(server_ch).stats().frame_tx.acks;
    pair.drive_server();
    assert_eq!(
        pair.server_conn_mut(server_ch).stats().frame_tx.acks,
        acks + 1,
        "the gap is acknowledged without waiting"
    );
}

/// Whether the server of an [`ack_frequency_pair`] acknowledges two PINGs in a row
/// at once (an ack-eliciting threshold of 1 or less; the pair asks for 10).
fn two_pings_acked_at_once(
    pair: &mut Pair,
    client_ch: ConnectionHandle,
    server_ch: ConnectionHandle,
) -> bool {
    let acks = pair.server_conn_mut(server_ch).stats().frame_tx.acks;
    for _ in 0..2 {
        pair.client_conn_mut(client_ch).ping();
        pair.drive_client();
    }
    pair.time += pair.latency;
    pair.drive_server();
    let at_once = pair.server_conn_mut(server_ch).stats().frame_tx.acks > acks;
    pair.drive();
    at_once
}

/// With `loss_fallback`, a loss sets the exact delay aside: the peer is asked for
/// the delay of its own transport parameters (25 ms) and an ACK for every second
/// packet until the fallback period has passed without another loss, then for the
/// configured values again.
#[test]
fn after_a_loss_the_peer_acknowledges_as_without_the_extension_for_a_while() {
    let _guard = subscribe();
    let fallback = Duration::from_secs(2);
    let (mut pair, client_ch, server_ch) = ack_frequency_pair(true, fallback);
    let delay = ping_ack_delay(&mut pair, client_ch, server_ch);
    assert!(LONG_DELAY.contains(&delay), "before any loss: {delay:?}");
    assert!(!two_pings_acked_at_once(&mut pair, client_ch, server_ch));

    // The first PING is lost, the second arrives; the client finds the loss.
    let requests = frequency_requests(&mut pair, client_ch);
    pair.client_conn_mut(client_ch).ping();
    pair.drive_client();
    pair.server.inbound.clear();
    pair.client_conn_mut(client_ch).ping();
    pair.drive();
    let stats = pair.client_conn_mut(client_ch).stats();
    assert_eq!(stats.path.lost_packets, 1);
    assert_eq!(stats.frame_tx.ack_frequency, requests + 1, "a new request");
    let lost_at = pair.time;
    let delay = ping_ack_delay(&mut pair, client_ch, server_ch);
    assert!(OWN_DELAY.contains(&delay), "after the loss: {delay:?}");
    assert!(two_pings_acked_at_once(&mut pair, client_ch, server_ch));

    // Within the fallback period the request stands...
    pair.time = lost_at + fallback - Duration::from_millis(300);
    let delay = ping_ack_delay(&mut pair, client_ch, server_ch);
    assert!(OWN_DELAY.contains(&delay), "within the period: {delay:?}");
    // ... and after it the next packet asks for the configured delay again; the
    // PING after that is acknowledged late.
    pair.time = lost_at + fallback;
    ping_ack_delay(&mut pair, client_ch, server_ch);
    assert_eq!(frequency_requests(&mut pair, client_ch), requests + 2);
    let delay = ping_ack_delay(&mut pair, client_ch, server_ch);
    assert!(LONG_DELAY.contains(&delay), "after the period: {delay:?}");
    assert!(!two_pings_acked_at_once(&mut pair, client_ch, server_ch));
}

/// Without `loss_fallback` (the default) a loss changes nothing.
#[test]
fn without_a_loss_fallback_a_loss_keeps_the_exact_ack_delay() {
    let _guard = subscribe();
    let (mut pair, client_ch, server_ch) = ack_frequency_pair(true, Duration::ZERO);
    let requests = frequency_requests(&mut pair, client_ch);
    pair.client_conn_mut(client_ch).ping();
    pair.drive_client();
    pair.server.inbound.clear();
    pair.client_conn_mut(client_ch).ping();
    pair.drive();
    let stats = pair.client_conn_mut(client_ch).stats();
    assert_eq!(stats.path.lost_packets, 1);
    assert_eq!(stats.frame_tx.ack_frequency, requests);
    let delay = ping_ack_delay(&mut pair, client_ch, server_ch);
    assert!(LONG_DELAY.contains(&delay), "{delay:?}");
}

/// With `sparse_fallback`, a sender whose ack-eliciting packets come further apart
/// than the configured delay asks for the peer's own delay (25 ms), since a long one
/// would save it no ACK; once they come at most half the delay apart, for the
/// configured one again. One ACK_FREQUENCY frame per switch.
#[test]
fn a_sparse_sender_asks_for_the_peers_own_ack_delay() {
    let _guard = subscribe();
    let (mut pair, client_ch, server_ch) =
        ack_frequency_pair_with(true, Duration::ZERO, true, false);
    // A connection starts as if its packets were dense.
    let delay = ping_ack_delay(&mut pair, client_ch, server_ch);
    assert!(LONG_DELAY.contains(&delay), "at first: {delay:?}");
    let requests = frequency_requests(&mut pair, client_ch);

    // A PING a second: after a few, the peer is asked for its own delay.
    let mut sparse_pings = 0;
    loop {
        sparse_pings += 1;
        assert!(sparse_pings <= 6, "still asking for the long delay");
        pair.time += Duration::from_secs(1);
        let delay = ping_ack_delay(&mut pair, client_ch, server_ch);
        if OWN_DELAY.contains(&delay) {
            break;
        }
        assert!(LONG_DELAY.contains(&delay), "{delay:?}");
    }
    assert!(sparse_pings >= 2, "switched on the first sparse packet");
    assert_eq!(frequency_requests(&mut pair, client_ch), requests + 1);

    // PINGs 20 ms apart (not waiting for their ACKs): once the mean gap is down to
    // half the delay, the configured delay is asked for again.
    for _ in 0..30 {
        pair.client_conn_mut(client_ch).ping();
        pair.drive_client();
        pair.time += Duration::from_millis(20);
        pair.drive_server();
    }
    pair.drive();
    assert_eq!(frequency_requests(&mut pair, client_ch), requests + 2);
    let delay = ping_ack_delay(&mut pair, client_ch, server_ch);
    assert!(LONG_DELAY.contains(&delay), "dense again: {delay:?}");
}

/// Without `sparse_fallback` (the default) a sparse sender keeps the exact delay.
#[test]
fn without_a_sparse_fallback_a_sparse_sender_keeps_the_exact_ack_delay() {
    let _guard = subscribe();
    let (mut pair, client_ch, server_ch) = ack_frequency_pair(true, Duration::ZERO);
    let requests = frequency_requests(&mut pair, client_ch);
    for _ in 0..6 {
        pair.time += Duration::from_secs(1);
        let delay = ping_ack_delay(&mut pair, client_ch, server_ch);
        assert!(LONG_DELAY.contains(&delay), "{delay:?}");
    }
    assert_eq!(frequency_requests(&mut pair, client_ch), requests);
}

/// How long a burst of `BURST_BYTES` written at once on a client's stream takes to
/// reach the server of an [`ack_frequency_pair`] (200 ms delay, an ACK every eleventh
/// packet, a 20 ms round trip), with or without
/// [`AckFrequencyConfig::immediate_ack_when_window_fills`]; and the IMMEDIATE_ACK
/// frames the client sent meanwhile.
fn burst_delivery(window_ack: bool) -> (Duration, u64) {
    const BURST_BYTES: usize = 40_000;
    let (mut pair, client_ch, server_ch) =
        ack_frequency_pair_with(true, Duration::ZERO, false, window_ack);
    let s = pair.client_streams(client_ch).open(Dir::Uni).unwrap();
    let start = pair.time;
    let written = pair
        .client_send(client_ch, s)
        .write(&vec![7u8; BURST_BYTES])
        .unwrap();
    assert_eq!(written, BURST_BYTES);
    let mut received = 0;
    loop {
        // A step handles what is due now, then moves the clock to the next event.
        let now = pair.time;
        if !pair.step() {
            panic!("idle with {received} of {BURST_BYTES} bytes received");
        }
        if received == 0 {
            if pair.server_streams(server_ch).accept(Dir::Uni).is_none() {
                continue;
            }
        }
        let mut recv = pair.server_recv(server_ch, s);
        let mut chunks = recv.read(false).unwrap();
        while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
            received += chunk.bytes.len();
        }
        let _ = chunks.finalize();
        if received == BURST_BYTES {
            let took = now - start;
            let immediate = pair
                .client_conn_mut(client_ch)
                .stats()
                .frame_tx
                .immediate_ack;
            return (took, immediate);
        }
        assert!(
            pair.time - start < Duration::from_secs(5),
            "the burst never arrived"
        );
    }
}

/// A burst larger than the congestion window fills it before the peer's threshold of
/// ACKs is reached: the sender then waits for the peer's 200 ms delay, unless the last
/// packet that fits asks for an ACK at once (then a few round trips of 20 ms).
#[test]
fn a_burst_larger_than_the_window_is_not_held_up_by_the_ack_delay() {
    let _guard = subscribe();
    let (held, none) = burst_delivery(false);
    assert_eq!(none, 0);
    assert!(held >= Duration::from_millis(200), "{held:?}");
    let (prompt, asked) = burst_delivery(true);
    assert!(prompt < Duration::from_millis(120), "{prompt:?}");
    assert!(
        (1..=4).contains(&asked),
        "about one request per round trip of the burst, not one per packet: {asked}"
    );
}
