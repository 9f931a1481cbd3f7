//! Analytics, metrics streaming and performance monitoring through the real server:
//! exact counts across bucket boundaries on a manual clock, rollups across a
//! restart, metrics subscriptions that carry only their series and only changes,
//! the `metrics` role, rate limits and cardinality caps, and `/metrics` read by a
//! Prometheus text-format parser.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::TestServer;
use tutti::client::{Client, ClientError, Event};
use tutti::clock::Clock;
use tutti::protocol::ErrorCode;
use tutti::protocol::v1::{self, StreamKind, push, request, response};
use tutti::transport::TransportKind;

/// A whole hour (so also a minute and a 5 s boundary) in 2027; tests start near it.
const MINUTE: u64 = 1_800_000_000_000;

fn event(t: &str, count: u32) -> v1::AnalyticsEvent {
    v1::AnalyticsEvent {
        r#type: t.into(),
        dimensions: HashMap::new(),
        count,
    }
}

fn with_dim(t: &str, k: &str, v: &str) -> v1::AnalyticsEvent {
    v1::AnalyticsEvent {
        r#type: t.into(),
        dimensions: [(k.to_owned(), v.to_owned())].into(),
        count: 1,
    }
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.error_code().unwrap(),
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// A client whose token carries `roles`.
async fn connect_as(s: &TestServer, t: TransportKind, user: &str, roles: &[&str]) -> Client {
    let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
    let token = s
        .server()
        .auth()
        .mint(user, Duration::from_secs(3600), &roles)
        .unwrap();
    Client::connect(s.client_config(t, &token)).await.unwrap()
}

async fn series(
    c: &Client,
    t: &str,
    dim: &str,
    duration_ms: u64,
    res_ms: u64,
) -> v1::AnalyticsSeriesResponse {
    match c
        .request(request::Body::AnalyticsSeries(v1::AnalyticsSeriesRequest {
            by_node: false,
            r#type: t.into(),
            dimension: dim.into(),
            duration_ms,
            resolution_ms: res_ms,
        }))
        .await
        .unwrap()
    {
        response::Body::AnalyticsSeries(s) => s,
        other => panic!("{other:?}"),
    }
}

async fn top(c: &Client, window_ms: u64) -> Vec<(String, u64)> {
    match c
        .request(request::Body::AnalyticsTop(v1::AnalyticsTopRequest {
            window_ms,
            limit: 0,
        }))
        .await
        .unwrap()
    {
        response::Body::AnalyticsTop(t) => {
            t.types.into_iter().map(|t| (t.r#type, t.count)).collect()
        }
        other => panic!("{other:?}"),
    }
}

async fn distinct(c: &Client, window_ms: u64) -> u64 {
    match c
        .request(request::Body::AnalyticsDistinctUsers(
            v1::AnalyticsDistinctUsersRequest { window_ms },
        ))
        .await
        .unwrap()
    {
        response::Body::AnalyticsDistinctUsers(d) => d.estimate,
        other => panic!("{other:?}"),
    }
}

fn points(s: &v1::AnalyticsSeriesResponse) -> Vec<(u64, u64)> {
    s.points.iter().map(|p| (p.start_ms, p.count)).collect()
}

both_transports!(
    counts_are_exact_across_bucket_boundaries,
    a_metrics_subscriber_gets_only_its_series_and_only_changes,
    queries_and_streams_need_the_metrics_role,
    rate_limits_and_caps_refuse_whole_batches,
    huge_durations_and_resolutions_are_exact_or_refused,
);

async fn counts_are_exact_across_bucket_boundaries(t: TransportKind) {
    let clock = Clock::manual(MINUTE - 7_000);
    let c2 = clock.clone();
    let s = TestServer::start_with_clock(c2, |_| {}).await;
    let ops = connect_as(&s, t, "ops", &["metrics"]).await;
    let alice = s.connect(t, "alice").await;
    let bob = s.connect(t, "bob").await;

    // 7 s before the minute: bucket [-10 s, -5 s).
    assert_eq!(
        alice
            .track(vec![event("signup", 3), event("view", 1)])
            .await
            .unwrap(),
        4
    );
    clock.advance(1_999); // -5.001 s: still the same 5 s bucket.
    assert_eq!(bob.track(vec![event("signup", 2)]).await.unwrap(), 2);
    clock.advance(1); // -5 s exactly: the next bucket.
    alice.track(vec![event("signup", 1)]).await.unwrap();
    clock.advance(5_000); // the minute boundary: a new bucket and a new minute.
    bob.track(vec![event("signup", 10), with_dim("view", "plan", "pro")])
        .await
        .unwrap();
    s.server().services().analytics.flush().await.unwrap(); // the first minute is written
    clock.advance(4_999);
    alice
        .track(vec![event("signup", 4), with_dim("view", "plan", "free")])
        .await
        .unwrap();

    // Now = MINUTE + 4.999 s. 20 s at 5 s: points at -15, -10, -5, 0.
    let fine = series(&ops, "signup", "", 20_000, 5_000).await;
    assert_eq!(fine.resolution_ms, 5_000);
    assert_eq!(
        points(&fine),
        [
            (MINUTE - 15_000, 0),
            (MINUTE - 10_000, 5),
            (MINUTE - 5_000, 1),
            (MINUTE, 14)
        ]
    );
    assert_eq!(fine.total, 20);
    // A resolution finer than the bucket is rounded up to it; 0 means the bucket.
    assert_eq!(
        series(&ops, "signup", "", 20_000, 0).await.points,
        fine.points
    );
    assert_eq!(
        series(&ops, "signup", "", 20_000, 1_000)
            .await
            .resolution_ms,
        5_000
    );
    // Minutes: one flushed minute and one pending, added up from both.
    let minutes = series(&ops, "signup", "", 120_000, 60_000).await;
    assert_eq!(
        points(&minutes),
        [(MINUTE - 120_000, 0), (MINUTE - 60_000, 6), (MINUTE, 14)]
    );
    // Dimensions are series of their own.
    assert_eq!(
        series(&ops, "view", "plan=pro", 120_000, 60_000)
            .await
            .total,
        1
    );
    assert_eq!(
        series(&ops, "view", "plan=free", 20_000, 5_000).await.total,
        1
    );
    assert_eq!(series(&ops, "view", "", 20_000, 5_000).await.total, 3);
    assert_eq!(series(&ops, "never", "", 20_000, 5_000).await.total, 0);
    // Top types and distinct users over the fine window and over minutes.
    assert_eq!(
        top(&ops, 60_000).await,
        [("signup".to_owned(), 20), ("view".to_owned(), 3)]
    );
    // A window is rounded out to whole buckets: 4 s is the current bucket.
    assert_eq!(
        top(&ops, 4_000).await,
        [("signup".to_owned(), 14), ("view".to_owned(), 2)]
    );
    assert_eq!(
        top(&ops, 2 * 3_600_000).await,
        [("signup".to_owned(), 20), ("view".to_owned(), 3)]
    );
    assert_eq!(distinct(&ops, 60_000).await, 2);
    assert_eq!(distinct(&ops, 2 * 3_600_000).await, 2);
    assert_eq!(distinct(&ops, 4_000).await, 2);
    let carol = s.connect(t, "carol").await;
    clock.advance(1); // the next bucket: only carol in it
    carol.track(vec![event("view", 1)]).await.unwrap();
    assert_eq!(distinct(&ops, 1).await, 1);
    assert_eq!(distinct(&ops, 60_000).await, 3);
}

/// Reads pushes until `pred` holds for an update; returns every update seen.
async fn updates_until(
    c: &Client,
    seen: &mut Vec<v1::MetricsUpdate>,
    pred: impl Fn(&[v1::MetricsUpdate]) -> bool,
) {
    while !pred(seen) {
        match c.next_event().await.expect("session open") {
            Event::Push(StreamKind::Analytics, p) => match p.event {
                Some(push::Event::MetricsUpdate(u)) => seen.push(u),
                other => panic!("unexpected analytics push {other:?}"),
            },
            Event::Push(kind, p) => panic!("unexpected push on {kind:?}: {p:?}"),
            _ => {}
        }
    }
}

fn event_total(updates: &[v1::MetricsUpdate], t: &str) -> u64 {
    updates
        .iter()
        .flat_map(|u| &u.events)
        .filter(|e| e.r#type == t)
        .map(|e| e.count)
        .sum()
}

async fn a_metrics_subscriber_gets_only_its_series_and_only_changes(t: TransportKind) {
    let s = TestServer::start().await;
    let ops = connect_as(&s, t, "ops", &["metrics"]).await;
    let sub = match ops
        .request(request::Body::MetricsSubscribe(
            v1::MetricsSubscribeRequest {
                all_nodes: false,
                event_types: vec!["signup".into()],
                metrics: vec![
                    "sessions.*".into(),
                    "latency.request.analytics_track".into(),
                ],
                interval_ms: 100,
            },
        ))
        .await
        .unwrap()
    {
        response::Body::MetricsSubscribe(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(sub.interval_ms, 100);
    let mut names = sub.metrics.clone();
    names.sort();
    assert_eq!(
        names,
        [
            "latency.request.analytics_track",
            "sessions.accepted",
            "sessions.quic",
            "sessions.webtransport"
        ]
    );

    let alice = s.connect(TransportKind::Quic, "alice").await;
    alice
        .track(vec![event("signup", 5), event("checkout", 3)])
        .await
        .unwrap();
    alice.track(vec![event("signup", 2)]).await.unwrap();

    let mut seen = Vec::new();
    updates_until(&ops, &mut seen, |u| {
        event_total(u, "signup") == 7
            && u.iter()
                .flat_map(|u| &u.latencies)
                .map(|l| l.count)
                .sum::<u64>()
                == 2
    })
    .await;
    // Then a change of one gauge only: another session opens.
    let before = seen.len();
    let _bob = s.connect(TransportKind::Quic, "bob").await;
    updates_until(&ops, &mut seen, |u| {
        u[before..]
            .iter()
            .flat_map(|u| &u.values)
            .any(|v| v.name == "sessions.accepted" && v.value == 3.0)
    })
    .await;

    for (i, u) in seen.iter().enumerate() {
        assert_eq!(u.seq, i as u64 + 1, "no gaps");
        assert_eq!(u.interval_ms, 100);
        assert!(
            !u.events.is_empty() || !u.values.is_empty() || !u.latencies.is_empty(),
            "empty updates are not sent"
        );
        for e in &u.events {
            assert_eq!(e.r#type, "signup", "checkout was not subscribed");
            assert!(e.count > 0);
        }
        for v in &u.values {
            assert!(
                v.name.starts_with("sessions."),
                "{} was not subscribed",
                v.name
            );
        }
        for l in &u.latencies {
            assert_eq!(l.name, "latency.request.analytics_track");
            assert!(
                l.count > 0 && l.p50 > 0.0 && l.max >= l.p99 && l.p99 >= l.p50,
                "{l:?}"
            );
        }
    }
    // Only changes: each value appears again only when it differs from the last sent.
    let mut last: HashMap<&str, f64> = HashMap::new();
    for v in seen.iter().flat_map(|u| &u.values) {
        assert_ne!(
            last.insert(&v.name, v.value),
            Some(v.value),
            "{} repeated unchanged",
            v.name
        );
    }
    assert_eq!(event_total(&seen, "signup"), 7, "each occurrence once");
    assert_eq!(event_total(&seen, "checkout"), 0);

    // Unsubscribed: nothing more arrives, even when things change.
    ops.request(request::Body::MetricsUnsubscribe(
        v1::MetricsUnsubscribeRequest {},
    ))
    .await
    .unwrap();
    alice.track(vec![event("signup", 1)]).await.unwrap();
    // An update built before the unsubscribe may still be in flight, but none may
    // carry the signup tracked after it. Five intervals without one show it.
    let mut late = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        updates_until(&ops, &mut late, |_| false),
    )
    .await;
    assert_eq!(event_total(&late, "signup"), 0, "{late:?}");
}

async fn queries_and_streams_need_the_metrics_role(t: TransportKind) {
    let s = TestServer::start().await;
    let alice = s.connect(t, "alice").await;
    alice.track(vec![event("signup", 1)]).await.unwrap();
    let bodies = [
        request::Body::MetricsSubscribe(v1::MetricsSubscribeRequest {
            all_nodes: false,
            event_types: vec!["*".into()],
            metrics: vec!["*".into()],
            interval_ms: 0,
        }),
        request::Body::AnalyticsSeries(v1::AnalyticsSeriesRequest {
            by_node: false,
            r#type: "signup".into(),
            dimension: String::new(),
            duration_ms: 60_000,
            resolution_ms: 0,
        }),
        request::Body::AnalyticsTop(v1::AnalyticsTopRequest {
            window_ms: 60_000,
            limit: 0,
        }),
        request::Body::AnalyticsDistinctUsers(v1::AnalyticsDistinctUsersRequest {
            window_ms: 60_000,
        }),
    ];
    for body in bodies {
        assert_eq!(code(alice.request(body).await), ErrorCode::PermissionDenied);
    }
    // With the role: bad names are typed errors too.
    let ops = connect_as(&s, t, "ops", &["metrics"]).await;
    let sub = |metrics: &str, types: &str| {
        request::Body::MetricsSubscribe(v1::MetricsSubscribeRequest {
            all_nodes: false,
            event_types: vec![types.into()],
            metrics: vec![metrics.into()],
            interval_ms: 0,
        })
    };
    assert_eq!(
        code(ops.request(sub("nope", "signup")).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(ops.request(sub("*", "Bad Type")).await),
        ErrorCode::BadRequest
    );
    match ops.request(sub("*", "*")).await.unwrap() {
        response::Body::MetricsSubscribe(r) => {
            assert_eq!(r.interval_ms, 1000, "the default interval");
            assert!(r.metrics.contains(&"latency.fanout".to_owned()));
            assert!(r.metrics.contains(&"bytes.in".to_owned()));
        }
        other => panic!("{other:?}"),
    }
}

/// Durations, windows and resolutions up to 2^64-1 ms, over the protocol and the
/// server API, give exact answers or a typed error, never a wrapped number or a
/// panic.
async fn huge_durations_and_resolutions_are_exact_or_refused(t: TransportKind) {
    let clock = Clock::manual(MINUTE + 1_000);
    let c2 = clock.clone();
    let s = TestServer::start_with_clock(c2, |_| {}).await;
    let ops = connect_as(&s, t, "ops", &["metrics"]).await;
    let alice = s.connect(t, "alice").await;
    alice.track(vec![event("signup", 2)]).await.unwrap();
    clock.advance(10_000);
    alice.track(vec![event("signup", 3)]).await.unwrap();
    let raw = |duration_ms: u64, resolution_ms: u64| {
        ops.request(request::Body::AnalyticsSeries(v1::AnalyticsSeriesRequest {
            by_node: false,
            r#type: "signup".into(),
            dimension: String::new(),
            duration_ms,
            resolution_ms,
        }))
    };
    // Rounded up to whole hours, 2^64-1 ms does not fit in 64 bits.
    assert_eq!(code(raw(u64::MAX, u64::MAX).await), ErrorCode::BadRequest);
    assert_eq!(code(raw(1_000, u64::MAX).await), ErrorCode::BadRequest);
    // All of time at the finest resolution is too many points.
    assert_eq!(code(raw(u64::MAX, 0).await), ErrorCode::LimitExceeded);
    // All of time as one point.
    let all = series(&ops, "signup", "", u64::MAX, 1 << 62).await;
    assert_eq!(
        all.resolution_ms,
        (1u64 << 62).div_ceil(3_600_000) * 3_600_000
    );
    assert_eq!(points(&all), [(0, 5)]);
    assert_eq!(all.total, 5);
    assert_eq!(top(&ops, u64::MAX).await, [("signup".to_string(), 5)]);
    assert_eq!(distinct(&ops, u64::MAX).await, 1);
    // 2^64 ms + 384 ms: the whole history, not the last 384 ms.
    let huge = "18446744073709552s";
    let (status, text) = s
        .api("GET", &format!("/api/v1/analytics/top?window={huge}"), None)
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, r#"[{"type":"signup","count":5}]"#);
    let (status, text) = s
        .api(
            "GET",
            &format!("/api/v1/analytics/users?window={huge}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with(r#"{"estimate":1,"#), "{text}");
    let (status, text) = s
        .api(
            "GET",
            &format!("/api/v1/analytics/series?type=signup&duration={huge}&resolution={huge}"),
            None,
        )
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("BAD_REQUEST"), "{text}");
}

async fn rate_limits_and_caps_refuse_whole_batches(t: TransportKind) {
    let clock = Clock::manual(MINUTE);
    let c2 = clock.clone();
    let s = TestServer::start_with_clock(c2, |c| {
        c.analytics.events_per_sec = 10;
        c.analytics.max_count = 5; // the burst is 2 s worth: 20
        c.analytics.max_event_types = 3;
        c.analytics.max_dimension_series = 2;
    })
    .await;
    let ops = connect_as(&s, t, "ops", &["metrics"]).await;
    let alice = s.connect(t, "alice").await;

    // Malformed input: BAD_REQUEST or LIMIT_EXCEEDED, nothing counted.
    assert_eq!(code(alice.track(vec![]).await), ErrorCode::BadRequest);
    assert_eq!(
        code(alice.track(vec![event("a", 1), event("Bad!", 1)]).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(alice.track(vec![event("a", 6)]).await),
        ErrorCode::LimitExceeded
    );
    let mut many = event("a", 1);
    for i in 0..5 {
        many.dimensions.insert(format!("k{i}"), "v".into());
    }
    assert_eq!(
        code(alice.track(vec![many]).await),
        ErrorCode::LimitExceeded
    );
    assert_eq!(
        code(alice.track(vec![with_dim("a", "k", &"x".repeat(65))]).await),
        ErrorCode::LimitExceeded
    );
    assert_eq!(
        code(alice.track(vec![with_dim("a", "K", "x")]).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(alice.track(vec![event("a", 1); 101]).await),
        ErrorCode::LimitExceeded
    );

    // The rate: 20 at once, then nothing until the clock moves.
    assert_eq!(alice.track(vec![event("a", 5); 4]).await.unwrap(), 20);
    assert_eq!(
        code(alice.track(vec![event("a", 1)]).await),
        ErrorCode::RateLimited
    );
    clock.advance(500);
    assert_eq!(
        code(alice.track(vec![event("a", 5), event("a", 1)]).await),
        ErrorCode::RateLimited,
        "5 refilled, 6 asked"
    );
    assert_eq!(alice.track(vec![event("a", 5)]).await.unwrap(), 5);
    // The limit is per connection.
    let bob = s.connect(t, "bob").await;
    assert_eq!(
        bob.track(vec![event("b", 1), event("c", 1)]).await.unwrap(),
        2
    );

    // Caps: a fourth type, a third dimension value.
    assert_eq!(
        code(bob.track(vec![event("d", 1)]).await),
        ErrorCode::LimitExceeded
    );
    bob.track(vec![
        with_dim("b", "plan", "free"),
        with_dim("b", "plan", "pro"),
    ])
    .await
    .unwrap();
    assert_eq!(
        code(bob.track(vec![with_dim("b", "plan", "team")]).await),
        ErrorCode::LimitExceeded
    );
    assert_eq!(
        code(
            bob.track(vec![event("c", 1), with_dim("b", "plan", "team")])
                .await
        ),
        ErrorCode::LimitExceeded
    );

    // Exactly what was accepted was counted.
    assert_eq!(
        top(&ops, 60_000).await,
        [
            ("a".to_owned(), 25),
            ("b".to_owned(), 3),
            ("c".to_owned(), 1)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_event_types_are_refused_when_types_are_configured() {
    let s = TestServer::start_with(|c| c.analytics.event_types = vec!["signup".into()]).await;
    let alice = s.connect(TransportKind::Quic, "alice").await;
    assert_eq!(alice.track(vec![event("signup", 1)]).await.unwrap(), 1);
    assert_eq!(
        code(
            alice
                .track(vec![event("signup", 1), event("other", 1)])
                .await
        ),
        ErrorCode::UnknownEventType
    );
    let (status, body) = s
        .api(
            "POST",
            "/api/v1/events",
            Some(r#"{"events":[{"type":"other"}]}"#),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("UNKNOWN_EVENT_TYPE"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_from_the_server_api_survive_a_restart() {
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let clock = Clock::manual(MINUTE + 1_000);
        let dir = tempfile::tempdir().unwrap();
        let config = support::test_config(dir.path());
        let start = |config| tutti::server::start_with_clock(config, clock.clone());
        let mut s = TestServer { server: Some(start(config.clone()).await.unwrap()), dir };

        // Backends: the API key, users named per event.
        let body = r#"{"events":[
            {"type":"order.paid","count":3,"user":"u1","dimensions":{"plan":"pro"}},
            {"type":"order.paid","user":"u2"},
            {"type":"signup","count":2,"user":"u3"}]}"#;
        let (status, text) = s.api("POST", "/api/v1/events", Some(body)).await;
        assert_eq!((status, text.as_str()), (200, r#"{"accepted":6}"#));
        clock.advance(2 * 60_000); // two minutes later, in the same hour
        let (status, _) = s
            .api("POST", "/api/v1/events", Some(r#"{"events":[{"type":"order.paid","user":"u1"}]}"#))
            .await;
        assert_eq!(status, 200);
        // Bad input: typed errors, nothing counted.
        for (body, want) in [
            (r#"{"events":[{"type":"Nope"}]}"#, 400),
            (r#"{"events":[{"type":"x","dimensions":{"a":"1","b":"2","c":"3","d":"4","e":"5"}}]}"#, 413),
            (r#"{"events":[{"type":"x","count":1001}]}"#, 413),
            (r#"{"events":"nope"}"#, 400),
        ] {
            let (status, text) = s.api("POST", "/api/v1/events", Some(body)).await;
            assert_eq!(status, want, "{body}: {text}");
        }
        let (status, _) = support::http(s.server().http_addr(), "POST", "/api/v1/events", Some(r#"{"events":[{"type":"x"}]}"#)).await;
        assert_eq!(status, 401, "no API key");

        s.shutdown().await; // flushes what is pending
        clock.advance(3_600_000); // an hour later: the fine window is gone
        s.server = Some(start(config).await.unwrap());

        let (status, text) = s
            .api("GET", "/api/v1/analytics/series?type=order.paid&duration=2h&resolution=1h", None)
            .await;
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["total"], 5);
        assert_eq!(v["resolution_ms"], 3_600_000);
        assert_eq!(v["points"], serde_json::json!([[MINUTE - 3_600_000, 0], [MINUTE, 5], [MINUTE + 3_600_000, 0]]));
        let (_, text) = s
            .api("GET", "/api/v1/analytics/series?type=order.paid&duration=70m&resolution=1m", None)
            .await;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["total"], 5);
        let pts = v["points"].as_array().unwrap();
        assert!(pts.contains(&serde_json::json!([MINUTE, 4])), "{text}");
        assert!(pts.contains(&serde_json::json!([MINUTE + 120_000, 1])), "{text}");
        let (_, text) = s
            .api("GET", "/api/v1/analytics/series?type=order.paid&dimension=plan%3Dpro&duration=2h&resolution=1h", None)
            .await;
        assert!(text.contains(r#""total":3"#), "{text}");
        let (_, text) = s.api("GET", "/api/v1/analytics/top?window=2h", None).await;
        assert_eq!(text, r#"[{"type":"order.paid","count":5},{"type":"signup","count":2}]"#);
        let (_, text) = s.api("GET", "/api/v1/analytics/users?window=2h", None).await;
        assert!(text.starts_with(r#"{"estimate":3,"#), "{text}");
        // The fine window is in memory only: empty after the restart.
        let (_, text) = s.api("GET", "/api/v1/analytics/top?window=10m", None).await;
        assert_eq!(text, "[]");
        s.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_text_parses_with_every_family_documented() {
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let s = TestServer::start().await;
        let alice = s.connect(TransportKind::Quic, "alice").await;
        let bob = s.connect(TransportKind::WebTransport, "bob").await;
        alice.track(vec![event("signup", 1)]).await.unwrap();
        bob.echo(b"x".to_vec(), true).await.unwrap();
        // The push stream is opened after the reply; wait until it arrives.
        assert!(matches!(bob.next_event().await, Some(Event::Push(..))));
        alice.ping_datagram().await.ok();
        let (status, text) = s.http_get("/metrics").await;
        assert_eq!(status, 200);

        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("valid Prometheus text");
        let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
            let s = scrape
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .unwrap_or_else(|| panic!("no sample {name} {label:?}"));
            match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name}: {other:?}"),
            }
        };
        assert_eq!(
            value("tutti_sessions_active", Some(("transport", "quic"))),
            1.0
        );
        assert_eq!(
            value("tutti_sessions_active", Some(("transport", "webtransport"))),
            1.0
        );
        assert_eq!(value("tutti_connections_open", None), 2.0);
        assert!(
            value("tutti_streams_opened_total", None) >= 3.0,
            "2 control streams and a push stream"
        );
        let summary = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "tutti_request_seconds"
                    && s.labels.get("request") == Some("analytics_track")
            })
            .expect("the request summary");
        match &summary.value {
            prometheus_parse::Value::Summary(qs) => {
                assert_eq!(
                    qs.iter().map(|q| q.quantile).collect::<Vec<_>>(),
                    [0.5, 0.9, 0.99, 0.999]
                );
                assert!(
                    qs.iter().all(|q| q.count > 0.0 && q.count < 1.0),
                    "seconds: {qs:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric == "tutti_fanout_seconds")
        );

        // Every family has HELP and TYPE, and docs/OPERATIONS.md names each.
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/OPERATIONS.md"))
                .unwrap();
        let families: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert!(families.len() >= 20, "{families:?}");
        for f in families {
            assert!(scrape.docs.contains_key(f), "{f} has no HELP");
            assert!(
                doc.contains(&format!("`{f}`")),
                "docs/OPERATIONS.md does not document {f}"
            );
        }
        // The bytes counters are sampled at the end of each connection too.
        drop(alice);
        drop(bob);
    })
    .await
    .expect("test timed out");
}
